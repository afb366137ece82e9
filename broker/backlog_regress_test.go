package broker

import (
	"context"
	"slices"
	"testing"
	"time"
)

// TestTransientDeviceBesideNewPersistentKeepsBacklog is the probe that
// found the backlog deleted undelivered: messages queued for jack, who
// has no device; jack/cli connects with a clean session (presence only),
// then jack/phone with a persistent one. The phone must receive the
// backlog, and nothing is deleted before it acknowledged it.
func TestTransientDeviceBesideNewPersistentKeepsBacklog(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	alice := mustDial(t, s, "alice", phoneOpt{})
	for _, id := range []string{"m1", "m2", "m3"} {
		alice.send("jack", id, "")
	}
	cli := mustDial(t, s, "jack", phoneOpt{clientID: "jack/cli", clean: true, noSub: true})
	if tk := cli.client.Subscribe("presence/jack", 0, nil); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("subscribe presence: %v", tk.Error())
	}
	phone := mustDial(t, s, "jack", phoneOpt{clientID: "jack/phone", noSub: true})
	cli.client.Disconnect(100)
	waitUntil(t, "jack/cli detached", func() bool { return !s.inbox.Connected("jack/cli") })
	if err := s.queue.(interface{ Flush() error }).Flush(); err != nil {
		t.Fatal(err)
	}
	if d := s.queue.Stats().Deleted; d != 0 {
		t.Fatalf("%d messages deleted before any device received them", d)
	}
	if tk := phone.client.Subscribe("inbox/jack", 1, phone.handle); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("subscribe inbox: %v", tk.Error())
	}
	phone.waitFor(3)
	if got := phone.ids(); !slices.Equal(got, []string{"m1", "m2", "m3"}) {
		t.Fatalf("the first persistent device received %v, want the backlog m1 m2 m3", got)
	}
}

// waitUntil polls cond until it holds or a deadline passes.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting until %s", what)
		case <-time.After(5 * time.Millisecond):
		}
	}
}
