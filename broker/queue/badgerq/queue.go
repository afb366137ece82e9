// Package queue keeps durable per-user message queues in Badger.
//
// Guarantees: a message passed to Append is on disk (per the sync mode)
// before its Done callback reports Stored; messages of one user are
// numbered in the order they were committed; a message stays until every
// device of its user has acknowledged it (at least once), or until it
// expires. Acknowledgements are persisted lazily, every AckFlushInterval:
// a crash may redeliver a few acknowledged messages, never lose one.
package badgerq

import (
	"errors"
	"fmt"
	"github.com/chatd/chatd/broker/queue"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/dgraph-io/ristretto/v2/z"

	"github.com/chatd/chatd/config"
)

// Options configures a Store.
type Options struct {
	// Dir is the Badger directory.
	Dir string
	// Queue holds the sync mode, TTLs and caps.
	Queue config.Queue
	// Logger receives background errors.
	Logger *slog.Logger
	// OnCommit, if set, is told the size and duration of every group commit.
	OnCommit func(messages int, took time.Duration)
	// Now is the clock of device_ttl, message_ttl and last-seen times;
	// nil means time.Now. Tests move it forward instead of waiting.
	Now func() time.Time
}

// Store is the set of all users' queues.
type Store struct {
	db     *badger.DB
	opts   Options
	log    *slog.Logger
	reqs   chan *queue.Request
	users  sync.Map // user ID -> *userQueue
	dirtyM sync.Mutex
	dirty  map[*userQueue]struct{}
	// ctl runs maintenance asked for by Flush and ForgetUnseen on the
	// committer goroutine, which owns flushes.
	ctl    chan func()
	stop   chan struct{}
	wg     sync.WaitGroup
	closed sync.Once
	// crashed skips the last flush on Close, as a crash would (tests).
	crashed atomic.Bool
	// closeErr is what the last flush on Close failed to persist.
	closeErr error
	stats    queue.Counters
	// free and lowDisk are the last reading of the disk watch.
	free    atomic.Int64
	lowDisk atomic.Bool
}

// Stats returns the store's running totals.
func (s *Store) Stats() queue.Stats { return s.stats.Stats() }

// Undelivered returns how many stored messages some device has yet to
// acknowledge, over all users (including expired ones not yet noticed).
func (s *Store) Undelivered() uint64 { return s.Stats().Undelivered() }

// Badger sizes; see Open.
const (
	memTableSize   = 16 << 20
	blockCacheSize = 64 << 20
	// maxBatchBytes keeps one commit well under Badger's transaction
	// limit, a fraction of the memtable size.
	maxBatchBytes = 1 << 20
)

// Open opens or creates the queue store in opts.Dir and starts its committer.
func Open(opts Options) (*Store, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	bo := badger.DefaultOptions(opts.Dir).
		WithLogger(badgerLogger{opts.Logger}).
		WithSyncWrites(opts.Queue.Sync == config.SyncAlways).
		WithDetectConflicts(false).
		WithNumVersionsToKeep(1).
		WithCompactL0OnClose(true).
		// Small memtables: a queue's entries live briefly, inserts into a
		// smaller skiplist are cheaper, and the server's memory stays low.
		WithMemTableSize(memTableSize).
		// Reads happen only when a device drains a backlog from disk.
		WithBlockCacheSize(blockCacheSize)
	db, err := badger.Open(bo)
	if err != nil && strings.Contains(err.Error(), z.NewFile.Error()) {
		// A crash between creating a memtable file and its first write leaves
		// an empty .mem file that fails the first open and not the second
		// (dgraph-io/badger#2207). Badger flattens the error to text, so
		// errors.Is cannot see the sentinel.
		opts.Logger.Warn("reopening queue after an interrupted memtable creation", "dir", opts.Dir)
		db, err = badger.Open(bo)
	}
	if err != nil {
		return nil, fmt.Errorf("open queue %s: %w", opts.Dir, err)
	}
	s := &Store{
		db:    db,
		opts:  opts,
		log:   opts.Logger,
		reqs:  make(chan *queue.Request, 16384),
		ctl:   make(chan func()),
		dirty: make(map[*userQueue]struct{}),
		stop:  make(chan struct{}),
	}
	s.checkDisk()
	s.wg.Add(2)
	go s.commitLoop()
	go s.maintenanceLoop()
	return s, nil
}

// Append queues r for the committer; r.Done reports the outcome. It blocks
// only when the committer is saturated, which slows that publisher alone.
func (s *Store) Append(r *queue.Request) {
	s.reqs <- r
}

