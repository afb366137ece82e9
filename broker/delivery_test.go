package broker

import (
	"fmt"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/testutil"
)

// manualPhone connects user with automatic PUBACKs off, so the test decides
// what is acknowledged.
type manualPhone struct {
	client paho.Client
	mu     sync.Mutex
	msgs   []paho.Message
	signal chan struct{}
}

func dialManual(t *testing.T, s *Server, clientID, user string) *manualPhone {
	t.Helper()
	p := &manualPhone{signal: make(chan struct{}, 1)}
	handle := func(_ paho.Client, m paho.Message) {
		p.mu.Lock()
		p.msgs = append(p.msgs, m)
		p.mu.Unlock()
		select {
		case p.signal <- struct{}{}:
		default:
		}
	}
	opts := paho.NewClientOptions().AddBroker("tcp://" + s.MQTTAddr()).
		SetClientID(clientID).SetUsername(user).SetPassword(mint(t, user)).
		SetCleanSession(false).SetAutoReconnect(false).SetAutoAckDisabled(true).SetOrderMatters(true).
		SetDefaultPublishHandler(handle)
	c := paho.NewClient(opts)
	if tk := c.Connect(); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("connect %s: %v", clientID, tk.Error())
	}
	t.Cleanup(func() { c.Disconnect(50) })
	tk := c.Subscribe("inbox/"+user, 1, handle)
	if !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("subscribe %s: %v", clientID, tk.Error())
	}
	p.client = c
	return p
}

func (p *manualPhone) waitFor(t *testing.T, n int) []paho.Message {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		p.mu.Lock()
		if len(p.msgs) >= n {
			out := append([]paho.Message(nil), p.msgs...)
			p.mu.Unlock()
			return out
		}
		have := len(p.msgs)
		p.mu.Unlock()
		select {
		case <-p.signal:
		case <-time.After(20 * time.Millisecond):
		case <-deadline:
			t.Fatalf("got %d messages, want %d", have, n)
		}
	}
}

func msgID(t *testing.T, payload []byte) string {
	t.Helper()
	e := decodeEnvelope(t, payload)
	return innerID(t, e)
}

func sendN(t *testing.T, from *phone, to string, first, n int) {
	t.Helper()
	for i := first; i < first+n; i++ {
		from.send(to, fmt.Sprintf("m-%d", i), "")
	}
}

func TestUnackedRedeliveredAfterReconnectAckedNot(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	bob := dialManual(t, s, "bob", "bob")
	alice := mustDial(t, s, "alice", phoneOpt{noSub: true})
	sendN(t, alice, "bob", 1, 10)
	got := bob.waitFor(t, 10)
	for i, m := range got[:4] {
		if id := msgID(t, m.Payload()); id != fmt.Sprintf("m-%d", i+1) {
			t.Fatalf("message %d = %s", i, id)
		}
		m.Ack()
	}
	// paho sends the PUBACKs in the background: disconnect once they are in.
	testutil.Eventually(t, 10*time.Second, func() bool {
		n, _ := deviceWindow(t, s, "bob", "")
		return n == 6
	}, "the server never got the four PUBACKs")
	bob.client.Disconnect(250)

	bob = dialManual(t, s, "bob", "bob")
	again := bob.waitFor(t, 6)
	for i, m := range again[:6] {
		if id, want := msgID(t, m.Payload()), fmt.Sprintf("m-%d", i+5); id != want {
			t.Fatalf("after reconnect message %d = %s, want %s (acked messages must not come back, unacked must, in order)", i, id, want)
		}
	}
}

func TestDuplicateIDDeliveredOnce(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	bob := mustDial(t, s, "bob", phoneOpt{})
	alice := mustDial(t, s, "alice", phoneOpt{noSub: true})
	mallory := mustDial(t, s, "mallory", phoneOpt{noSub: true})
	alice.send("bob", "m-1", `,"n":1`)
	alice.send("bob", "m-1", `,"n":2`)
	mallory.send("bob", "m-1", "") // another sender's id space
	alice.send("bob", "m-2", "")
	got := bob.waitFor(3)
	want := []string{"alice/m-1", "mallory/m-1", "alice/m-2"}
	for i, e := range got {
		if id := e.From + "/" + innerID(t, e); id != want[i] {
			t.Fatalf("message %d = %s, want %s", i, id, want[i])
		}
	}
	if string(got[0].Msg) != `{"id":"m-1","n":1}` {
		t.Fatalf("first copy must win, got %s", got[0].Msg)
	}
}

func TestExpiredMessagesAreDeletedUnread(t *testing.T) {
	var clock testClock
	s := startServerAt(t, t.TempDir(), clock.Now, func(c *config.Config) { c.Queue.MessageTTL = time.Second })
	bob := mustDial(t, s, "bob", phoneOpt{})
	bob.client.Disconnect(100)
	alice := mustDial(t, s, "alice", phoneOpt{noSub: true})
	alice.send("bob", "old", "")
	// Badger expiry has one-second resolution: move the server's clock
	// past the message's TTL, rounded up.
	clock.Advance(2100 * time.Millisecond)
	alice.send("bob", "new", "")
	bob = mustDial(t, s, "bob", phoneOpt{})
	if got := innerID(t, bob.waitFor(1)[0]); got != "new" {
		t.Fatalf("first message after expiry = %s, want new", got)
	}
}

