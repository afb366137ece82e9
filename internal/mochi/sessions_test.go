package mochi

import (
	"fmt"
	"log/slog"
	"runtime"
	"slices"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// keptClient is a connection of id for user, subscribed to filters.
func keptClient(srv *mqtt.Server, id, user string, clean bool, filters ...string) *mqtt.Client {
	cl := srv.NewClient(nil, "t1", id, false)
	cl.Properties.Username = []byte(user)
	cl.Properties.Clean = clean
	for _, f := range filters {
		sub := packets.Subscription{Filter: f, Qos: 1, RetainHandling: 1}
		srv.Topics.Subscribe(id, sub)
		cl.State.Subscriptions.Add(f, sub)
	}
	return cl
}

// closeKept establishes and forgets a connection of id, as a connection
// that subscribed to filters and ended at now would.
func closeKept(r *Registry, srv *mqtt.Server, id, user string, now time.Time, ttl time.Duration, filters ...string) {
	cl := keptClient(srv, id, user, false, filters...)
	r.Establish(srv, cl, now)
	srv.Clients.Add(cl)
	r.Forget(srv, cl, false, false, now, ttl)
}

// TestRegistryKeepsSessions: a session Forget removed is resumed, with its
// subscriptions, by the next connection of its client ID and user that
// does not start clean, before it expires and while mochi holds no client
// of the ID; once only; and never after Drop or DropUser.
func TestRegistryKeepsSessions(t *testing.T) {
	const (
		id   = "bob/phone"
		user = "bob"
	)
	filters := []string{"inbox/bob", "presence/alice"}
	t0 := time.Unix(1_700_000_000, 0)
	tests := []struct {
		name string
		// before runs between the close and the reconnection.
		before func(r *Registry, srv *mqtt.Server)
		at     time.Time
		user   string
		clean  bool
		want   bool
	}{
		{name: "resumed", at: t0.Add(time.Minute), user: user, want: true},
		{name: "just before expiry", at: t0.Add(time.Hour - time.Second), user: user, want: true},
		{name: "expired", at: t0.Add(time.Hour), user: user},
		{name: "clean start", at: t0.Add(time.Minute), user: user, clean: true},
		{name: "another user", at: t0.Add(time.Minute), user: "mallory"},
		{name: "dropped", at: t0.Add(time.Minute), user: user, before: func(r *Registry, _ *mqtt.Server) { r.Drop(id) }},
		{name: "user dropped", at: t0.Add(time.Minute), user: user, before: func(r *Registry, _ *mqtt.Server) { r.DropUser(user) }},
		{name: "another user dropped", at: t0.Add(time.Minute), user: user, want: true, before: func(r *Registry, _ *mqtt.Server) { r.DropUser("bo") }},
		{name: "mochi holds a client", at: t0.Add(time.Minute), user: user, before: func(_ *Registry, srv *mqtt.Server) {
			srv.Clients.Add(srv.NewClient(nil, "t1", id, false))
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := mqtt.New(&mqtt.Options{Logger: slog.New(slog.DiscardHandler)})
			var r Registry
			closeKept(&r, srv, id, user, t0, time.Hour, filters...)
			if _, ok := srv.Clients.Get(id); ok || len(srv.Topics.Subscribers("inbox/bob").Subscriptions) > 0 {
				t.Fatal("Forget left the client in mochi")
			}
			if tt.before != nil {
				tt.before(&r, srv)
			}
			cl := keptClient(srv, id, tt.user, tt.clean)
			if got := r.Establish(srv, cl, tt.at); got != tt.want {
				t.Fatalf("Establish = %v, want %v", got, tt.want)
			}
			if got := r.Resuming(cl); got != tt.want {
				t.Fatalf("Resuming = %v, want %v", got, tt.want)
			}
			subs := r.Resumed(cl)
			if again := r.Resumed(cl); again != nil {
				t.Fatalf("Resumed twice: %v", again)
			}
			if r.Kept() != 0 || len(r.resuming) != 0 {
				t.Fatalf("after a reconnection: %d sessions kept and %d resuming, want none", r.Kept(), len(r.resuming))
			}
			if !tt.want {
				if subs != nil {
					t.Fatalf("Resumed = %v, want none", subs)
				}
				return
			}
			counted := srv.Info.Subscriptions
			Restore(srv, cl, subs)
			var got []string
			for f, s := range cl.State.Subscriptions.GetAll() {
				if s.Qos != 1 || s.RetainHandling != 1 {
					t.Errorf("restored %s with %+v, want QoS 1 and retain handling 1", f, s)
				}
				got = append(got, f)
			}
			slices.Sort(got)
			if !slices.Equal(got, filters) {
				t.Fatalf("restored %v, want %v", got, filters)
			}
			if _, ok := srv.Topics.Subscribers("presence/alice").Subscriptions[id]; !ok {
				t.Fatal("presence/alice not back in mochi's topic tree")
			}
			if n := srv.Info.Subscriptions - counted; n != 2 {
				t.Fatalf("mochi counts %d more subscriptions, want 2", n)
			}
		})
	}
}

// TestRegistryDropDuringConnection: a device dropped while connected
// leaves no session when its connection ends; a later connection does.
func TestRegistryDropDuringConnection(t *testing.T) {
	srv := mqtt.New(&mqtt.Options{Logger: slog.New(slog.DiscardHandler)})
	var r Registry
	now := time.Unix(1_700_000_000, 0)
	for _, drop := range []func(){func() { r.Drop("bob/phone") }, func() { r.DropUser("bob") }} {
		cl := keptClient(srv, "bob/phone", "bob", false, "inbox/bob")
		r.Establish(srv, cl, now)
		srv.Clients.Add(cl)
		drop()
		r.Forget(srv, cl, false, false, now, time.Hour)
		if r.Kept() != 0 || len(r.dropped) != 0 {
			t.Fatalf("a dropped device's connection left %d sessions and %d marks", r.Kept(), len(r.dropped))
		}
	}
	closeKept(&r, srv, "bob/phone", "bob", now, time.Hour, "inbox/bob")
	if r.Kept() != 1 {
		t.Fatal("a later connection left no session")
	}
}

// TestRegistrySweepsExpired: expired sessions are swept as new ones are
// kept, so that the registry holds at most about twice the live ones;
// a session with no TTL, or a clean one, is not kept.
func TestRegistrySweepsExpired(t *testing.T) {
	srv := mqtt.New(&mqtt.Options{Logger: slog.New(slog.DiscardHandler)})
	var r Registry
	t0 := time.Unix(1_700_000_000, 0)
	closeKept(&r, srv, "a/none", "a", t0, 0)
	if r.Kept() != 0 {
		t.Fatal("a session with no TTL was kept")
	}
	for round := range 10 {
		now := t0.Add(time.Duration(round) * time.Minute)
		for i := range 3 * minSweep {
			closeKept(&r, srv, fmt.Sprintf("u%d/d%d", round, i), fmt.Sprintf("u%d", round), now, 30*time.Second)
		}
		if n := r.Kept(); n > 2*3*minSweep {
			t.Fatalf("round %d: %d sessions kept, want at most %d", round, n, 2*3*minSweep)
		}
	}
}

// TestRegistryRecordSize measures what a kept session costs: its share of
// the map and its subscriptions, not the client's kilobytes.
func TestRegistryRecordSize(t *testing.T) {
	const n = 5000
	srv := mqtt.New(&mqtt.Options{Logger: slog.New(slog.DiscardHandler)})
	var r Registry
	now := time.Unix(1_700_000_000, 0)
	cls := make([]*mqtt.Client, n)
	var start runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&start)
	for i := range cls {
		user := fmt.Sprintf("user%06d", i)
		cls[i] = keptClient(srv, user+"/phone", user, false, "inbox/"+user, "presence/friend")
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	// mochi's clients here have no connection, hence no buffers: a
	// connected one holds its read and write buffers too.
	t.Logf("a mochi client, unconnected, with two filters: %.0f bytes",
		float64(int64(before.HeapAlloc)-int64(start.HeapAlloc))/n)
	r.mu.Lock()
	for _, cl := range cls {
		r.keep(cl, now, time.Hour)
	}
	r.mu.Unlock()
	runtime.GC()
	runtime.ReadMemStats(&after)
	// Retained: the heap once the garbage (mochi's copies of the
	// subscription maps, the map's old buckets) is collected.
	per := float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / n
	t.Logf("a kept session with two filters: %.0f bytes retained (mean of %d; %.0f allocated)",
		per, n, float64(after.TotalAlloc-before.TotalAlloc)/n)
	if per > 400 {
		t.Fatalf("a kept session takes %.0f bytes, want at most 400", per)
	}
	runtime.KeepAlive(cls)
	runtime.KeepAlive(&r)
}
