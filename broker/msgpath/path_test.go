package msgpath

import (
	"errors"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/queue/badgerq"
	"github.com/chatd/chatd/broker/service/groups"
	"github.com/chatd/chatd/internal/testutil"
)

// wantPuback fails t unless pk is the PUBACK of pid with reason, encoded
// as the client's protocol version has it: 3.1.1 has no reason code, and
// MQTT 5 leaves out a success code.
func wantPuback(t *testing.T, pk packets.Packet, pid uint16, reason byte) {
	t.Helper()
	wantLen := 2
	if reason != 0 {
		wantLen = 3
	}
	if pk.FixedHeader.Type != packets.Puback || pk.PacketID != pid || pk.ReasonCode != reason || pk.FixedHeader.Remaining != wantLen {
		t.Fatalf("got packet type %d id %d reason %#x length %d, want PUBACK %d reason %#x length %d",
			pk.FixedHeader.Type, pk.PacketID, pk.ReasonCode, pk.FixedHeader.Remaining, pid, reason, wantLen)
	}
}

func TestNewRequiresItsParts(t *testing.T) {
	pt := newPathTest(t, pathConfig{})
	full := Options{Store: pt.store, Groups: pt.groups, Presence: pt.presence, Observe: pt.obs}
	cases := []struct {
		name string
		drop func(*Options)
	}{
		{"no store", func(o *Options) { o.Store = nil }},
		{"no groups", func(o *Options) { o.Groups = nil }},
		{"no presence", func(o *Options) { o.Presence = nil }},
		{"no observer", func(o *Options) { o.Observe = nil }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			o := full
			c.drop(&o)
			if p, err := New(o); err == nil {
				p.Close()
				t.Fatal("New succeeded")
			}
		})
	}
}

func TestPublishToInbox(t *testing.T) {
	cases := []struct {
		name           string
		senderV5, toV5 bool
		wantMsg        string
	}{
		{"v5 to v5", true, true, `{"id":"m1","text":"hi"}`},
		{"3.1.1 to 3.1.1", false, false, `{"id":"m1","text":"hi"}`},
		{"3.1.1 to v5", false, true, `{"id":"m1", "text": "hi"}`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			pt := newPathTest(t, pathConfig{})
			bob := pt.subscribe(conn{user: "bob", device: "phone", v5: c.toV5})
			alice := pt.open(conn{user: "alice", v5: c.senderV5})
			// What the store holds of bob's queue when alice's PUBACK is
			// written: the PUBACK must follow the commit.
			var headAtAck atomic.Int64
			headAtAck.Store(-1)
			alice.conn.onWrite = func() {
				head, err := pt.store.Head("bob")
				if err != nil {
					t.Error(err)
				}
				headAtAck.Store(int64(head))
			}
			pt.publish(alice, 7, "inbox/bob", c.wantMsg)

			acks := alice.conn.waitPackets(t, packets.Puback, 1)
			wantPuback(t, acks[0], 7, 0)
			if h := headAtAck.Load(); h != 1 {
				t.Fatalf("bob's queue head when the PUBACK was written: %d, want 1", h)
			}
			pubs := bob.conn.waitPackets(t, packets.Publish, 1)
			pk := pubs[0]
			if pk.TopicName != "inbox/bob" || pk.FixedHeader.Qos != 1 || pk.PacketID == 0 {
				t.Fatalf("delivery: topic %q qos %d id %d", pk.TopicName, pk.FixedHeader.Qos, pk.PacketID)
			}
			e := decodeEvent(t, pk.Payload)
			if e.Kind != "msg" || e.From != "alice" || e.To != "bob" || e.Group != "" || e.TS != testNow.UnixMilli() || string(e.Msg) != c.wantMsg {
				t.Fatalf("envelope %s", pk.Payload)
			}
			if n := len(alice.conn.packets()); n != 1 {
				t.Fatalf("alice got %d packets, want her PUBACK alone", n)
			}
			connected, refused, _, _ := pt.obs.snapshot()
			if connected != 2 || len(refused) != 0 {
				t.Fatalf("observed %d connections and refusals %v", connected, refused)
			}
			for _, user := range []string{"alice", "bob"} {
				want := "presence/" + user + ` {"user":"` + user + `","online":true`
				if !slices.ContainsFunc(pt.announced.all(), func(s string) bool { return strings.HasPrefix(s, want) }) {
					t.Fatalf("presence of %s not announced: %q", user, pt.announced.all())
				}
			}
		})
	}
}

