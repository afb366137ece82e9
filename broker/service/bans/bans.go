// Package bans keeps the users an app's backend banned (the server API):
// a banned user's connects are refused until the ban expires or is
// lifted. Bans live in the node's Badger database, or in a replicated
// JetStream bucket in a cluster, and every node keeps all of them in
// memory, so that a CONNECT costs no read.
package bans

import (
	"errors"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"
)

// ErrUnknown is the error of lifting a ban that does not exist.
var ErrUnknown = errors.New("no such ban")

// Ban is one banned user.
type Ban struct {
	// User is the banned user ID.
	User string `json:"user"`
	// Reason is the backend's, for people; it may be empty.
	Reason string `json:"reason"`
	// Until is when the ban ends, in Unix seconds; 0 means never.
	Until int64 `json:"until"`
	// Created is when it was made, in Unix seconds.
	Created int64 `json:"created"`
}

// Active reports whether b holds at now.
func (b Ban) Active(now time.Time) bool { return b.Until == 0 || now.Unix() < b.Until }

// backend persists bans.
type backend interface {
	put(b Ban) error
	delete(user string) error
	close()
}

// Store is every ban, kept in memory over a backend.
type Store struct {
	be  backend
	now func() time.Time
	// onBan ends the banned user's connections on this node.
	onBan func(user string)

	mu   sync.RWMutex
	bans map[string]Ban
}

// newStore keeps bans, those in storage now first, over be.
func newStore(be backend, stored []Ban, now func() time.Time, onBan func(user string)) *Store {
	if now == nil {
		now = time.Now
	}
	if onBan == nil {
		onBan = func(string) {}
	}
	s := &Store{be: be, now: now, onBan: onBan, bans: make(map[string]Ban, len(stored))}
	for _, b := range stored {
		s.bans[b.User] = b
	}
	return s
}

// Ban bans b.User, replacing any ban of it, and ends its connections
// here; in a cluster every node ends those it has as the ban reaches it.
func (s *Store) Ban(b Ban) error {
	if err := s.be.put(b); err != nil {
		return err
	}
	s.set(b)
	return nil
}

// Unban lifts the ban of user, or answers ErrUnknown.
func (s *Store) Unban(user string) error {
	if _, ok := s.Banned(user); !ok {
		return ErrUnknown
	}
	if err := s.be.delete(user); err != nil {
		return err
	}
	s.unset(user)
	return nil
}

// Banned returns the ban of user if one holds now.
func (s *Store) Banned(user string) (Ban, bool) {
	s.mu.RLock()
	b, ok := s.bans[user]
	s.mu.RUnlock()
	if !ok || !b.Active(s.now()) {
		return Ban{}, false
	}
	return b, true
}

// List returns the bans that hold now, by user.
func (s *Store) List() []Ban {
	now := s.now()
	s.mu.RLock()
	all := slices.Collect(maps.Values(s.bans))
	s.mu.RUnlock()
	out := slices.DeleteFunc(all, func(b Ban) bool { return !b.Active(now) })
	slices.SortFunc(out, func(a, b Ban) int { return strings.Compare(a.User, b.User) })
	return out
}

// Close stops following the other nodes' changes.
func (s *Store) Close() { s.be.close() }

// set records b and, when it holds, ends the user's connections here.
func (s *Store) set(b Ban) {
	s.mu.Lock()
	s.bans[b.User] = b
	s.mu.Unlock()
	if b.Active(s.now()) {
		s.onBan(b.User)
	}
}

func (s *Store) unset(user string) {
	s.mu.Lock()
	delete(s.bans, user)
	s.mu.Unlock()
}
