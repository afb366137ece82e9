package badgerq

import (
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/dgraph-io/badger/v4"
)

// userQueue is the in-memory index of one user's queue; the messages
// themselves live only in Badger.
type userQueue struct {
	name string
	mu   sync.Mutex
	// head is the last sequence assigned; committed the last one durable;
	// tail is the lowest that may still be stored; every sequence <= deleted
	// has been deleted.
	head, committed, tail, deleted uint64
	devices                        map[string]*deviceState
	// forgotten lists devices unseen for device_ttl whose records the next flush deletes.
	forgotten []string
	// evicted is set when the index is dropped from memory: whoever finds
	// it so loads the user again (lockUser).
	evicted bool
	// used is set whenever the index is locked, and cleared by each
	// eviction pass: one that finds it clear evicts the index.
	used bool
}

// deviceState is one device's record, and what of it is on disk.
type deviceState struct {
	record
	saved     record
	transient bool
	forget    bool
	// online counts the device's open connections (a takeover briefly has two).
	online int
}

// user returns the queue index of name, loading it. The index is put in
// the map locked, before it is read from Badger, so that there is only
// ever one: callers that find it wait on its mutex for the load, and no
// second load's older snapshot can replace it after an eviction.
func (s *Store) user(name string) (*userQueue, error) {
	if v, ok := s.users.Load(name); ok {
		return v.(*userQueue), nil
	}
	u := &userQueue{name: name, devices: make(map[string]*deviceState)}
	u.mu.Lock()
	defer u.mu.Unlock()
	if v, loaded := s.users.LoadOrStore(name, u); loaded {
		return v.(*userQueue), nil
	}
	if err := s.load(u); err != nil {
		u.evicted = true
		s.users.CompareAndDelete(name, u)
		return nil, err
	}
	return u, nil
}

// lockUser returns the loaded queue index of name, locked, loading it
// again if it was evicted meanwhile.
func (s *Store) lockUser(name string) (*userQueue, error) {
	for {
		u, err := s.user(name)
		if err != nil {
			return nil, err
		}
		u.mu.Lock()
		if !u.evicted {
			u.used = true
			return u, nil
		}
		u.mu.Unlock()
	}
}

// Loaded returns how many users' queue indexes are in memory: those with
// a device connected, or something not yet flushed.
func (s *Store) Loaded() int {
	n := 0
	s.users.Range(func(_, _ any) bool { n++; return true })
	return n
}

// EvictIdle drops from memory, now, every user with nothing that lives
// only there (see evictIdle), however recently it was used; the committer
// does the same every evictEvery for users unused since its last pass. After
// Close it does nothing.
func (s *Store) EvictIdle() {
	s.onCommitter(func() { s.evictIdleUsers(true) })
}

// Users unused for a whole evictEvery are dropped from memory at its end:
// soon enough that memory follows the users in use, not every user ever
// addressed, late enough that a user who keeps receiving is not loaded
// again for every message.
const evictEvery = time.Minute

// evictIdleUsers evicts the idle users: all of them, or those not used
// since the last pass; on the committer goroutine.
func (s *Store) evictIdleUsers(all bool) {
	s.users.Range(func(_, v any) bool {
		s.evictIdle(v.(*userQueue), all)
		return true
	})
}

// evictIdle drops u from memory when nothing of it lives only there (no
// device connected, every record saved, nothing to delete or forget,
// nothing staged) and, unless all, it was not used since the last pass.
// Reloading it from Badger gives the same index. Runs on the committer
// goroutine, so no append is half staged.
func (s *Store) evictIdle(u *userQueue, all bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	used := u.used
	u.used = false // a second chance: the next pass evicts it if unused
	if u.evicted || used && !all || len(u.forgotten) > 0 || u.committed != u.head {
		return
	}
	for _, d := range u.devices {
		if d.online > 0 || d.record != d.saved {
			return
		}
	}
	if low, ok := u.minCursor(); ok && low > u.deleted {
		return
	}
	s.dirtyM.Lock()
	_, dirty := s.dirty[u]
	s.dirtyM.Unlock()
	if dirty {
		return
	}
	u.evicted = true
	s.users.CompareAndDelete(u.name, u)
}

