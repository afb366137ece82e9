package revocations

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/chatd/chatd/broker/service/records"
)

// keyTag prefixes revocations in the node's shared Badger database (see
// badgerq's key layout).
const keyTag = 'r'

// told adapts onRevoke to a records.Set's onPut.
func told(onRevoke OnRevoke) func(string, Revocation) {
	return func(_ string, r Revocation) {
		if onRevoke != nil {
			onRevoke(r)
		}
	}
}

// NewBadger returns the Store of one node, in db; now is its clock (nil
// means time.Now).
func NewBadger(db *badger.DB, now func() time.Time, onRevoke OnRevoke, log *slog.Logger) (*Store, error) {
	if now == nil {
		now = time.Now
	}
	set, err := records.NewBadger(db, keyTag, told(onRevoke))
	if err != nil {
		return nil, fmt.Errorf("revocations: %w", err)
	}
	return &Store{set: set, now: now, log: log}, nil
}

// NewKV returns the Store of a cluster node on the bucket named bucket,
// telling onRevoke of each revocation made on any node as it reaches
// this one. ctx bounds the setup.
func NewKV(ctx context.Context, js jetstream.JetStream, bucket string, replicas int, now func() time.Time, onRevoke OnRevoke, log *slog.Logger) (*Store, error) {
	if now == nil {
		now = time.Now
	}
	set, err := records.NewKV(ctx, js, bucket, "chatd revoked tokens", replicas, told(onRevoke), log)
	if err != nil {
		return nil, fmt.Errorf("revocations: %w", err)
	}
	return &Store{set: set, now: now, log: log}, nil
}
