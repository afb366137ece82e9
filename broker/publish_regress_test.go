package broker

// Regression tests for the publish path: nothing acknowledged is lost and
// every publish is answered, in any order of events.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
	paho5 "github.com/eclipse/paho.golang/paho"

	"github.com/chatd/chatd/broker/queue/badgerq"
	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/testutil"
)

// v5Box is an MQTT 5 client subscribed to its inbox, recording what arrives.
type v5Box struct {
	t      *testing.T
	c      *paho5.Client
	mu     sync.Mutex
	got    []envelopeMsg
	signal chan struct{}
}

// dialV5Inbox connects user over MQTT 5 and subscribes it to its inbox.
func dialV5Inbox(t *testing.T, s *Server, user string) *v5Box {
	t.Helper()
	b := &v5Box{t: t, signal: make(chan struct{}, 1)}
	b.c = dialV5(t, s, user, func(p *paho5.Publish) {
		e := decodeEnvelope(t, p.Payload)
		b.mu.Lock()
		b.got = append(b.got, e)
		b.mu.Unlock()
		select {
		case b.signal <- struct{}{}:
		default:
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := b.c.Subscribe(ctx, &paho5.Subscribe{Subscriptions: []paho5.SubscribeOptions{{Topic: "inbox/" + user, QoS: 1}}}); err != nil {
		t.Fatalf("subscribe %s: %v", user, err)
	}
	return b
}

// publish sends payload to topic at QoS 1 and returns the PUBACK's reason code.
func (b *v5Box) publish(topic, payload string) byte {
	b.t.Helper()
	return publishV5(b.t, b.c, topic, payload)
}

// waitFor waits until n envelopes have arrived and returns them.
func (b *v5Box) waitFor(n int) []envelopeMsg {
	b.t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		b.mu.Lock()
		if len(b.got) >= n {
			out := slices.Clone(b.got)
			b.mu.Unlock()
			return out
		}
		have := len(b.got)
		b.mu.Unlock()
		select {
		case <-b.signal:
		case <-time.After(50 * time.Millisecond):
		case <-deadline:
			b.t.Fatalf("got %d envelopes, want %d", have, n)
		}
	}
}

// findError returns the error event about ref among evs.
func findError(t *testing.T, evs []envelopeMsg, ref string) envelopeMsg {
	t.Helper()
	for _, e := range evs {
		if e.Kind == "error" && e.Ref == ref {
			return e
		}
	}
	t.Fatalf("no error event for %s among %+v", ref, evs)
	return envelopeMsg{}
}

// msgIDs returns the ids of the messages among evs, in order.
func msgIDs(t *testing.T, evs []envelopeMsg) []string {
	t.Helper()
	var out []string
	for _, e := range evs {
		if e.Kind == "msg" {
			out = append(out, innerID(t, e))
		}
	}
	return out
}

// waitDepth waits until user's queue holds no undeleted message.
func waitDepth0(t *testing.T, s *Server, user string) {
	t.Helper()
	testutil.Eventually(t, 10*time.Second, func() bool {
		d, err := s.queue.Depth(user)
		return err == nil && d == 0
	}, "the queue of %s was never emptied", user)
}

// TestGroupFullQueues: a group message reaching no member because every
// other member's queue is full is refused with queue_full and leaves no
// dedup key, so that its resend is delivered; one reaching some members
// is acknowledged, and its sender told whom it missed. MQTT 3.1.1 and 5.
func TestGroupFullQueues(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *config.Config) {
		c.Queue.MaxQueueMessages = 3
		c.Receipts.Delivered = false
	})
	for _, g := range []struct {
		id, by  string
		members []string
	}{
		{"g1", "alice", []string{"bob", "carol", "dave", "erin"}},
		{"g2", "alice", []string{"bob", "carol"}},
		{"g3", "erin", []string{"bob", "carol"}},
	} {
		if st, body := httpJSON(t, s, "POST", "/v1/groups", g.by, map[string]any{"id": g.id, "members": g.members}); st != 201 {
			t.Fatalf("create %s: %d %v", g.id, st, body)
		}
	}
	// bob and carol, who never connected, have full queues.
	filler := mustDial(t, s, "filler", phoneOpt{noSub: true})
	for _, u := range []string{"bob", "carol"} {
		for i := range 3 {
			filler.send(u, fmt.Sprintf("%s-f-%d", u, i), "")
		}
	}
	alice := mustDial(t, s, "alice", phoneOpt{})
	dave := mustDial(t, s, "dave", phoneOpt{})
	erin := dialV5Inbox(t, s, "erin")

	// Some members' queues full: stored for the others and acknowledged.
	alice.publish("group/g1", []byte(`{"id":"part-v3"}`))
	if code := erin.publish("group/g1", `{"id":"part-v5"}`); code != 0 {
		t.Fatalf("group publish with room for some members: reason 0x%x, want 0", code)
	}
	if got := msgIDs(t, dave.waitFor(2)); !slices.Equal(got, []string{"part-v3", "part-v5"}) {
		t.Fatalf("dave got %v", got)
	}
	const missed = "could not reach: bob, carol"
	// alice: the error event and erin's message; erin: the reverse.
	for who, ev := range map[string]envelopeMsg{
		"alice": findError(t, alice.waitFor(2), "part-v3"),
		"erin":  findError(t, erin.waitFor(2), "part-v5"),
	} {
		if ev.Code != "queue_full" || !strings.Contains(ev.Reason, missed) {
			t.Errorf("%s's error event %+v, want queue_full naming whom it missed (%q)", who, ev, missed)
		}
	}

	// Every other member's queue full: refused, nothing stored.
	alice.publish("group/g2", []byte(`{"id":"all-v3"}`))
	if ev := findError(t, alice.waitFor(3), "all-v3"); ev.Code != "queue_full" {
		t.Fatalf("alice's error event %+v, want queue_full", ev)
	}
	if code := erin.publish("group/g3", `{"id":"all-v5"}`); code != 0x97 {
		t.Fatalf("group publish with every queue full: reason 0x%x, want 0x97", code)
	}

	// Once the queues have room the same publishes are stored: the
	// refusal kept no dedup key.
	bob := mustDial(t, s, "bob", phoneOpt{})
	carol := mustDial(t, s, "carol", phoneOpt{})
	for _, p := range []*phone{bob, carol} {
		p.waitFor(3)
		waitAcked(t, s, p.user, "")
		waitDepth0(t, s, p.user)
	}
	alice.publish("group/g2", []byte(`{"id":"all-v3"}`))
	if code := erin.publish("group/g3", `{"id":"all-v5"}`); code != 0 {
		t.Fatalf("resend with room: reason 0x%x, want 0", code)
	}
	for _, p := range []*phone{bob, carol} {
		want := []string{p.user + "-f-0", p.user + "-f-1", p.user + "-f-2", "all-v3", "all-v5"}
		if got := msgIDs(t, p.waitFor(5)); !slices.Equal(got, want) {
			t.Errorf("%s got %v, want %v", p.user, got, want)
		}
	}
}

