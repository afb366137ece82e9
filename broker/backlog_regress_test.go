package broker

import (
	"slices"
	"testing"
	"time"

	"github.com/chatd/chatd/internal/testutil"
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
	testutil.Eventually(t, 10*time.Second, func() bool { return !s.auth.Connected("jack/cli") }, "jack/cli never detached")
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
