// Package badgerq keeps the durable per-user message queues of
// broker/queue in Badger, on one node.
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
	"io/fs"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/dgraph-io/badger/v4/options"
	"github.com/dgraph-io/ristretto/v2/z"

	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/queue/devices"
)

// Sync says when a commit is made durable relative to its Done.
type Sync int

// Sync modes.
const (
	// SyncAlways fsyncs every commit before its Done: survives power loss.
	SyncAlways Sync = iota
	// SyncBatch writes every commit to the OS before its Done and fsyncs
	// every SyncInterval: survives a process crash, loses at most
	// SyncInterval on power loss.
	SyncBatch
	// SyncNone writes every commit to the OS before its Done and never
	// fsyncs: survives a process crash only.
	SyncNone
)

// Options configures a Store.
type Options struct {
	// Dir is the Badger directory.
	Dir string
	// Settings are the TTLs, caps, flush interval and batch size; a zero
	// field means its default.
	Settings queue.Settings
	// Sync says when commits are fsynced; SyncBatch needs SyncInterval.
	Sync Sync
	// SyncInterval is how often SyncBatch fsyncs.
	SyncInterval time.Duration
	// MinFreeBytes is the free space of Dir's file system below which
	// new messages are refused (queue.ErrNoSpace).
	MinFreeBytes int64
	// Logger receives background errors.
	Logger *slog.Logger
	// OnCommit, if set, is told the size and duration of every group commit.
	OnCommit func(messages int, took time.Duration)
	// OnDeleted, if set, is told of the messages every device acknowledged
	// once they are deleted.
	OnDeleted queue.DeletedFunc
	// Now is the clock of device_ttl, message_ttl and last-seen times;
	// nil means time.Now. Tests move it forward instead of waiting.
	Now func() time.Time
}

// Store is the set of all users' queues.
type Store struct {
	// deviceAPI gives the Store the device methods of queue.Store
	// (MayAttach, Attach, Cursor, SetSubscribed, Ack, Detach) and Flush,
	// ForgetUnseen, Loaded and EvictIdle.
	deviceAPI
	// reg is the device registry and each user's queue index; the
	// committer goroutine owns its flushes (reg.Control).
	reg    *devices.Registry[userQueue]
	db     *badger.DB
	opts   Options
	log    *slog.Logger
	reqs   chan *queue.Request
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
	memTableSize = 8 << 20
	numMemtables = 3
	// numLevelZeroTables keeps as much in level 0 as 5 tables of 16 MiB.
	numLevelZeroTables = 10
	blockCacheSize     = 8 << 20
	// maxBatchBytes keeps one commit well under Badger's transaction
	// limit, a fraction of the memtable size.
	maxBatchBytes = 1 << 20
)

// memTableFor returns the memtable size to open dir with: memTableSize,
// or more when dir holds a memtable log written with bigger memtables
// (by an earlier version, or by this function after a crash). Badger
// replays each log into a memtable of the configured size and stops the
// process when one does not fit; a log file is twice its memtable's size.
func memTableFor(dir string) (int64, error) {
	size := int64(memTableSize)
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return size, nil
	}
	if err != nil {
		return 0, fmt.Errorf("list memtable logs: %w", err)
	}
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".mem") {
			continue
		}
		info, err := e.Info()
		if err != nil {
			return 0, fmt.Errorf("memtable log %s: %w", e.Name(), err)
		}
		size = max(size, info.Size()/2)
	}
	return size, nil
}