// TestTakenOverDeviceForgottenAfterTTL: a device whose session was taken
// over and that then left is forgotten after device_ttl like any other,
// and stops holding its user's messages back.
func TestTakenOverDeviceForgottenAfterTTL(t *testing.T) {
	// The sweep that forgets devices runs every second for this ttl; the
	// server's clock is moved past the ttl instead of waiting it out.
	const ttl = 10 * time.Second
	var clock testClock
	s := startServerAt(t, t.TempDir(), clock.Now, func(c *config.Config) {
		c.Queue.DeviceTTL = ttl
		c.Receipts.Delivered = false
	})
	tablet := mustDial(t, s, "bob", phoneOpt{clientID: "bob/tablet"})
	first := mustDial(t, s, "bob", phoneOpt{clientID: "bob/phone"})
	second := mustDial(t, s, "bob", phoneOpt{clientID: "bob/phone"})
	testutil.Eventually(t, 10*time.Second, func() bool { return !first.client.IsConnectionOpen() },
		"the first connection of bob/phone was not taken over")
	second.client.Disconnect(250)
	waitDisconnected(t, s, "bob/phone")
	left := clock.Now()

	alice := mustDial(t, s, "alice", phoneOpt{noSub: true})
	// deleted reports whether a message is deleted within wait: either
	// answer is an outcome, so Poll's error is the answer false.
	deleted := func(wait time.Duration) bool {
		return testutil.Poll(wait, func() error {
			if s.queue.Stats().Deleted == 0 {
				return errors.New("nothing deleted")
			}
			return nil
		}) == nil
	}
	// Within device_ttl the phone holds what the tablet acknowledged.
	alice.send("bob", "m-0", "")
	tablet.waitFor(1)
	waitAcked(t, s, "bob", "tablet")
	if deleted(300*time.Millisecond) && clock.Now().Sub(left) < ttl {
		t.Fatal("a message was deleted before the phone that did not acknowledge it was forgotten")
	}
	// Past it, the phone is forgotten: what the tablet acknowledges goes.
	clock.Advance(ttl)
	deadline := time.Now().Add(30 * time.Second)
	for i := 1; !deleted(500 * time.Millisecond); i++ {
		if time.Now().After(deadline) {
			t.Fatalf("bob/phone, taken over and gone for %v, still holds bob's messages (device_ttl %v)", clock.Now().Sub(left).Round(time.Second), ttl)
		}
		alice.send("bob", fmt.Sprintf("m-%d", i), "")
		tablet.waitFor(i + 1)
		waitAcked(t, s, "bob", "tablet")
	}
	if clock.Now().Sub(left) < ttl {
		t.Fatalf("messages deleted %v after the phone left, before device_ttl %v", clock.Now().Sub(left), ttl)
	}
}

