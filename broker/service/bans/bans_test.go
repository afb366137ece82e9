package bans_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/chatd/chatd/broker/cluster/natsnode/natstest"
	"github.com/chatd/chatd/broker/service/bans"
	"github.com/chatd/chatd/internal/testutil"
)

// clock is a test clock moved by hand.
type clock struct{ unix atomic.Int64 }

func (c *clock) now() time.Time { return time.Unix(c.unix.Load(), 0) }

// backends open two Stores on one backend (two restarts, or two nodes).
var backends = []struct {
	name string
	// open returns two stores that share what they hold (a node and,
	// in a cluster, another node) and a way to open one more later (a
	// restart).
	open func(t *testing.T, now func() time.Time) (a, b *bans.Store, reopen func() *bans.Store)
}{
	{"badger", func(t *testing.T, now func() time.Time) (*bans.Store, *bans.Store, func() *bans.Store) {
		db, err := badger.Open(badger.DefaultOptions(t.TempDir()).WithLogger(nil))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { db.Close() })
		open := func() *bans.Store {
			s, err := bans.NewBadger(db, now, nil)
			if err != nil {
				t.Fatal(err)
			}
			return s
		}
		a := open()
		return a, a, open // one node: one store
	}},
	{"kv", func(t *testing.T, now func() time.Time) (*bans.Store, *bans.Store, func() *bans.Store) {
		nodes := natstest.Cluster(t, 3)
		open := func(i int) func() *bans.Store {
			return func() *bans.Store {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				s, err := bans.NewKV(ctx, nodes[i].JetStream(), "test_bans", 3, now, nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(s.Close)
				return s
			}
		}
		return open(0)(), open(1)(), open(2)
	}},
}

// TestStoreContract checks each backend: a ban holds until it expires
// or is lifted, is seen by a store opened later (a restart) and, in a
// cluster, by a store already open on another node.
func TestStoreContract(t *testing.T) {
	for _, be := range backends {
		t.Run(be.name, func(t *testing.T) {
			var c clock
			c.unix.Store(1_000_000)
			a, b, reopen := be.open(t, c.now) // b open before the bans: a cluster node must follow
			if err := a.Ban(bans.Ban{User: "mallory", Reason: "spam", Created: 1_000_000}); err != nil {
				t.Fatal(err)
			}
			if err := a.Ban(bans.Ban{User: "eve", Until: 1_000_060, Created: 1_000_000}); err != nil {
				t.Fatal(err)
			}
			// Valid user IDs that a KV bucket would not take as keys.
			odd := []string{".dot", "dot.", "a..b", "b64=x"}
			for _, u := range odd {
				if err := a.Ban(bans.Ban{User: u, Created: 1_000_000}); err != nil {
					t.Fatalf("ban %q: %v", u, err)
				}
			}
			for _, s := range []*bans.Store{a, b, reopen()} {
				waitBanned(t, s, "mallory", true)
				waitBanned(t, s, "eve", true)
				for _, u := range odd {
					waitBanned(t, s, u, true)
				}
			}
			for _, u := range odd {
				if err := b.Unban(u); err != nil {
					t.Fatalf("unban %q: %v", u, err)
				}
			}
			for _, s := range []*bans.Store{a, b, reopen()} {
				for _, u := range odd {
					waitBanned(t, s, u, false)
				}
			}
			if got, _ := a.Banned("mallory"); got.Reason != "spam" || got.Until != 0 {
				t.Errorf("mallory's ban: %+v", got)
			}
			if _, ok := a.Banned("bob"); ok {
				t.Error("bob banned")
			}
			c.unix.Store(1_000_060) // eve's ban ends
			if _, ok := a.Banned("eve"); ok {
				t.Error("eve still banned after her ban ended")
			}
			if l := b.List(); len(l) != 1 || l[0].User != "mallory" {
				t.Errorf("list %+v: want mallory only", l)
			}
			if err := b.Unban("eve"); !errors.Is(err, bans.ErrUnknown) {
				t.Errorf("unban of an ended ban: %v, want ErrUnknown", err)
			}
			if err := b.Unban("mallory"); err != nil {
				t.Fatal(err)
			}
			for _, s := range []*bans.Store{a, b, reopen()} {
				waitBanned(t, s, "mallory", false)
			}
		})
	}
}

// waitBanned polls s until user's ban is as want: another node learns
// of a change through its watch.
func waitBanned(t *testing.T, s *bans.Store, user string, want bool) {
	t.Helper()
	testutil.Eventually(t, 10*time.Second, func() bool {
		_, ok := s.Banned(user)
		return ok == want
	}, "%s banned: %v", user, want)
}
