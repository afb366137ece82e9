package bans

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/chatd/chatd/broker/service/records"
)

// NewKV returns the Store of a cluster node on the bucket named bucket
// (created with replicas copies): it reads every ban, then follows the
// other nodes' changes until Close, calling onBan (if set) for each ban
// that reaches it, so that every node ends the connections it has of a
// user banned anywhere, as reliably as the bucket itself. ctx bounds the
// setup.
func NewKV(ctx context.Context, js jetstream.JetStream, bucket string, replicas int, now func() time.Time, onBan func(user string), log *slog.Logger) (*Store, error) {
	now = clock(now)
	set, err := records.NewKV(ctx, js, bucket, "chatd bans", replicas, onPut(now, onBan), log)
	if err != nil {
		return nil, fmt.Errorf("bans: %w", err)
	}
	return &Store{set: set, now: now}, nil
}
