// Package groups keeps group chats' memberships, in Badger on one node or
// in a replicated JetStream KV bucket in a cluster, and serves the group
// HTTP API of PROTOCOL.md section 7.
package groups

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/chatd/chatd/broker/topic"
)

// opTimeout bounds one operation against the storage, conflict retries
// included; only the KV backend can take that long.
const opTimeout = 10 * time.Second

// Errors of group operations; the HTTP API maps each to a status.
var (
	ErrUnknown       = errors.New("unknown group")
	ErrExists        = errors.New("group exists")
	ErrNotAuthorized = errors.New("not authorized")
	ErrInvalid       = errors.New("invalid request")
	ErrTooMany       = errors.New("too many members")
)

// errConflict is a compare-and-set that lost: the group is no longer at
// the revision the change was computed from.
var errConflict = errors.New("group changed meanwhile")

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

func (g *Group) clone() *Group {
	return &Group{ID: g.ID, Members: slices.Clone(g.Members), Admins: slices.Clone(g.Admins), Created: g.Created}
}

// backend is where groups persist. Every write is a compare-and-set on a
// revision that grows with each write of a group, so the Store needs no
// lock across storage calls and concurrent writers, in this process or on
// other nodes, never overwrite each other's changes.
type backend interface {
	// get reads gid from storage, never from a cache: nil when there is no
	// such group, with the revision of its deletion or 0.
	get(ctx context.Context, gid string) (*Group, uint64, error)
	// create stores g if there is no group g.ID, or fails with ErrExists.
	create(ctx context.Context, g *Group) (uint64, error)
	// update stores g if group g.ID is still at revision rev, or fails
	// with errConflict.
	update(ctx context.Context, g *Group, rev uint64) (uint64, error)
}

// entry is a cached group at a revision; g nil is a group deleted at rev
// (only ever learnt from the KV watch), err a value that would not decode.
type entry struct {
	g   *Group
	rev uint64
	err error
}

// Store is every group, in storage and cached in memory. Only groups that
// exist are cached, so lookups of made-up names cost a storage read, not
// memory; with KV, every group changed on any node since NewKV is cached
// too. A Store made by New is the only writer of its groups; one made by
// NewKV shares its bucket with the Stores of other nodes.
//
// What the Store guarantees:
//
//   - No lost updates: Create, AddMember and RemoveMember are each one
//     compare-and-set on the group's revision, retried from a fresh read
//     on conflict, so concurrent changes from any Stores on the same
//     storage all take effect, one after another.
//   - Decisions on current data: a change is applied only to the revision
//     it was computed from, and a refusal (ErrNotAuthorized, ErrTooMany,
//     ErrUnknown) or a change found already made that a cached group
//     would give is checked again against a fresh read, so none rests on
//     a stale cache. A change that leaves the group as it is writes
//     nothing.
//   - Read your writes: once a change returns, Get on the same Store
//     returns it or a later revision. The cache never goes back to an
//     older revision.
//   - Get of an uncached group reads storage; with KV, from the bucket's
//     stream leader, which has every change acknowledged before the read.
//   - Other nodes' changes (KV only): the Store watches the bucket from
//     NewKV on and applies every change to its cache, so a change
//     acknowledged on another node is returned by Get here as soon as the
//     watch delivers it, usually within milliseconds. Until then Get may
//     return the previous revision of a cached group: reads are not
//     linearizable. While the watch is interrupted (the connection to
//     NATS down, the bucket's leader changing) the cache keeps serving what
//     it has; the watch then resumes after the last change it delivered,
//     skipping none. If the watch ends for good (its connection was
//     closed), the Store stops caching and reads every group from the
//     bucket, which fails as the connection does.
//
// An operation that fails for want of an answer from storage (a timeout)
// may still have been applied.
type Store struct {
	b          backend
	maxMembers int
	// ctx ends at Close; every storage call runs under it.
	ctx    context.Context
	cancel context.CancelFunc

	mu    sync.RWMutex
	cache map[string]entry
	// uncached is set once the cache can no longer be kept current: the KV
	// watch ended other than by Close.
	uncached bool

	// watch and watched are the KV backend's watcher and the end of the
	// goroutine feeding it into the cache; nil for Badger.
	watch     jetstream.KeyWatcher
	watched   chan struct{}
	closeOnce sync.Once
	closing   chan struct{}
	closeErr  error
}

func newStore(b backend, maxMembers int) *Store {
	ctx, cancel := context.WithCancel(context.Background())
	return &Store{b: b, maxMembers: maxMembers, ctx: ctx, cancel: cancel,
		cache: make(map[string]entry), closing: make(chan struct{})}
}

// Close stops the KV watch and waits for it; for a Store made by New it
// does nothing else. It closes neither the Badger database nor the NATS
// connection. Operations after Close fail on KV. It is safe to call more
// than once.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		close(s.closing)
		if s.watch != nil {
			s.closeErr = stopWatch(s.watch)
			<-s.watched
		}
		s.cancel()
	})
	return s.closeErr
}

