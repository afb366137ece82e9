package groups

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/chatd/chatd/broker/cluster/natsnode"
	"github.com/chatd/chatd/broker/protocol/topic"
)

// setupTimeout bounds NewKV when its context has no earlier deadline: a
// replicated bucket just created needs its leader elected.
const setupTimeout = 30 * time.Second

// probeKey is read to see that a bucket answers; "/" is in no group's key.
const probeKey = "chatd/probe"

// countPrefix begins the key of a user's count of groups made; "/" is in
// no group's key.
const countPrefix = "chatd/created/"

// NewKV returns a Store on the JetStream KV bucket named bucket, creating
// it with replicas copies or updating its configuration, allowing at most
// maxMembers per group, and the limits of opts. Every node of a cluster
// makes its own Store on the same bucket, with the same limits; see Store
// for what each sees of the others' changes. ctx bounds the setup only.
// Close the Store to stop its watch of the bucket.
func NewKV(ctx context.Context, js jetstream.JetStream, bucket string, replicas int, maxMembers int, opts ...Option) (*Store, error) {
	ctx, cancel := context.WithTimeout(ctx, setupTimeout)
	defer cancel()
	kv, err := natsnode.OpenKV(ctx, js, bucket, "chatd groups", replicas)
	if err != nil {
		return nil, fmt.Errorf("groups: %w", err)
	}
	b := &kvBackend{kv: kv, js: js, bucket: bucket}
	// A bucket just created may not have elected its leader yet: make sure
	// the first operation is answered.
	err = natsnode.UntilAnswered(ctx, func(ctx context.Context) error {
		_, _, _, err := b.last(ctx, probeKey)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("groups: bucket %s not answering: %w", bucket, err)
	}
	s := newStore(b, maxMembers, opts)
	// The watch lives as long as the Store: a context given to it makes
	// nats.go unsubscribe when that context ends. Until it is set up, the
	// setup's context may end it too.
	stop := context.AfterFunc(ctx, s.cancel)
	// UpdatesOnly: a group not cached is read from the bucket when needed,
	// so only changes made from now on are wanted, and only of the groups
	// cached or being read.
	w, err := kv.WatchAll(s.ctx, jetstream.UpdatesOnly())
	if !stop() && err == nil {
		err = ctx.Err()
		_ = stopWatch(w) // already unsubscribing: s.ctx has ended
	}
	if err != nil {
		s.cancel()
		return nil, fmt.Errorf("groups: watch bucket %s: %w", bucket, err)
	}
	s.watch, s.watched = w, make(chan struct{})
	go s.follow()
	return s, nil
}

// follow applies the watch's changes to the cache until the watch ends.
// It adds no group to the cache: a group not cached is read from the
// bucket when it is needed.
func (s *Store) follow() {
	defer close(s.watched)
	for e := range s.watch.Updates() {
		if e == nil {
			continue // end of initial values; UpdatesOnly has none
		}
		gid, ok := groupID(e.Key())
		if !ok {
			continue // not a group's key: nothing the Store ever reads
		}
		ent := entry{rev: e.Revision()}
		if e.Operation() == jetstream.KeyValuePut {
			g, err := decode(e.Value())
			if err != nil {
				err = fmt.Errorf("load group %s: %w", gid, err)
			}
			ent.g, ent.err = g, err
		}
		s.learn(gid, ent, false)
	}
	select {
	case <-s.closing:
	default:
		// The connection was closed under the Store: no more changes will
		// arrive, so a cache would go stale.
		s.stopCaching()
	}
}

// stopWait bounds how long stopWatch waits for the cluster to delete a
// watch's consumer. A cluster with a quorum answers in milliseconds; one
// without (the last nodes shutting down) never does, and nats.go would
// wait its fixed 5 s for each watch: the last node of a cluster took 5 s
// more to stop.
const stopWait = 500 * time.Millisecond

// stopWatch stops w; a watch already ended with its connection is not an
// error, nor is a stop the cluster cannot answer (its last nodes are
// shutting down): the watch's consumer is ephemeral and JetStream drops it
// once it is inactive. nats.go unsubscribes before it asks for the
// consumer's deletion, so the watch delivers nothing more whether or not
// the cluster answered within stopWait; a request left waiting ends
// when the connection closes, as its owner does next on shutdown, or at
// nats.go's timeout.
func stopWatch(w jetstream.KeyWatcher) error {
	done := make(chan error, 1)
	go func() { done <- w.Stop() }()
	var err error
	select {
	case err = <-done:
	case <-time.After(stopWait):
		return nil
	}
	var apiErr *jetstream.APIError
	var legacyAPIErr *nats.APIError
	if err == nil || errors.Is(err, nats.ErrConnectionClosed) || errors.Is(err, nats.ErrBadSubscription) ||
		errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) ||
		errors.As(err, &apiErr) || errors.As(err, &legacyAPIErr) {
		return nil
	}
	return fmt.Errorf("groups: stop watch: %w", err)
}

