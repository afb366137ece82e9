// Package presence tracks whether each user has a device online and
// publishes its changes on presence/{user}. The last state of every user
// is kept in Badger, where it survives a restart and from where Retained
// reads it for a new subscriber: not in mochi's retained messages, which
// would hold every user's in memory and copy them all every second.
package presence

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/chatd/chatd/broker/protocol/envelope"
	"github.com/chatd/chatd/broker/protocol/topic"
)

// keyTag prefixes presence records in the shared Badger database.
const keyTag = 'p'

// Publisher publishes a message, as the server.
type Publisher func(topic string, payload []byte, retain bool, qos byte) error

// Relay carries a node's own presence changes to every node of a
// cluster, this one included, which hand them to Tracker.Remote.
type Relay func(user string, online bool)

// Tracker counts each user's connections and publishes transitions.
// Connections are counted, not devices, so a session takeover (the new
// connection arrives before the old one leaves) never shows "offline".
//
// In a cluster, a user is online while any node has a connection of it:
// each node relays its own first and last connections, and every node
// keeps, per user, the set of nodes it is online at and publishes when
// that set becomes empty or stops being so.
//
// A transition is stored (an fsync under sync: always) and published
// after the Tracker's lock is let go, by the goroutine whose connection
// caused it, so that a slow disk delays that user's transitions only. One
// goroutine at a time stores a user's, so a later state is never stored
// or published before an earlier one; transitions that come while one is
// being stored are merged into the newest.
type Tracker struct {
	db      *badger.DB
	publish Publisher
	log     *slog.Logger
	now     func() time.Time
	relay   Relay
	// save stores a user's state in db; tests slow it down.
	save func(user string, online bool, ts int64) error
	// page is how many states Retained reads in one transaction
	// (retainedPage; tests make it small).
	page int

	mu    sync.Mutex
	conns map[string]int
	// where is, in a cluster, the nodes each online user is connected to.
	where map[string]map[string]struct{}
	// unsaved is each user's newest transition not yet stored and
	// published; saving has the users a goroutine is storing them for.
	unsaved map[string]state
	saving  map[string]bool
	// erased are the users erased in the last erasedFor, and when.
	erased map[string]time.Time
}

// erasedFor is how long after an erase the offline transitions of the
// user's closing connections delete its state instead of storing it.
const erasedFor = time.Minute

// state is a user's presence from a time on, Unix milliseconds.
type state struct {
	online bool
	ts     int64
}

// New returns a Tracker storing in db and publishing with publish. In a
// cluster relay carries this node's first and last connections of a user
// to every node, and the cluster's come back through Remote and NodeGone;
// nil counts this node's connections alone.
func New(db *badger.DB, publish Publisher, relay Relay, log *slog.Logger) *Tracker {
	t := &Tracker{db: db, publish: publish, log: log, now: time.Now, conns: make(map[string]int),
		unsaved: make(map[string]state), saving: make(map[string]bool), erased: make(map[string]time.Time)}
	if relay != nil {
		t.relay = relay
		t.where = make(map[string]map[string]struct{})
	}
	t.save = t.store
	t.page = retainedPage
	return t
}

