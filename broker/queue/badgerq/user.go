package badgerq

import (
	"context"
	"fmt"

	"github.com/dgraph-io/badger/v4"

	"github.com/chatd/chatd/broker/queue/devices"
)

// userQueue is the in-memory index of one user's queue, kept in the
// device registry's User beside the user's devices; the messages
// themselves live only in Badger.
type userQueue struct {
	// head is the last sequence assigned; committed the last one durable;
	// tail is the lowest that may still be stored; every sequence <=
	// deleted has been deleted.
	head, committed, tail, deleted uint64
}

// user is one user's devices and queue index.
type user = devices.User[userQueue]

// deviceAPI is the registry's methods, as the Store offers them.
type deviceAPI = devices.API[userQueue]

// written is the revision of every device record in Badger, which keeps
// one version of each and writes without compare-and-set.
const written = 1

// persister keeps the device records in Badger (keys.go) and loads each
// user's queue index, for the device registry.
type persister struct{ s *Store }

// Context returns no bound: Badger's calls are local.
func (persister) Context() (context.Context, context.CancelFunc) {
	return context.Background(), func() {}
}

// Load reads a user's queue bounds and device records. The head is the
// larger of the last stored message and the largest cursor, so that a
// queue emptied by deletion never reuses a sequence a device has already
// acknowledged.
func (p persister) Load(_ context.Context, name string) (map[string]devices.Stored, userQueue, error) {
	s := p.s
	var first, last uint64
	recs := make(map[string]devices.Stored)
	now := uint64(s.opts.Now().Unix())
	err := s.db.View(func(txn *badger.Txn) error {
		first = firstLive(txn, name, 1, now)

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
			r, ok := devices.DecodeRecord(v)
			if !ok {
				return fmt.Errorf("device record %s/%s is corrupt (%d bytes)", name, device, len(v))
			}
			recs[device] = devices.Stored{Record: r, Rev: written}
		}
		return nil
	})
	if err != nil {
		return nil, userQueue{}, fmt.Errorf("load queue of %s: %w", name, err)
	}
	q := userQueue{head: last}
	for _, st := range recs {
		q.head = max(q.head, st.Record.Cursor)
	}
	q.committed = q.head
	if first == 0 {
		q.tail = q.head + 1
	} else {
		q.tail = first
	}
	q.deleted = q.tail - 1
	return recs, q, nil
}

// Start returns a new device's cursor: before the first message kept
// for the backlog, the head otherwise.
func (persister) Start(_ context.Context, u *user, backlog bool) (uint64, error) {
	if backlog {
		return u.Queue.tail - 1, nil
	}
	return u.Queue.head, nil
}

// Create writes a device's record at once.
func (p persister) Create(_ context.Context, user, device string, r devices.Record) (uint64, error) {
	err := p.s.db.Update(func(txn *badger.Txn) error {
		return txn.Set(deviceKey(user, device), r.Encode())
	})
	if err != nil {
		return 0, fmt.Errorf("write device record: %w", err)
	}
	return written, nil
}

// Update writes a device's record at once, whatever was there.
func (p persister) Update(ctx context.Context, user, device string, r devices.Record, _ uint64) (uint64, error) {
	return p.Create(ctx, user, device, r)
}

// Idle reports whether Badger holds all of u's index: every staged
// message committed, and every message all devices acknowledged deleted.
func (persister) Idle(u *user) bool {
	if u.Queue.committed != u.Queue.head {
		return false
	}
	low, ok := u.MinCursor()
	return !ok || low <= u.Queue.deleted
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

// undelivered counts the messages some device has yet to acknowledge,
// including expired ones not yet skipped. Acknowledged messages awaiting
// their lazy deletion do not count. Called with u locked.
func undelivered(u *user) uint64 {
	low := u.Queue.deleted
	if m, ok := u.MinCursor(); ok && m > low {
		low = m
	}
	return u.Queue.head - low
}