// Open opens or creates the queue store in opts.Dir and starts its committer.
func Open(opts Options) (*Store, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	opts.Settings = opts.Settings.WithDefaults()
	memTable, sizeErr := memTableFor(opts.Dir)
	if sizeErr != nil {
		return nil, fmt.Errorf("open queue %s: %w", opts.Dir, sizeErr)
	}
	if memTable > memTableSize {
		opts.Logger.Info("queue memtables sized for the logs of an earlier run with larger ones, until they are flushed",
			"dir", opts.Dir, "memtable_bytes", memTable)
	}
	bo := badger.DefaultOptions(opts.Dir).
		WithLogger(badgerLogger{opts.Logger}).
		WithSyncWrites(opts.Sync == SyncAlways).
		WithDetectConflicts(false).
		WithNumVersionsToKeep(1).
		WithCompactL0OnClose(true).
		// Small memtables, and few: a queue's entries live briefly, inserts
		// into a smaller skiplist are cheaper, and the server's memory stays
		// low (each memtable is an arena on the heap and a mapped log file
		// of twice its size).
		WithMemTableSize(memTable).
		WithNumMemtables(numMemtables).
		// Many small level-0 tables rather than few big ones: most
		// messages are deleted while still in level 0, where a compaction
		// drops them together with their tombstones instead of pushing
		// both down the tree.
		WithNumLevelZeroTables(numLevelZeroTables).
		WithNumLevelZeroTablesStall(2 * numLevelZeroTables).
		// A queue's entries are short-lived and small: compressing each
		// table as the memtable is flushed costs CPU and, in the table
		// builder's buffers, most of the heap under load, to save disk
		// that the deletes soon free anyway.
		WithCompression(options.None).
		// Reads happen only when a device drains a backlog from disk, and
		// uncompressed tables are read through the page cache: a small
		// block cache saves little more than re-parsing a block, and keeps
		// tables written compressed by older versions from being
		// decompressed on every read.
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
		db:   db,
		opts: opts,
		log:  opts.Logger,
		reqs: make(chan *queue.Request, 16384),
		stop: make(chan struct{}),
	}
	s.reg = devices.New(persister{s}, devices.Options{Flush: s.flush, Stop: s.stop, Settings: opts.Settings, Now: opts.Now, Logger: opts.Logger})
	s.deviceAPI = s.reg.API()
	s.checkDisk()
	s.wg.Add(2)
	go s.commitLoop()
	go s.maintenanceLoop()
	return s, nil
}

// Append queues r for the committer; r.Done reports the outcome. It blocks
// only while the committer is saturated, which slows every publisher:
// they all wait on the same queue of requests.
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
			meta, data, err := queue.DecodeValue(v)
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

// Depth returns how many messages of user are stored and not yet deleted.
func (s *Store) Depth(user string) (uint64, error) {
	u, err := s.reg.Lock(user)
	if err != nil {
		return 0, err
	}
	defer u.Unlock()
	return u.Queue.head - u.Queue.deleted, nil
}

// Waiting counts the messages of user with Seq > after that have not
// expired, reading their keys alone.
func (s *Store) Waiting(user string, after uint64) (uint64, error) {
	var n uint64
	now := uint64(s.opts.Now().Unix())
	err := s.db.View(func(txn *badger.Txn) error {
		io := badger.DefaultIteratorOptions
		io.Prefix = msgPrefix(user)
		io.PrefetchValues = false
		it := txn.NewIterator(io)
		defer it.Close()
		for it.Seek(msgKey(user, after+1)); it.Valid(); it.Next() {
			if !expired(it.Item(), now) {
				n++
			}
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("count waiting messages of %s after %d: %w", user, after, err)
	}
	return n, nil
}

// Head returns the last sequence of user's queue that is durable.
func (s *Store) Head(user string) (uint64, error) {
	u, err := s.reg.Lock(user)
	if err != nil {
		return 0, err
	}
	defer u.Unlock()
	return u.Queue.committed, nil
}

// DB returns the Badger database, for the server's other small records
// (presence, groups) under their own key prefixes, listed in keys.go.
func (s *Store) DB() *badger.DB { return s.db }

// DiskSize returns Badger's LSM and value-log sizes in bytes.
func (s *Store) DiskSize() (lsm, vlog int64) { return s.db.Size() }

// badgerLogger routes Badger's logs to slog, keeping its chatty info lines at debug.
type badgerLogger struct{ l *slog.Logger }

func (b badgerLogger) Errorf(f string, a ...any) { b.l.Error(fmt.Sprintf("badger: "+f, a...)) }

// Warningf logs at warn, but for the block-cache statistics Badger warns
// of every minute while reads miss its cache: a queue's reads are of
// messages read once, which no cache size would keep, and the tables are
// read through the page cache anyway (see Open).
func (b badgerLogger) Warningf(f string, a ...any) {
	if strings.HasPrefix(f, "%s might be too small") || strings.HasPrefix(f, "Cache life expectancy") {
		b.l.Debug(fmt.Sprintf("badger: "+f, a...))
		return
	}
	b.l.Warn(fmt.Sprintf("badger: "+f, a...))
}
func (b badgerLogger) Infof(f string, a ...any)  { b.l.Debug(fmt.Sprintf("badger: "+f, a...)) }
func (b badgerLogger) Debugf(f string, a ...any) { b.l.Debug(fmt.Sprintf("badger: "+f, a...)) }

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
