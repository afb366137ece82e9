package records

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"log/slog"
	"regexp"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/chatd/chatd/broker/cluster/natsnode"
)

// kvTimeout bounds each write to the bucket.
const kvTimeout = 5 * time.Second

type kvBackend[T any] struct {
	kv     jetstream.KeyValue
	cancel context.CancelFunc
	done   chan struct{}
}

// NewKV returns the Set of a cluster node on the bucket named bucket
// (created with replicas copies): it reads every record, then follows
// the other nodes' changes until Close, telling onPut (nil: none) of
// each record that reaches it, as reliably as the bucket itself. Any
// string is a key: one the bucket would refuse (a user ID such as
// ".alice" or "a..b") is stored encoded (see kvKey). ctx bounds the setup.
func NewKV[T any](ctx context.Context, js jetstream.JetStream, bucket, description string, replicas int, onPut func(key string, v T), log *slog.Logger) (*Set[T], error) {
	kv, err := natsnode.OpenKV(ctx, js, bucket, description, replicas)
	if err != nil {
		return nil, err
	}
	// The watch lives as long as the Set, not the setup's context.
	wctx, cancel := context.WithCancel(context.Background())
	// A bucket just made may not answer yet: asked again while ctx lasts.
	var w jetstream.KeyWatcher
	err = natsnode.UntilAnswered(ctx, func(context.Context) (err error) {
		w, err = kv.WatchAll(wctx)
		return err
	})
	if err != nil {
		cancel()
		return nil, fmt.Errorf("watch %s: %w", bucket, err)
	}
	// The watch first replays every record, then follows the changes.
	stored := make(map[string]T)
	err = natsnode.KVReplay(ctx, w, func(e jetstream.KeyValueEntry) error {
		if v, ok := decodeEntry[T](e, log); ok {
			stored[fromKVKey(e.Key())] = v
		}
		return nil
	})
	if err != nil {
		cancel()
		return nil, fmt.Errorf("read %s: %w", bucket, err)
	}
	be := &kvBackend[T]{kv: kv, cancel: cancel, done: make(chan struct{})}
	s := newSet[T](be, stored, onPut)
	go be.follow(wctx, w, s, log)
	return s, nil
}

// follow applies the bucket's changes, this node's own included, until
// the watch ends.
func (be *kvBackend[T]) follow(ctx context.Context, w jetstream.KeyWatcher, s *Set[T], log *slog.Logger) {
	defer close(be.done)
	defer func() {
		if err := w.Stop(); err != nil {
			log.Debug("records: stop watch", "error", err)
		}
	}()
	for {
		var e jetstream.KeyValueEntry
		select {
		case <-ctx.Done():
			return
		case got, ok := <-w.Updates():
			if !ok {
				return
			}
			if got == nil {
				continue
			}
			e = got
		}
		if e.Operation() != jetstream.KeyValuePut {
			s.unset(fromKVKey(e.Key()))
			continue
		}
		if v, ok := decodeEntry[T](e, log); ok {
			s.set(fromKVKey(e.Key()), v)
		}
	}
}

func decodeEntry[T any](e jetstream.KeyValueEntry, log *slog.Logger) (T, bool) {
	var v T
	if e.Operation() != jetstream.KeyValuePut {
		return v, false
	}
	if err := json.Unmarshal(e.Value(), &v); err != nil {
		log.Error("records: bad record", "key", e.Key(), "error", err)
		return v, false
	}
	return v, true
}

func (be *kvBackend[T]) put(k string, v T) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("record %s: %w", k, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), kvTimeout)
	defer cancel()
	// A write is asked again while the bucket elects its leader; both
	// writes are idempotent.
	err = natsnode.UntilAnswered(ctx, func(ctx context.Context) error {
		_, err := be.kv.Put(ctx, kvKey(k), b)
		return err
	})
	if err != nil {
		return fmt.Errorf("record %s: %w", k, err)
	}
	return nil
}

func (be *kvBackend[T]) delete(k string) error {
	ctx, cancel := context.WithTimeout(context.Background(), kvTimeout)
	defer cancel()
	err := natsnode.UntilAnswered(ctx, func(ctx context.Context) error { return be.kv.Purge(ctx, kvKey(k)) })
	if err != nil {
		return fmt.Errorf("delete record %s: %w", k, err)
	}
	return nil
}

func (be *kvBackend[T]) close() {
	be.cancel()
	<-be.done
}

// encodedPrefix starts a key stored encoded: no user ID, token key or
// other plain key has an "=".
const encodedPrefix = "b64="

// validKVKey matches what a JetStream KV bucket takes as a key (nats.go's
// own check), which also keeps a key one subject token or more.
var validKVKey = regexp.MustCompile(`^[-/_=.a-zA-Z0-9]+$`)

// kvKey returns k as the bucket stores it: k itself when the bucket
// takes it (every key written before keys were encoded was such, and
// reads as before), else encodedPrefix and k in unpadded base64url.
func kvKey(k string) string {
	if validKVKey.MatchString(k) && !strings.HasPrefix(k, ".") && !strings.HasSuffix(k, ".") &&
		!strings.Contains(k, "..") && !strings.HasPrefix(k, encodedPrefix) {
		return k
	}
	return encodedPrefix + base64.RawURLEncoding.EncodeToString([]byte(k))
}

// fromKVKey returns the key kvKey stored as stored.
func fromKVKey(stored string) string {
	enc, ok := strings.CutPrefix(stored, encodedPrefix)
	if !ok {
		return stored
	}
	b, err := base64.RawURLEncoding.DecodeString(enc)
	if err != nil {
		// Not written by kvKey: taken as it is.
		return stored
	}
	return string(b)
}
