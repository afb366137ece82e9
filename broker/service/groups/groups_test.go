package groups

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"

	"github.com/chatd/chatd/broker/cluster/natsnode"
	"github.com/chatd/chatd/internal/testutil"
)

// TestMain checks that closed Stores, databases and NATS nodes leave no
// goroutine behind.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// propagation is how long a change may take to reach another Store
// through the watch; generous, as only a broken watch should ever need it.
const propagation = 20 * time.Second

const testMax = 4

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// storage is one backend's storage, on which Stores can be opened as if
// on separate nodes (KV) or one after another (Badger).
type storage interface {
	open(t *testing.T, maxMembers int, opts ...Option) *Store
	// writer returns a Store whose changes s learns of: s itself for
	// Badger, which has one Store per database, another node's for KV.
	writer(t *testing.T, s *Store, maxMembers int, opts ...Option) *Store
}

type badgerStorage struct{ db *badger.DB }

func newBadger(t *testing.T) storage {
	db, err := badger.Open(badger.DefaultOptions(t.TempDir()).WithLogger(nil))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := db.Close(); err != nil {
			t.Error(err)
		}
	})
	return &badgerStorage{db: db}
}

func (b *badgerStorage) open(t *testing.T, maxMembers int, opts ...Option) *Store {
	s := New(b.db, maxMembers, opts...)
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	})
	return s
}

func (b *badgerStorage) writer(_ *testing.T, s *Store, _ int, _ ...Option) *Store { return s }

// kvStorage is an embedded single-node NATS; each Store gets its own
// connection, like a node of its own.
type kvStorage struct {
	node *natsnode.Node
}

const testBucket = "groups"

