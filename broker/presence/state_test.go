package presence

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
)

// states renders what was published for user as "on" and "off" in order.
func states(rec *recorder, user string) string {
	var s []string
	for _, p := range rec.of(user) {
		if p.Online {
			s = append(s, "on")
		} else {
			s = append(s, "off")
		}
	}
	return strings.Join(s, " ")
}

// op is one event a Tracker is told of.
type op struct {
	kind   string // "connect", "disconnect", "remote-on", "remote-off", "node-gone"
	node   string
	user   string
	relays string // for connect and disconnect in a cluster: the relayed change wanted, "" for none
}

// apply tells tr of o.
func (o op) apply(tr *Tracker) {
	switch o.kind {
	case "connect":
		tr.Connected(o.user)
	case "disconnect":
		tr.Disconnected(o.user)
	case "remote-on":
		tr.Remote(o.node, o.user, true)
	case "remote-off":
		tr.Remote(o.node, o.user, false)
	case "node-gone":
		tr.NodeGone(o.node)
	default:
		panic("unknown op " + o.kind)
	}
}

// TestSingleNode: a user is online from its first connection to its
// last; only those two transitions are published, per user.
func TestSingleNode(t *testing.T) {
	tests := []struct {
		name       string
		ops        []op
		want       map[string]string // user: states published
		wantOnline []string          // the users online at the end, sorted
	}{
		{"one connection", []op{{kind: "connect", user: "bob"}, {kind: "disconnect", user: "bob"}},
			map[string]string{"bob": "on off"}, nil},
		{"still connected", []op{{kind: "connect", user: "bob"}},
			map[string]string{"bob": "on"}, []string{"bob"}},
		{"takeover: the new connection comes before the old one leaves", []op{
			{kind: "connect", user: "bob"}, {kind: "connect", user: "bob"}, {kind: "disconnect", user: "bob"},
		}, map[string]string{"bob": "on"}, []string{"bob"}},
		{"two devices, both leave", []op{
			{kind: "connect", user: "bob"}, {kind: "connect", user: "bob"},
			{kind: "disconnect", user: "bob"}, {kind: "disconnect", user: "bob"},
		}, map[string]string{"bob": "on off"}, nil},
		{"users are independent", []op{
			{kind: "connect", user: "alice"}, {kind: "connect", user: "bob"},
			{kind: "disconnect", user: "alice"}, {kind: "connect", user: "carol"},
		}, map[string]string{"alice": "on off", "bob": "on", "carol": "on"}, []string{"bob", "carol"}},
		{"back online", []op{
			{kind: "connect", user: "bob"}, {kind: "disconnect", user: "bob"}, {kind: "connect", user: "bob"},
		}, map[string]string{"bob": "on off on"}, []string{"bob"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tr, rec, _ := newTracker(t)
			for _, o := range tt.ops {
				o.apply(tr)
			}
			for user, want := range tt.want {
				if got := states(rec, user); got != want {
					t.Errorf("%s published %q, want %q", user, got, want)
				}
			}
			local := tr.Local()
			slices.Sort(local)
			if !slices.Equal(local, tt.wantOnline) {
				t.Errorf("Local() = %v, want %v", local, tt.wantOnline)
			}
			for _, user := range []string{"alice", "bob", "carol"} {
				if got, want := tr.Online(user), slices.Contains(tt.wantOnline, user); got != want {
					t.Errorf("Online(%s) = %v, want %v", user, got, want)
				}
			}
		})
	}
}

