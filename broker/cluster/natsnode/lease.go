package natsnode

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Leases hands out named leases, each held by one node of a cluster at a
// time, as keys of a KV bucket whose entries expire unless renewed: a
// holder that crashes loses its leases within the bucket's TTL, one that
// stops gives them up at once.
type Leases struct {
	kv     jetstream.KeyValue
	holder string
	ttl    time.Duration
	log    *slog.Logger
}

// OpenLeases opens (or creates) the bucket of leases held by holder, this
// node's name, that expire ttl after their last renewal.
func OpenLeases(ctx context.Context, js jetstream.JetStream, bucket string, replicas int, holder string, ttl time.Duration, log *slog.Logger) (*Leases, error) {
	if holder == "" {
		return nil, errors.New("leases: no holder name")
	}
	var kv jetstream.KeyValue
	err := UntilAnswered(ctx, func(ctx context.Context) (err error) {
		kv, err = js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket:      bucket,
			Description: "chatd leases: which node runs what",
			History:     1,
			TTL:         ttl,
			Replicas:    replicas,
			Storage:     jetstream.FileStorage,
		})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("bucket %s: %w", bucket, err)
	}
	return &Leases{kv: kv, holder: holder, ttl: ttl, log: log}, nil
}

// Hold waits until this node holds the lease on name, or ctx ends. The
// context it returns ends when a renewal is refused, or none is answered
// before the lease would expire (another node may hold it then), or ctx
// ends; release stops the renewals, gives the lease up and waits for
// that.
func (l *Leases) Hold(ctx context.Context, name string) (context.Context, func(), error) {
	every := l.ttl / 3
	var rev uint64
	for {
		// A take whose answer was lost finds the lease its own the next
		// time: take is idempotent, as UntilAnswered needs.
		err := UntilAnswered(ctx, func(ctx context.Context) (err error) {
			rev, err = l.take(ctx, name)
			return err
		})
		if err == nil {
			break
		}
		if !errors.Is(err, jetstream.ErrKeyExists) {
			return nil, nil, fmt.Errorf("lease %s: %w", name, err)
		}
		t := time.NewTimer(every)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, nil, ctx.Err()
		}
	}
	held, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer cancel()
		t := time.NewTicker(every)
		defer t.Stop()
		renewed := time.Now()
		for {
			select {
			case <-t.C:
				// Not cancelled by a release: an update applied but
				// unanswered would leave rev behind the bucket's, and the
				// release's delete refused.
				uctx, ucancel := context.WithTimeout(context.Background(), every)
				next, err := l.kv.Update(uctx, name, []byte(l.holder), rev)
				ucancel()
				switch {
				case err == nil:
					rev, renewed = next, time.Now()
				case Unanswered(err) && time.Since(renewed) < l.ttl-every:
					// A slow bucket (a leader election, a loaded node):
					// tried again at the next tick, while the lease lasts.
				default:
					if held.Err() == nil {
						l.log.Warn("lease lost", "lease", name, "error", err)
					}
					return
				}
			case <-held.Done():
				// Given up with a short deadline of its own: the caller
				// is stopping, and an unanswered delete only means the
				// lease expires instead.
				dctx, dcancel := context.WithTimeout(context.Background(), 2*time.Second)
				if err := l.kv.Delete(dctx, name, jetstream.LastRevision(rev)); err != nil {
					l.log.Debug("give up lease", "lease", name, "error", err)
				}
				dcancel()
				return
			}
		}
	}()
	release := func() {
		cancel()
		wg.Wait()
	}
	return held, release, nil
}

// take creates the lease's key, or takes it over when this node held it
// before a restart; jetstream.ErrKeyExists means another node holds it.
func (l *Leases) take(ctx context.Context, name string) (uint64, error) {
	rev, err := l.kv.Create(ctx, name, []byte(l.holder))
	if !errors.Is(err, jetstream.ErrKeyExists) {
		return rev, err
	}
	e, gerr := l.kv.Get(ctx, name)
	if gerr != nil || string(e.Value()) != l.holder {
		return 0, err
	}
	return l.kv.Update(ctx, name, []byte(l.holder), e.Revision())
}
