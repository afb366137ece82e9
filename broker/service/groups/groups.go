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

	"github.com/chatd/chatd/broker/protocol/topic"
)

// opTimeout bounds one operation against the storage, conflict retries
// included; only the KV backend can take that long.
const opTimeout = 10 * time.Second

// Defaults of the Options.
const (
	// DefaultMaxPerUser is how many groups one user may have made and not
	// deleted, unless MaxPerUser says otherwise.
	DefaultMaxPerUser = 1000
	// DefaultCacheMembers bounds the cache unless CacheMembers says
	// otherwise: about 80 MB with 64-byte user IDs, less with shorter ones.
	DefaultCacheMembers = 1_000_000
)

// Errors of group operations; the HTTP API maps each to a status.
var (
	ErrUnknown       = errors.New("unknown group")
	ErrExists        = errors.New("group exists")
	ErrNotAuthorized = errors.New("not authorized")
	ErrInvalid       = errors.New("invalid request")
	ErrTooMany       = errors.New("too many members")
	ErrTooManyGroups = errors.New("too many groups")
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
	// Admins may add and remove members and delete the group; sorted.
	Admins []string `json:"admins"`
	// Creator made the group, which counts against its MaxPerUser until
	// the group is deleted; empty for groups made before it was recorded,
	// which count against nobody's.
	Creator string `json:"creator,omitempty"`
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
	c := *g
	c.Members, c.Admins = slices.Clone(g.Members), slices.Clone(g.Admins)
	return &c
}

// Option sets a limit of a Store other than its members per group.
type Option func(*options)

type options struct {
	maxPerUser   int
	cacheMembers int
}

// MaxPerUser caps how many groups one user may have made and not
// deleted; n must be positive, else the default stays.
func MaxPerUser(n int) Option {
	return func(o *options) {
		if n > 0 {
			o.maxPerUser = n
		}
	}
}

// CacheMembers bounds the groups a Store keeps in memory by their members,
// summed, each group counting one more; the groups used least recently
// make room. n must be positive, else the default stays.
func CacheMembers(n int) Option {
	return func(o *options) {
		if n > 0 {
			o.cacheMembers = n
		}
	}
}

// backend is where groups persist. Every write is a compare-and-set on a
// revision that grows with each write of a group, so the Store needs no
// lock across storage calls and concurrent writers, in this process or on
// other nodes, never overwrite each other's changes.
type backend interface {
	// get reads gid from storage, never from a cache: nil when there is no
	// such group, with the revision of its deletion or 0.
	get(ctx context.Context, gid string) (*Group, uint64, error)
	// create stores g if there is no group g.ID, or fails with ErrExists,
	// and counts it as one of g.Creator's, failing with ErrTooManyGroups
	// if g.Creator has maxPerUser already.
	create(ctx context.Context, g *Group, maxPerUser int) (uint64, error)
	// update stores g if group g.ID is still at revision rev, or fails
	// with errConflict.
	update(ctx context.Context, g *Group, rev uint64) (uint64, error)
	// remove deletes g if it is still at revision rev, or fails with
	// errConflict, and counts it no more as one of g.Creator's. gone says
	// whether the group was deleted, which it can be even with an error:
	// its creator's count not lowered.
	remove(ctx context.Context, g *Group, rev uint64) (gone bool, err error)
	// each calls fn with every group in storage, in no set order.
	each(ctx context.Context, fn func(*Group)) error
	// forget deletes user's count of groups made.
	forget(ctx context.Context, user string) error
}

// entry is a cached group at a revision; g nil is a group deleted at rev,
// err a value that would not decode (both only ever learnt of a group
// already cached).
type entry struct {
	g   *Group
	rev uint64
	err error
}

// flight is what the Store learns of a group while operations on it that
// may cache it are under way.
type flight struct {
	// ops counts the operations.
	ops int
	// newest is the newest revision learnt since the first of them began.
	newest entry
}

