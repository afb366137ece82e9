// Package jsqueue keeps the per-user message queues of broker/queue in NATS
// JetStream, so that several chatd nodes can share them: the queue of the
// cluster mode, with the method set of queue.Store and its types.
//
// Guarantees: a message passed to Append is acknowledged by JetStream (on
// a quorum of the stream's replicas) before its Done callback reports
// Stored; Done is called once per request, in request order. A message
// stays until every device of its user has acknowledged it (at least once),
// or until it expires. Acknowledgements are persisted lazily, every
// AckFlushInterval: a crash may redeliver a few acknowledged messages,
// never lose one.
//
// Sequences: Message.Seq is the message's stream sequence in its user's
// shard. It is assigned by the stream leader, so it grows in commit order
// for every user whichever node appended, is stable for the message's
// life, and is the cursor devices acknowledge and Read starts after. It is
// not dense: a user's sequences skip the other users' messages of the
// same shard.
//
// Layout: users are spread over Options.Shards streams by a stable hash
// (names.go); a user's messages are the subject <prefix>.q.<shard>.<user>
// of its shard's stream. Device cursors live in a replicated KV bucket.
package jsqueue

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"

	"github.com/chatd/chatd/broker/cluster/natsnode"

	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/queue/devices"
)

// Defaults of Options.
const (
	// DefaultShards is the number of streams users are spread over.
	DefaultShards = 4
	// DefaultReplicas is the replica count of streams and bucket.
	DefaultReplicas = 3
	// DefaultPrefix names streams, subjects and bucket.
	DefaultPrefix = "chatd"
	// DefaultMaxPending caps publishes awaiting acknowledgement.
	DefaultMaxPending = 16384
	// DefaultPublishTimeout is how long one publish waits for its acknowledgement.
	DefaultPublishTimeout = 5 * time.Second
	// DefaultRetryFor is how long a publish is retried before it fails.
	DefaultRetryFor = 30 * time.Second
	// DefaultRequestTimeout bounds each synchronous JetStream call.
	DefaultRequestTimeout = 5 * time.Second
)

// Options configures a Store.
type Options struct {
	// Conn is the NATS connection (natsnode.Node.Conn); the Store does
	// not close it.
	Conn *nats.Conn
	// Settings are the TTLs, caps, flush interval and batch size; a zero
	// field means its default (queue.Settings.WithDefaults).
	// There is no sync mode: fsync is the NATS servers' (natsnode.Config),
	// and a replicated stream's durability is its quorum.
	Settings queue.Settings
	// Shards is how many streams the users are spread over; 0 means
	// DefaultShards. It cannot change once the streams exist: Open refuses.
	Shards int
	// Replicas is the replica count of the streams and the bucket; 0 means DefaultReplicas.
	Replicas int
	// Prefix names the streams, subjects and bucket, so that separate
	// stores can share one NATS; "" means DefaultPrefix. Letters, digits, '-' and '_'.
	Prefix string
	// MaxPending caps messages awaiting their JetStream acknowledgement;
	// Append blocks beyond it. 0 means DefaultMaxPending.
	MaxPending int
	// PublishTimeout is how long one publish waits for its acknowledgement
	// before it is sent again; 0 means DefaultPublishTimeout.
	PublishTimeout time.Duration
	// RetryFor is how long a publish is retried across leader elections
	// and reconnects before Done reports Failed; 0 means DefaultRetryFor.
	RetryFor time.Duration
	// RequestTimeout bounds Read, Head, Depth, Attach and every call of an
	// acknowledgement flush; 0 means DefaultRequestTimeout.
	RequestTimeout time.Duration
	// Logger receives background errors.
	Logger *slog.Logger
	// OnCommit, if set, is told the size of every batch of publishes and
	// how long its acknowledgements took.
	OnCommit func(messages int, took time.Duration)
	// OnDeleted, if set, is told of the messages every device acknowledged
	// once they are purged.
	OnDeleted queue.DeletedFunc
	// Now is the clock of device_ttl, message_ttl and last-seen times;
	// nil means time.Now. Tests move it forward instead of waiting.
	Now func() time.Time
}

// Store is the set of all users' queues, in JetStream.
type Store struct {
	opts    Options
	log     *slog.Logger
	nc      *nats.Conn
	js      jetstream.JetStream
	names   names
	streams []jetstream.Stream
	kv      jetstream.KeyValue

	// order keeps the copies to each user in request order (append.go).
	order order

	// closeMu orders Append against Close: Append holds it shared while
	// queueing, so that nothing is queued after the committer drained.
	closeMu sync.RWMutex
	closing bool
	reqs    chan *queue.Request
	batches chan *batch
	stop    chan struct{}
	// crashed skips the last flush on Close, as a crash would (tests).
	crashed atomic.Bool
	// completed is closed when the completer has reported everything.
	completed chan struct{}
	wg        sync.WaitGroup
	closed    sync.Once

	// deviceAPI gives the Store the device methods of queue.Store
	// (MayAttach, Attach, Cursor, SetSubscribed, Ack, Detach) and Flush,
	// ForgetUnseen, Loaded and EvictIdle.
	deviceAPI
	// reg is the device registry, its records in the bucket; the flusher
	// goroutine owns its flushes (reg.Control).
	reg *devices.Registry[queueState]

	stats queue.Counters
	// retries counts publishes sent again, for tests.
	retries atomic.Uint64
	// free and lowDisk back FreeBytes and LowDisk.
	free    atomic.Int64
	lowDisk atomic.Bool
}