// kvBackend keeps groups in a JetStream KV bucket; a group's revision is
// its key's revision, the stream sequence of its last write.
type kvBackend struct {
	kv     jetstream.KeyValue
	js     jetstream.JetStream
	bucket string
}

func (b *kvBackend) get(ctx context.Context, gid string) (*Group, uint64, error) {
	rev, v, ok, err := b.last(ctx, kvKey(gid))
	if err != nil || !ok {
		return nil, rev, err
	}
	g, err := decode(v)
	if err != nil {
		return nil, 0, err
	}
	return g, rev, nil
}

// last returns key's latest value and revision as the stream leader has
// them: ok false for a key never written (revision 0) or deleted.
func (b *kvBackend) last(ctx context.Context, key string) (rev uint64, v []byte, ok bool, err error) {
	// The leader's, not a direct get's: see natsnode.KVLast.
	return natsnode.KVLast(ctx, b.js, b.bucket, key)
}

func (b *kvBackend) create(ctx context.Context, g *Group, maxPerUser int) (uint64, error) {
	v, err := json.Marshal(g)
	if err != nil {
		return 0, fmt.Errorf("encode group %s: %w", g.ID, err)
	}
	// A group that exists is refused without touching its maker's count.
	cur, rev, err := b.get(ctx, g.ID)
	if err != nil {
		return 0, fmt.Errorf("load group %s: %w", g.ID, err)
	}
	if cur != nil {
		return 0, fmt.Errorf("%w: %s", ErrExists, g.ID)
	}
	if err := b.count(ctx, g.Creator, 1, maxPerUser); err != nil {
		return 0, err
	}
	next, err := b.createFrom(ctx, g, v, rev)
	if errors.Is(err, ErrExists) {
		// Made by another meanwhile: the count went up for nothing. Any
		// other error may come from a write applied all the same, which
		// keeps its count.
		if cerr := b.count(ctx, g.Creator, -1, 0); cerr != nil {
			return 0, fmt.Errorf("group %s made by another meanwhile; count of %s not lowered: %w", g.ID, g.Creator, cerr)
		}
	}
	return next, err
}

// createFrom stores v as g if its key is at revision rev, or is no group
// at all when it is not.
func (b *kvBackend) createFrom(ctx context.Context, g *Group, v []byte, rev uint64) (uint64, error) {
	// Revision 0 expects no write to the key ever; a deleted group's key
	// expects its deletion marker instead.
	for {
		next, err := b.kv.Update(ctx, kvKey(g.ID), v, rev)
		if err == nil {
			return next, nil
		}
		if !errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			return 0, fmt.Errorf("store group %s: %w", g.ID, err)
		}
		cur, curRev, err := b.get(ctx, g.ID)
		if err != nil {
			return 0, fmt.Errorf("load group %s: %w", g.ID, err)
		}
		if cur != nil {
			return 0, fmt.Errorf("%w: %s", ErrExists, g.ID)
		}
		rev = curRev
	}
}