// Restore marks the users who were online when the server stopped,
// cleanly or not, offline from now: their connections did not survive.
func (t *Tracker) Restore() error {
	now := t.now().UnixMilli()
	type rec struct {
		user   string
		online bool
		ts     int64
	}
	var recs []rec
	err := t.scan(nil, 0, func(user string, online bool, ts int64) error {
		if online {
			recs = append(recs, rec{user, online, ts})
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("restore presence: %w", err)
	}
	for _, r := range recs {
		if err := t.save(r.user, false, now); err != nil {
			return fmt.Errorf("restore presence of %s: %w", r.user, err)
		}
	}
	return nil
}

// Retained calls fn with the topic and message of the last stored state
// of every user the presence filter matches: presence/{user}, or every
// user for presence/+ and presence/#. A filter that is not a presence
// filter matches nobody. It stops at fn's first error and returns it.
// fn runs outside any read transaction, so a subscriber slow to take the
// states holds no Badger snapshot open (which would keep compactions from
// dropping deleted messages).
func (t *Tracker) Retained(filter string, fn func(topic string, msg []byte) error) error {
	rest, ok := strings.CutPrefix(filter, topic.PresencePrefix)
	if !ok {
		return nil
	}
	switch {
	case rest == "+" || rest == "#":
	case topic.ValidUser(rest):
		online, ts, found, err := t.load(rest)
		if err != nil || !found {
			return err
		}
		return fn(filter, envelope.Presence(rest, online, ts))
	default:
		return nil
	}
	after := []byte(nil)
	type stored struct {
		user string
		state
	}
	for {
		var page []stored
		err := t.scan(after, t.page, func(user string, online bool, ts int64) error {
			page = append(page, stored{user, state{online: online, ts: ts}})
			return nil
		})
		if err != nil {
			return err
		}
		for _, p := range page {
			if err := fn(topic.PresencePrefix+p.user, envelope.Presence(p.user, p.online, p.ts)); err != nil {
				return err
			}
		}
		if len(page) < t.page {
			return nil
		}
		after = []byte(page[len(page)-1].user)
	}
}

// retainedPage is how many states Retained reads in one transaction.
const retainedPage = 512

// load reads user's stored state; found is false when it has none.
func (t *Tracker) load(user string) (online bool, ts int64, found bool, err error) {
	err = t.db.View(func(txn *badger.Txn) error {
		item, err := txn.Get(append([]byte{keyTag}, user...))
		if errors.Is(err, badger.ErrKeyNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		v, err := item.ValueCopy(nil)
		if err != nil {
			return err
		}
		if online, ts, found = decode(v); !found {
			return fmt.Errorf("presence record of %q is corrupt", user)
		}
		return nil
	})
	if err != nil {
		return false, 0, false, fmt.Errorf("read presence of %s: %w", user, err)
	}
	return online, ts, found, nil
}

// scan calls fn with the stored state of every user after the one named
// after (all when nil), at most limit of them (no limit when 0), in one
// read transaction.
func (t *Tracker) scan(after []byte, limit int, fn func(user string, online bool, ts int64) error) error {
	return t.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{keyTag}, PrefetchValues: true, PrefetchSize: 100})
		defer it.Close()
		it.Rewind()
		if after != nil {
			from := append([]byte{keyTag}, after...)
			it.Seek(from)
			if it.Valid() && bytes.Equal(it.Item().Key(), from) {
				it.Next()
			}
		}
		for n := 0; it.Valid() && (limit == 0 || n < limit); it.Next() {
			item := it.Item()
			v, err := item.ValueCopy(nil)
			if err != nil {
				return fmt.Errorf("read presence: %w", err)
			}
			online, ts, ok := decode(v)
			name := string(item.Key()[1:])
			if !ok || !topic.ValidUser(name) {
				return fmt.Errorf("presence record of %q is corrupt", name)
			}
			if err := fn(name, online, ts); err != nil {
				return err
			}
			n++
		}
		return nil
	})
}

// Connected records a new connection of user; the first one makes it online.
func (t *Tracker) Connected(user string) {
	t.mu.Lock()
	t.conns[user]++
	flush := t.conns[user] == 1 && t.change(user, true)
	t.mu.Unlock()
	if flush {
		t.flush(user)
	}
}

// Disconnected records a closed connection of user; the last one makes it
// offline, last seen now.
func (t *Tracker) Disconnected(user string) {
	t.mu.Lock()
	t.conns[user]--
	flush := false
	if t.conns[user] <= 0 {
		delete(t.conns, user)
		flush = t.change(user, false)
	}
	t.mu.Unlock()
	if flush {
		t.flush(user)
	}
}

// change announces a transition of this node, or relays it in a cluster.
// Called with t.mu held, so one node's relayed changes keep their order;
// true means the caller must flush(user) (see announce).
func (t *Tracker) change(user string, online bool) bool {
	if t.relay != nil {
		t.relay(user, online)
		return false
	}
	return t.announce(user, online)
}

// Remote applies a cluster node's change: user got its first connection
// at node (online) or lost its last there.
func (t *Tracker) Remote(node, user string, online bool) {
	t.mu.Lock()
	flush := t.remote(node, user, online)
	t.mu.Unlock()
	if flush {
		t.flush(user)
	}
}

// remote is Remote with t.mu held; true means the caller must flush(user).
func (t *Tracker) remote(node, user string, online bool) bool {
	nodes := t.where[user]
	if online {
		if nodes == nil {
			nodes = make(map[string]struct{})
			t.where[user] = nodes
		}
		_, had := nodes[node]
		nodes[node] = struct{}{}
		return len(nodes) == 1 && !had && t.announce(user, true)
	}
	if _, had := nodes[node]; !had {
		return false
	}
	delete(nodes, node)
	if len(nodes) > 0 {
		return false
	}
	delete(t.where, user)
	return t.announce(user, false)
}

// NodeGone drops every connection of a cluster node that stopped or restarted.
func (t *Tracker) NodeGone(node string) {
	t.mu.Lock()
	var users []string
	for user, nodes := range t.where {
		if _, ok := nodes[node]; ok {
			users = append(users, user)
		}
	}
	t.mu.Unlock()
	for _, user := range users {
		t.Remote(node, user, false)
	}
}