func newKV(t *testing.T) storage {
	n, err := natsnode.Start(context.Background(), natsnode.Config{Name: "solo", Dir: t.TempDir(), Listen: "127.0.0.1:0", Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Shutdown)
	return &kvStorage{node: n}
}

func (k *kvStorage) open(t *testing.T, maxMembers int, opts ...Option) *Store {
	s, _ := k.openConn(t, maxMembers, opts...)
	return s
}

func (k *kvStorage) writer(t *testing.T, _ *Store, maxMembers int, opts ...Option) *Store {
	return k.open(t, maxMembers, opts...)
}

// openConn opens a Store on a connection of its own and returns both.
func (k *kvStorage) openConn(t *testing.T, maxMembers int, opts ...Option) (*Store, *natsnode.Node) {
	t.Helper()
	ctx := context.Background()
	conn, err := natsnode.Start(ctx, natsnode.Config{URL: k.node.ClientURL(), Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewKV(ctx, conn.JetStream(), testBucket, 1, maxMembers, opts...)
	if err != nil {
		conn.Shutdown()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
		conn.Shutdown()
	})
	return s, conn
}

var backends = []struct {
	name string
	new  func(t *testing.T) storage
}{
	{"badger", newBadger},
	{"kv", newKV},
}

func wantErr(t *testing.T, err, want error) {
	t.Helper()
	if !errors.Is(err, want) {
		t.Fatalf("error %v, want %v", err, want)
	}
}

func wantGroup(t *testing.T, g *Group, members, admins []string) {
	t.Helper()
	if !slices.Equal(g.Members, members) || !slices.Equal(g.Admins, admins) {
		t.Fatalf("group %s: members %v admins %v, want %v and %v", g.ID, g.Members, g.Admins, members, admins)
	}
}

// behaviours are checked against every backend alike.
var behaviours = []struct {
	name string
	run  func(t *testing.T, st storage)
}{
	{"member of", func(t *testing.T, st storage) {
		s := st.open(t, testMax)
		for _, c := range []struct {
			creator, gid string
			members      []string
		}{
			{"alice", "g1", []string{"bob"}},
			{"carol", "g2", []string{"bob"}},
			{"dave", "g.3", nil},
		} {
			if _, err := s.Create(c.creator, c.gid, c.members); err != nil {
				t.Fatal(err)
			}
		}
		for user, want := range map[string][]string{"bob": {"g1", "g2"}, "dave": {"g.3"}, "zed": {}} {
			got, err := s.MemberOf(user)
			if err != nil || !slices.Equal(got, want) {
				t.Errorf("MemberOf(%s) = %v, %v; want %v", user, got, err, want)
			}
		}
		if err := s.Delete("alice", "g1"); err != nil {
			t.Fatal(err)
		}
		if got, err := s.MemberOf("bob"); err != nil || !slices.Equal(got, []string{"g2"}) {
			t.Errorf("MemberOf(bob) after g1 deleted = %v, %v", got, err)
		}
	}},
	{"erase", func(t *testing.T, st storage) {
		s := st.open(t, testMax)
		if _, err := s.Create("alice", "mine", []string{"bob"}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Create("carol", "theirs", []string{"alice", "bob"}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Create("carol", "other", []string{"bob"}); err != nil {
			t.Fatal(err)
		}
		left, deleted, err := s.Erase("alice")
		if err != nil || !slices.Equal(left, []string{"theirs"}) || !slices.Equal(deleted, []string{"mine"}) {
			t.Fatalf("Erase(alice) = left %v, deleted %v, %v; want left theirs, deleted mine", left, deleted, err)
		}
		_, err = s.Get("mine")
		wantErr(t, err, ErrUnknown)
		g, err := s.Get("theirs")
		if err != nil {
			t.Fatal(err)
		}
		wantGroup(t, g, []string{"bob", "carol"}, []string{"carol"})
		if got, err := s.MemberOf("alice"); err != nil || len(got) != 0 {
			t.Fatalf("MemberOf(alice) after the erase = %v, %v", got, err)
		}
		// Erasing carol, the creator and admin of two groups, deletes both.
		if _, deleted, err := s.Erase("carol"); err != nil || !slices.Equal(deleted, []string{"other", "theirs"}) {
			t.Fatalf("Erase(carol) deleted %v, %v", deleted, err)
		}
		if got, err := s.MemberOf("bob"); err != nil || len(got) != 0 {
			t.Fatalf("MemberOf(bob) = %v, %v; want no group left", got, err)
		}
		// dave made a group and left it: erased, he is no longer named as
		// its creator, and counts as having made none.
		small := st.open(t, testMax, MaxPerUser(1))
		if _, err := small.Create("dave", "left", []string{"erin"}); err != nil {
			t.Fatal(err)
		}
		if _, err := small.RemoveMember("dave", "left", "dave"); err != nil {
			t.Fatal(err)
		}
		_, err = small.Create("dave", "second", nil)
		wantErr(t, err, ErrTooManyGroups)
		if left, _, err := small.Erase("dave"); err != nil || !slices.Equal(left, []string{"left"}) {
			t.Fatalf("Erase(dave) left %v, %v", left, err)
		}
		if g, err := small.Get("left"); err != nil || g.Creator != "" {
			t.Fatalf("group left: %+v, %v; want no creator named", g, err)
		}
		if _, err := small.Create("dave", "second", nil); err != nil {
			t.Fatalf("dave, erased, makes a group: %v", err)
		}
	}},
	{"create and get", func(t *testing.T, st storage) {
		s := st.open(t, testMax)
		g, err := s.Create("carol", "g1", []string{"bob", "alice", "bob", "carol"})
		if err != nil {
			t.Fatal(err)
		}
		wantGroup(t, g, []string{"alice", "bob", "carol"}, []string{"carol"})
		if g.ID != "g1" || g.Created == 0 {
			t.Fatalf("created %+v", g)
		}
		got, err := s.Get("g1")
		if err != nil {
			t.Fatal(err)
		}
		wantGroup(t, got, g.Members, g.Admins)
		if !got.IsMember("alice") || got.IsMember("dave") || !got.IsAdmin("carol") || got.IsAdmin("alice") {
			t.Fatalf("membership of %+v", got)
		}
	}},
	{"create refusals", func(t *testing.T, st storage) {
		s := st.open(t, testMax)
		if _, err := s.Create("alice", "g1", nil); err != nil {
			t.Fatal(err)
		}
		_, err := s.Create("bob", "g1", nil)
		wantErr(t, err, ErrExists)
		for _, gid := range []string{"", "a/b", "a b", string(make([]byte, 65))} {
			_, err = s.Create("alice", gid, nil)
			wantErr(t, err, ErrInvalid)
		}
		_, err = s.Create("alice", "g2", []string{"bob", "no+user"})
		wantErr(t, err, ErrInvalid)
		_, err = s.Create("alice", "g3", []string{"a", "b", "c", "d"})
		wantErr(t, err, ErrTooMany)
		// At the limit, counting the creator once.
		if _, err = s.Create("a", "g4", []string{"a", "b", "c", "d"}); err != nil {
			t.Fatal(err)
		}
		for _, gid := range []string{"g2", "g3"} {
			_, err = s.Get(gid)
			wantErr(t, err, ErrUnknown)
		}
	}},
	{"get unknown", func(t *testing.T, st storage) {
		s := st.open(t, testMax)
		for _, gid := range []string{"nope", "", "a/b", ".x"} {
			_, err := s.Get(gid)
			wantErr(t, err, ErrUnknown)
		}
	}},
	{"ids with dots", func(t *testing.T, st storage) {
		s := st.open(t, testMax)
		// "." separates KV subject tokens; these must each be a group of their own.
		ids := []string{".", "..", "a.b", ".a..b.", "-_.", "a"}
		for i, gid := range ids {
			if _, err := s.Create("alice", gid, []string{fmt.Sprintf("u%d", i)}); err != nil {
				t.Fatalf("create %q: %v", gid, err)
			}
		}
		fresh := st.open(t, testMax)
		for i, gid := range ids {
			g, err := fresh.Get(gid)
			if err != nil {
				t.Fatalf("get %q: %v", gid, err)
			}
			if g.ID != gid || !g.IsMember(fmt.Sprintf("u%d", i)) {
				t.Fatalf("get %q: %+v", gid, g)
			}
		}
	}},
	{"add member", func(t *testing.T, st storage) {
		s := st.open(t, testMax)
		if _, err := s.Create("alice", "g1", []string{"bob"}); err != nil {
			t.Fatal(err)
		}
		_, err := s.AddMember("bob", "g1", "carol")
		wantErr(t, err, ErrNotAuthorized)
		// To a non-member the group is unknown, as if it did not exist.
		_, err = s.AddMember("zed", "g1", "zed")
		wantErr(t, err, ErrUnknown)
		_, err = s.AddMember("alice", "g1", "no+user")
		wantErr(t, err, ErrInvalid)
		_, err = s.AddMember("alice", "nope", "carol")
		wantErr(t, err, ErrUnknown)
		_, err = s.AddMember("alice", "a/b", "carol")
		wantErr(t, err, ErrUnknown)
		g, err := s.AddMember("alice", "g1", "carol")
		if err != nil {
			t.Fatal(err)
		}
		wantGroup(t, g, []string{"alice", "bob", "carol"}, []string{"alice"})
		if g, err = s.AddMember("alice", "g1", "bob"); err != nil {
			t.Fatalf("adding a member again: %v", err)
		}
		wantGroup(t, g, []string{"alice", "bob", "carol"}, []string{"alice"})
		if _, err = s.AddMember("alice", "g1", "dave"); err != nil {
			t.Fatal(err)
		}
		_, err = s.AddMember("alice", "g1", "erin")
		wantErr(t, err, ErrTooMany)
		// A member already in a full group is no error.
		if _, err = s.AddMember("alice", "g1", "dave"); err != nil {
			t.Fatal(err)
		}
		g, err = s.Get("g1")
		if err != nil {
			t.Fatal(err)
		}
		wantGroup(t, g, []string{"alice", "bob", "carol", "dave"}, []string{"alice"})
	}},
	{"remove member", func(t *testing.T, st storage) {
		s := st.open(t, testMax)
		if _, err := s.Create("alice", "g1", []string{"bob", "carol"}); err != nil {
			t.Fatal(err)
		}
		_, err := s.RemoveMember("bob", "g1", "carol")
		wantErr(t, err, ErrNotAuthorized)
		_, err = s.RemoveMember("bob", "nope", "bob")
		wantErr(t, err, ErrUnknown)
		g, err := s.RemoveMember("bob", "g1", "bob")
		if err != nil {
			t.Fatalf("leaving: %v", err)
		}
		wantGroup(t, g, []string{"alice", "carol"}, []string{"alice"})
		if g, err = s.RemoveMember("alice", "g1", "zed"); err != nil {
			t.Fatalf("removing a non-member: %v", err)
		}
		wantGroup(t, g, []string{"alice", "carol"}, []string{"alice"})
		if g, err = s.RemoveMember("alice", "g1", "alice"); err != nil {
			t.Fatal(err)
		}
		wantGroup(t, g, []string{"carol"}, []string{})
		// Without admins nobody adds or removes others; members still leave.
		_, err = s.AddMember("carol", "g1", "alice")
		wantErr(t, err, ErrNotAuthorized)
		_, err = s.AddMember("alice", "g1", "alice")
		wantErr(t, err, ErrUnknown)
		if g, err = s.RemoveMember("carol", "g1", "carol"); err != nil {
			t.Fatal(err)
		}
		wantGroup(t, g, []string{}, []string{})
		if _, err = s.Get("g1"); err != nil {
			t.Fatalf("an empty group still exists: %v", err)
		}
	}},
	{"non-members learn nothing and write nothing", func(t *testing.T, st storage) {
		s := st.open(t, testMax)
		if _, err := s.Create("alice", "g1", []string{"bob"}); err != nil {
			t.Fatal(err)
		}
		before := storedRev(t, s, "g1")
		ops := []struct {
			name string
			op   func() (*Group, error)
		}{
			{"leave", func() (*Group, error) { return s.RemoveMember("zed", "g1", "zed") }},
			{"remove a member", func() (*Group, error) { return s.RemoveMember("zed", "g1", "bob") }},
			{"add itself", func() (*Group, error) { return s.AddMember("zed", "g1", "zed") }},
			{"add a member", func() (*Group, error) { return s.AddMember("zed", "g1", "bob") }},
		}
		for _, o := range ops {
			g, err := o.op()
			if !errors.Is(err, ErrUnknown) || g != nil {
				t.Fatalf("%s by a non-member: %+v, %v; want %v", o.name, g, err, ErrUnknown)
			}
			if err.Error() != unknown("g1").Error() {
				t.Fatalf("%s by a non-member: %q, not the words for a missing group", o.name, err)
			}
		}
		// Changes that change nothing are not written either.
		if _, err := s.RemoveMember("alice", "g1", "zed"); err != nil {
			t.Fatal(err)
		}
		if _, err := s.AddMember("alice", "g1", "bob"); err != nil {
			t.Fatal(err)
		}
		if after := storedRev(t, s, "g1"); after != before {
			t.Fatalf("group written: revision %d, was %d", after, before)
		}
		if err := hasMembers(s, "g1", "alice", "bob")(); err != nil {
			t.Fatal(err)
		}
	}},
	{"groups per user are capped, across restarts", func(t *testing.T, st storage) {
		s := st.open(t, testMax, MaxPerUser(2))
		for _, gid := range []string{"a1", "a2"} {
			g, err := s.Create("alice", gid, []string{"bob"})
			if err != nil {
				t.Fatal(err)
			}
			if g.Creator != "alice" {
				t.Fatalf("creator %q", g.Creator)
			}
		}
		_, err := s.Create("alice", "a3", nil)
		wantErr(t, err, ErrTooManyGroups)
		if _, err := s.Create("bob", "b1", nil); err != nil {
			t.Fatalf("another user's first group: %v", err)
		}
		// Leaving a group one made does not give its slot back.
		if _, err := s.RemoveMember("alice", "a2", "alice"); err != nil {
			t.Fatal(err)
		}
		fresh := st.open(t, testMax, MaxPerUser(2))
		_, err = fresh.Create("alice", "a3", nil)
		wantErr(t, err, ErrTooManyGroups)
		if _, err := fresh.Get("a3"); !errors.Is(err, ErrUnknown) {
			t.Fatalf("refused group exists: %v", err)
		}
		// A higher cap lets her make more.
		if _, err := st.open(t, testMax, MaxPerUser(3)).Create("alice", "a3", nil); err != nil {
			t.Fatal(err)
		}
	}},
	{"delete", func(t *testing.T, st storage) {
		s := st.open(t, testMax, MaxPerUser(2))
		for _, gid := range []string{"a1", "a2"} {
			if _, err := s.Create("alice", gid, []string{"bob"}); err != nil {
				t.Fatal(err)
			}
		}
		before := storedRev(t, s, "a1")
		wantErr(t, s.Delete("zed", "a1"), ErrUnknown)
		wantErr(t, s.Delete("zed", "nope"), ErrUnknown)
		wantErr(t, s.Delete("alice", "a/b"), ErrUnknown)
		wantErr(t, s.Delete("bob", "a1"), ErrNotAuthorized)
		if after := storedRev(t, s, "a1"); after != before {
			t.Fatalf("refused deletion wrote: revision %d, was %d", after, before)
		}
		if err := s.Delete("alice", "a1"); err != nil {
			t.Fatal(err)
		}
		for _, sx := range []*Store{s, st.open(t, testMax)} {
			_, err := sx.Get("a1")
			wantErr(t, err, ErrUnknown)
			_, err = sx.AddMember("alice", "a1", "carol")
			wantErr(t, err, ErrUnknown)
		}
		wantErr(t, s.Delete("alice", "a1"), ErrUnknown)
		// Her slot is back, once; another may take the freed name.
		if _, err := s.Create("alice", "a3", nil); err != nil {
			t.Fatalf("create after deleting: %v", err)
		}
		_, err := s.Create("alice", "a4", nil)
		wantErr(t, err, ErrTooManyGroups)
		g, err := s.Create("bob", "a1", nil)
		if err != nil {
			t.Fatalf("create a deleted group's name again: %v", err)
		}
		wantGroup(t, g, []string{"bob"}, []string{"bob"})
		if err := hasMembers(st.open(t, testMax), "a1", "bob")(); err != nil {
			t.Fatal(err)
		}
	}},
	{"delete from a stale cache", func(t *testing.T, st storage) {
		s := st.open(t, testMax)
		if _, err := s.Create("alice", "g1", []string{"bob"}); err != nil {
			t.Fatal(err)
		}
		old, _ := s.cached("g1")
		if _, err := s.AddMember("alice", "g1", "carol"); err != nil {
			t.Fatal(err)
		}
		s.mu.Lock()
		s.cache.put("g1", old)
		s.mu.Unlock()
		// The deletion at the cached revision loses; it must try again.
		if err := s.Delete("alice", "g1"); err != nil {
			t.Fatal(err)
		}
		for _, sx := range []*Store{s, st.open(t, testMax)} {
			_, err := sx.Get("g1")
			wantErr(t, err, ErrUnknown)
		}
	}},
	{"deleting a group of no recorded creator", func(t *testing.T, st storage) {
		s := st.open(t, testMax, MaxPerUser(1))
		if _, err := s.Create("alice", "a1", nil); err != nil {
			t.Fatal(err)
		}
		// As stored before creators were: counted against nobody.
		old := &Group{ID: "old", Members: []string{"alice"}, Admins: []string{"alice"}, Created: 1}
		if _, err := s.b.update(context.Background(), old, 0); err != nil {
			t.Fatal(err)
		}
		if err := s.Delete("alice", "old"); err != nil {
			t.Fatal(err)
		}
		_, err := s.Create("alice", "a2", nil)
		wantErr(t, err, ErrTooManyGroups)
	}},
	{"concurrent creates keep the cap", func(t *testing.T, st storage) {
		const limit = 3
		s := st.open(t, testMax, MaxPerUser(limit))
		stores := []*Store{s, st.writer(t, s, testMax, MaxPerUser(limit))}
		var wg sync.WaitGroup
		var mu sync.Mutex
		made := 0
		for i := range 12 {
			wg.Go(func() {
				_, err := stores[i%2].Create("alice", fmt.Sprintf("g%02d", i), nil)
				mu.Lock()
				defer mu.Unlock()
				switch {
				case err == nil:
					made++
				case !errors.Is(err, ErrTooManyGroups):
					t.Error(err)
				}
			})
		}
		wg.Wait()
		if made != limit {
			t.Fatalf("%d groups made, cap %d", made, limit)
		}
	}},
	{"cache is bounded", func(t *testing.T, st storage) {
		// Each group of two members weighs 3: at most 3 fit in 10.
		a := st.open(t, testMax, CacheMembers(10))
		w := st.writer(t, a, testMax)
		for i := range 20 {
			if _, err := a.Create("alice", fmt.Sprintf("g%02d", i), []string{"bob"}); err != nil {
				t.Fatal(err)
			}
		}
		check := func() {
			t.Helper()
			a.mu.Lock()
			defer a.mu.Unlock()
			if a.cache.used > 10 || len(a.cache.items) > 3 || a.cache.order.Len() != len(a.cache.items) {
				t.Fatalf("cache holds %d groups weighing %d, bound 10", len(a.cache.items), a.cache.used)
			}
		}
		check()
		for i := range 20 {
			if err := hasMembers(a, fmt.Sprintf("g%02d", i), "alice", "bob")(); err != nil {
				t.Fatal(err)
			}
		}
		check()
		// g00 was dropped; changed meanwhile, it is read again as it is now.
		if _, ok := a.cached("g00"); ok {
			t.Fatal("g00 still cached")
		}
		if _, err := w.AddMember("alice", "g00", "carol"); err != nil {
			t.Fatal(err)
		}
		if err := hasMembers(a, "g00", "alice", "bob", "carol")(); err != nil {
			t.Fatal(err)
		}
		// A group heavier than the whole cache is served, not cached.
		big := st.open(t, testMax, CacheMembers(2))
		if err := hasMembers(big, "g01", "alice", "bob")(); err != nil {
			t.Fatal(err)
		}
		if _, ok := big.cached("g01"); ok {
			t.Fatal("a group heavier than the cache was cached")
		}
	}},
	{"results are not changed later", func(t *testing.T, st storage) {
		s := st.open(t, testMax)
		if _, err := s.Create("alice", "g1", []string{"bob"}); err != nil {
			t.Fatal(err)
		}
		before, err := s.Get("g1")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.AddMember("alice", "g1", "carol"); err != nil {
			t.Fatal(err)
		}
		wantGroup(t, before, []string{"alice", "bob"}, []string{"alice"})
		after, err := s.Get("g1")
		if err != nil {
			t.Fatal(err)
		}
		wantGroup(t, after, []string{"alice", "bob", "carol"}, []string{"alice"})
	}},
	{"persisted", func(t *testing.T, st storage) {
		s := st.open(t, testMax)
		if _, err := s.Create("alice", "g1", []string{"bob"}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.AddMember("alice", "g1", "carol"); err != nil {
			t.Fatal(err)
		}
		fresh := st.open(t, testMax)
		g, err := fresh.Get("g1")
		if err != nil {
			t.Fatal(err)
		}
		wantGroup(t, g, []string{"alice", "bob", "carol"}, []string{"alice"})
		_, err = fresh.Create("bob", "g1", nil)
		wantErr(t, err, ErrExists)
		// The fresh Store's cache is empty: its change starts from storage.
		if g, err = fresh.RemoveMember("alice", "g1", "bob"); err != nil {
			t.Fatal(err)
		}
		wantGroup(t, g, []string{"alice", "carol"}, []string{"alice"})
	}},
	{"stale cache never decides", func(t *testing.T, st storage) {
		// A cache behind storage, as on a node the watch has not yet told
		// of another's change, is made here by putting an entry back.
		a := st.open(t, testMax)
		w := st.writer(t, a, testMax)
		if _, err := a.Create("alice", "g1", []string{"bob"}); err != nil {
			t.Fatal(err)
		}
		stale := func(change func() error) {
			t.Helper()
			old, ok := a.cached("g1")
			if !ok {
				t.Fatal("g1 not cached")
			}
			if err := change(); err != nil {
				t.Fatal(err)
			}
			// Let a hear of it first, so that nothing undoes the rollback.
			latest, _ := w.cached("g1")
			eventually(t, func() error {
				if e, _ := a.cached("g1"); e.rev < latest.rev {
					return fmt.Errorf("a has revision %d, not %d", e.rev, latest.rev)
				}
				return nil
			})
			a.mu.Lock()
			a.cache.put("g1", old)
			a.mu.Unlock()
		}
		// Full in storage, room in the cache: refused.
		stale(func() error {
			if _, err := w.AddMember("alice", "g1", "carol"); err != nil {
				return err
			}
			_, err := w.AddMember("alice", "g1", "dave")
			return err
		})
		_, err := a.AddMember("alice", "g1", "erin")
		wantErr(t, err, ErrTooMany)
		// Room in storage, full in the cache: accepted.
		stale(func() error {
			_, err := w.RemoveMember("carol", "g1", "carol")
			return err
		})
		g, err := a.AddMember("alice", "g1", "erin")
		if err != nil {
			t.Fatal(err)
		}
		wantGroup(t, g, []string{"alice", "bob", "dave", "erin"}, []string{"alice"})
		// No longer admin in storage, still in the cache: refused.
		stale(func() error {
			_, err := w.RemoveMember("alice", "g1", "alice")
			return err
		})
		_, err = a.RemoveMember("alice", "g1", "bob")
		wantErr(t, err, ErrUnknown)
		eventually(t, hasMembers(a, "g1", "bob", "dave", "erin"))
	}},
	{"concurrent changes on one store", func(t *testing.T, st storage) {
		s := st.open(t, 1000)
		if _, err := s.Create("admin", "g1", nil); err != nil {
			t.Fatal(err)
		}
		want := []string{"admin"}
		var wg sync.WaitGroup
		errs := make(chan error, 40)
		for i := range 40 {
			u := fmt.Sprintf("u%02d", i)
			want = append(want, u)
			wg.Go(func() {
				if _, err := s.AddMember("admin", "g1", u); err != nil {
					errs <- err
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		slices.Sort(want)
		g, err := s.Get("g1")
		if err != nil {
			t.Fatal(err)
		}
		wantGroup(t, g, want, []string{"admin"})
		g, err = st.open(t, 1000).Get("g1")
		if err != nil {
			t.Fatal(err)
		}
		wantGroup(t, g, want, []string{"admin"})
	}},
}

func TestBehaviour(t *testing.T) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			for _, c := range behaviours {
				t.Run(c.name, func(t *testing.T) { c.run(t, b.new(t)) })
			}
		})
	}
}

// TestLearnKeepsNewest covers a group the cache did not hold when a newer
// revision came (from the KV watch, or another operation) while an
// operation was reading or writing an older one: the older must not be
// cached over it.
func TestLearnKeepsNewest(t *testing.T) {
	s := newBadger(t).open(t, testMax)
	older := entry{g: &Group{ID: "g1", Members: []string{"a"}}, rev: 5}
	newer := entry{g: &Group{ID: "g1", Members: []string{"a", "b"}}, rev: 6}
	deleted := entry{rev: 7}

	// No operation under way: what the watch brings is not cached.
	s.learn("g1", newer, false)
	if _, ok := s.cached("g1"); ok {
		t.Fatal("the watch added a group to the cache")
	}
	s.begin("g1")
	s.learn("g1", newer, false)
	if got := s.learn("g1", older, true); got.rev != newer.rev {
		t.Fatalf("learnt revision %d, want %d", got.rev, newer.rev)
	}
	if e, ok := s.cached("g1"); !ok || e.rev != newer.rev {
		t.Fatalf("cached %+v %v, want revision %d", e, ok, newer.rev)
	}
	s.end("g1")

	// A deletion while a read of the group is under way is not undone by it.
	s.cache.clear()
	s.begin("g1")
	s.begin("g1")
	s.learn("g1", deleted, false)
	s.end("g1")
	if got := s.learn("g1", newer, true); got.g != nil {
		t.Fatalf("learnt %+v, want the deletion", got)
	}
	if _, ok := s.cached("g1"); ok {
		t.Fatal("a deleted group was cached")
	}
	s.end("g1")
	if len(s.flights) != 0 {
		t.Fatalf("flights left: %v", s.flights)
	}
}

// storedRev is gid's revision in storage.
func storedRev(t *testing.T, s *Store, gid string) uint64 {
	t.Helper()
	_, rev, err := s.b.get(context.Background(), gid)
	if err != nil {
		t.Fatal(err)
	}
	return rev
}

// eventually polls f until it succeeds or propagation has passed, and
// fails with f's last error then.
func eventually(t *testing.T, f func() error) {
	t.Helper()
	testutil.EventuallyNoError(t, propagation, f, "change not propagated")
}

// hasMembers is a poll condition: s's gid has exactly members.
func hasMembers(s *Store, gid string, members ...string) func() error {
	return func() error {
		g, err := s.Get(gid)
		if err != nil {
			return err
		}
		if !slices.Equal(g.Members, members) {
			return fmt.Errorf("members %v, want %v", g.Members, members)
		}
		return nil
	}
}

// TestKVNodesSeeEachOther runs two Stores on one bucket, each on its own
// connection as on two nodes.
func TestKVNodesSeeEachOther(t *testing.T) {
	kv := newKV(t).(*kvStorage)
	a, b := kv.open(t, testMax), kv.open(t, testMax)

	if _, err := a.Create("alice", "g1", []string{"bob"}); err != nil {
		t.Fatal(err)
	}
	// Not cached on b: read from the bucket, so visible at once.
	if err := hasMembers(b, "g1", "alice", "bob")(); err != nil {
		t.Fatal(err)
	}
	_, err := b.Create("bob", "g1", nil)
	wantErr(t, err, ErrExists)

	// Cached on b now: the watch brings a's change.
	if _, err := a.AddMember("alice", "g1", "carol"); err != nil {
		t.Fatal(err)
	}
	eventually(t, hasMembers(b, "g1", "alice", "bob", "carol"))
	if _, err := b.RemoveMember("carol", "g1", "carol"); err != nil {
		t.Fatal(err)
	}
	eventually(t, hasMembers(a, "g1", "alice", "bob"))

	// b changes a group a has cached, and a changes it again at once,
	// whether or not the watch has brought b's change yet: the
	// compare-and-set makes a start again from b's revision.
	if _, err := b.AddMember("alice", "g1", "dave"); err != nil {
		t.Fatal(err)
	}
	g, err := a.AddMember("alice", "g1", "erin")
	if err != nil {
		t.Fatal(err)
	}
	wantGroup(t, g, []string{"alice", "bob", "dave", "erin"}, []string{"alice"})
	eventually(t, hasMembers(b, "g1", "alice", "bob", "dave", "erin"))

	// The group is full on both; b makes room and a fills it at once: a
	// refusal from a's possibly stale cache is checked against the bucket.
	if _, err := b.RemoveMember("dave", "g1", "dave"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.AddMember("alice", "g1", "frank"); err != nil {
		t.Fatalf("adding to a group with room: %v", err)
	}
	// The admin leaves on a; b, whose cache may still name her admin,
	// must refuse her at once.
	if _, err := a.RemoveMember("alice", "g1", "alice"); err != nil {
		t.Fatal(err)
	}
	_, err = b.AddMember("alice", "g1", "gina")
	wantErr(t, err, ErrUnknown)
	eventually(t, hasMembers(a, "g1", "bob", "erin", "frank"))
	eventually(t, hasMembers(b, "g1", "bob", "erin", "frank"))
}

// TestKVConcurrentNodesLoseNothing changes one group from two Stores at
// once: every change must survive.
func TestKVConcurrentNodesLoseNothing(t *testing.T) {
	kv := newKV(t).(*kvStorage)
	const maxMembers, perStore = 1000, 30
	stores := []*Store{kv.open(t, maxMembers), kv.open(t, maxMembers)}
	if _, err := stores[0].Create("admin", "g1", nil); err != nil {
		t.Fatal(err)
	}
	// Both have it cached, so that their changes race from the same revision.
	for _, s := range stores {
		if _, err := s.Get("g1"); err != nil {
			t.Fatal(err)
		}
	}
	run := func(op func(s *Store, i, j int) error) {
		t.Helper()
		var wg sync.WaitGroup
		errs := make(chan error, len(stores)*perStore)
		for i, s := range stores {
			for j := range perStore {
				wg.Go(func() {
					if err := op(s, i, j); err != nil {
						errs <- err
					}
				})
			}
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
	}
	user := func(i, j int) string { return fmt.Sprintf("s%d-u%02d", i, j) }
	run(func(s *Store, i, j int) error {
		_, err := s.AddMember("admin", "g1", user(i, j))
		return err
	})
	// Then each removes the other's odd users while adding more of its own.
	run(func(s *Store, i, j int) error {
		if j%2 == 1 {
			_, err := s.RemoveMember("admin", "g1", user(1-i, j))
			return err
		}
		_, err := s.AddMember("admin", "g1", user(i, perStore+j))
		return err
	})
	want := []string{"admin"}
	for i := range stores {
		for j := range perStore {
			if j%2 == 0 {
				want = append(want, user(i, j), user(i, perStore+j))
			}
		}
	}
	slices.Sort(want)
	if err := hasMembers(kv.open(t, maxMembers), "g1", want...)(); err != nil {
		t.Fatalf("in the bucket: %v", err)
	}
	for _, s := range stores {
		eventually(t, hasMembers(s, "g1", want...))
	}
}

// TestKVDeletedOutside covers a group deleted from the bucket by other
// means: every Store stops serving it, and it can be made again.
func TestKVDeletedOutside(t *testing.T) {
	kv := newKV(t).(*kvStorage)
	a, b := kv.open(t, testMax), kv.open(t, testMax)
	if _, err := a.Create("alice", "g.1", []string{"bob"}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Get("g.1"); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	bucket, err := kv.node.JetStream().KeyValue(ctx, testBucket)
	if err != nil {
		t.Fatal(err)
	}
	if err := bucket.Delete(ctx, kvKey("g.1")); err != nil {
		t.Fatal(err)
	}
	for _, s := range []*Store{a, b} {
		eventually(t, func() error {
			if _, err := s.Get("g.1"); !errors.Is(err, ErrUnknown) {
				return fmt.Errorf("get of a deleted group: %v", err)
			}
			return nil
		})
		_, err := s.AddMember("alice", "g.1", "carol")
		wantErr(t, err, ErrUnknown)
	}
	if _, err := b.Create("carol", "g.1", nil); err != nil {
		t.Fatalf("create again after deletion: %v", err)
	}
	eventually(t, hasMembers(a, "g.1", "carol"))
	// A value no Store wrote is reported, not served.
	if _, err := bucket.Put(ctx, kvKey("g.1"), []byte("{")); err != nil {
		t.Fatal(err)
	}
	eventually(t, func() error {
		if _, err := a.Get("g.1"); err == nil || errors.Is(err, ErrUnknown) {
			return fmt.Errorf("get of a corrupt group: %v", err)
		}
		return nil
	})
}

// TestKVDeleteSeenByOthers deletes a group on one node that another has
// cached: the other stops serving it, and its creator's slot is back on
// every node.
func TestKVDeleteSeenByOthers(t *testing.T) {
	kv := newKV(t).(*kvStorage)
	a, b := kv.open(t, testMax, MaxPerUser(1)), kv.open(t, testMax, MaxPerUser(1))
	if _, err := a.Create("alice", "g1", []string{"bob"}); err != nil {
		t.Fatal(err)
	}
	if err := hasMembers(b, "g1", "alice", "bob")(); err != nil {
		t.Fatal(err)
	}
	_, err := b.Create("alice", "g2", nil)
	wantErr(t, err, ErrTooManyGroups)
	if err := a.Delete("alice", "g1"); err != nil {
		t.Fatal(err)
	}
	eventually(t, func() error {
		if _, err := b.Get("g1"); !errors.Is(err, ErrUnknown) {
			return fmt.Errorf("get of a group deleted on another node: %v", err)
		}
		return nil
	})
	if _, err := b.Create("alice", "g2", nil); err != nil {
		t.Fatalf("create after deleting on another node: %v", err)
	}
}

// TestKVWatchLost closes a Store's connection under it: it must stop
// serving its cache, which no longer hears of other nodes' changes.
func TestKVWatchLost(t *testing.T) {
	kv := newKV(t).(*kvStorage)
	a := kv.open(t, testMax)
	b, conn := kv.openConn(t, testMax)
	if _, err := a.Create("alice", "g1", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Get("g1"); err != nil {
		t.Fatal(err)
	}
	conn.Shutdown()
	eventually(t, func() error {
		if _, err := b.Get("g1"); err == nil {
			return errors.New("still served from the cache")
		}
		return nil
	})
	if err := b.Close(); err != nil {
		t.Fatalf("close after losing the connection: %v", err)
	}
}

// TestNewKVIdempotent opens the bucket again with another configuration.
func TestNewKVIdempotent(t *testing.T) {
	kv := newKV(t).(*kvStorage)
	a := kv.open(t, testMax)
	if _, err := a.Create("alice", "g1", nil); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	s, err := NewKV(ctx, kv.node.JetStream(), testBucket, 1, testMax)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := hasMembers(s, "g1", "alice")(); err != nil {
		t.Fatal(err)
	}
	info, err := kv.node.JetStream().KeyValue(ctx, testBucket)
	if err != nil {
		t.Fatal(err)
	}
	st, err := info.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if cfg := st.Config(); cfg.History != 1 || cfg.Replicas != 1 || cfg.Storage != jetstream.FileStorage {
		t.Fatalf("bucket config %+v", cfg)
	}
	_, err = NewKV(ctx, kv.node.JetStream(), "bad bucket", 1, testMax)
	if err == nil {
		t.Fatal("a bucket name with a space was accepted")
	}
	if err := s.Close(); err != nil || s.Close() != nil {
		t.Fatalf("close twice: %v", err)
	}
}