// TestCluster: a node relays its own first and last connections of a
// user instead of publishing them; presence follows the cluster's
// changes coming back through Remote, online while any node has the user,
// and NodeGone takes a node's users offline unless another node has them.
func TestCluster(t *testing.T) {
	tests := []struct {
		name       string
		ops        []op
		want       map[string]string // user: states published
		wantOnline []string          // users Online at the end, sorted
		wantLocal  []string          // users with a connection on this node, sorted
	}{
		{"own connections are relayed, not published", []op{
			{kind: "connect", user: "bob", relays: "bob on"},
			{kind: "connect", user: "bob"},
			{kind: "disconnect", user: "bob"},
			{kind: "disconnect", user: "bob", relays: "bob off"},
		}, map[string]string{"bob": ""}, nil, nil},
		{"a local connection is online before its relay comes back", []op{
			{kind: "connect", user: "bob", relays: "bob on"},
		}, map[string]string{"bob": ""}, []string{"bob"}, []string{"bob"}},
		{"own change coming back", []op{
			{kind: "connect", user: "bob", relays: "bob on"},
			{kind: "remote-on", node: "self", user: "bob"},
			{kind: "disconnect", user: "bob", relays: "bob off"},
			{kind: "remote-off", node: "self", user: "bob"},
		}, map[string]string{"bob": "on off"}, nil, nil},
		{"online on another node", []op{
			{kind: "remote-on", node: "n2", user: "bob"},
		}, map[string]string{"bob": "on"}, []string{"bob"}, nil},
		{"online on two nodes, leaves one", []op{
			{kind: "remote-on", node: "n2", user: "bob"},
			{kind: "remote-on", node: "n3", user: "bob"},
			{kind: "remote-off", node: "n2", user: "bob"},
		}, map[string]string{"bob": "on"}, []string{"bob"}, nil},
		{"online on two nodes, leaves both", []op{
			{kind: "remote-on", node: "n2", user: "bob"},
			{kind: "remote-on", node: "n3", user: "bob"},
			{kind: "remote-off", node: "n3", user: "bob"},
			{kind: "remote-off", node: "n2", user: "bob"},
		}, map[string]string{"bob": "on off"}, nil, nil},
		{"the same node twice counts once", []op{
			{kind: "remote-on", node: "n2", user: "bob"},
			{kind: "remote-on", node: "n2", user: "bob"},
			{kind: "remote-off", node: "n2", user: "bob"},
		}, map[string]string{"bob": "on off"}, nil, nil},
		{"offline from a node it was never online at", []op{
			{kind: "remote-on", node: "n2", user: "bob"},
			{kind: "remote-off", node: "n3", user: "bob"},
			{kind: "remote-off", node: "n3", user: "carol"},
		}, map[string]string{"bob": "on", "carol": ""}, []string{"bob"}, nil},
		{"node gone", []op{
			{kind: "remote-on", node: "n2", user: "alice"},
			{kind: "remote-on", node: "n2", user: "bob"},
			{kind: "remote-on", node: "n3", user: "bob"},
			{kind: "remote-on", node: "n3", user: "carol"},
			{kind: "node-gone", node: "n2"},
		}, map[string]string{"alice": "on off", "bob": "on", "carol": "on"}, []string{"bob", "carol"}, nil},
		{"unknown node gone", []op{
			{kind: "remote-on", node: "n2", user: "bob"},
			{kind: "node-gone", node: "n9"},
		}, map[string]string{"bob": "on"}, []string{"bob"}, nil},
		{"back after its node was gone", []op{
			{kind: "remote-on", node: "n2", user: "bob"},
			{kind: "node-gone", node: "n2"},
			{kind: "remote-on", node: "n2", user: "bob"},
		}, map[string]string{"bob": "on off on"}, []string{"bob"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var mu sync.Mutex
			var relayed []string
			tr, rec, _ := newTrackerRelay(t, func(user string, online bool) {
				mu.Lock()
				defer mu.Unlock()
				if online {
					relayed = append(relayed, user+" on")
				} else {
					relayed = append(relayed, user+" off")
				}
			})
			for i, o := range tt.ops {
				mu.Lock()
				relayed = relayed[:0]
				mu.Unlock()
				o.apply(tr)
				mu.Lock()
				got := strings.Join(relayed, ", ")
				mu.Unlock()
				if got != o.relays {
					t.Errorf("op %d (%s %s): relayed %q, want %q", i, o.kind, o.user, got, o.relays)
				}
			}
			for user, want := range tt.want {
				if got := states(rec, user); got != want {
					t.Errorf("%s published %q, want %q", user, got, want)
				}
			}
			for _, user := range []string{"alice", "bob", "carol"} {
				if got, want := tr.Online(user), slices.Contains(tt.wantOnline, user); got != want {
					t.Errorf("Online(%s) = %v, want %v", user, got, want)
				}
			}
			local := tr.Local()
			slices.Sort(local)
			if !slices.Equal(local, tt.wantLocal) {
				t.Errorf("Local() = %v, want %v", local, tt.wantLocal)
			}
		})
	}
}

