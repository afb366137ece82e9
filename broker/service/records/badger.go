package records

import (
	"encoding/json"
	"fmt"

	"github.com/dgraph-io/badger/v4"
)

type badgerBackend[T any] struct {
	db  *badger.DB
	tag byte
}

// NewBadger returns the Set of one node, in db under keys that start with
// tag (see badgerq's key layout), with onPut (nil: none) told of each
// record put.
func NewBadger[T any](db *badger.DB, tag byte, onPut func(key string, v T)) (*Set[T], error) {
	be := badgerBackend[T]{db, tag}
	stored, err := be.all()
	if err != nil {
		return nil, err
	}
	return newSet[T](be, stored, onPut), nil
}

func (be badgerBackend[T]) key(k string) []byte { return append([]byte{be.tag}, k...) }

func (be badgerBackend[T]) put(k string, v T) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("record %s: %w", k, err)
	}
	if err := be.db.Update(func(txn *badger.Txn) error { return txn.Set(be.key(k), b) }); err != nil {
		return fmt.Errorf("record %s: %w", k, err)
	}
	return nil
}

func (be badgerBackend[T]) delete(k string) error {
	if err := be.db.Update(func(txn *badger.Txn) error { return txn.Delete(be.key(k)) }); err != nil {
		return fmt.Errorf("delete record %s: %w", k, err)
	}
	return nil
}

func (be badgerBackend[T]) all() (map[string]T, error) {
	out := make(map[string]T)
	err := be.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{be.tag}})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			var v T
			if err := it.Item().Value(func(b []byte) error { return json.Unmarshal(b, &v) }); err != nil {
				return fmt.Errorf("record %q: %w", it.Item().Key(), err)
			}
			out[string(it.Item().Key()[1:])] = v
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read records: %w", err)
	}
	return out, nil
}

func (badgerBackend[T]) close() {}
