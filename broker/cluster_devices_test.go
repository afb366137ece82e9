package broker

import (
	"fmt"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/chatd/chatd/broker/service/deviceapi"
	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/testutil"
)

// takeEvents takes n payloads from got and returns them as events.
func takeEvents(t *testing.T, got <-chan string, n int) []string {
	t.Helper()
	raw := make([][]byte, 0, n)
	timeout := time.After(20 * time.Second)
	for len(raw) < n {
		select {
		case p := <-got:
			raw = append(raw, []byte(p))
		case <-timeout:
			t.Fatalf("got %d events of %d: %v", len(raw), n, received(t, raw))
		}
	}
	return received(t, raw)
}

// TestClusterDevices: a user's devices on different nodes stay in step
// (copies of direct and group messages and of read receipts cross
// nodes), any node's devices API lists devices connected to the others,
// and removing a device through one node closes its connection on
// another (MQTT 5 reason 0x98) and stops it holding messages back.
func TestClusterDevices(t *testing.T) {
	nodes := startTestClusterWith(t, 3, func(c *config.Config) { c.Receipts.Delivered = false })
	if st, body := httpJSON(t, nodes[0], "POST", "/v1/groups", "alice", map[string]any{"id": "g1", "members": []string{"bob"}}); st != 201 {
		t.Fatalf("create group: %d %v", st, body)
	}
	tablet := mustDial(t, nodes[2], "alice", phoneOpt{clientID: "alice/tablet"})
	tablet.client.Disconnect(100)
	ph := mustDial(t, nodes[0], "alice", phoneOpt{clientID: "alice/phone"})
	laptopGot, laptopDisc := make(chan string, 16), make(chan byte, 1)
	dialV5Watched(t, nodes[1], "alice", "alice/laptop", laptopGot, laptopDisc)
	bob := mustDial(t, nodes[2], "bob", phoneOpt{})

	// The group may take a moment to reach node 1's cache of members.
	testutil.EventuallyNoError(t, 20*time.Second, func() error {
		if st, g := httpJSON(t, nodes[0], "GET", "/v1/groups/g1", "alice", nil); st != 200 || fmt.Sprint(g["members"]) != "[alice bob]" {
			return fmt.Errorf("node 1 sees %d %v", st, g)
		}
		return nil
	}, "the group never reached node 1")
	ph.send("bob", "m1", "")
	ph.publish("group/g1", []byte(`{"id":"g-1"}`))
	bob.waitFor(2)
	bob.send("alice", "b1", "")
	if got := waitEvents(t, ph, 1); got[0] != "msg:bob->alice:b1" {
		t.Fatalf("the phone got %v, want bob's b1", got)
	}
	ph.publish("receipt/bob", []byte(`{"status":"read","ids":["b1"]}`))
	want := []string{"sent:alice->bob:m1", "sent:alice->g1:g-1", "msg:bob->alice:b1", "receipt:read:alice->bob:[b1]"}
	if got := takeEvents(t, laptopGot, len(want)); !slices.Equal(got, want) {
		t.Fatalf("the laptop, on another node, got %v, want %v", got, want)
	}

	// Node 1 lists the laptop online on node 2, the tablet offline with
	// all four waiting.
	waitDevices(t, nodes[0], "alice", func(ds map[string]deviceapi.Device) bool {
		return len(ds) == 3 && ds["alice/phone"].Online && ds["alice/laptop"].Online && !ds["alice/tablet"].Online &&
			ds["alice/phone"].Waiting == 0 && ds["alice/laptop"].Waiting == 0 && ds["alice/tablet"].Waiting == 4
	}, "node 1 never listed the phone and the laptop online with nothing waiting, and the tablet offline with 4")

	// Removed through node 3, the tablet holds nothing back any more.
	if st, body := httpDo(t, nodes[2], http.MethodDelete, "/v1/devices/alice/tablet", "alice"); st != http.StatusNoContent {
		t.Fatalf("remove the tablet: %d %s", st, body)
	}
	testutil.EventuallyNoError(t, 20*time.Second, func() error {
		if n, err := nodes[0].queue.Depth("alice"); err != nil || n != 0 {
			return fmt.Errorf("alice's queue holds %d messages (%v), want 0", n, err)
		}
		return nil
	}, "the removed tablet's backlog was not deleted")

	// Removed through node 1, the laptop's connection on node 2 ends.
	if st, body := httpDo(t, nodes[0], http.MethodDelete, "/v1/devices/alice/laptop", "alice"); st != http.StatusNoContent {
		t.Fatalf("remove the laptop: %d %s", st, body)
	}
	select {
	case code := <-laptopDisc:
		if code != 0x98 {
			t.Fatalf("the laptop was disconnected with 0x%x, want 0x98", code)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the laptop's connection on node 2 was not closed")
	}
	// Node 2, where it was connected, does not bring it back: a message
	// the phone acknowledges is deleted, and node 2 lists the phone alone.
	bob.send("alice", "b2", "")
	ph.waitFor(2)
	testutil.EventuallyNoError(t, 20*time.Second, func() error {
		if n, err := nodes[1].queue.Depth("alice"); err != nil || n != 0 {
			return fmt.Errorf("alice's queue holds %d messages (%v), want 0", n, err)
		}
		return nil
	}, "a message the phone acknowledged is held back after the laptop's removal")
	// Online on node 1 is learnt by asking the peers, whose answer a
	// loaded machine may delay past its wait: polled.
	waitDevices(t, nodes[1], "alice", func(ds map[string]deviceapi.Device) bool {
		return len(ds) == 1 && ds["alice/phone"].Online
	}, "node 2 never listed the phone alone, online")
}