func TestFlowControlWindow(t *testing.T) {
	const window = 5
	s := startServer(t, t.TempDir(), func(c *config.Config) { c.Limits.MaxInflight = window })
	bob := dialManual(t, s, "bob", "bob")
	alice := mustDial(t, s, "alice", phoneOpt{noSub: true})
	sendN(t, alice, "bob", 1, 20)
	got := bob.waitFor(t, window)

	// Every publish is durable (PUBACKed) and the window is full: the
	// server must hold exactly window messages in flight and no more.
	inflight, next := deviceWindow(t, s, "bob", "")
	if inflight != window || next != window+1 {
		t.Fatalf("server has %d in flight, next %d; want %d and %d", inflight, next, window, window+1)
	}
	if n := len(bob.waitFor(t, window)); n != window {
		t.Fatalf("device received %d messages with a window of %d", n, window)
	}
	got[0].Ack()
	more := bob.waitFor(t, window+1)
	if id := msgID(t, more[window].Payload()); id != "m-6" {
		t.Fatalf("after one ack got %s, want m-6", id)
	}
}

// waitAcked waits until the server has received the device's PUBACKs for
// everything sent to it: paho sends them after the handler returns, and may
// not have when a test disconnects.
func waitAcked(t *testing.T, s *Server, user, device string) {
	t.Helper()
	testutil.Eventually(t, 10*time.Second, func() bool {
		n, _, ok := s.path.Window(user, device)
		return ok && n == 0
	}, "%s/%s never acknowledged what it received", user, device)
}

// deviceWindow reads a device's in-flight count and next sequence from the server.
func deviceWindow(t *testing.T, s *Server, user, device string) (inflight int, next uint64) {
	t.Helper()
	n, nx, ok := s.path.Window(user, device)
	if !ok {
		t.Fatalf("%s/%s is not being fed", user, device)
	}
	return n, nx
}

func TestMultiDevice(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	alice := mustDial(t, s, "alice", phoneOpt{noSub: true})

	// A user's first device receives everything queued before it connected.
	alice.send("bob", "before", "")
	phone := mustDial(t, s, "bob", phoneOpt{clientID: "bob/phone"})
	if id := innerID(t, phone.waitFor(1)[0]); id != "before" {
		t.Fatalf("first device got %s", id)
	}

	// Both devices receive; a device added later gets only what arrives after.
	laptop := mustDial(t, s, "bob", phoneOpt{clientID: "bob/laptop"})
	alice.send("bob", "both", "")
	if id := innerID(t, laptop.waitFor(1)[0]); id != "both" {
		t.Fatalf("new device's first message = %s, want both", id)
	}
	if id := innerID(t, phone.waitFor(2)[1]); id != "both" {
		t.Fatalf("phone's second message = %s", id)
	}

	// A message waits for the device that is offline, even when the other acked it.
	waitAcked(t, s, "bob", "laptop")
	laptop.client.Disconnect(250)
	alice.send("bob", "while-away", "")
	phone.waitFor(3)
	laptop = mustDial(t, s, "bob", phoneOpt{clientID: "bob/laptop"})
	if id := innerID(t, laptop.waitFor(1)[0]); id != "while-away" {
		t.Fatalf("reconnected laptop got %s, want while-away", id)
	}
}

func TestSessionTakeover(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	lost := make(chan error, 1)
	opts := paho.NewClientOptions().AddBroker("tcp://" + s.MQTTAddr()).
		SetClientID("bob").SetUsername("bob").SetPassword(mint(t, "bob")).
		SetCleanSession(false).SetAutoReconnect(false).
		SetConnectionLostHandler(func(_ paho.Client, err error) { lost <- err })
	first := paho.NewClient(opts)
	if tk := first.Connect(); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("connect: %v", tk.Error())
	}
	defer first.Disconnect(50)

	second := mustDial(t, s, "bob", phoneOpt{})
	select {
	case <-lost:
	case <-time.After(30 * time.Second):
		t.Fatal("first connection was not disconnected by the takeover")
	}
	alice := mustDial(t, s, "alice", phoneOpt{noSub: true})
	alice.send("bob", "after-takeover", "")
	if id := innerID(t, second.waitFor(1)[0]); id != "after-takeover" {
		t.Fatalf("got %s", id)
	}
}

func TestSubscriptionSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	s := startServer(t, dir, nil)
	bob := mustDial(t, s, "bob", phoneOpt{})
	bob.client.Disconnect(100)
	stopServer(t, s)

	s = startServer(t, dir, nil)
	alice := mustDial(t, s, "alice", phoneOpt{noSub: true})
	alice.send("bob", "after-restart", "")
	// bob does not subscribe again: its device subscribed before the restart.
	bob = mustDial(t, s, "bob", phoneOpt{noSub: true})
	if id := innerID(t, bob.waitFor(1)[0]); id != "after-restart" {
		t.Fatalf("got %s", id)
	}
}

func TestUnsubscribeStopsDelivery(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	bob := mustDial(t, s, "bob", phoneOpt{})
	alice := mustDial(t, s, "alice", phoneOpt{noSub: true})
	alice.send("bob", "one", "")
	bob.waitFor(1)
	waitAcked(t, s, "bob", "")
	if tk := bob.client.Unsubscribe("inbox/bob"); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("unsubscribe: %v", tk.Error())
	}
	if _, _, ok := s.path.Window("bob", ""); ok {
		t.Fatal("device still fed after unsubscribing")
	}
	alice.send("bob", "two", "")
	// "one" is deleted once its ack is flushed; "two" must stay queued.
	testutil.EventuallyNoError(t, 10*time.Second, func() error {
		if d, err := s.queue.Depth("bob"); err != nil || d != 1 {
			return fmt.Errorf("queue depth %d (%v), want 1: the message must wait in the queue", d, err)
		}
		return nil
	}, "bob's queue")
	if n := bob.count(); n != 1 {
		t.Fatalf("bob received %d messages after unsubscribing, want 1", n)
	}
}