// TestReservedTopicPublishesAnswered: mochi drops publishes to the topics
// it reserves before the server's checks; they are answered like any
// refused publish, so a client's outbox never waits on them.
func TestReservedTopicPublishesAnswered(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	bob := mustDial(t, s, "bob", phoneOpt{})
	alice := mustDial(t, s, "alice", phoneOpt{})
	erin := dialV5Inbox(t, s, "erin")
	topics := []string{"$SYS/broker/clients", "$sys/x", "$SYS", "$share", "$share/g", "$share/g/inbox/bob"}
	for i, topic := range topics {
		ref := fmt.Sprintf("r-%d", i)
		alice.publish(topic, []byte(`{"id":"`+ref+`"}`))
		if ev := alice.waitFor(i + 1)[i]; ev.Kind != "error" || ev.Code != "bad_topic" || ev.Ref != ref {
			t.Errorf("v3 publish to %s: event %+v, want bad_topic for %s", topic, ev, ref)
		}
		if code := erin.publish(topic, `{"id":"`+ref+`"}`); code != 0x90 {
			t.Errorf("v5 publish to %s: reason 0x%x, want 0x90", topic, code)
		}
	}
	alice.send("bob", "ok", "")
	if got := msgIDs(t, bob.waitFor(1)); !slices.Equal(got, []string{"ok"}) {
		t.Fatalf("bob got %v, want only ok", got)
	}
}

// rawConnectV5 builds an MQTT 5 CONNECT with clean start, username and password.
func rawConnectV5(clientID, user, password string) []byte {
	body := rawString("MQTT")
	body = append(body, 5, 0xC2, 0, 30, 0) // level 5; username, password, clean start; keepalive 30 s; no properties
	body = append(body, rawString(clientID)...)
	body = append(body, rawString(user)...)
	body = append(body, rawString(password)...)
	return rawPacket(0x10, body)
}