// TestPublishRefused covers every refusal of a publish: an MQTT 5 sender
// gets the PUBACK reason code, a 3.1.1 sender a PUBACK and an error event
// in its own inbox.
func TestPublishRefused(t *testing.T) {
	long := `{"id":"m1","text":"` + strings.Repeat("x", 300) + `"}`
	cases := []struct {
		name, topic, payload string
		// setup runs once alice and bob are connected.
		setup  func(pt *pathTest, alice *client)
		code   string
		reason byte
		// ref is the error event's ref: the id of the refused message,
		// when it has one.
		ref string
	}{
		{name: "unknown topic", topic: "chat/bob", payload: `{"id":"m1"}`, code: CodeBadTopic, reason: 0x90, ref: "m1"},
		{name: "invalid user in topic", topic: "inbox/b+b", payload: `{"id":"m1"}`, code: CodeBadTopic, reason: 0x90, ref: "m1"},
		{name: "not JSON", topic: "inbox/bob", payload: `hello`, code: CodeBadPayload, reason: 0x99},
		{name: "no id", topic: "inbox/bob", payload: `{"text":"hi"}`, code: CodeBadPayload, reason: 0x99},
		{name: "too large", topic: "inbox/bob", payload: long, code: CodeTooLarge, reason: 0x95, ref: "m1"},
		{name: "presence topic", topic: "presence/bob", payload: `{"id":"m1"}`, code: CodeNotAuthorized, reason: 0x87, ref: "m1"},
		{name: "rate limited", topic: "inbox/bob", payload: `{"id":"m1"}`, code: CodeRateLimited, reason: 0x97, ref: "m1",
			setup: func(_ *pathTest, alice *client) { alice.budget.refuseAfter(0) }},
		{name: "unknown group", topic: "group/nope", payload: `{"id":"m1"}`, code: CodeUnknownGroup, reason: 0x90, ref: "m1"},
		{name: "not a member", topic: "group/others", payload: `{"id":"m1"}`, code: CodeNotAuthorized, reason: 0x87, ref: "m1",
			setup: func(pt *pathTest, _ *client) {
				if _, err := pt.groups.Create("bob", "others", []string{"carol"}); err != nil {
					pt.t.Fatal(err)
				}
			}},
		{name: "bad read receipt", topic: "receipt/bob", payload: `{"status":"seen","ids":["m1"]}`, code: CodeBadPayload, reason: 0x99},
		{name: "recipient's queue full", topic: "inbox/bob", payload: `{"id":"m1"}`, code: CodeQueueFull, reason: 0x97, ref: "m1",
			setup: func(pt *pathTest, _ *client) { pt.fill("bob") }},
	}
	for _, v5 := range []bool{true, false} {
		for _, c := range cases {
			t.Run(protoName(v5)+"/"+c.name, func(t *testing.T) {
				pt := newPathTest(t, pathConfig{settings: func(s *queue.Settings) { s.MaxQueueMessages = 1 }})
				bob := pt.subscribe(conn{user: "bob"})
				alice := pt.subscribe(conn{user: "alice", v5: v5})
				if c.setup != nil {
					c.setup(pt, alice)
				}
				bobHead := pt.head("bob")
				pt.publish(alice, 9, c.topic, c.payload)

				acks := alice.conn.waitPackets(t, packets.Puback, 1)
				if v5 {
					wantPuback(t, acks[0], 9, c.reason)
					if q := pt.queued("alice"); len(q) != 0 {
						t.Fatalf("an MQTT 5 sender got error events: %+v", q)
					}
				} else {
					wantPuback(t, acks[0], 9, 0)
					pubs := alice.conn.waitPackets(t, packets.Publish, 1)
					e := decodeEvent(t, pubs[0].Payload)
					if pubs[0].TopicName != "inbox/alice" || e.Kind != "error" || e.Code != c.code || e.Ref != c.ref || e.Reason == "" {
						t.Fatalf("error event on %q: %s", pubs[0].TopicName, pubs[0].Payload)
					}
				}
				if h := pt.head("bob"); h != bobHead {
					t.Fatalf("bob's queue head went from %d to %d: a refused publish was stored", bobHead, h)
				}
				if n := len(bob.conn.ofType(packets.Publish)); n != 0 {
					t.Fatalf("bob got %d messages", n)
				}
				if _, refused, _, _ := pt.obs.snapshot(); !slices.Equal(refused, []string{c.code}) {
					t.Fatalf("observed refusals %v, want [%s]", refused, c.code)
				}
			})
		}
	}
}

