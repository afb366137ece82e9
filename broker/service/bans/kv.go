package bans

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/chatd/chatd/broker/cluster/natsnode"
)

// kvTimeout bounds each write to the bucket.
const kvTimeout = 5 * time.Second

type kvBackend struct {
	kv     jetstream.KeyValue
	cancel context.CancelFunc
	done   chan struct{}
}

// NewKV returns the Store of a cluster node on the bucket named bucket
// (created with replicas copies): it reads every ban, then follows the
// other nodes' changes until Close, calling onBan (if set) for each ban
// that reaches it, so that every node ends the connections it has of a
// user banned anywhere, as reliably as the bucket itself. ctx bounds the
// setup.
func NewKV(ctx context.Context, js jetstream.JetStream, bucket string, replicas int, now func() time.Time, onBan func(user string), log *slog.Logger) (*Store, error) {
	kv, err := natsnode.OpenKV(ctx, js, bucket, "chatd bans", replicas)
	if err != nil {
		return nil, fmt.Errorf("bans: %w", err)
	}
	// The watch lives as long as the Store, not the setup's context.
	wctx, cancel := context.WithCancel(context.Background())
	w, err := kv.WatchAll(wctx)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("bans: watch %s: %w", bucket, err)
	}
	// The watch first replays every ban, then follows the changes.
	var stored []Ban
	err = natsnode.KVReplay(ctx, w, func(e jetstream.KeyValueEntry) error {
		if b, ok := decodeEntry(e, log); ok {
			stored = append(stored, b)
		}
		return nil
	})
	if err != nil {
		cancel()
		return nil, fmt.Errorf("bans: read %s: %w", bucket, err)
	}
	be := &kvBackend{kv: kv, cancel: cancel, done: make(chan struct{})}
	s := newStore(be, stored, now, onBan)
	go be.follow(wctx, w, s, log)
	return s, nil
}

// follow applies the bucket's changes, this node's own included, until
// the watch ends.
func (be *kvBackend) follow(ctx context.Context, w jetstream.KeyWatcher, s *Store, log *slog.Logger) {
	defer close(be.done)
	defer func() {
		if err := w.Stop(); err != nil {
			log.Debug("bans: stop watch", "error", err)
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
			s.unset(e.Key())
			continue
		}
		if b, ok := decodeEntry(e, log); ok {
			s.set(b)
		}
	}
}

func decodeEntry(e jetstream.KeyValueEntry, log *slog.Logger) (Ban, bool) {
	if e.Operation() != jetstream.KeyValuePut {
		return Ban{}, false
	}
	var b Ban
	if err := json.Unmarshal(e.Value(), &b); err != nil {
		log.Error("bans: bad record", "key", e.Key(), "error", err)
		return Ban{}, false
	}
	return b, true
}

func (be *kvBackend) put(b Ban) error {
	v, err := json.Marshal(b)
	if err != nil {
		return fmt.Errorf("ban %s: %w", b.User, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), kvTimeout)
	defer cancel()
	if _, err := be.kv.Put(ctx, b.User, v); err != nil {
		return fmt.Errorf("ban %s: %w", b.User, err)
	}
	return nil
}

func (be *kvBackend) delete(user string) error {
	ctx, cancel := context.WithTimeout(context.Background(), kvTimeout)
	defer cancel()
	if err := be.kv.Purge(ctx, user); err != nil {
		return fmt.Errorf("unban %s: %w", user, err)
	}
	return nil
}

func (be *kvBackend) close() {
	be.cancel()
	<-be.done
}
