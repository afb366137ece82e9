package broker

import (
	"encoding/json"
	"fmt"
	"slices"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"

	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/hooks"
)

// copyEvent is what a user's device receives, as far as the copies of
// PROTOCOL.md section 4 need it.
type copyEvent struct {
	Kind   string          `json:"kind"`
	From   string          `json:"from"`
	To     string          `json:"to"`
	Status string          `json:"status"`
	By     string          `json:"by"`
	Peer   string          `json:"peer"`
	IDs    []string        `json:"ids"`
	Msg    json.RawMessage `json:"msg"`
}

// String is the event in short: kind, the message id or receipt ids, and
// who it concerns.
func (e copyEvent) String() string {
	var m struct {
		ID string `json:"id"`
	}
	_ = json.Unmarshal(e.Msg, &m)
	switch e.Kind {
	case "receipt":
		return fmt.Sprintf("receipt:%s:%s->%s:%v", e.Status, e.By, e.Peer, e.IDs)
	default:
		return fmt.Sprintf("%s:%s->%s:%s", e.Kind, e.From, e.To, m.ID)
	}
}

// received decodes what p received, in order.
func received(t *testing.T, raw [][]byte) []string {
	t.Helper()
	out := make([]string, 0, len(raw))
	for _, b := range raw {
		var e copyEvent
		if err := json.Unmarshal(b, &e); err != nil {
			t.Fatalf("event %q: %v", b, err)
		}
		out = append(out, e.String())
	}
	return out
}

// waitEvents waits until p has n events and returns them.
func waitEvents(t *testing.T, p *phone, n int) []string {
	t.Helper()
	p.waitFor(n)
	p.mu.Lock()
	defer p.mu.Unlock()
	return received(t, p.raw)
}

// TestDevicesStayInStep: what one device of a user sends, and what it
// reads, reaches the user's other devices (MQTT 3.1.1), online at once or
// queued for one offline across a restart; the sending device never gets
// its own copy.
func TestDevicesStayInStep(t *testing.T) {
	dir := t.TempDir()
	noDelivered := func(c *config.Config) { c.Receipts.Delivered = false }
	s := startServer(t, dir, noDelivered)

	// The tablet is one of alice's devices, offline from here on.
	tablet := mustDial(t, s, "alice", phoneOpt{clientID: "alice/tablet"})
	tablet.client.Disconnect(100)
	ph := mustDial(t, s, "alice", phoneOpt{clientID: "alice/phone"})
	laptop := mustDial(t, s, "alice", phoneOpt{clientID: "alice/laptop"})
	bob := mustDial(t, s, "bob", phoneOpt{})

	for _, id := range []string{"m1", "m2", "m3"} {
		ph.send("bob", id, "")
	}
	sent := []string{"sent:alice->bob:m1", "sent:alice->bob:m2", "sent:alice->bob:m3"}
	if got := waitEvents(t, laptop, 3); !slices.Equal(got, sent) {
		t.Fatalf("laptop got %v, want the sent copies %v", got, sent)
	}
	bob.waitFor(3)
	bob.send("alice", "b1", "")
	// The laptop reads bob's message.
	laptop.waitFor(4)
	laptop.publish("receipt/bob", []byte(`{"status":"read","ids":["b1"]}`))
	if got := waitEvents(t, bob, 4); got[3] != "receipt:read:alice->:[b1]" {
		t.Fatalf("bob got %v, want alice's read receipt last", got)
	}
	// A message to herself reaches every device of alice, the sender's
	// too, after all of the above: it marks the end.
	ph.send("alice", "self", "")
	wantPhone := []string{"msg:bob->alice:b1", "receipt:read:alice->bob:[b1]", "msg:alice->alice:self"}
	if got := waitEvents(t, ph, 3); !slices.Equal(got, wantPhone) {
		t.Fatalf("the sending phone got %v, want %v (no copy of its own sends)", got, wantPhone)
	}
	wantLaptop := append(slices.Clone(sent), "msg:bob->alice:b1", "msg:alice->alice:self")
	if got := waitEvents(t, laptop, 5); !slices.Equal(got, wantLaptop) {
		t.Fatalf("the reading laptop got %v, want %v (no copy of its own receipt)", got, wantLaptop)
	}

	// The tablet, offline through all of it, gets everything after a restart.
	stopServer(t, s)
	s = startServer(t, dir, noDelivered)
	tablet = mustDial(t, s, "alice", phoneOpt{clientID: "alice/tablet"})
	wantTablet := append(slices.Clone(sent), "msg:bob->alice:b1", "receipt:read:alice->bob:[b1]", "msg:alice->alice:self")
	if got := waitEvents(t, tablet, 6); !slices.Equal(got, wantTablet) {
		t.Fatalf("the tablet got %v, want %v", got, wantTablet)
	}
	// The phone and the laptop come back too (what they acknowledged
	// just before the restart may come again: at least once), and once
	// every device has acknowledged everything alice's queue is empty.
	mustDial(t, s, "alice", phoneOpt{clientID: "alice/phone"})
	mustDial(t, s, "alice", phoneOpt{clientID: "alice/laptop"})
	deadline := time.Now().Add(10 * time.Second)
	for {
		n, err := s.queue.Depth("alice")
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("alice's queue holds %d messages after every device acknowledged everything", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestCopiesOff: no copies with carbons.enabled false, nor from an MQTT 5
// connection that asks for none with the CONNECT user property.
func TestCopiesOff(t *testing.T) {
	cases := []struct {
		name     string
		enabled  bool
		property bool
	}{
		{"server setting off", false, false},
		{"user property off", true, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := startServer(t, t.TempDir(), func(cfg *config.Config) {
				cfg.Receipts.Delivered = false
				cfg.Carbons.Enabled = c.enabled
			})
			laptop := mustDial(t, s, "alice", phoneOpt{clientID: "alice/laptop"})
			mustDial(t, s, "bob", phoneOpt{})
			var props []paho5.UserProperty
			if c.property {
				props = []paho5.UserProperty{{Key: hooks.CopiesProperty, Value: "off"}}
			}
			ph := dialV5Device(t, s, "alice", "alice/phone", props, nil)
			if code := publishV5(t, ph, "inbox/bob", `{"id":"m1"}`); code != 0 {
				t.Fatalf("publish: reason 0x%x", code)
			}
			if code := publishV5(t, ph, "receipt/bob", `{"status":"read","ids":["b0"]}`); code != 0 {
				t.Fatalf("read receipt: reason 0x%x", code)
			}
			if code := publishV5(t, ph, "inbox/alice", `{"id":"self"}`); code != 0 {
				t.Fatalf("publish to self: reason 0x%x", code)
			}
			want := []string{"msg:alice->alice:self"}
			if got := waitEvents(t, laptop, 1); !slices.Equal(got, want) {
				t.Fatalf("the laptop got %v, want only %v", got, want)
			}
		})
	}
}