// setClock makes tr's clock read ms, Unix milliseconds, until set again.
func setClock(tr *Tracker) func(ms int64) {
	var mu sync.Mutex
	var now int64
	tr.now = func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		return time.UnixMilli(now)
	}
	return func(ms int64) {
		mu.Lock()
		defer mu.Unlock()
		now = ms
	}
}

// TestLastSeen: an online state carries the time of the first connection
// as ts, an offline one the time of the last disconnection as
// last_seen, published and stored alike, in a cluster too.
func TestLastSeen(t *testing.T) {
	tests := []struct {
		name    string
		cluster bool
		on, off func(tr *Tracker)
	}{
		{"single node", false,
			func(tr *Tracker) { tr.Connected("bob") },
			func(tr *Tracker) { tr.Disconnected("bob") }},
		{"cluster", true,
			func(tr *Tracker) { tr.Remote("n2", "bob", true) },
			func(tr *Tracker) { tr.Remote("n2", "bob", false) }},
		{"cluster, node gone", true,
			func(tr *Tracker) { tr.Remote("n2", "bob", true) },
			func(tr *Tracker) { tr.NodeGone("n2") }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var relay Relay
			if tt.cluster {
				relay = func(string, bool) {}
			}
			tr, rec, db := newTrackerRelay(t, relay)
			set := setClock(tr)
			set(1_000)
			tt.on(tr)
			if online, ts := stored(t, db, "bob"); !online || ts != 1_000 {
				t.Errorf("stored online=%v at %d, want online at 1000", online, ts)
			}
			set(5_000)
			tt.off(tr)
			got := rec.of("bob")
			want := []published{
				{User: "bob", Online: true, TS: 1_000},
				{User: "bob", Online: false, LastSeen: 5_000},
			}
			if !slices.Equal(got, want) {
				t.Fatalf("published %+v, want %+v", got, want)
			}
			if online, ts := stored(t, db, "bob"); online || ts != 5_000 {
				t.Errorf("stored online=%v at %d, want offline at 5000", online, ts)
			}
		})
	}
}

