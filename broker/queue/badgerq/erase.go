package badgerq

import (
	"errors"
	"fmt"

	"github.com/dgraph-io/badger/v4"
)

// Erase implements queue.Store: it removes every device of user at once,
// then, on the committer goroutine (so that no commit of user's queue
// runs meanwhile), deletes its messages and the dedup keys of what it
// sent.
func (s *Store) Erase(user string) ([]string, error) {
	names, err := s.RemoveAll(user)
	if err != nil {
		return nil, fmt.Errorf("erase %s: %w", user, err)
	}
	err = errStoreClosed
	s.reg.Do(func() { err = s.eraseQueue(user) })
	if err != nil {
		return names, fmt.Errorf("erase %s: %w", user, err)
	}
	return names, nil
}

// errStoreClosed is the error of an Erase after Close.
var errStoreClosed = errors.New("queue store closed")

// eraseQueue deletes user's messages and dedup keys; run by the committer.
func (s *Store) eraseQueue(user string) error {
	u, err := s.reg.Lock(user)
	if err != nil {
		return err
	}
	defer u.Unlock()
	wb := s.db.NewWriteBatch()
	defer wb.Cancel()
	var msgs uint64
	err = s.db.View(func(txn *badger.Txn) error {
		for _, prefix := range [][]byte{msgPrefix(user), dedupKey(user, "")} {
			io := badger.DefaultIteratorOptions
			io.PrefetchValues = false
			io.Prefix = prefix
			it := txn.NewIterator(io)
			for it.Rewind(); it.Valid(); it.Next() {
				key := it.Item().KeyCopy(nil)
				if err := wb.Delete(key); err != nil {
					it.Close()
					return fmt.Errorf("delete %q: %w", key, err)
				}
				if prefix[0] == msgTag && seqOf(key) > u.Queue.deleted {
					msgs++
				}
			}
			it.Close()
		}
		return nil
	})
	if err == nil {
		err = wb.Flush()
	}
	if err != nil {
		return fmt.Errorf("delete queue: %w", err)
	}
	// Sequences go on from the head while the user stays in memory, and
	// start again at 1 once it is loaded again with nothing stored: no
	// device is left to have acknowledged one.
	q := &u.Queue
	q.deleted, q.tail = q.head, q.head+1
	s.stats.Deleted.Add(msgs)
	return nil
}
