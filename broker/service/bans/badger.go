package bans

import (
	"fmt"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/chatd/chatd/broker/service/records"
)

// keyTag prefixes ban records in the node's shared Badger database (see
// badgerq's key layout).
const keyTag = 'b'

// NewBadger returns the Store of one node, in db; now is its clock (nil
// means time.Now), and onBan ends a banned user's connections (nil: none).
func NewBadger(db *badger.DB, now func() time.Time, onBan func(user string)) (*Store, error) {
	now = clock(now)
	set, err := records.NewBadger(db, keyTag, onPut(now, onBan))
	if err != nil {
		return nil, fmt.Errorf("bans: %w", err)
	}
	return &Store{set: set, now: now}, nil
}
