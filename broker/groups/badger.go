package groups

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"

	"github.com/dgraph-io/badger/v4"
)

// keyTag prefixes group records in the shared Badger database.
const keyTag = 'g'

// New returns a Store in db allowing at most maxMembers per group. It
// must be the only Store on db. Close is not needed.
func New(db *badger.DB, maxMembers int) *Store {
	return newStore(&badgerBackend{db: db}, maxMembers)
}

// badgerBackend keeps groups in Badger; a group's revision is its record's
// Badger version, which grows with every commit, across restarts too.
type badgerBackend struct {
	db *badger.DB
	// mu serialises writes, so that the version read back after a commit
	// is that commit's: Badger does not return a commit's version.
	mu sync.Mutex
}

func (b *badgerBackend) get(_ context.Context, gid string) (*Group, uint64, error) {
	var g *Group
	var rev uint64
	err := b.db.View(func(txn *badger.Txn) error {
		item, err := txn.Get(key(gid))
		if errors.Is(err, badger.ErrKeyNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		rev = item.Version()
		return item.Value(func(v []byte) error {
			g = new(Group)
			return json.Unmarshal(v, g)
		})
	})
	if err != nil {
		return nil, 0, err
	}
	return g, rev, nil
}

func (b *badgerBackend) create(_ context.Context, g *Group) (uint64, error) {
	return b.put(g, 0, true)
}

func (b *badgerBackend) update(_ context.Context, g *Group, rev uint64) (uint64, error) {
	return b.put(g, rev, false)
}

// put writes g if its record is at version rev, 0 for none. A create
// finding a record fails with ErrExists, an update with errConflict.
func (b *badgerBackend) put(g *Group, rev uint64, create bool) (uint64, error) {
	v, err := json.Marshal(g)
	if err != nil {
		return 0, fmt.Errorf("encode group %s: %w", g.ID, err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	k := key(g.ID)
	err = b.db.Update(func(txn *badger.Txn) error {
		var cur uint64
		item, err := txn.Get(k)
		switch {
		case err == nil:
			cur = item.Version()
		case !errors.Is(err, badger.ErrKeyNotFound):
			return err
		}
		if create && cur != 0 {
			return fmt.Errorf("%w: %s", ErrExists, g.ID)
		}
		if cur != rev {
			return errConflict
		}
		return txn.Set(k, v)
	})
	if errors.Is(err, ErrExists) || errors.Is(err, errConflict) {
		return 0, err
	}
	if errors.Is(err, badger.ErrConflict) {
		// Only a writer outside this Store could cause it; try again from
		// a fresh read like any other conflict.
		return 0, fmt.Errorf("store group %s: %w: %w", g.ID, errConflict, err)
	}
	if err != nil {
		return 0, fmt.Errorf("store group %s: %w", g.ID, err)
	}
	err = b.db.View(func(txn *badger.Txn) error {
		item, err := txn.Get(k)
		if err != nil {
			return err
		}
		rev = item.Version()
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("read back group %s: %w", g.ID, err)
	}
	return rev, nil
}

func key(gid string) []byte { return append([]byte{keyTag}, gid...) }