var prefixRE = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)

// withDefaults fills in zero options and checks the rest.
func (o Options) withDefaults() (Options, error) {
	if o.Conn == nil {
		return o, errors.New("jsqueue: Options.Conn is required")
	}
	if o.Shards == 0 {
		o.Shards = DefaultShards
	}
	if o.Replicas == 0 {
		o.Replicas = DefaultReplicas
	}
	if o.Prefix == "" {
		o.Prefix = DefaultPrefix
	}
	if o.MaxPending == 0 {
		o.MaxPending = DefaultMaxPending
	}
	if o.PublishTimeout == 0 {
		o.PublishTimeout = DefaultPublishTimeout
	}
	if o.RetryFor == 0 {
		o.RetryFor = DefaultRetryFor
	}
	if o.RequestTimeout == 0 {
		o.RequestTimeout = DefaultRequestTimeout
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	o.Settings = o.Settings.WithDefaults()
	switch {
	case o.Shards < 1:
		return o, fmt.Errorf("jsqueue: Shards %d: want at least 1", o.Shards)
	case o.Replicas < 1 || o.Replicas > 5:
		return o, fmt.Errorf("jsqueue: Replicas %d: JetStream allows 1 to 5", o.Replicas)
	case !prefixRE.MatchString(o.Prefix):
		return o, fmt.Errorf("jsqueue: Prefix %q: letters, digits, '-' and '_' only", o.Prefix)
	case o.MaxPending < 1 || o.PublishTimeout < 0 || o.RetryFor < 0 || o.RequestTimeout < 0:
		return o, errors.New("jsqueue: MaxPending, PublishTimeout, RetryFor and RequestTimeout must be positive")
	}
	return o, nil
}

// Open creates or updates the streams and the bucket and starts the
// committer, the completer and the acknowledgement flusher.
func Open(ctx context.Context, opts Options) (*Store, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	js, err := jetstream.New(opts.Conn,
		// The Store bounds its own pending publishes; the context's cap is
		// the same, so that a publish waits for room instead of failing.
		jetstream.WithPublishAsyncMaxPending(opts.MaxPending),
		jetstream.WithPublishAsyncTimeout(opts.PublishTimeout),
	)
	if err != nil {
		return nil, fmt.Errorf("jsqueue: jetstream: %w", err)
	}
	s := &Store{
		opts:      opts,
		log:       opts.Logger,
		nc:        opts.Conn,
		js:        js,
		names:     names{prefix: opts.Prefix, shards: opts.Shards},
		reqs:      make(chan *queue.Request, 16384),
		batches:   make(chan *batch, 64),
		stop:      make(chan struct{}),
		completed: make(chan struct{}),
		order:     order{users: make(map[string]*userOrder)},
	}
	// The bucket is shared by every node: a shared persister.
	s.reg = devices.New(persister{s}, devices.Options{Shared: persister{s}, Flush: s.flush, Stop: s.stop,
		Settings: opts.Settings, Now: opts.Now, Logger: opts.Logger})
	s.deviceAPI = s.reg.API()
	if err := s.setup(ctx); err != nil {
		return nil, err
	}
	s.readFree()
	s.wg.Add(3)
	go s.commitLoop()
	go s.completeLoop()
	go s.flushLoop()
	return s, nil
}

// setup creates the bucket, checks the shard count and creates or
// updates every shard's stream.
func (s *Store) setup(ctx context.Context) error {
	q := s.opts.Settings
	kv, err := natsnode.OpenKV(ctx, s.js, s.names.bucket(), "chatd device cursors", s.opts.Replicas)
	if err != nil {
		return fmt.Errorf("jsqueue: %w", err)
	}
	s.kv = kv
	if err := s.checkShards(ctx); err != nil {
		return err
	}
	// JetStream refuses a dedup window longer than the message TTL; a
	// message is gone by then anyway.
	dedup := q.DedupWindow
	if q.MessageTTL > 0 && (dedup > q.MessageTTL || dedup == 0) {
		dedup = q.MessageTTL
	}
	perSubject := int64(q.MaxQueueMessages)
	if perSubject <= 0 {
		perSubject = -1
	}
	// The streams are made side by side: each waits for its replicas to
	// elect a leader, seconds in a new cluster.
	s.streams = make([]jetstream.Stream, s.opts.Shards)
	g, gctx := errgroup.WithContext(ctx)
	for i := range s.opts.Shards {
		cfg := jetstream.StreamConfig{
			Name:        s.names.stream(i),
			Description: "chatd queues, shard " + strconv.Itoa(i),
			Subjects:    []string{s.names.streamSubjects(i)},
			Retention:   jetstream.LimitsPolicy,
			Storage:     jetstream.FileStorage,
			Replicas:    s.opts.Replicas,
			MaxAge:      q.MessageTTL,
			Duplicates:  dedup,
			MaxMsgs:     -1,
			MaxBytes:    -1,
			// max_queue_messages: a publish to a user at the cap is refused,
			// not an older message dropped. With no stream-wide limits set,
			// DiscardNew only ever applies per subject.
			MaxMsgsPerSubject:    perSubject,
			Discard:              jetstream.DiscardNew,
			DiscardNewPerSubject: perSubject > 0,
			// Read fetches a batch from one replica; see read.go.
			AllowDirect: true,
		}
		g.Go(func() error {
			err := natsnode.UntilAnswered(gctx, func(ctx context.Context) (err error) {
				s.streams[i], err = s.js.CreateOrUpdateStream(ctx, cfg)
				return err
			})
			if err != nil {
				return fmt.Errorf("jsqueue: stream %s: %w", cfg.Name, err)
			}
			return nil
		})
	}
	return g.Wait()
}

// checkShards records the shard count on first use and refuses another:
// users would hash to other streams and lose sight of their queues.
func (s *Store) checkShards(ctx context.Context) error {
	want := strconv.Itoa(s.opts.Shards)
	// A bucket just created may not have elected its leader yet.
	err := natsnode.UntilAnswered(ctx, func(ctx context.Context) error {
		_, err := s.kv.Create(ctx, shardsKey, []byte(want))
		return err
	})
	if err == nil {
		return nil
	}
	if !errors.Is(err, jetstream.ErrKeyExists) {
		return fmt.Errorf("jsqueue: record shard count: %w", err)
	}
	var e jetstream.KeyValueEntry
	for {
		err = natsnode.UntilAnswered(ctx, func(ctx context.Context) (err error) {
			e, err = s.kv.Get(ctx, shardsKey)
			return err
		})
		// The key exists (Create said so): a replica that has not applied
		// it yet answers "not found", as seen while a cluster forms.
		if !errors.Is(err, jetstream.ErrKeyNotFound) {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("jsqueue: read shard count: %w (%w)", err, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
	if err != nil {
		return fmt.Errorf("jsqueue: read shard count: %w", err)
	}
	if got := string(e.Value()); got != want {
		return fmt.Errorf("jsqueue: the queues were created with %s shards, not %s; the shard count cannot change", got, want)
	}
	return nil
}

// Close stores what was already appended (retrying for at most
// RetryFor), persists acknowledgements (what it cannot, it logs: those
// messages are delivered again) and stops the Store's goroutines.
// It leaves the connection open. Append must not be called after Close;
// if it is, its Done reports Failed.
func (s *Store) Close() error {
	s.closed.Do(func() {
		s.closeMu.Lock()
		s.closing = true
		s.closeMu.Unlock()
		close(s.stop)
		s.wg.Wait()
	})
	return nil
}

// errClosed fails a request made after Close.
var errClosed = errors.New("jsqueue: store closed")

// Append queues r for the committer; r.Done reports the outcome. It blocks
// only while the committer is saturated, which slows every publisher:
// they all wait on the same queue of requests.
func (s *Store) Append(r *queue.Request) {
	s.closeMu.RLock()
	defer s.closeMu.RUnlock()
	if s.closing {
		r.Done(queue.Failed, queue.Message{}, errClosed)
		return
	}
	s.reqs <- r
}

// TryAppend queues r unless the committer is saturated; it never blocks,
// so the completer's own callbacks may use it.
func (s *Store) TryAppend(r *queue.Request) bool {
	s.closeMu.RLock()
	defer s.closeMu.RUnlock()
	if s.closing {
		return false
	}
	select {
	case s.reqs <- r:
		return true
	default:
		return false
	}
}

// Stats returns the store's running totals.
func (s *Store) Stats() queue.Stats { return s.stats.Stats() }

// Undelivered returns how many messages this store stored that no purge
// of this store has removed yet. In a cluster each node counts its own
// appends and purges, so only the sum over nodes means anything, and
// expired messages are never subtracted.
func (s *Store) Undelivered() uint64 { return s.Stats().Undelivered() }

// DiskSize returns the bytes held by the message streams and by the
// device bucket (the two figures badgerq gives for its LSM tree and
// value log). A failed lookup is logged and counts as 0.
func (s *Store) DiskSize() (streams, devices int64) {
	ctx, cancel := context.WithTimeout(context.Background(), s.opts.RequestTimeout)
	defer cancel()
	for _, st := range s.streams {
		info, err := st.Info(ctx)
		if err != nil {
			s.log.Error("stream size", "stream", st.CachedInfo().Config.Name, "error", err)
			continue
		}
		streams += int64(info.State.Bytes)
	}
	kvs, err := s.kv.Status(ctx)
	if err != nil {
		s.log.Error("bucket size", "bucket", s.names.bucket(), "error", err)
		return streams, 0
	}
	return streams, int64(kvs.Bytes())
}

// reqCtx bounds one synchronous JetStream call.
func (s *Store) reqCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), s.opts.RequestTimeout)
}
