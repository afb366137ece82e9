package badgerq

// Crash closes s as a crash would for what matters to clients: the
// acknowledgements received since the last flush are not persisted.
func Crash(s *Store) error {
	s.crashed.Store(true)
	return s.Close()
}