func protoName(v5 bool) string {
	if v5 {
		return "v5"
	}
	return "v3"
}

// fill stores server-made events for user until its queue is full.
func (pt *pathTest) fill(user string) {
	pt.t.Helper()
	for {
		st := make(chan queue.Status, 1)
		pt.store.Append(&queue.Request{To: user, Data: []byte(`{"kind":"filler"}`),
			Done: func(s queue.Status, _ queue.Message, _ error) { st <- s }})
		switch s := <-st; s {
		case queue.Full:
			return
		case queue.Stored:
		default:
			pt.t.Fatalf("filling the queue of %s: %v", user, s)
		}
	}
}

// head returns the last sequence stored for user, once every request made
// before has been committed.
func (pt *pathTest) head(user string) uint64 {
	pt.t.Helper()
	pt.barrier()
	h, err := pt.store.Head(user)
	if err != nil {
		pt.t.Fatal(err)
	}
	return h
}

func TestRefusedQoS0(t *testing.T) {
	cases := []struct {
		v5         bool
		wantEvents int
	}{
		{v5: true, wantEvents: 0},
		{v5: false, wantEvents: 1},
	}
	for _, c := range cases {
		t.Run(protoName(c.v5), func(t *testing.T) {
			pt := newPathTest(t, pathConfig{})
			alice := pt.open(conn{user: "alice", v5: c.v5})
			pt.p.Publish(alice.s, Publish{Topic: "inbox/bob", Payload: []byte("not json")})
			if q := pt.queued("alice"); len(q) != c.wantEvents {
				t.Fatalf("alice has %d error events, want %d", len(q), c.wantEvents)
			}
			// Every answer of the publish was made: no PUBACK was among them.
			alice.s.w.Wait()
			if n := len(alice.conn.packets()); n != 0 {
				t.Fatalf("a QoS 0 publish was answered with %d packets", n)
			}
		})
	}
}

// TestAnswersKeepPublishOrder: a refusal, made before the store, waits
// for the PUBACKs of the publishes before it.
func TestAnswersKeepPublishOrder(t *testing.T) {
	pt := newPathTest(t, pathConfig{})
	alice := pt.open(conn{user: "alice", v5: true})
	pt.publish(alice, 1, "inbox/bob", `{"id":"m1"}`)
	pt.publish(alice, 2, "chat/bob", `{"id":"m2"}`)
	pt.publish(alice, 3, "inbox/bob", `{"id":"m3"}`)
	pt.publish(alice, 4, "inbox/bob", `{"id":"m3"}`) // a resend: a duplicate
	acks := alice.conn.waitPackets(t, packets.Puback, 4)
	for i, want := range []byte{0, 0x90, 0, 0} {
		wantPuback(t, acks[i], uint16(i+1), want)
	}
	if h := pt.head("bob"); h != 2 {
		t.Fatalf("bob's queue head %d, want 2", h)
	}
}

func TestPublishDelayedByBudget(t *testing.T) {
	pt := newPathTest(t, pathConfig{})
	alice := pt.open(conn{user: "alice", v5: true})
	alice.budget.slowDown()
	pt.publish(alice, 1, "inbox/bob", `{"id":"m1"}`)
	wantPuback(t, alice.conn.waitPackets(t, packets.Puback, 1)[0], 1, 0)
	if _, _, delayed, _ := pt.obs.snapshot(); delayed != 1 {
		t.Fatalf("observed %d delayed publishes, want 1", delayed)
	}
}

