package groups

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"sync"

	"github.com/dgraph-io/badger/v4"
)

// keyTag prefixes group records in the shared Badger database.
const keyTag = 'g'

// countTag follows keyTag in the key of a user's count of groups made; no
// group ID has it, so no group's key begins with it.
const countTag = '/'

// New returns a Store in db allowing at most maxMembers per group, and
// the limits of opts. It must be the only Store on db. Close is not needed.
func New(db *badger.DB, maxMembers int, opts ...Option) *Store {
	return newStore(&badgerBackend{db: db}, maxMembers, opts)
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

func (b *badgerBackend) create(_ context.Context, g *Group, maxPerUser int) (uint64, error) {
	v, err := json.Marshal(g)
	if err != nil {
		return 0, fmt.Errorf("encode group %s: %w", g.ID, err)
	}
	return b.put(g.ID, func(txn *badger.Txn, cur uint64) error {
		if cur != 0 {
			return fmt.Errorf("%w: %s", ErrExists, g.ID)
		}
		n, err := count(txn, g.Creator)
		if err != nil {
			return err
		}
		if n >= maxPerUser {
			return fmt.Errorf("%w: at most %d per user", ErrTooManyGroups, maxPerUser)
		}
		if err := setCount(txn, g.Creator, n+1); err != nil {
			return err
		}
		return txn.Set(key(g.ID), v)
	})
}

func (b *badgerBackend) update(_ context.Context, g *Group, rev uint64) (uint64, error) {
	v, err := json.Marshal(g)
	if err != nil {
		return 0, fmt.Errorf("encode group %s: %w", g.ID, err)
	}
	return b.put(g.ID, func(txn *badger.Txn, cur uint64) error {
		if cur != rev {
			return errConflict
		}
		return txn.Set(key(g.ID), v)
	})
}

func (b *badgerBackend) remove(_ context.Context, g *Group, rev uint64) (bool, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	err := b.commit(g.ID, func(txn *badger.Txn, cur uint64) error {
		if cur != rev {
			return errConflict
		}
		if err := txn.Delete(key(g.ID)); err != nil {
			return err
		}
		if g.Creator == "" {
			return nil
		}
		n, err := count(txn, g.Creator)
		if err != nil {
			return err
		}
		return setCount(txn, g.Creator, max(n-1, 0))
	})
	if err != nil {
		return false, err
	}
	return true, nil
}

// put commits write and returns the version of gid's record it left.
func (b *badgerBackend) put(gid string, write func(txn *badger.Txn, cur uint64) error) (uint64, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if err := b.commit(gid, write); err != nil {
		return 0, err
	}
	var rev uint64
	err := b.db.View(func(txn *badger.Txn) error {
		item, err := txn.Get(key(gid))
		if err != nil {
			return err
		}
		rev = item.Version()
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("read back group %s: %w", gid, err)
	}
	return rev, nil
}

// commit runs write in one transaction, given the version of gid's record
// (0 for none), with b.mu held. The Store's own errors (ErrExists,
// ErrTooManyGroups, errConflict) come back as write returned them.
func (b *badgerBackend) commit(gid string, write func(txn *badger.Txn, cur uint64) error) error {
	err := b.db.Update(func(txn *badger.Txn) error {
		var cur uint64
		item, err := txn.Get(key(gid))
		switch {
		case err == nil:
			cur = item.Version()
		case !errors.Is(err, badger.ErrKeyNotFound):
			return err
		}
		return write(txn, cur)
	})
	switch {
	case err == nil, errors.Is(err, ErrExists), errors.Is(err, ErrTooManyGroups), errors.Is(err, errConflict):
		return err
	case errors.Is(err, badger.ErrConflict):
		// Only a writer outside this Store could cause it; try again from
		// a fresh read like any other conflict.
		return fmt.Errorf("store group %s: %w: %w", gid, errConflict, err)
	}
	return fmt.Errorf("store group %s: %w", gid, err)
}

// count returns how many groups user has made and not deleted.
func (b *badgerBackend) forget(_ context.Context, user string) error {
	err := b.db.Update(func(txn *badger.Txn) error { return txn.Delete(countKey(user)) })
	if err != nil {
		return fmt.Errorf("delete group count of %s: %w", user, err)
	}
	return nil
}

func count(txn *badger.Txn, user string) (int, error) {
	item, err := txn.Get(countKey(user))
	if errors.Is(err, badger.ErrKeyNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("load group count of %s: %w", user, err)
	}
	var n int
	err = item.Value(func(v []byte) error {
		n, err = parseCount(v)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("load group count of %s: %w", user, err)
	}
	return n, nil
}

// setCount records n groups made by user; none takes no record.
func setCount(txn *badger.Txn, user string, n int) error {
	var err error
	if n == 0 {
		err = txn.Delete(countKey(user))
	} else {
		err = txn.Set(countKey(user), strconv.AppendInt(nil, int64(n), 10))
	}
	if err != nil {
		return fmt.Errorf("store group count of %s: %w", user, err)
	}
	return nil
}

// parseCount decodes a count of groups, a decimal number in both backends.
func parseCount(v []byte) (int, error) {
	n, err := strconv.Atoi(string(v))
	if err != nil || n < 0 {
		return 0, fmt.Errorf("bad count %q", v)
	}
	return n, nil
}

func (b *badgerBackend) each(_ context.Context, fn func(*Group)) error {
	return b.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{keyTag}, PrefetchValues: true})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			if k := it.Item().Key(); len(k) > 1 && k[1] == countTag {
				continue // a user's count of groups made
			}
			g := new(Group)
			if err := it.Item().Value(func(v []byte) error { return json.Unmarshal(v, g) }); err != nil {
				return fmt.Errorf("group record %q: %w", it.Item().Key(), err)
			}
			fn(g)
		}
		return nil
	})
}

func key(gid string) []byte { return append([]byte{keyTag}, gid...) }

func countKey(user string) []byte { return append([]byte{keyTag, countTag}, user...) }
