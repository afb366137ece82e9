package mochi

import (
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/chatd/chatd/internal/testutil"
)

// TestRegistryForget: Forget removes a connection from mochi's client map
// and topic tree only when it is the newest of its client ID to pass
// Establish, its session is persistent and the server is not closing; and
// never removes another connection's entry.
func TestRegistryForget(t *testing.T) {
	const (
		id     = "bob/phone"
		filter = "inbox/bob"
	)
	tests := []struct {
		name string
		// established: cl passed Establish; newer: another connection of
		// the same client ID passed it after cl.
		established, newer bool
		// otherInMap: mochi's map holds another connection of the ID.
		otherInMap      bool
		expire, closing bool
		// wantGone: cl's entry and subscription are removed.
		wantGone bool
	}{
		{name: "persistent session", established: true, wantGone: true},
		{name: "clean session: mochi removes it", established: true, expire: true},
		{name: "server closing", established: true, closing: true},
		{name: "a newer connection passed Establish", established: true, newer: true},
		{name: "never passed Establish", established: false},
		{name: "the map holds another connection", established: true, otherInMap: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := mqtt.New(&mqtt.Options{Logger: slog.New(slog.DiscardHandler)})
			cl := srv.NewClient(nil, "t1", id, false)
			sub := packets.Subscription{Filter: filter, Qos: 1}
			srv.Topics.Subscribe(id, sub)
			cl.State.Subscriptions.Add(filter, sub)
			inMap := cl
			if tt.otherInMap {
				inMap = srv.NewClient(nil, "t1", id, false)
			}
			srv.Clients.Add(inMap)
			var r Registry
			if tt.established {
				r.Establish(srv, cl, time.Now())
			}
			if tt.newer {
				r.Establish(srv, srv.NewClient(nil, "t1", id, false), time.Now())
			}

			r.Forget(srv, cl, tt.expire, tt.closing, time.Now(), time.Hour)

			got, ok := srv.Clients.Get(id)
			_, subscribed := srv.Topics.Subscribers(filter).Subscriptions[id]
			switch {
			case tt.wantGone && (ok || subscribed):
				t.Fatalf("after Forget: in the map %v, subscribed %v; want neither", ok, subscribed)
			case !tt.wantGone && (!ok || got != inMap):
				t.Fatalf("after Forget the map holds %p (found %v), want %p left alone", got, ok, inMap)
			case !tt.wantGone && !tt.otherInMap && !subscribed:
				t.Fatal("Forget unsubscribed a connection it was to leave alone")
			}
			if held, _ := r.held(id); tt.established && !tt.newer && held != nil {
				t.Fatal("the registry still holds the connection it forgot")
			}
		})
	}
}

// TestRegistryOnMochi: on a real mochi server, a persistent client is
// removed from mochi's client map and topic tree once it disconnects, and
// a clean one by mochi itself. The "mochi alone" rows record mochi
// v2.7.9's own behaviour, which is why Registry exists: if they fail after
// an upgrade, mochi now removes persistent clients itself.
func TestRegistryOnMochi(t *testing.T) {
	tests := []struct {
		name     string
		s        session
		registry bool
		// bye sends DISCONNECT before closing the socket.
		bye       bool
		wantInMap bool
	}{
		{"3.1.1 persistent", session{id: "bob/a", persistent: true}, true, false, false},
		{"3.1.1 persistent, DISCONNECT", session{id: "bob/a", persistent: true}, true, true, false},
		{"v5 session expiry", session{id: "bob/a", v5: true, persistent: true}, true, true, false},
		{"3.1.1 clean: left to mochi", session{id: "bob/a"}, true, false, false},
		{"v5 expiry 0: left to mochi", session{id: "bob/a", v5: true}, true, true, false},
		{"3.1.1 persistent, mochi alone", session{id: "bob/a", persistent: true}, false, false, true},
		{"v5 session expiry, mochi alone", session{id: "bob/a", v5: true, persistent: true}, false, true, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var o mochiOptions
			if tt.registry {
				o.registry = new(Registry)
			}
			ms := startMochi(t, o)
			c := ms.connect(t, tt.s)
			c.subscribe("inbox/bob")
			cl := ms.client(t, c)
			if got, ok := ms.inMap(tt.s.id); !ok || got != cl || !ms.subscribed(tt.s.id, "inbox/bob") {
				t.Fatalf("connected: in the map %v (%p, want %p), subscribed %v", ok, got, cl, ms.subscribed(tt.s.id, "inbox/bob"))
			}
			if tt.bye {
				c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}})
			}
			if err := c.conn.Close(); err != nil {
				t.Fatal(err)
			}
			ms.waitEnded(t, cl)
			what := "in mochi's client map and topic tree: %v"
			if !tt.registry {
				what += " (else mochi may no longer keep closed persistent clients, and Registry may go)"
			}
			// mochi removes a clean session right after OnDisconnect.
			testutil.Eventually(t, wait, func() bool {
				_, ok := ms.inMap(tt.s.id)
				return ok == tt.wantInMap && ms.subscribed(tt.s.id, "inbox/bob") == tt.wantInMap
			}, what, tt.wantInMap)
			if o.registry != nil {
				if _, n := o.registry.held(tt.s.id); n != 0 {
					t.Fatalf("the registry still holds %d connections", n)
				}
			}
		})
	}
}