// Online reports whether user has a connection on this node or, in a
// cluster, on any node.
func (t *Tracker) Online(user string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.online(user)
}

// online is Online with t.mu held.
func (t *Tracker) online(user string) bool { return t.conns[user] > 0 || len(t.where[user]) > 0 }

// State returns whether user is online (on any node) and when it was
// last seen, in Unix milliseconds: now when online, 0 when never seen.
func (t *Tracker) State(user string) (online bool, lastSeen int64, err error) {
	t.mu.Lock()
	online = t.online(user)
	pending, unsaved := t.unsaved[user]
	t.mu.Unlock()
	switch {
	case online:
		return true, t.now().UnixMilli(), nil
	case unsaved:
		return false, pending.ts, nil
	}
	_, ts, found, err := t.load(user)
	if err != nil || !found {
		return false, 0, err
	}
	return false, ts, nil
}

// Local returns the users with a connection on this node.
func (t *Tracker) Local() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	users := make([]string, 0, len(t.conns))
	for u := range t.conns {
		users = append(users, u)
	}
	return users
}

// Erase forgets user's stored state (an account deleted). Connections
// of the user that close in the next erasedFor, as the erase closes
// them, go offline without storing a state again; one that comes online
// is a new user's.
func (t *Tracker) Erase(user string) error {
	t.mu.Lock()
	now := t.now()
	for u, at := range t.erased {
		if now.Sub(at) > erasedFor {
			delete(t.erased, u)
		}
	}
	t.erased[user] = now
	t.mu.Unlock()
	if err := t.forget(user); err != nil {
		return fmt.Errorf("erase presence of %s: %w", user, err)
	}
	return nil
}

// forget deletes user's stored state.
func (t *Tracker) forget(user string) error {
	return t.db.Update(func(txn *badger.Txn) error {
		return txn.Delete(append([]byte{keyTag}, user...))
	})
}

// announce records a transition for flush to store and publish; called
// with t.mu held, so that a user's transitions are recorded in the order
// they happen. It reports whether the caller must call flush(user) once it
// has let go of t.mu: true unless another goroutine is flushing user's,
// which then takes this transition too.
func (t *Tracker) announce(user string, online bool) bool {
	t.unsaved[user] = state{online: online, ts: t.now().UnixMilli()}
	if online {
		delete(t.erased, user)
	}
	if t.saving[user] {
		return false
	}
	t.saving[user] = true
	return true
}

// flush stores and publishes user's newest transition, without t.mu held,
// until none is left unsaved. Only the goroutine that announce told to
// runs it for a user, so a user's states are stored and published in
// order, and the last stored is the newest.
func (t *Tracker) flush(user string) {
	for {
		t.mu.Lock()
		st, ok := t.unsaved[user]
		if !ok {
			delete(t.saving, user)
			t.mu.Unlock()
			return
		}
		delete(t.unsaved, user)
		at, erased := t.erased[user]
		erased = erased && !st.online && t.now().Sub(at) <= erasedFor
		t.mu.Unlock()
		if erased {
			// The erased user's connections closing: its state is
			// forgotten, not stored again.
			if err := t.forget(user); err != nil {
				t.log.Error("forget presence", "user", user, "error", err)
			}
			if err := t.publish(topic.PresencePrefix+user, envelope.Presence(user, false, st.ts), false, 0); err != nil {
				t.log.Error("publish presence", "user", user, "error", err)
			}
			continue
		}
		// Stored before it is published, so that what a subscriber saw
		// survives a restart, and a subscriber that reads the stored state
		// (Retained) after this change reaches it sees this change too.
		// Not retained by mochi: Retained serves new subscribers.
		if err := t.save(user, st.online, st.ts); err != nil {
			t.log.Error("store presence", "user", user, "error", err)
		}
		if err := t.publish(topic.PresencePrefix+user, envelope.Presence(user, st.online, st.ts), false, 0); err != nil {
			t.log.Error("publish presence", "user", user, "error", err)
		}
	}
}

func (t *Tracker) store(user string, online bool, ts int64) error {
	return t.db.Update(func(txn *badger.Txn) error {
		return txn.Set(append([]byte{keyTag}, user...), encode(online, ts))
	})
}

func encode(online bool, ts int64) []byte {
	b := make([]byte, 9)
	if online {
		b[0] = 1
	}
	binary.BigEndian.PutUint64(b[1:], uint64(ts))
	return b
}

func decode(v []byte) (online bool, ts int64, ok bool) {
	if len(v) != 9 {
		return false, 0, false
	}
	return v[0] == 1, int64(binary.BigEndian.Uint64(v[1:])), true
}
