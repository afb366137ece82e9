// Package bans keeps the users an app's backend banned (the server API):
// a banned user's connects are refused until the ban expires or is
// lifted. Bans live in the node's Badger database, or in a replicated
// JetStream bucket in a cluster, and every node keeps all of them in
// memory, so that a CONNECT costs no read.
package bans

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/chatd/chatd/broker/service/records"
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

// Store is every ban, kept in memory on every node (records.Set).
type Store struct {
	set *records.Set[Ban]
	now func() time.Time
}

// onPut ends, when b holds, the banned user's connections on this node
// (onBan), as each ban reaches it.
func onPut(now func() time.Time, onBan func(user string)) func(string, Ban) {
	return func(_ string, b Ban) {
		if onBan != nil && b.Active(now()) {
			onBan(b.User)
		}
	}
}

// clock is now, or time.Now when nil.
func clock(now func() time.Time) func() time.Time {
	if now == nil {
		return time.Now
	}
	return now
}

// Ban bans b.User, replacing any ban of it, and ends its connections
// here; in a cluster every node ends those it has as the ban reaches it.
func (s *Store) Ban(b Ban) error {
	if err := s.set.Put(b.User, b); err != nil {
		return fmt.Errorf("ban %s: %w", b.User, err)
	}
	return nil
}

// Unban lifts the ban of user, or answers ErrUnknown.
func (s *Store) Unban(user string) error {
	if _, ok := s.Banned(user); !ok {
		return ErrUnknown
	}
	if err := s.set.Delete(user); err != nil {
		return fmt.Errorf("unban %s: %w", user, err)
	}
	return nil
}

// Banned returns the ban of user if one holds now.
func (s *Store) Banned(user string) (Ban, bool) {
	b, ok := s.set.Get(user)
	if !ok || !b.Active(s.now()) {
		return Ban{}, false
	}
	return b, true
}

// List returns the bans that hold now, by user.
func (s *Store) List() []Ban {
	now := s.now()
	out := slices.DeleteFunc(slices.Collect(maps.Values(s.set.All())), func(b Ban) bool { return !b.Active(now) })
	slices.SortFunc(out, func(a, b Ban) int { return strings.Compare(a.User, b.User) })
	return out
}

// Close stops following the other nodes' changes.
func (s *Store) Close() { s.set.Close() }
