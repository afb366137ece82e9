// Package records keeps small keyed records (bans, revoked tokens) in
// memory on every node, over storage: the node's Badger database, or a
// replicated JetStream KV bucket in a cluster, whose changes every node
// follows. A lookup costs no read, which a CONNECT check needs.
package records

import (
	"maps"
	"sync"
)

// backend persists records.
type backend[T any] interface {
	put(key string, v T) error
	delete(key string) error
	close()
}

// Set is every record of one kind, by key, kept in memory over a backend.
type Set[T any] struct {
	be backend[T]
	// onPut is told of each record put, here or, in a cluster, on any
	// node, once this node has it.
	onPut func(key string, v T)

	mu sync.RWMutex
	m  map[string]T
}

// newSet keeps records, those in storage now first, over be.
func newSet[T any](be backend[T], stored map[string]T, onPut func(string, T)) *Set[T] {
	if onPut == nil {
		onPut = func(string, T) {}
	}
	if stored == nil {
		stored = make(map[string]T)
	}
	return &Set[T]{be: be, onPut: onPut, m: stored}
}

// Put stores v under key, replacing what was there, and tells onPut.
func (s *Set[T]) Put(key string, v T) error {
	if err := s.be.put(key, v); err != nil {
		return err
	}
	s.set(key, v)
	return nil
}

// Delete deletes the record of key; there may be none.
func (s *Set[T]) Delete(key string) error {
	if err := s.be.delete(key); err != nil {
		return err
	}
	s.unset(key)
	return nil
}

// Get returns the record of key.
func (s *Set[T]) Get(key string) (T, bool) {
	s.mu.RLock()
	v, ok := s.m[key]
	s.mu.RUnlock()
	return v, ok
}

// All returns a copy of every record, by key.
func (s *Set[T]) All() map[string]T {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return maps.Clone(s.m)
}

// Close stops following the other nodes' changes.
func (s *Set[T]) Close() { s.be.close() }

func (s *Set[T]) set(key string, v T) {
	s.mu.Lock()
	s.m[key] = v
	s.mu.Unlock()
	s.onPut(key, v)
}

func (s *Set[T]) unset(key string) {
	s.mu.Lock()
	delete(s.m, key)
	s.mu.Unlock()
}