// rawPublishQoS2 builds a QoS 2 PUBLISH with packet id 1.
func rawPublishQoS2(v5 bool, topic string, payload []byte) []byte {
	body := append(rawString(topic), 0, 1)
	if v5 {
		body = append(body, 0) // no properties
	}
	return rawPacket(0x34, append(body, payload...))
}

// readToClose reads r until the server closes the connection and returns
// what it read; it fails the test if the server keeps it open.
func readToClose(t *testing.T, c net.Conn, r io.Reader) []byte {
	t.Helper()
	if err := c.SetReadDeadline(time.Now().Add(rawWait)); err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(r)
	if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
		t.Fatalf("server kept the connection open for %v", rawWait)
	}
	return b
}

// TestQoS2PublishRefused: the server grants QoS 1 at most; a QoS 2
// publish ends the connection (MQTT 5: DISCONNECT 0x9B first) and is
// neither stored nor acknowledged.
func TestQoS2PublishRefused(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	bob := mustDial(t, s, "bob", phoneOpt{})

	c := rawDial(t, s)
	rawLogin(t, c, "alice", "alice")
	if _, err := c.Write(rawPublishQoS2(false, "inbox/bob", []byte(`{"id":"q2-v3"}`))); err != nil {
		t.Fatal(err)
	}
	if rest := readToClose(t, c, c); len(rest) != 0 {
		t.Errorf("v3 QoS 2 publish answered % x, want the connection closed", rest)
	}

	c5 := rawDial(t, s)
	if _, err := c5.Write(rawConnectV5("erin", "erin", mint(t, "erin"))); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(c5)
	if ack := readPacket(t, c5, r); ack[0] != 0x20 || ack[3] != 0 {
		t.Fatalf("v5 CONNACK % x", ack)
	}
	if _, err := c5.Write(rawPublishQoS2(true, "inbox/bob", []byte(`{"id":"q2-v5"}`))); err != nil {
		t.Fatal(err)
	}
	if d := readPacket(t, c5, r); d[0] != 0xE0 || d[2] != 0x9B {
		t.Errorf("v5 QoS 2 publish answered % x, want DISCONNECT 0x9B", d)
	}
	if rest := readToClose(t, c5, r); len(rest) != 0 {
		t.Errorf("after the DISCONNECT: % x", rest)
	}

	if h, _ := s.queue.Head("bob"); h != 0 {
		t.Fatalf("bob's queue head %d after QoS 2 publishes, want 0", h)
	}
	mustDial(t, s, "carol", phoneOpt{noSub: true}).send("bob", "ok", "")
	if got := msgIDs(t, bob.waitFor(1)); !slices.Equal(got, []string{"ok"}) {
		t.Fatalf("bob got %v, want only ok", got)
	}
}