func (b *kvBackend) update(ctx context.Context, g *Group, rev uint64) (uint64, error) {
	v, err := json.Marshal(g)
	if err != nil {
		return 0, fmt.Errorf("encode group %s: %w", g.ID, err)
	}
	next, err := b.kv.Update(ctx, kvKey(g.ID), v, rev)
	if errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
		return 0, fmt.Errorf("store group %s: %w: %w", g.ID, errConflict, err)
	}
	if err != nil {
		return 0, fmt.Errorf("store group %s: %w", g.ID, err)
	}
	return next, nil
}

func (b *kvBackend) remove(ctx context.Context, g *Group, rev uint64) (bool, error) {
	err := b.kv.Delete(ctx, kvKey(g.ID), jetstream.LastRevision(rev))
	if errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
		return false, fmt.Errorf("delete group %s: %w: %w", g.ID, errConflict, err)
	}
	if err != nil {
		return false, fmt.Errorf("delete group %s: %w", g.ID, err)
	}
	if g.Creator == "" {
		return true, nil
	}
	if err := b.count(ctx, g.Creator, -1, 0); err != nil {
		return true, fmt.Errorf("group %s deleted; count of %s not lowered: %w", g.ID, g.Creator, err)
	}
	return true, nil
}

// count adds delta, 1 or -1, to the number of groups user has made: up to
// limit, failing with ErrTooManyGroups there, and down to 0.
func (b *kvBackend) forget(ctx context.Context, user string) error {
	if err := b.kv.Delete(ctx, countPrefix+kvKey(user)); err != nil {
		return fmt.Errorf("delete group count of %s: %w", user, err)
	}
	return nil
}

func (b *kvBackend) count(ctx context.Context, user string, delta, limit int) error {
	k := countPrefix + kvKey(user)
	for {
		rev, v, ok, err := b.last(ctx, k)
		if err != nil {
			return fmt.Errorf("load group count of %s: %w", user, err)
		}
		n := 0
		if ok {
			if n, err = parseCount(v); err != nil {
				return fmt.Errorf("load group count of %s: %w", user, err)
			}
		}
		if delta > 0 && n >= limit {
			return fmt.Errorf("%w: at most %d per user", ErrTooManyGroups, limit)
		}
		_, err = b.kv.Update(ctx, k, strconv.AppendInt(nil, int64(max(n+delta, 0)), 10), rev)
		if err == nil {
			return nil
		}
		if !errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			return fmt.Errorf("store group count of %s: %w", user, err)
		}
		// Another group of user made or deleted meanwhile; each lost round
		// means one that succeeded.
		if ctx.Err() != nil {
			return fmt.Errorf("store group count of %s: %w", user, err)
		}
	}
}

// each reads the bucket's latest values through one watch (a single
// ordered consumer replaying them), not one request per key.
func (b *kvBackend) each(ctx context.Context, fn func(*Group)) error {
	w, err := b.kv.WatchAll(ctx, jetstream.IgnoreDeletes())
	if err != nil {
		return fmt.Errorf("bucket %s: %w", b.bucket, err)
	}
	defer func() { _ = stopWatch(w) }()
	err = natsnode.KVReplay(ctx, w, func(e jetstream.KeyValueEntry) error {
		if e.Key() == probeKey || strings.HasPrefix(e.Key(), countPrefix) {
			return nil
		}
		g, err := decode(e.Value())
		if err != nil {
			return fmt.Errorf("group %s: %w", e.Key(), err)
		}
		fn(g)
		return nil
	})
	if err != nil {
		return fmt.Errorf("bucket %s: %w", b.bucket, err)
	}
	return nil
}

// kvKey is gid's key. Group IDs are [A-Za-z0-9_.-], but "." separates a
// key's subject tokens, which must not be empty; "=" is a key character no
// group ID has, so each "." becomes "=" and every ID maps to its own key.
func kvKey(gid string) string { return strings.ReplaceAll(gid, ".", "=") }

// groupID reverses kvKey; false for a key no group has.
func groupID(key string) (string, bool) {
	gid := strings.ReplaceAll(key, "=", ".")
	return gid, kvKey(gid) == key && topic.ValidUser(gid)
}

func decode(v []byte) (*Group, error) {
	g := new(Group)
	if err := json.Unmarshal(v, g); err != nil {
		return nil, fmt.Errorf("decode: %w", err)
	}
	return g, nil
}