// Store is every group, in storage and the most recently used of them
// cached in memory, within CacheMembers. Only groups that exist are added
// to the cache, so lookups of made-up names cost a storage read, not
// memory. A Store made by New is the only writer of its groups; one made
// by NewKV shares its bucket with the Stores of other nodes.
//
// What the Store guarantees:
//
//   - No lost updates: Create, AddMember, RemoveMember and Delete are each
//     one compare-and-set on the group's revision, retried from a fresh
//     read on conflict, so concurrent changes from any Stores on the same
//     storage all take effect, one after another.
//   - Decisions on current data: a change is applied only to the revision
//     it was computed from, and a refusal (ErrNotAuthorized, ErrTooMany,
//     ErrUnknown) or a change found already made that a cached group
//     would give is checked again against a fresh read, so none rests on
//     a stale cache. A change that leaves the group as it is writes
//     nothing.
//   - A user's count of groups made (MaxPerUser) is in storage, so it
//     survives restarts, and is shared by every node. With Badger it
//     changes in the same transaction as the group. With KV it is a key
//     of its own, raised before the group is made and lowered after it is
//     deleted, so an operation cut short between the two (a timeout, a
//     crash) leaves it one too high, never too low.
//   - Read your writes: once a change returns, Get on the same Store
//     returns it or a later revision. The cache never goes back to an
//     older revision, even for a group it dropped and read again.
//   - Get of an uncached group reads storage; with KV, from the bucket's
//     stream leader, which has every change acknowledged before the read.
//   - Other nodes' changes (KV only): the Store watches the bucket from
//     NewKV on and applies every change of a cached group to its cache,
//     so a change acknowledged on another node is returned by Get here as
//     soon as the watch delivers it, usually within milliseconds. Until
//     then Get may return the previous revision of a cached group: reads
//     are not linearizable. While the watch is interrupted (the connection
//     to NATS down, the bucket's leader changing) the cache keeps serving
//     what it has; the watch then resumes after the last change it
//     delivered, skipping none. If the watch ends for good (its connection
//     was closed), the Store stops caching and reads every group from the
//     bucket, which fails as the connection does.
//
// An operation that fails for want of an answer from storage (a timeout)
// may still have been applied.
type Store struct {
	b          backend
	maxMembers int
	maxPerUser int
	// ctx ends at Close; every storage call runs under it.
	ctx    context.Context
	cancel context.CancelFunc

	mu    sync.Mutex
	cache *cache
	// flights has the groups that operations under way may cache: a
	// revision the watch or another operation brings meanwhile may be
	// newer than the one the operation read or wrote, and must win even
	// if the group was not cached when it came.
	flights map[string]*flight
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

func newStore(b backend, maxMembers int, opts []Option) *Store {
	o := options{maxPerUser: DefaultMaxPerUser, cacheMembers: DefaultCacheMembers}
	for _, opt := range opts {
		opt(&o)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Store{b: b, maxMembers: maxMembers, maxPerUser: o.maxPerUser, ctx: ctx, cancel: cancel,
		cache: newCache(o.cacheMembers), flights: make(map[string]*flight), closing: make(chan struct{})}
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

// MemberOf returns the IDs of the groups user belongs to, sorted. It
// reads every group in storage, not the cache: a query for operators and
// backends (the server API), never for the message path.
func (s *Store) MemberOf(user string) ([]string, error) {
	ctx, cancel := context.WithTimeout(s.ctx, opTimeout)
	defer cancel()
	ids := []string{}
	err := s.b.each(ctx, func(g *Group) {
		if g.IsMember(user) {
			ids = append(ids, g.ID)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("groups of %s: %w", user, err)
	}
	slices.Sort(ids)
	return ids, nil
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
	defer s.end(s.begin(gid))
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
	if !topic.ValidUser(creator) {
		return nil, fmt.Errorf("%w: creator %q is not a user ID", ErrInvalid, creator)
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
	g := &Group{ID: gid, Members: set, Admins: []string{creator}, Creator: creator, Created: time.Now().UnixMilli()}
	ctx, cancel := context.WithTimeout(s.ctx, opTimeout)
	defer cancel()
	defer s.end(s.begin(gid))
	rev, err := s.b.create(ctx, g, s.maxPerUser)
	if err != nil {
		return nil, err
	}
	s.learn(gid, entry{g: g, rev: rev}, true)
	return g, nil
}

// AddMember adds user to gid on behalf of by, who must be an admin. A
// group by is not a member of is unknown to by, whether or not it exists.
func (s *Store) AddMember(by, gid, user string) (*Group, error) {
	if !topic.ValidUser(user) {
		return nil, fmt.Errorf("%w: %q is not a user ID", ErrInvalid, user)
	}
	return s.change(gid, func(g *Group) (action, error) {
		if !g.IsMember(by) {
			return keep, unknown(gid)
		}
		if !g.IsAdmin(by) {
			return keep, fmt.Errorf("%w: only admins add members", ErrNotAuthorized)
		}
		if g.IsMember(user) {
			return keep, nil
		}
		if len(g.Members) >= s.maxMembers {
			return keep, fmt.Errorf("%w: at most %d", ErrTooMany, s.maxMembers)
		}
		g.Members = insert(g.Members, user)
		return put, nil
	})
}

// RemoveMember removes user from gid on behalf of by: an admin, or user
// itself. A group by is not a member of is unknown to by, whether or not
// it exists.
func (s *Store) RemoveMember(by, gid, user string) (*Group, error) {
	return s.change(gid, func(g *Group) (action, error) {
		if !g.IsMember(by) {
			return keep, unknown(gid)
		}
		if by != user && !g.IsAdmin(by) {
			return keep, fmt.Errorf("%w: only admins remove others", ErrNotAuthorized)
		}
		if !g.IsMember(user) {
			return keep, nil
		}
		g.Members = remove(g.Members, user)
		g.Admins = remove(g.Admins, user)
		return put, nil
	})
}

// Delete deletes gid on behalf of by, who must be an admin; its creator
// may then make another group in its place. A group by is not a member
// of is unknown to by, whether or not it exists.
func (s *Store) Delete(by, gid string) error {
	_, err := s.change(gid, func(g *Group) (action, error) {
		if !g.IsMember(by) {
			return keep, unknown(gid)
		}
		if !g.IsAdmin(by) {
			return keep, fmt.Errorf("%w: only admins delete a group", ErrNotAuthorized)
		}
		return drop, nil
	})
	return err
}

// Erase takes user out of every group (an account deleted): the groups
// it alone administers are deleted, as nobody would be left to run them;
// it leaves the others, and is no longer named as the creator of any,
// nor counted as having made any. It returns the groups it left and
// those it deleted. Like MemberOf, it reads every group in storage.
func (s *Store) Erase(user string) (left, deleted []string, err error) {
	ctx, cancel := context.WithTimeout(s.ctx, opTimeout)
	var gids []string
	err = s.b.each(ctx, func(g *Group) {
		if g.IsMember(user) || g.Creator == user {
			gids = append(gids, g.ID)
		}
	})
	cancel()
	if err != nil {
		return nil, nil, fmt.Errorf("erase %s from groups: %w", user, err)
	}
	slices.Sort(gids)
	for _, gid := range gids {
		var dropped bool
		_, err := s.change(gid, func(g *Group) (action, error) {
			dropped = false
			if g.IsAdmin(user) && len(g.Admins) == 1 {
				dropped = true
				return drop, nil
			}
			if !g.IsMember(user) && g.Creator != user {
				return keep, nil
			}
			g.Members = remove(g.Members, user)
			g.Admins = remove(g.Admins, user)
			if g.Creator == user {
				g.Creator = ""
			}
			return put, nil
		})
		switch {
		case errors.Is(err, ErrUnknown):
			// Deleted meanwhile.
		case err != nil:
			return left, deleted, fmt.Errorf("erase %s from group %s: %w", user, gid, err)
		case dropped:
			deleted = append(deleted, gid)
		default:
			left = append(left, gid)
		}
	}
	ctx, cancel = context.WithTimeout(s.ctx, opTimeout)
	defer cancel()
	if err := s.b.forget(ctx, user); err != nil {
		return left, deleted, fmt.Errorf("erase %s from groups: %w", user, err)
	}
	return left, deleted, nil
}

// action is what an edit of change asks to be done with the group.
type action int

const (
	// keep writes nothing: the group is as it should be.
	keep action = iota
	// put stores the edited group.
	put
	// drop deletes the group.
	drop
)

// change applies edit to a copy of gid and does what edit asks if gid has
// not changed meanwhile, else applies edit again to what it has become.
// It returns the group as it is then, nil once deleted.
func (s *Store) change(gid string, edit func(*Group) (action, error)) (*Group, error) {
	if !topic.ValidUser(gid) {
		return nil, unknown(gid)
	}
	ctx, cancel := context.WithTimeout(s.ctx, opTimeout)
	defer cancel()
	defer s.end(s.begin(gid))
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
		act := keep
		if err == nil {
			g = e.g.clone()
			act, err = edit(g)
		}
		if err != nil || act == keep {
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
		if act == drop {
			var gone bool
			if gone, err = s.b.remove(ctx, e.g, e.rev); gone {
				// The deletion's own revision is not returned; any between
				// the group's and the next write's orders the same, and
				// revisions grow by at least one with each write.
				s.learn(gid, entry{rev: e.rev + 1}, false)
				return nil, err
			}
		} else {
			var rev uint64
			if rev, err = s.b.update(ctx, g, e.rev); err == nil {
				s.learn(gid, entry{g: g, rev: rev}, true)
				return g, nil
			}
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
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cache.get(gid)
}

// read loads gid from storage and caches it if it exists; it returns the
// newest revision known, which a concurrent change may have brought
// meanwhile. It must be called between begin and end.
func (s *Store) read(ctx context.Context, gid string) (entry, error) {
	g, rev, err := s.b.get(ctx, gid)
	if err != nil {
		return entry{}, fmt.Errorf("load group %s: %w", gid, err)
	}
	// Not added to the cache if missing: made-up names must not take memory.
	return s.learn(gid, entry{g: g, rev: rev}, true), nil
}

// begin records that an operation that may cache gid is under way, until
// end(gid); it returns gid.
func (s *Store) begin(gid string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	f := s.flights[gid]
	if f == nil {
		f = &flight{}
		s.flights[gid] = f
	}
	f.ops++
	return gid
}

// end records the end of an operation begun by begin(gid).
func (s *Store) end(gid string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f := s.flights[gid]
	if f.ops--; f.ops == 0 {
		delete(s.flights, gid)
	}
}

// learn takes note of e, a revision of gid read, written or brought by
// the watch, and returns the newest revision known. It replaces a cached
// entry of an older revision; add says that e may be cached if gid is not,
// which only an operation between begin and end may ask for, and which
// only a group that exists is. Revisions only grow, so whichever order
// reads, writes and the watch arrive in, the cache ends at the newest, and
// a revision that was not cached, having come while the group was not,
// is still known to the operations under way, so none caches an older one.
func (s *Store) learn(gid string, e entry, add bool) entry {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.uncached {
		return e
	}
	if f := s.flights[gid]; f != nil {
		if f.newest.rev > e.rev {
			e = f.newest
		} else {
			f.newest = e
		}
	}
	if cur, ok := s.cache.get(gid); ok {
		if cur.rev >= e.rev {
			return cur
		}
		s.cache.put(gid, e)
		return e
	}
	if add && e.g != nil {
		s.cache.put(gid, e)
	}
	return e
}

// stopCaching empties the cache for good: without the watch it would
// miss other nodes' changes.
func (s *Store) stopCaching() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.uncached = true
	s.cache.clear()
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