func TestGroupPublish(t *testing.T) {
	cases := []struct {
		name  string
		setup func(pt *pathTest, alice *client)
		// reason is alice's PUBACK reason code.
		reason byte
		// reached are the members that get the message.
		reached []string
		// unreached is the error event alice gets: the members it names.
		unreached string
		refused   []string
	}{
		{name: "every member", reached: []string{"bob", "carol"}},
		{name: "one member's queue full", setup: func(pt *pathTest, _ *client) { pt.fill("carol") },
			reached: []string{"bob"}, unreached: "carol"},
		{name: "every member's queue full", setup: func(pt *pathTest, _ *client) { pt.fill("bob"); pt.fill("carol") },
			reason: 0x97, refused: []string{CodeQueueFull}},
		// One publish costs the budget once per copy: the second copy is
		// over it.
		{name: "copies over the rate", setup: func(_ *pathTest, alice *client) { alice.budget.refuseAfter(1) },
			reason: 0x97, refused: []string{CodeRateLimited}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			pt := newPathTest(t, pathConfig{settings: func(s *queue.Settings) { s.MaxQueueMessages = 1 }})
			if _, err := pt.groups.Create("alice", "team", []string{"bob", "carol"}); err != nil {
				t.Fatal(err)
			}
			members := map[string]*client{
				"bob":   pt.subscribe(conn{user: "bob"}),
				"carol": pt.subscribe(conn{user: "carol", v5: true}),
			}
			alice := pt.subscribe(conn{user: "alice", v5: true})
			if c.setup != nil {
				c.setup(pt, alice)
			}
			pt.publish(alice, 5, "group/team", `{"id":"g1"}`)
			wantPuback(t, alice.conn.waitPackets(t, packets.Puback, 1)[0], 5, c.reason)

			for _, m := range c.reached {
				pk := members[m].conn.waitPackets(t, packets.Publish, 1)[0]
				e := decodeEvent(t, pk.Payload)
				if pk.TopicName != "inbox/"+m || e.From != "alice" || e.To != m || e.Group != "team" || string(e.Msg) != `{"id":"g1"}` {
					t.Fatalf("%s got %s on %q", m, pk.Payload, pk.TopicName)
				}
			}
			for m, cl := range members {
				if !slices.Contains(c.reached, m) {
					if n := len(cl.conn.ofType(packets.Publish)); n != 0 {
						t.Fatalf("%s got %d messages", m, n)
					}
				}
			}
			events := pt.queued("alice")
			switch {
			case c.unreached == "" && len(events) != 0:
				t.Fatalf("alice has events %+v", events)
			case c.unreached != "":
				if len(events) != 1 || events[0].Code != CodeQueueFull || events[0].Ref != "g1" || !strings.HasSuffix(events[0].Reason, "could not reach: "+c.unreached) {
					t.Fatalf("alice has events %+v, want one naming %s", events, c.unreached)
				}
			}
			if _, refused, _, _ := pt.obs.snapshot(); !slices.Equal(refused, c.refused) {
				t.Fatalf("observed refusals %v, want %v", refused, c.refused)
			}
		})
	}
}

// failingGroups is a group store that cannot be read.
type failingGroups struct{}

var errGroupsDown = errors.New("groups unavailable")

func (failingGroups) Get(string) (*groups.Group, error) { return nil, errGroupsDown }

// TestPublishNotStored: a publish the server failed to store, for want
// of a group record or of disk space, is to be sent again: an MQTT 5
// client is told so, a 3.1.1 client is disconnected.
func TestPublishNotStored(t *testing.T) {
	cases := []struct {
		name, topic string
		cfg         pathConfig
		refused     []string
		cause       error
	}{
		{name: "group unreadable", topic: "group/team", cfg: pathConfig{opts: func(o *Options) { o.Groups = failingGroups{} }},
			cause: errGroupsDown},
		{name: "disk full", topic: "inbox/bob", cfg: pathConfig{store: func(o *badgerq.Options) { o.MinFreeBytes = 1 << 62 }},
			refused: []string{refusedNoSpace}, cause: queue.ErrNoSpace},
	}
	for _, v5 := range []bool{true, false} {
		for _, c := range cases {
			t.Run(protoName(v5)+"/"+c.name, func(t *testing.T) {
				pt := newPathTest(t, c.cfg)
				alice := pt.open(conn{user: "alice", v5: v5})
				pt.publish(alice, 3, c.topic, `{"id":"m1"}`)
				if v5 {
					wantPuback(t, alice.conn.waitPackets(t, packets.Puback, 1)[0], 3, unspecifiedError)
					if ended := alice.ended.all(); len(ended) != 0 {
						t.Fatalf("an MQTT 5 connection was ended: %v", ended)
					}
				} else {
					var ended []error
					testutil.Eventually(t, wait, func() bool { ended = alice.ended.all(); return len(ended) > 0 }, "the connection ends")
					if len(ended) != 1 || !errors.Is(ended[0], ErrResend) || !errors.Is(ended[0], c.cause) {
						t.Fatalf("connection ended with %v, want %v and %v", ended, ErrResend, c.cause)
					}
					alice.s.w.Wait()
					if n := len(alice.conn.packets()); n != 0 {
						t.Fatalf("a 3.1.1 client got %d packets: the publish must not be acknowledged", n)
					}
				}
				if _, refused, _, _ := pt.obs.snapshot(); !slices.Equal(refused, c.refused) {
					t.Fatalf("observed refusals %v, want %v", refused, c.refused)
				}
			})
		}
	}
}