// TestRegistryTakeoverKeepsNewer: when a client ID connects again, the
// older connection's end removes nothing of the newer one, which stays in
// mochi's client map with the subscription it inherited and is served;
// once it leaves, it is removed.
func TestRegistryTakeoverKeepsNewer(t *testing.T) {
	for _, v5 := range []bool{false, true} {
		t.Run(fmt.Sprintf("v5=%v", v5), func(t *testing.T) {
			s := session{id: "bob/phone", v5: v5, persistent: true}
			ms := startMochi(t, mochiOptions{registry: new(Registry)})
			older := ms.connect(t, s)
			older.subscribe("inbox/bob")
			olderCl := ms.client(t, older)
			newer := ms.connect(t, s)
			newerCl := ms.client(t, newer)
			waitClosed(t, older.conn, wait)
			ms.waitEnded(t, olderCl)

			if got, ok := ms.inMap(s.id); !ok || got != newerCl {
				t.Fatalf("mochi's map holds %p (found %v), want the newer connection %p", got, ok, newerCl)
			}
			if !ms.subscribed(s.id, "inbox/bob") {
				t.Fatal("the subscription the newer connection inherited is gone")
			}
			newer.ping()

			if err := newer.conn.Close(); err != nil {
				t.Fatal(err)
			}
			ms.waitEnded(t, newerCl)
			if _, ok := ms.inMap(s.id); ok || ms.subscribed(s.id, "inbox/bob") {
				t.Fatal("the newer connection stayed after it left")
			}
		})
	}
}

// TestRegistryRapidReconnects: a client ID reconnecting over and over,
// each older connection closed by the client as the newer one connects,
// leaves the newest connection in mochi's map, whatever the order in
// which the older ones end.
func TestRegistryRapidReconnects(t *testing.T) {
	const n = 20
	s := session{id: "bob/phone", persistent: true}
	ms := startMochi(t, mochiOptions{registry: new(Registry)})
	prev := ms.connect(t, s)
	var closing sync.WaitGroup
	for range n {
		c := ms.dial(t)
		closing.Add(1)
		go func(old *rawClient) {
			defer closing.Done()
			old.conn.Close()
		}(prev)
		c.send(connectPacket(s))
		if fh, body := c.read(); fh.Type != packets.Connack || body[1] != 0 {
			t.Fatalf("got packet type %d % x, want an accepting CONNACK", fh.Type, body)
		}
		prev = c
	}
	closing.Wait()
	last := ms.client(t, prev)
	testutil.Eventually(t, wait, func() bool { return ms.hook.endedCount() == n }, "every older connection ended")
	if got, ok := ms.inMap(s.id); !ok || got != last {
		t.Fatalf("mochi's map holds %p (found %v), want the newest connection %p", got, ok, last)
	}
	prev.ping()
}