// TestIDsMustBeValidUTF8: an id that is not valid UTF-8 (or an unpaired
// surrogate escape, which decodes to U+FFFD) is refused in messages and
// read receipts alike, and receipt ids are checked like message ids; a
// valid non-ASCII id comes back in receipts unchanged.
func TestIDsMustBeValidUTF8(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *config.Config) { c.Receipts.Delivered = false })
	bob := mustDial(t, s, "bob", phoneOpt{})
	alice := mustDial(t, s, "alice", phoneOpt{})
	erin := dialV5Inbox(t, s, "erin")
	many := `"m"` + strings.Repeat(`,"m"`, 1000)
	bad := []struct{ name, topic, payload string }{
		{"invalid UTF-8 message id", "inbox/bob", "{\"id\":\"m-\xff\"}"},
		{"lone surrogate message id", "inbox/bob", `{"id":"m-\ud800"}`},
		{"invalid UTF-8 receipt id", "receipt/bob", "{\"status\":\"read\",\"ids\":[\"ok\",\"\xc3\"]}"},
		{"lone surrogate receipt id", "receipt/bob", `{"status":"read","ids":["\udc00"]}`},
		{"65-byte receipt id", "receipt/bob", `{"status":"read","ids":["` + strings.Repeat("i", 65) + `"]}`},
		{"empty receipt id", "receipt/bob", `{"status":"read","ids":[""]}`},
		{"no receipt ids", "receipt/bob", `{"status":"read","ids":[]}`},
		{"1001 receipt ids", "receipt/bob", `{"status":"read","ids":[` + many + `]}`},
	}
	for i, c := range bad {
		alice.publish(c.topic, []byte(c.payload))
		if ev := alice.waitFor(i + 1)[i]; ev.Kind != "error" || ev.Code != "bad_payload" {
			t.Errorf("v3 %s: event %+v, want bad_payload", c.name, ev)
		}
		if code := erin.publish(c.topic, c.payload); code != 0x99 {
			t.Errorf("v5 %s: reason 0x%x, want 0x99", c.name, code)
		}
	}
	if h, _ := s.queue.Head("bob"); h != 0 {
		t.Fatalf("bob's queue head %d after refused publishes, want 0", h)
	}
	// A valid id, escaped or not, comes back in the read receipt as sent.
	bob.publish("inbox/alice", []byte(`{"id":"m-é-\ud83d\ude00"}`))
	got := alice.waitFor(len(bad) + 1)[len(bad)]
	id := innerID(t, got)
	if id != "m-é-\U0001F600" {
		t.Fatalf("alice got id %q", id)
	}
	alice.publish("receipt/bob", []byte(`{"status":"read","ids":["m-é-\ud83d\ude00"]}`))
	bob.waitFor(1)
	if ev := bob.events()[0]; ev["status"] != "read" || ids(ev) != id {
		t.Fatalf("bob's read receipt %v, want ids [%s]", ev, id)
	}
}

// TestReceiptsStopAtDiskReserve: past the disk reserve read receipts are
// refused like messages, as not stored: MQTT 5 PUBACK 0x80, MQTT 3.1.1
// disconnect without a PUBACK.
func TestReceiptsStopAtDiskReserve(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *config.Config) { c.Queue.MinFreeBytes = 1 << 62 })
	erin := dialV5Inbox(t, s, "erin")
	for _, c := range []struct{ topic, payload string }{
		{"inbox/bob", `{"id":"m-1"}`},
		{"receipt/bob", `{"status":"read","ids":["m-1"]}`},
	} {
		if code := erin.publish(c.topic, c.payload); code != failedToStore {
			t.Errorf("v5 publish to %s on a full disk: reason 0x%x, want 0x%x", c.topic, code, failedToStore)
		}
	}
	raw := rawDial(t, s)
	rawLogin(t, raw, "alice", "alice")
	if _, err := raw.Write(rawPublish("receipt/bob", []byte(`{"status":"read","ids":["m-1"]}`))); err != nil {
		t.Fatal(err)
	}
	if rest := readToClose(t, raw, raw); len(rest) != 0 {
		t.Errorf("v3 receipt on a full disk answered % x, want the connection closed", rest)
	}
	if h, _ := s.queue.Head("bob"); h != 0 {
		t.Fatalf("bob's queue head %d on a full disk, want 0", h)
	}
}