// TestRestore: after a start, a user stored online is offline from the
// start, last seen then, as its connections did not survive; one stored
// offline keeps its last seen. Nothing is published: new subscribers read
// the stored states (Retained). A corrupt record fails the restore.
func TestRestore(t *testing.T) {
	put := func(t *testing.T, db *badger.DB, key string, value []byte) {
		t.Helper()
		err := db.Update(func(txn *badger.Txn) error {
			return txn.Set(append([]byte{keyTag}, key...), value)
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	t.Run("states", func(t *testing.T) {
		tr, rec, db := newTracker(t)
		put(t, db, "alice", encode(true, 100))
		put(t, db, "bob", encode(false, 200))
		setClock(tr)(9_000)
		if err := tr.Restore(); err != nil {
			t.Fatal(err)
		}
		for _, tt := range []struct {
			user     string
			lastSeen int64
		}{
			{"alice", 9_000},
			{"bob", 200},
		} {
			if got := rec.of(tt.user); len(got) != 0 {
				t.Errorf("%s published %+v, want nothing", tt.user, got)
			}
			if online, ts := stored(t, db, tt.user); online || ts != tt.lastSeen {
				t.Errorf("%s stored online=%v at %d, want offline at %d", tt.user, online, ts, tt.lastSeen)
			}
		}
	})
	for _, tt := range []struct {
		name, key string
		value     []byte
	}{
		{"short record", "bob", []byte{1, 2}},
		{"user not valid", "bob smith", encode(false, 1)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tr, _, db := newTracker(t)
			put(t, db, tt.key, tt.value)
			if err := tr.Restore(); err == nil || !strings.Contains(err.Error(), "corrupt") {
				t.Fatalf("Restore = %v, want the record reported corrupt", err)
			}
		})
	}
}

// TestRetained: a new subscriber to a presence filter reads the last
// stored state of each user it matches, as a subscriber would decode it.
func TestRetained(t *testing.T) {
	tr, _, db := newTracker(t)
	set := setClock(tr)
	set(1_000)
	tr.Connected("alice")
	tr.Connected("bob")
	set(3_000)
	tr.Disconnected("bob")
	// A user whose ID starts with another's is a user of its own.
	if err := db.Update(func(txn *badger.Txn) error {
		return txn.Set(append([]byte{keyTag}, "alice2"...), encode(false, 7))
	}); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		filter string
		want   []string // "user on|off at", in key order
	}{
		{"presence/alice", []string{"alice on 1000"}},
		{"presence/bob", []string{"bob off 3000"}},
		{"presence/carol", nil},
		{"presence/+", []string{"alice on 1000", "alice2 off 7", "bob off 3000"}},
		{"presence/#", []string{"alice on 1000", "alice2 off 7", "bob off 3000"}},
		{"presence/ali", nil},
		{"presence/not valid", nil},
		{"inbox/alice", nil},
		{"presence/+/x", nil},
	} {
		t.Run(tt.filter, func(t *testing.T) {
			var got []string
			err := tr.Retained(tt.filter, func(topicName string, msg []byte) error {
				var p published
				if err := json.Unmarshal(msg, &p); err != nil {
					return err
				}
				if topicName != "presence/"+p.User {
					t.Errorf("state of %s on topic %s", p.User, topicName)
				}
				state := "off"
				if p.Online {
					state = "on"
				}
				got = append(got, fmt.Sprintf("%s %s %d", p.User, state, p.at()))
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, tt.want) {
				t.Fatalf("Retained(%q) = %q, want %q", tt.filter, got, tt.want)
			}
		})
	}
	t.Run("fn error stops", func(t *testing.T) {
		stop := errors.New("stop")
		calls := 0
		err := tr.Retained("presence/+", func(string, []byte) error { calls++; return stop })
		if !errors.Is(err, stop) || calls != 1 {
			t.Fatalf("Retained = %v after %d calls, want stop after 1", err, calls)
		}
	})
}

// TestRetainedPages: a wildcard subscriber's states are read a page at a
// time, each page in a transaction of its own, and every user comes once,
// in order, whatever the page size.
func TestRetainedPages(t *testing.T) {
	tr, _, db := newTracker(t)
	const users = 23
	var want []string
	for i := range users {
		user := fmt.Sprintf("u%02d", i)
		want = append(want, user)
		if err := db.Update(func(txn *badger.Txn) error {
			return txn.Set(append([]byte{keyTag}, user...), encode(i%2 == 0, int64(i)))
		}); err != nil {
			t.Fatal(err)
		}
	}
	for _, page := range []int{1, 5, 22, 23, 24, 512} {
		t.Run(fmt.Sprint(page), func(t *testing.T) {
			tr.page = page
			var got []string
			err := tr.Retained("presence/#", func(topicName string, _ []byte) error {
				got = append(got, strings.TrimPrefix(topicName, "presence/"))
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, want) {
				t.Fatalf("page %d: got %q, want %q", page, got, want)
			}
		})
	}
}
