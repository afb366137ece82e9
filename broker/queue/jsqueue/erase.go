package jsqueue

import "fmt"

// Erase implements queue.Store: it removes every device of user from the
// bucket, then purges the user's subject. The stream's message ids, which
// name senders, are JetStream's to forget, after dedup_window.
func (s *Store) Erase(user string) ([]string, error) {
	names, err := s.RemoveAll(user)
	if err != nil {
		return nil, fmt.Errorf("erase %s: %w", user, err)
	}
	ctx, cancel := s.reqCtx()
	defer cancel()
	subj, shard := s.names.subject(user)
	// Sequence 0 purges the whole subject.
	n, err := purge(ctx, s.nc, s.names.stream(shard), subj, 0)
	if err != nil {
		return names, fmt.Errorf("erase %s: %w", user, err)
	}
	s.stats.Deleted.Add(n)
	return names, nil
}