// TestGroupReadFailureAsksForResend: a group that cannot be read is not
// refused as unknown (for good) but answered as not stored, so that the
// client sends the message again: MQTT 5 PUBACK 0x80, MQTT 3.1.1
// disconnect without a PUBACK.
func TestGroupReadFailureAsksForResend(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	// A group record that does not decode fails every read of the group.
	err := s.queue.(*badgerq.Store).DB().Update(func(txn *badger.Txn) error {
		return txn.Set([]byte("gbroken"), []byte("{not json"))
	})
	if err != nil {
		t.Fatal(err)
	}
	erin := dialV5Inbox(t, s, "erin")
	if code := erin.publish("group/broken", `{"id":"m-1"}`); code != failedToStore {
		t.Errorf("v5 publish to an unreadable group: reason 0x%x, want 0x%x", code, failedToStore)
	}
	if code := erin.publish("group/nope", `{"id":"m-2"}`); code != 0x90 {
		t.Errorf("v5 publish to a missing group: reason 0x%x, want 0x90", code)
	}
	raw := rawDial(t, s)
	rawLogin(t, raw, "alice", "alice")
	if _, err := raw.Write(rawPublish("group/broken", []byte(`{"id":"m-3"}`))); err != nil {
		t.Fatal(err)
	}
	if rest := readToClose(t, raw, raw); len(rest) != 0 {
		t.Errorf("v3 publish to an unreadable group answered % x, want the connection closed", rest)
	}
}

// rawConnectPersistent builds an MQTT 3.1.1 CONNECT without clean session.
func rawConnectPersistent(clientID, user, password string) []byte {
	body := rawString("MQTT")
	body = append(body, 4, 0xC0, 0, 30) // level 4; username, password; keepalive 30 s
	body = append(body, rawString(clientID)...)
	body = append(body, rawString(user)...)
	body = append(body, rawString(password)...)
	return rawPacket(0x10, body)
}

// TestReconnectRaceKeepsNewestRegistered: a device disconnecting while
// its next connection comes in never leaves that connection out of the
// server's client map, so the one after still takes it over. The race is
// narrow: the rounds make it likely, not certain, that a regression shows.
func TestReconnectRaceKeepsNewestRegistered(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	const id = "bob/phone"
	token := mint(t, "bob")
	// login connects id; it runs beside the test goroutine, so it reports
	// errors instead of failing the test.
	login := func() (net.Conn, error) {
		c, err := net.Dial("tcp", s.MQTTAddr())
		if err != nil {
			return nil, err
		}
		if err := c.SetDeadline(time.Now().Add(rawWait)); err != nil {
			return nil, errors.Join(err, c.Close())
		}
		if _, err := c.Write(rawConnectPersistent(id, "bob", token)); err != nil {
			return nil, errors.Join(err, c.Close())
		}
		ack := make([]byte, 4)
		if _, err := io.ReadFull(c, ack); err != nil {
			return nil, errors.Join(err, c.Close())
		}
		if ack[0] != 0x20 || ack[3] != 0 {
			return nil, errors.Join(fmt.Errorf("CONNACK % x", ack), c.Close())
		}
		return c, nil
	}
	connected := func() int64 { return atomic.LoadInt64(&s.mqtt.Info.ClientsConnected) }
	cur, err := login()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cur.Close() })
	for round := range 100 {
		type result struct {
			c   net.Conn
			err error
		}
		next := make(chan result)
		go func() {
			c, err := login()
			next <- result{c, err}
		}()
		// The old connection leaves as the new one comes in.
		_, werr := cur.Write([]byte{0xE0, 0})
		r := <-next
		if r.err != nil {
			t.Fatalf("round %d: connect: %v", round, r.err)
		}
		_ = cur.Close()
		cur = r.c
		if werr != nil && !errors.Is(werr, net.ErrClosed) {
			// The takeover may have closed it first.
			t.Logf("round %d: DISCONNECT: %v", round, werr)
		}
		// Once the old connection is fully gone, its hooks have run.
		testutil.EventuallyNoError(t, 10*time.Second, func() error {
			if n := connected(); n != 1 {
				return fmt.Errorf("%d connections, want 1", n)
			}
			return nil
		}, "round %d", round)
		if cl, ok := s.mqtt.Clients.Get(id); !ok || cl.Closed() {
			t.Fatalf("round %d: the live connection of %s is not in the client map", round, id)
		}
	}
	// The next connection of the device takes the live one over.
	mustDial(t, s, "bob", phoneOpt{clientID: id})
	readToClose(t, cur, cur)
}