// TestRegistryKeepsClientsWhileClosing: during shutdown a persistent
// client that disconnects stays in mochi's client map: Forget deletes
// nothing then (see TestForgetWhileMapIsRead for why).
func TestRegistryKeepsClientsWhileClosing(t *testing.T) {
	s := session{id: "bob/phone", persistent: true}
	ms := startMochi(t, mochiOptions{registry: new(Registry)})
	c := ms.connect(t, s)
	c.subscribe("inbox/bob")
	cl := ms.client(t, c)
	ms.hook.closing.Store(true)
	if err := c.conn.Close(); err != nil {
		t.Fatal(err)
	}
	ms.waitEnded(t, cl)
	if got, ok := ms.inMap(s.id); !ok || got != cl || !ms.subscribed(s.id, "inbox/bob") {
		t.Fatalf("during shutdown Forget removed the client: in the map %v, subscribed %v", ok, ms.subscribed(s.id, "inbox/bob"))
	}
}

// TestForgetWhileMapIsRead reproduces the mechanism of mochi v2.7.9's
// shutdown deadlock (mochi-mqtt/server#488): Clients.GetByListener holds
// the map's read lock and takes it again in Clients.Len; a writer waiting
// between the two (a Delete from a disconnect) blocks the second, and
// GetByListener never lets go of the first. The test holds the read lock
// in GetByListener's place. While closing, Forget takes no write lock, so
// a second read lock still goes through; otherwise its Delete waits as
// that writer does, and mochi's Len really blocks behind it.
func TestForgetWhileMapIsRead(t *testing.T) {
	const id = "bob/phone"
	for _, closing := range []bool{true, false} {
		t.Run(fmt.Sprintf("closing=%v", closing), func(t *testing.T) {
			srv := mqtt.New(&mqtt.Options{Logger: slog.New(slog.DiscardHandler)})
			cl := srv.NewClient(nil, "t1", id, false)
			srv.Clients.Add(cl)
			var r Registry
			r.Establish(srv, cl, time.Now())

			srv.Clients.RLock() // GetByListener's first read lock
			forgotten := make(chan struct{})
			go func() {
				defer close(forgotten)
				r.Forget(srv, cl, false, closing, time.Now(), time.Hour)
			}()
			if closing {
				select {
				case <-forgotten:
				case <-time.After(wait):
					srv.Clients.RUnlock()
					t.Fatal("Forget waited on the map's lock during shutdown")
				}
				if !srv.Clients.TryRLock() { // GetByListener's second read lock
					srv.Clients.RUnlock()
					t.Fatal("a second read lock would block after Forget")
				}
				srv.Clients.RUnlock()
				srv.Clients.RUnlock()
				if _, ok := srv.Clients.Get(id); !ok {
					t.Fatal("Forget deleted during shutdown")
				}
				return
			}

			// Forget's Delete is the writer waiting between the two.
			err := testutil.Poll(wait, func() error {
				if srv.Clients.TryRLock() {
					srv.Clients.RUnlock()
					return fmt.Errorf("no writer waits on the map")
				}
				return nil
			})
			if err != nil {
				srv.Clients.RUnlock()
				t.Fatal(err)
			}
			lenDone := make(chan struct{})
			go func() {
				defer close(lenDone)
				srv.Clients.Len() // GetByListener's second read lock
			}()
			// A wait too short could only let the deadlock pass unseen.
			select {
			case <-lenDone:
				srv.Clients.RUnlock()
				t.Fatal("Clients.Len went through with a writer waiting: the map's lock no longer queues readers behind a writer")
			case <-time.After(50 * time.Millisecond):
			}
			srv.Clients.RUnlock() // only the test can: in mochi this is the deadlock
			for _, done := range []chan struct{}{forgotten, lenDone} {
				select {
				case <-done:
				case <-time.After(wait):
					t.Fatal("the map stayed locked after the read lock was let go")
				}
			}
			if _, ok := srv.Clients.Get(id); ok {
				t.Fatal("Forget did not delete the persistent client")
			}
		})
	}
}