// Close stores what was already appended, persists acknowledgements and
// closes Badger. Append must not be called after Close.
func (s *Store) Close() error {
	var err error
	s.closed.Do(func() {
		close(s.stop)
		s.wg.Wait()
		err = s.closeErr
		if e := s.db.Sync(); e != nil {
			err = errors.Join(err, fmt.Errorf("sync queue: %w", e))
		}
		if e := s.db.Close(); e != nil {
			err = errors.Join(err, fmt.Errorf("close queue: %w", e))
		}
	})
	return err
}

// Read returns up to max messages of user with Seq > after, in order,
// leaving out those past message_ttl.
func (s *Store) Read(user string, after uint64, max int) ([]queue.Message, error) {
	var out []queue.Message
	now := uint64(s.opts.Now().Unix())
	err := s.db.View(func(txn *badger.Txn) error {
		io := badger.DefaultIteratorOptions
		io.Prefix = msgPrefix(user)
		io.PrefetchSize = min(max, 256)
		it := txn.NewIterator(io)
		defer it.Close()
		for it.Seek(msgKey(user, after+1)); it.Valid() && len(out) < max; it.Next() {
			item := it.Item()
			if expired(item, now) {
				continue
			}
			v, err := item.ValueCopy(nil)
			if err != nil {
				return fmt.Errorf("read value: %w", err)
			}
			meta, data, err := decodeValue(v)
			if err != nil {
				return fmt.Errorf("message %d: %w", seqOf(item.Key()), err)
			}
			out = append(out, queue.Message{Seq: seqOf(item.Key()), Meta: meta, Data: data})
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read queue of %s after %d: %w", user, after, err)
	}
	return out, nil
}

// expired reports a message past its message_ttl at now (Unix seconds).
// Badger hides expired entries by the wall clock; this check makes the
// store follow Options.Now as well.
func expired(item *badger.Item, now uint64) bool {
	exp := item.ExpiresAt()
	return exp != 0 && exp <= now
}

// Attach registers a connection of a device of user and returns the
// device's cursor, the last sequence it has acknowledged, and whether it
// subscribed to its inbox on an earlier connection. A device new to the
// store gets everything queued when the user has no persistent device
// (so a user's first persistent device receives the whole backlog, even
// beside transient ones), and what arrives from then on otherwise. A
// transient device is forgotten when its last connection detaches; Attach
// and Detach are counted, so every Attach must be matched by one Detach.
func (s *Store) Attach(user, device string, transient bool) (cursor uint64, subscribed bool, err error) {
	u, err := s.lockUser(user)
	if err != nil {
		return 0, false, err
	}
	defer u.mu.Unlock()
	now := s.opts.Now().Unix()
	if d, ok := u.devices[device]; ok {
		if d.transient && !transient {
			// A transient device reconnecting with a persistent session
			// becomes persistent: its record is written now, as for a
			// new device.
			r := d.record
			r.seen = now
			if !u.hasPersistent() {
				// The user's first persistent device: the backlog too, even
				// what it went past as a transient device.
				r.cursor = min(r.cursor, u.tail-1)
			}
			if err := s.saveDevice(user, device, r); err != nil {
				return 0, false, err
			}
			d.record, d.saved = r, r
		}
		d.seen = now
		d.online++
		d.transient = d.transient && transient
		return d.cursor, d.subscribed, nil
	}
	r := record{cursor: u.head, seen: now}
	if !u.hasPersistent() {
		r.cursor = u.tail - 1
	}
	d := &deviceState{record: r, transient: transient, online: 1}
	if !transient {
		// Persisted now, not lazily: a device that crashed before its record
		// was written would come back as "new" and skip what it was sent.
		if err := s.saveDevice(user, device, r); err != nil {
			return 0, false, err
		}
		d.saved = r
	}
	u.unforget(device)
	u.devices[device] = d
	return r.cursor, false, nil
}

// saveDevice writes a device record at once.
func (s *Store) saveDevice(user, device string, r record) error {
	err := s.db.Update(func(txn *badger.Txn) error {
		return txn.Set(deviceKey(user, device), r.encode())
	})
	if err != nil {
		return fmt.Errorf("register device %s/%s: %w", user, device, err)
	}
	return nil
}

// MayAttach reports whether device of user may connect: it is known, or
// the user has fewer than max_devices devices.
func (s *Store) MayAttach(user, device string) (bool, error) {
	u, err := s.lockUser(user)
	if err != nil {
		return false, err
	}
	defer u.mu.Unlock()
	_, known := u.devices[device]
	return known || len(u.devices) < s.opts.Queue.MaxDevices, nil
}

// Cursor returns the last sequence device of user has acknowledged.
func (s *Store) Cursor(user, device string) (uint64, error) {
	u, err := s.lockUser(user)
	if err != nil {
		return 0, err
	}
	defer u.mu.Unlock()
	d, ok := u.devices[device]
	if !ok {
		return 0, fmt.Errorf("device %s/%s is not registered", user, device)
	}
	return d.cursor, nil
}

// SetSubscribed records whether a device of user is subscribed to its
// inbox; it is persisted within AckFlushInterval.
func (s *Store) SetSubscribed(user, device string, subscribed bool) {
	s.updateDevice(user, device, func(d *deviceState) { d.subscribed = subscribed })
}

// Ack records that device of user has acknowledged every message up to and
// including cursor. It is persisted within AckFlushInterval.
func (s *Store) Ack(user, device string, cursor uint64) {
	s.updateDevice(user, device, func(d *deviceState) { d.cursor = max(d.cursor, cursor) })
}

// Detach records that a connection of device of user ended; a transient
// device is forgotten when its last connection ends.
func (s *Store) Detach(user, device string) {
	u, err := s.lockUser(user)
	if err != nil {
		s.log.Error("detach", "user", user, "error", err)
		return
	}
	if d, ok := u.devices[device]; ok {
		d.online = max(d.online-1, 0)
		switch {
		case d.online > 0:
		case d.transient:
			delete(u.devices, device)
		default:
			d.seen = s.opts.Now().Unix()
		}
	}
	u.mu.Unlock()
	s.markDirty(u)
}

// Flush persists acknowledgements and deletes what every device has
// acknowledged now, instead of at the next AckFlushInterval, and returns
// what failed. After Close it does nothing.
func (s *Store) Flush() error {
	var err error
	s.onCommitter(func() { err = s.flush() })
	return err
}

// ForgetUnseen forgets, now, the offline devices unseen for device_ttl by
// the store's clock, as the periodic sweep does, and persists that.
// After Close it does nothing.
func (s *Store) ForgetUnseen() error {
	var err error
	s.onCommitter(func() {
		s.forgetUnseenDevices(s.opts.Now())
		err = s.flush()
	})
	return err
}

// onCommitter runs f on the committer goroutine and waits for it; after
// Close it does nothing.
func (s *Store) onCommitter(f func()) {
	done := make(chan struct{})
	select {
	case s.ctl <- func() { f(); close(done) }:
		<-done
	case <-s.stop:
	}
}

// updateDevice changes a known device's record and schedules its flush.
func (s *Store) updateDevice(user, device string, change func(*deviceState)) {
	u, err := s.lockUser(user)
	if err != nil {
		s.log.Error("update device", "user", user, "device", device, "error", err)
		return
	}
	d, ok := u.devices[device]
	if ok {
		change(d)
	}
	u.mu.Unlock()
	if ok {
		s.markDirty(u)
	}
}

// Depth returns how many messages of user are stored and not yet deleted.
func (s *Store) Depth(user string) (uint64, error) {
	u, err := s.lockUser(user)
	if err != nil {
		return 0, err
	}
	defer u.mu.Unlock()
	return u.head - u.deleted, nil
}

// Head returns the last sequence of user's queue that is durable.
func (s *Store) Head(user string) (uint64, error) {
	u, err := s.lockUser(user)
	if err != nil {
		return 0, err
	}
	defer u.mu.Unlock()
	return u.committed, nil
}

// DB returns the Badger database, for the server's other small records
// (presence, groups) under their own key prefixes, listed in keys.go.
func (s *Store) DB() *badger.DB { return s.db }

// DiskSize returns Badger's LSM and value-log sizes in bytes.
func (s *Store) DiskSize() (lsm, vlog int64) { return s.db.Size() }

func (s *Store) markDirty(u *userQueue) {
	s.dirtyM.Lock()
	s.dirty[u] = struct{}{}
	s.dirtyM.Unlock()
}

// badgerLogger routes Badger's logs to slog, keeping its chatty info lines at debug.
type badgerLogger struct{ l *slog.Logger }

func (b badgerLogger) Errorf(f string, a ...any)   { b.l.Error(fmt.Sprintf("badger: "+f, a...)) }
func (b badgerLogger) Warningf(f string, a ...any) { b.l.Warn(fmt.Sprintf("badger: "+f, a...)) }
func (b badgerLogger) Infof(f string, a ...any)    { b.l.Debug(fmt.Sprintf("badger: "+f, a...)) }
func (b badgerLogger) Debugf(f string, a ...any)   { b.l.Debug(fmt.Sprintf("badger: "+f, a...)) }

// TryAppend queues r unless the committer is saturated; it never blocks,
// so the committer's own callbacks may use it.
func (s *Store) TryAppend(r *queue.Request) bool {
	select {
	case s.reqs <- r:
		return true
	default:
		return false
	}
}
