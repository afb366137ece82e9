package bans

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/dgraph-io/badger/v4"
)

// keyTag prefixes ban records in the node's shared Badger database (see
// badgerq's key layout).
const keyTag = 'b'

type badgerBackend struct{ db *badger.DB }

// NewBadger returns the Store of one node, in db; now is its clock (nil
// means time.Now), and onBan ends a banned user's connections (nil: none).
func NewBadger(db *badger.DB, now func() time.Time, onBan func(user string)) (*Store, error) {
	be := badgerBackend{db}
	stored, err := be.all()
	if err != nil {
		return nil, err
	}
	return newStore(be, stored, now, onBan), nil
}

func key(user string) []byte { return append([]byte{keyTag}, user...) }

func (be badgerBackend) put(b Ban) error {
	v, err := json.Marshal(b)
	if err != nil {
		return fmt.Errorf("ban %s: %w", b.User, err)
	}
	if err := be.db.Update(func(txn *badger.Txn) error { return txn.Set(key(b.User), v) }); err != nil {
		return fmt.Errorf("ban %s: %w", b.User, err)
	}
	return nil
}

func (be badgerBackend) delete(user string) error {
	if err := be.db.Update(func(txn *badger.Txn) error { return txn.Delete(key(user)) }); err != nil {
		return fmt.Errorf("unban %s: %w", user, err)
	}
	return nil
}

func (be badgerBackend) all() ([]Ban, error) {
	var out []Ban
	err := be.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{keyTag}})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			var b Ban
			if err := it.Item().Value(func(v []byte) error { return json.Unmarshal(v, &b) }); err != nil {
				return fmt.Errorf("ban record %q: %w", it.Item().Key(), err)
			}
			out = append(out, b)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read bans: %w", err)
	}
	return out, nil
}

func (badgerBackend) close() {}