// Get returns the group gid. The result is shared: do not modify it.
func (s *Store) Get(gid string) (*Group, error) {
	if !topic.ValidUser(gid) {
		return nil, unknown(gid)
	}
	if e, ok := s.cached(gid); ok && e.err == nil {
		if e.g == nil {
			return nil, unknown(gid)
		}
		return e.g, nil
	}
	ctx, cancel := context.WithTimeout(s.ctx, opTimeout)
	defer cancel()
	e, err := s.read(ctx, gid)
	if err != nil {
		return nil, err
	}
	if e.err != nil {
		return nil, e.err
	}
	if e.g == nil {
		return nil, unknown(gid)
	}
	return e.g, nil
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
	ctx, cancel := context.WithTimeout(s.ctx, opTimeout)
	defer cancel()
	rev, err := s.b.create(ctx, g)
	if err != nil {
		return nil, err
	}
	s.remember(gid, entry{g: g, rev: rev})
	return g, nil
}

// AddMember adds user to gid on behalf of by, who must be an admin. A
// group by is not a member of is unknown to by, whether or not it exists.
func (s *Store) AddMember(by, gid, user string) (*Group, error) {
	if !topic.ValidUser(user) {
		return nil, fmt.Errorf("%w: %q is not a user ID", ErrInvalid, user)
	}
	return s.change(gid, func(g *Group) (bool, error) {
		if !g.IsMember(by) {
			return false, unknown(gid)
		}
		if !g.IsAdmin(by) {
			return false, fmt.Errorf("%w: only admins add members", ErrNotAuthorized)
		}
		if g.IsMember(user) {
			return false, nil
		}
		if len(g.Members) >= s.maxMembers {
			return false, fmt.Errorf("%w: at most %d", ErrTooMany, s.maxMembers)
		}
		g.Members = insert(g.Members, user)
		return true, nil
	})
}

// RemoveMember removes user from gid on behalf of by: an admin, or user
// itself. A group by is not a member of is unknown to by, whether or not
// it exists.
func (s *Store) RemoveMember(by, gid, user string) (*Group, error) {
	return s.change(gid, func(g *Group) (bool, error) {
		if !g.IsMember(by) {
			return false, unknown(gid)
		}
		if by != user && !g.IsAdmin(by) {
			return false, fmt.Errorf("%w: only admins remove others", ErrNotAuthorized)
		}
		if !g.IsMember(user) {
			return false, nil
		}
		g.Members = remove(g.Members, user)
		g.Admins = remove(g.Admins, user)
		return true, nil
	})
}

// change applies edit to a copy of gid and stores it if gid has not
// changed meanwhile, else applies edit again to what it has become. edit
// reports whether it changed the group; a group it leaves as it was is
// not written.
func (s *Store) change(gid string, edit func(*Group) (bool, error)) (*Group, error) {
	if !topic.ValidUser(gid) {
		return nil, unknown(gid)
	}
	ctx, cancel := context.WithTimeout(s.ctx, opTimeout)
	defer cancel()
	e, ok := s.cached(gid)
	fresh := !ok
	for {
		if fresh {
			var err error
			if e, err = s.read(ctx, gid); err != nil {
				return nil, err
			}
		}
		var err error
		switch {
		case e.err != nil:
			err = e.err
		case e.g == nil:
			err = unknown(gid)
		}
		var g *Group
		changed := false
		if err == nil {
			g = e.g.clone()
			changed, err = edit(g)
		}
		if err != nil || !changed {
			if fresh {
				if err != nil {
					return nil, err
				}
				return e.g, nil
			}
			// Refused, or found already done, on the cached copy, which
			// may be behind storage: only the stored group may decide.
			fresh = true
			continue
		}
		rev, err := s.b.update(ctx, g, e.rev)
		if err == nil {
			s.remember(gid, entry{g: g, rev: rev})
			return g, nil
		}
		if !errors.Is(err, errConflict) {
			return nil, err
		}
		// Another change won; each lost round means one that succeeded,
		// so this ends, within ctx at the latest.
		if ctx.Err() != nil {
			return nil, fmt.Errorf("change group %s: %w", gid, err)
		}
		fresh = true
	}
}

// cached returns the cache's entry for gid, if any.
func (s *Store) cached(gid string) (entry, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	e, ok := s.cache[gid]
	return e, ok
}

// read loads gid from storage and caches it if it exists; it returns the
// newest revision known, which a concurrent change may have cached meanwhile.
func (s *Store) read(ctx context.Context, gid string) (entry, error) {
	g, rev, err := s.b.get(ctx, gid)
	if err != nil {
		return entry{}, fmt.Errorf("load group %s: %w", gid, err)
	}
	if g == nil {
		// Not cached: made-up names must not take memory.
		return entry{rev: rev}, nil
	}
	return s.remember(gid, entry{g: g, rev: rev}), nil
}

// remember caches e unless the cache holds a later revision of gid, and
// returns what the cache holds then. Revisions only grow, so whichever
// order reads, writes and the watch arrive in, the cache ends at the newest.
func (s *Store) remember(gid string, e entry) entry {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.uncached {
		return e
	}
	if cur, ok := s.cache[gid]; ok && cur.rev >= e.rev {
		return cur
	}
	s.cache[gid] = e
	return e
}

// stopCaching empties the cache for good: without the watch it would
// miss other nodes' changes.
func (s *Store) stopCaching() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.uncached = true
	clear(s.cache)
}

// unknown is the error for a group that does not exist or, to a user who
// is not a member, one that does: the same words for both, so that an
// answer does not tell whether a group exists.
func unknown(gid string) error { return fmt.Errorf("%w: %s", ErrUnknown, gid) }

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