// load reads a user's queue bounds and devices into u, locked and not yet
// loaded. The head is the larger of the last stored message and the
// largest cursor, so that a queue emptied by deletion never reuses a
// sequence a device has already acknowledged.
func (s *Store) load(u *userQueue) error {
	name := u.name
	var first, last uint64
	now := s.opts.Now()
	unseen := now.Add(-s.opts.Queue.DeviceTTL).Unix()
	err := s.db.View(func(txn *badger.Txn) error {
		first = firstLive(txn, name, 1, uint64(now.Unix()))

		io := badger.DefaultIteratorOptions
		io.PrefetchValues = false
		io.Prefix = msgPrefix(name)
		io.Reverse = true
		it := txn.NewIterator(io)
		it.Seek(msgKey(name, ^uint64(0)))
		if it.Valid() {
			last = seqOf(it.Item().Key())
		}
		it.Close()

		dio := badger.DefaultIteratorOptions
		dio.Prefix = devicePrefix(name)
		it = txn.NewIterator(dio)
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			item := it.Item()
			device := string(item.Key()[len(dio.Prefix):])
			v, err := item.ValueCopy(nil)
			if err != nil {
				return fmt.Errorf("read device %s: %w", device, err)
			}
			r, ok := decodeRecord(v)
			if !ok {
				return fmt.Errorf("device record %s/%s is corrupt (%d bytes)", name, device, len(v))
			}
			d := &deviceState{record: r, saved: r}
			if r.seen < unseen {
				d.forget = true
			}
			u.devices[device] = d
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("load queue of %s: %w", name, err)
	}
	u.head = last
	for _, d := range u.devices {
		u.head = max(u.head, d.cursor)
	}
	u.committed = u.head
	if first == 0 {
		u.tail = u.head + 1
	} else {
		u.tail = first
	}
	u.deleted = u.tail - 1
	for device, d := range u.devices {
		if d.forget {
			u.forgotten = append(u.forgotten, device)
			delete(u.devices, device)
		}
	}
	if len(u.forgotten) > 0 {
		s.markDirty(u)
	}
	u.used = true
	return nil
}

// firstLive returns the sequence of user's first message from seq on that
// is not past message_ttl at now (Unix seconds), 0 if there is none.
func firstLive(txn *badger.Txn, user string, seq, now uint64) uint64 {
	io := badger.DefaultIteratorOptions
	io.PrefetchValues = false
	io.Prefix = msgPrefix(user)
	it := txn.NewIterator(io)
	defer it.Close()
	for it.Seek(msgKey(user, seq)); it.Valid(); it.Next() {
		if !expired(it.Item(), now) {
			return seqOf(it.Item().Key())
		}
	}
	return 0
}

// hasPersistent reports whether the user has a device that is not
// transient; called with u.mu held.
func (u *userQueue) hasPersistent() bool {
	for _, d := range u.devices {
		if !d.transient {
			return true
		}
	}
	return false
}

// unforget drops name from the records the next flush deletes, for a
// device that came back before it; called with u.mu held.
func (u *userQueue) unforget(name string) {
	u.forgotten = slices.DeleteFunc(u.forgotten, func(f string) bool { return f == name })
}

// minCursor is the sequence every device has acknowledged; ok is false
// when the user has no persistent device. A transient device holds
// messages back while it is connected, but it cannot release them alone:
// they wait for the user's first persistent device.
func (u *userQueue) minCursor() (uint64, bool) {
	if !u.hasPersistent() {
		return 0, false
	}
	m := ^uint64(0)
	for _, d := range u.devices {
		m = min(m, d.cursor)
	}
	return m, true
}

// undelivered counts the messages some device has yet to acknowledge,
// including expired ones not yet skipped. Acknowledged messages awaiting
// their lazy deletion do not count. Called with u.mu held.
func (u *userQueue) undelivered() uint64 {
	low := u.deleted
	if m, ok := u.minCursor(); ok && m > low {
		low = m
	}
	return u.head - low
}
