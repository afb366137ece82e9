package jsqueue

// Crash closes s as a crash of its node would for what matters to
// clients: the acknowledgements received since the last flush are not
// persisted. The NATS connection and servers stay up.
func Crash(s *Store) error {
	s.crashed.Store(true)
	return s.Close()
}
