// Package groups keeps group chats' memberships in Badger and serves the
// group HTTP API of PROTOCOL.md section 7.
package groups

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/chatd/chatd/broker/topic"
)

// keyTag prefixes group records in the shared Badger database.
const keyTag = 'g'

// Errors of group operations; the HTTP API maps each to a status.
var (
	ErrUnknown       = errors.New("unknown group")
	ErrExists        = errors.New("group exists")
	ErrNotAuthorized = errors.New("not authorized")
	ErrInvalid       = errors.New("invalid request")
	ErrTooMany       = errors.New("too many members")
)

// Group is one group chat.
type Group struct {
	// ID names the group; members publish to group/{ID}.
	ID string `json:"id"`
	// Members are the user IDs in the group, sorted.
	Members []string `json:"members"`
	// Admins may add and remove members; sorted.
	Admins []string `json:"admins"`
	// Created is when the group was made, Unix milliseconds.
	Created int64 `json:"created"`
}

// IsMember reports whether user belongs to g.
func (g *Group) IsMember(user string) bool {
	_, ok := slices.BinarySearch(g.Members, user)
	return ok
}

// IsAdmin reports whether user administers g.
func (g *Group) IsAdmin(user string) bool {
	_, ok := slices.BinarySearch(g.Admins, user)
	return ok
}

// Store is every group, on disk and cached in memory. Changes are written
// to disk before they are visible. Only groups that exist are cached, so
// lookups of made-up names cost a disk read, not memory.
type Store struct {
	db         *badger.DB
	maxMembers int
	mu         sync.RWMutex
	cache      map[string]*Group
}

// New returns a Store in db allowing at most maxMembers per group.
func New(db *badger.DB, maxMembers int) *Store {
	return &Store{db: db, maxMembers: maxMembers, cache: make(map[string]*Group)}
}

// Get returns the group gid. The result is shared: do not modify it.
func (s *Store) Get(gid string) (*Group, error) {
	if !topic.ValidUser(gid) {
		return nil, fmt.Errorf("%w: %q", ErrUnknown, gid)
	}
	s.mu.RLock()
	g, ok := s.cache[gid]
	s.mu.RUnlock()
	if ok {
		return g, nil
	}
	g, err := s.load(gid)
	if err != nil {
		return nil, err
	}
	if g == nil {
		return nil, fmt.Errorf("%w: %s", ErrUnknown, gid)
	}
	s.mu.Lock()
	s.cache[gid] = g
	s.mu.Unlock()
	return g, nil
}

func (s *Store) load(gid string) (*Group, error) {
	var g *Group
	err := s.db.View(func(txn *badger.Txn) error {
		item, err := txn.Get(key(gid))
		if errors.Is(err, badger.ErrKeyNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		return item.Value(func(v []byte) error {
			g = new(Group)
			return json.Unmarshal(v, g)
		})
	})
	if err != nil {
		return nil, fmt.Errorf("load group %s: %w", gid, err)
	}
	return g, nil
}

// Create makes group gid with creator as member and admin, plus members.
func (s *Store) Create(creator, gid string, members []string) (*Group, error) {
	if !topic.ValidUser(gid) {
		return nil, fmt.Errorf("%w: group id must be 1-64 characters of [A-Za-z0-9_.-]", ErrInvalid)
	}
	set := []string{creator}
	for _, m := range members {
		if !topic.ValidUser(m) {
			return nil, fmt.Errorf("%w: %q is not a user ID", ErrInvalid, m)
		}
		set = append(set, m)
	}
	slices.Sort(set)
	set = slices.Compact(set)
	if len(set) > s.maxMembers {
		return nil, fmt.Errorf("%w: %d members, at most %d", ErrTooMany, len(set), s.maxMembers)
	}
	g := &Group{ID: gid, Members: set, Admins: []string{creator}, Created: time.Now().UnixMilli()}
	s.mu.Lock()
	defer s.mu.Unlock()
	if cur, err := s.lockedGet(gid); err == nil && cur != nil {
		return nil, fmt.Errorf("%w: %s", ErrExists, gid)
	} else if err != nil {
		return nil, err
	}
	if err := s.put(g); err != nil {
		return nil, err
	}
	return g, nil
}

// AddMember adds user to gid on behalf of by, who must be an admin.
func (s *Store) AddMember(by, gid, user string) (*Group, error) {
	if !topic.ValidUser(user) {
		return nil, fmt.Errorf("%w: %q is not a user ID", ErrInvalid, user)
	}
	return s.change(gid, func(g *Group) error {
		if !g.IsAdmin(by) {
			return fmt.Errorf("%w: only admins add members", ErrNotAuthorized)
		}
		if g.IsMember(user) {
			return nil
		}
		if len(g.Members) >= s.maxMembers {
			return fmt.Errorf("%w: at most %d", ErrTooMany, s.maxMembers)
		}
		g.Members = insert(g.Members, user)
		return nil
	})
}

// RemoveMember removes user from gid on behalf of by: an admin, or user itself.
func (s *Store) RemoveMember(by, gid, user string) (*Group, error) {
	return s.change(gid, func(g *Group) error {
		if by != user && !g.IsAdmin(by) {
			return fmt.Errorf("%w: only admins remove others", ErrNotAuthorized)
		}
		g.Members = remove(g.Members, user)
		g.Admins = remove(g.Admins, user)
		return nil
	})
}

// change applies edit to a copy of gid and stores it.
func (s *Store) change(gid string, edit func(*Group) error) (*Group, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	cur, err := s.lockedGet(gid)
	if err != nil {
		return nil, err
	}
	if cur == nil {
		return nil, fmt.Errorf("%w: %s", ErrUnknown, gid)
	}
	g := &Group{ID: cur.ID, Members: slices.Clone(cur.Members), Admins: slices.Clone(cur.Admins), Created: cur.Created}
	if err := edit(g); err != nil {
		return nil, err
	}
	if err := s.put(g); err != nil {
		return nil, err
	}
	return g, nil
}

// lockedGet reads through the cache, nil for no such group; called with s.mu held.
func (s *Store) lockedGet(gid string) (*Group, error) {
	if !topic.ValidUser(gid) {
		return nil, nil
	}
	if g, ok := s.cache[gid]; ok {
		return g, nil
	}
	g, err := s.load(gid)
	if err != nil || g == nil {
		return nil, err
	}
	s.cache[gid] = g
	return g, nil
}

// put writes g and caches it; called with s.mu held.
func (s *Store) put(g *Group) error {
	b, err := json.Marshal(g)
	if err != nil {
		return fmt.Errorf("encode group %s: %w", g.ID, err)
	}
	err = s.db.Update(func(txn *badger.Txn) error { return txn.Set(key(g.ID), b) })
	if err != nil {
		return fmt.Errorf("store group %s: %w", g.ID, err)
	}
	s.cache[g.ID] = g
	return nil
}

func key(gid string) []byte { return append([]byte{keyTag}, gid...) }

func insert(sorted []string, v string) []string {
	i, found := slices.BinarySearch(sorted, v)
	if found {
		return sorted
	}
	return slices.Insert(sorted, i, v)
}

func remove(sorted []string, v string) []string {
	i, found := slices.BinarySearch(sorted, v)
	if !found {
		return sorted
	}
	return slices.Delete(sorted, i, i+1)
}
