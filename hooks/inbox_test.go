package hooks

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
	"go.uber.org/goleak"
	"golang.org/x/time/rate"

	"github.com/chatd/chatd/broker/msgpath"
	"github.com/chatd/chatd/broker/presence"
	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/queue/badgerq"
	"github.com/chatd/chatd/broker/service/groups"
	"github.com/chatd/chatd/internal/mochi"
	"github.com/chatd/chatd/internal/testutil"
)

// inboxWait is how long a test waits for the server before it fails.
const inboxWait = 10 * time.Second

var inboxSecret = []byte("inbox-test-secret-0123456789-0123")

// inboxTest is a mochi server on loopback with the Auth and Inbox hooks,
// added as broker/server.go adds them, on a real message path and Badger
// store. A last hook tells the test when the Inbox hook is done with a
// disconnect.
type inboxTest struct {
	t     *testing.T
	srv   *mqtt.Server
	store *badgerq.Store
	path  *msgpath.Path
	inbox *Inbox
	addr  string
	// reasons records the Inbox hook's disconnect reasons.
	reasons *inboxReasons
	// ended receives each client whose disconnect every hook has handled.
	ended chan *mqtt.Client

	mu    sync.Mutex
	conns []net.Conn
}

// newInboxTest starts the server; maxInflight is the path's window.
// Cleanup disconnects the test's clients, waits for their sessions to
// end, shuts down as broker.Server.Close does, and checks that no
// goroutine is left.
func newInboxTest(t *testing.T, maxInflight int) *inboxTest {
	t.Helper()
	return newInboxTestWith(t, maxInflight, nil)
}

// newInboxTestWith is newInboxTest with the Presence hook reading the
// states it sends from retained (nil: the server's presence tracker).
func newInboxTestWith(t *testing.T, maxInflight int, retained Retained) *inboxTest {
	t.Helper()
	before := goleak.IgnoreCurrent()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	so := badgerq.Options{Dir: t.TempDir(), Settings: queue.DefaultSettings(), Sync: badgerq.SyncNone, Logger: log}
	so.Settings.AckFlushInterval = time.Millisecond
	store, err := badgerq.Open(so)
	if err != nil {
		t.Fatal(err)
	}
	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumQos = 1
	caps.TopicAliasMaximum = 0
	srv := mqtt.New(&mqtt.Options{InlineClient: true, Capabilities: caps, Logger: log})
	grp := groups.New(store.DB(), 16)
	tracker := presence.New(store.DB(), srv.Publish, nil, log)
	if retained == nil {
		retained = tracker
	}
	path, err := msgpath.New(msgpath.Options{
		Store: store, Groups: grp, Presence: tracker,
		Observe: inboxPathObserver{}, MaxMessageBytes: 1024, MaxInflight: maxInflight,
		MaxPendingBytes: 1 << 20, Log: log,
	})
	if err != nil {
		t.Fatal(err)
	}
	users := &Users{MaxConnections: 16, PublishRate: 1000, PublishBytesRate: 1 << 20}
	auth := &Auth{
		Server: srv, Verifier: token.NewVerifier(inboxSecret), MaxSubscriptions: 16, MaxKeepalive: 60,
		Connects: rate.NewLimiter(rate.Inf, 1), Users: users, MayAttach: store.MayAttach, Log: log,
	}
	it := &inboxTest{t: t, srv: srv, store: store, path: path, reasons: &inboxReasons{},
		ended: make(chan *mqtt.Client, 16)}
	it.inbox = &Inbox{Server: srv, Path: path, Users: users, Observe: it.reasons, Log: log}
	for _, h := range []mqtt.Hook{auth, it.inbox, &Presence{Retained: retained, Log: log}, &endHook{ended: it.ended}} {
		if err := srv.AddHook(h, nil); err != nil {
			t.Fatal(err)
		}
	}
	l := listeners.NewTCP(listeners.Config{ID: "tcp", Address: "127.0.0.1:0"})
	// CloseClients as the server sets it: a clean session leaves mochi's
	// client map only after its OnDisconnect, so one may leave while
	// Close walks the map, which mochi's own walk deadlocks on.
	if err := srv.AddListener(mochi.Guard{Listener: l, Timeout: inboxWait, CloseClients: mochi.DisconnectOnShutdown(srv)}); err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(); err != nil {
		t.Fatal(err)
	}
	it.addr = l.Address()
	t.Cleanup(func() {
		it.mu.Lock()
		for _, c := range it.conns {
			c.Close()
		}
		it.mu.Unlock()
		testutil.Eventually(t, inboxWait, func() bool {
			n := 0
			it.inbox.sessions.Range(func(_, _ any) bool { n++; return true })
			return n == 0
		}, "every session ends")
		it.inbox.Closing()
		if err := srv.Close(); err != nil {
			t.Error(err)
		}
		path.Close()
		if err := grp.Close(); err != nil {
			t.Error(err)
		}
		if err := store.Close(); err != nil {
			t.Error(err)
		}
		goleak.VerifyNone(t, before)
	})
	return it
}

// endHook is the last hook: it reports each disconnect once the hooks
// before it have handled it.
type endHook struct {
	mqtt.HookBase
	ended chan *mqtt.Client
}

func (h *endHook) ID() string                                    { return "test-end" }
func (h *endHook) Provides(b byte) bool                          { return b == mqtt.OnDisconnect }
func (h *endHook) OnDisconnect(cl *mqtt.Client, _ error, _ bool) { h.ended <- cl }

// waitEnded waits for the disconnect of clientID to pass every hook.
// close closes rc, the connection of clientID, and waits until its
// session ended and it left mochi's client map.
func (it *inboxTest) close(rc *rawClient, clientID string) {
	it.t.Helper()
	if err := rc.conn.Close(); err != nil {
		it.t.Fatal(err)
	}
	it.waitEnded(clientID)
	testutil.Eventually(it.t, inboxWait, func() bool {
		_, ok := it.srv.Clients.Get(clientID)
		return !ok
	}, "%s leaves mochi's client map", clientID)
}

func (it *inboxTest) waitEnded(clientID string) *mqtt.Client {
	it.t.Helper()
	for {
		select {
		case cl := <-it.ended:
			if cl.ID == clientID {
				return cl
			}
		case <-time.After(inboxWait):
			it.t.Fatalf("the disconnect of %s did not reach the last hook", clientID)
		}
	}
}

// inboxPathObserver ignores what the path counts: the path's own tests
// check it.
type inboxPathObserver struct{}

func (inboxPathObserver) Connected()          {}
func (inboxPathObserver) Refused(string)      {}
func (inboxPathObserver) Delayed()            {}
func (inboxPathObserver) Acked(time.Duration) {}

// inboxReasons records disconnect reasons.
type inboxReasons struct {
	mu   sync.Mutex
	vals []string
}

// Disconnected implements DisconnectObserver.
func (r *inboxReasons) Disconnected(reason string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.vals = append(r.vals, reason)
}

func (r *inboxReasons) all() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.vals)
}

// rawClient is a bare MQTT client: the test writes and reads packets.
type rawClient struct {
	t       *testing.T
	conn    net.Conn
	r       *bufio.Reader
	version byte
	// held are PUBLISHes read before a SUBACK: the server may start
	// feeding a subscription before mochi writes its SUBACK.
	held []packets.Packet
}

// session is how a rawClient connects.
type session struct {
	user, device string
	v5           bool
	// persistent asks for a session kept after disconnecting: clean
	// session off (3.1.1) or a session expiry (5).
	persistent bool
}

func (s session) clientID() string {
	if s.device == "" {
		return s.user
	}
	return s.user + "/" + s.device
}

// connect dials the server and connects as s; it fails the test unless
// the CONNACK accepts.
func (it *inboxTest) connect(s session) *rawClient {
	it.t.Helper()
	rc, _ := it.connectAck(s)
	return rc
}

// connectAck is connect, returning the CONNACK too.
func (it *inboxTest) connectAck(s session) (*rawClient, packets.Packet) {
	it.t.Helper()
	c, err := net.Dial("tcp", it.addr)
	if err != nil {
		it.t.Fatal(err)
	}
	it.mu.Lock()
	it.conns = append(it.conns, c)
	it.mu.Unlock()
	tok, err := token.Mint(inboxSecret, s.user, time.Hour)
	if err != nil {
		it.t.Fatal(err)
	}
	rc := &rawClient{t: it.t, conn: c, r: bufio.NewReader(c), version: 4}
	if s.v5 {
		rc.version = 5
	}
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: rc.version,
		Connect: packets.ConnectParams{
			ProtocolName: []byte("MQTT"), Clean: !s.persistent, Keepalive: 30,
			ClientIdentifier: s.clientID(),
			UsernameFlag:     true, Username: []byte(s.user),
			PasswordFlag: true, Password: []byte(tok),
		},
	}
	if s.v5 && s.persistent {
		pk.Properties.SessionExpiryInterval, pk.Properties.SessionExpiryIntervalFlag = 3600, true
	}
	rc.send(pk)
	ack := rc.read()
	if ack.FixedHeader.Type != packets.Connack || ack.ReasonCode != 0 {
		it.t.Fatalf("CONNACK of %s: type %d code %#x", s.clientID(), ack.FixedHeader.Type, ack.ReasonCode)
	}
	return rc, ack
}

// send encodes pk for the client's protocol version and writes it.
func (rc *rawClient) send(pk packets.Packet) {
	rc.t.Helper()
	pk.ProtocolVersion = rc.version
	b, err := testutil.Encode(pk)
	if err != nil {
		rc.t.Fatal(err)
	}
	if _, err := rc.conn.Write(b); err != nil {
		rc.t.Fatalf("write packet type %d: %v", pk.FixedHeader.Type, err)
	}
}

// next reads the next packet; err is the read's error, io.EOF once the
// server closed the connection.
func (rc *rawClient) next() (packets.Packet, error) {
	if err := rc.conn.SetReadDeadline(time.Now().Add(inboxWait)); err != nil {
		return packets.Packet{}, err
	}
	b, err := rc.r.ReadByte()
	if err != nil {
		return packets.Packet{}, err
	}
	var fh packets.FixedHeader
	if err := fh.Decode(b); err != nil {
		return packets.Packet{}, err
	}
	n, _, err := packets.DecodeLength(rc.r)
	if err != nil {
		return packets.Packet{}, err
	}
	fh.Remaining = n
	body := make([]byte, n)
	if _, err := io.ReadFull(rc.r, body); err != nil {
		return packets.Packet{}, err
	}
	pk := packets.Packet{FixedHeader: fh, ProtocolVersion: rc.version}
	switch fh.Type {
	case packets.Connack:
		err = pk.ConnackDecode(body)
	case packets.Publish:
		err = pk.PublishDecode(body)
	case packets.Puback:
		err = pk.PubackDecode(body)
	case packets.Suback:
		err = pk.SubackDecode(body)
	case packets.Unsuback:
		err = pk.UnsubackDecode(body)
	case packets.Disconnect:
		err = pk.DisconnectDecode(body)
	}
	return pk, err
}

// read reads the next packet and fails the test if there is none.
func (rc *rawClient) read() packets.Packet {
	rc.t.Helper()
	if len(rc.held) > 0 {
		pk := rc.held[0]
		rc.held = rc.held[1:]
		return pk
	}
	pk, err := rc.next()
	if err != nil {
		rc.t.Fatalf("read packet: %v", err)
	}
	return pk
}

// readType reads the next packet and fails the test unless it has type typ.
func (rc *rawClient) readType(typ byte) packets.Packet {
	rc.t.Helper()
	pk := rc.read()
	if pk.FixedHeader.Type != typ {
		rc.t.Fatalf("read packet type %d, want %d", pk.FixedHeader.Type, typ)
	}
	return pk
}

// wantClosed fails the test unless the server closes the connection
// before sending anything more.
func (rc *rawClient) wantClosed() {
	rc.t.Helper()
	pk, err := rc.next()
	if err == nil {
		rc.t.Fatalf("read packet type %d, want the connection closed", pk.FixedHeader.Type)
	}
	if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && !isReset(err) {
		rc.t.Fatalf("read: %v, want the connection closed", err)
	}
}

// isReset reports a connection the server closed with unread bytes left.
func isReset(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && !op.Timeout()
}

// subscribe subscribes to filter and checks the grant.
func (rc *rawClient) subscribe(pid uint16, filter string) {
	rc.t.Helper()
	rc.send(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1},
		PacketID:    pid,
		Filters:     packets.Subscriptions{{Filter: filter, Qos: 1}},
	})
	var ack packets.Packet
	for {
		pk, err := rc.next()
		if err != nil {
			rc.t.Fatalf("read SUBACK: %v", err)
		}
		if pk.FixedHeader.Type != packets.Publish {
			if pk.FixedHeader.Type != packets.Suback {
				rc.t.Fatalf("read packet type %d, want a SUBACK", pk.FixedHeader.Type)
			}
			ack = pk
			break
		}
		rc.held = append(rc.held, pk)
	}
	if ack.PacketID != pid || len(ack.ReasonCodes) != 1 || ack.ReasonCodes[0] >= 0x80 {
		rc.t.Fatalf("SUBACK of %s: id %d codes %v", filter, ack.PacketID, ack.ReasonCodes)
	}
}

// publish sends a PUBLISH.
func (rc *rawClient) publish(pid uint16, qos byte, topic, payload string) {
	rc.t.Helper()
	rc.send(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos},
		PacketID:    pid, TopicName: topic, Payload: []byte(payload),
	})
}

// puback acknowledges one of the server's deliveries.
func (rc *rawClient) puback(pid uint16) {
	rc.t.Helper()
	rc.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: pid})
}

// wantPuback reads the next packet and fails the test unless it is the
// PUBACK of pid with reason.
func (rc *rawClient) wantPuback(pid uint16, reason byte) {
	rc.t.Helper()
	pk := rc.readType(packets.Puback)
	if pk.PacketID != pid || pk.ReasonCode != reason {
		rc.t.Fatalf("PUBACK id %d reason %#x, want id %d reason %#x", pk.PacketID, pk.ReasonCode, pid, reason)
	}
}

// envelope decodes the parts of a delivered envelope the tests check.
func envelopeOf(t *testing.T, payload []byte) (kind, from, code string, msg json.RawMessage) {
	t.Helper()
	var e struct {
		Kind, From, Code string
		Msg              json.RawMessage
	}
	if err := json.Unmarshal(payload, &e); err != nil {
		t.Fatalf("envelope %q: %v", payload, err)
	}
	return e.Kind, e.From, e.Code, e.Msg
}

// TestQoS2PublishEndsConnection: the CONNACK said QoS 1 at most; a QoS 2
// publish ends the connection, with DISCONNECT 0x9B for MQTT 5, and is
// not stored.
func TestQoS2PublishEndsConnection(t *testing.T) {
	for _, v5 := range []bool{false, true} {
		t.Run(fmt.Sprintf("v5=%v", v5), func(t *testing.T) {
			it := newInboxTest(t, 8)
			alice := it.connect(session{user: "alice", v5: v5})
			alice.publish(1, 2, "inbox/bob", `{"id":"m1"}`)
			if v5 {
				pk := alice.readType(packets.Disconnect)
				if pk.ReasonCode != packets.ErrQosNotSupported.Code {
					t.Fatalf("DISCONNECT reason %#x, want %#x", pk.ReasonCode, packets.ErrQosNotSupported.Code)
				}
			}
			alice.wantClosed()
			it.waitEnded("alice")
			if got := it.reasons.all(); !slices.Equal(got, []string{string(ReasonProtocol)}) {
				t.Fatalf("disconnect reasons %v, want [%s]", got, ReasonProtocol)
			}
			if h, err := it.store.Head("bob"); err != nil || h != 0 {
				t.Fatalf("bob's queue head %d (%v): a QoS 2 publish was stored", h, err)
			}
		})
	}
}

// TestReservedTopicAnswered: mochi drops a publish to a topic it
// reserves without an answer; the hook has the path refuse it as
// bad_topic, so the client's outbox does not stall.
func TestReservedTopicAnswered(t *testing.T) {
	for _, topic := range []string{"$SYS/x", "$share", "$share/grp"} {
		for _, v5 := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/v5=%v", topic, v5), func(t *testing.T) {
				it := newInboxTest(t, 8)
				alice := it.connect(session{user: "alice", v5: v5})
				alice.subscribe(1, "inbox/alice")
				alice.publish(2, 1, topic, `{"id":"m1"}`)
				if v5 {
					alice.wantPuback(2, 0x90)
				} else {
					alice.wantPuback(2, 0)
					pk := alice.readType(packets.Publish)
					if kind, _, code, _ := envelopeOf(t, pk.Payload); kind != "error" || code != msgpath.CodeBadTopic {
						t.Fatalf("error event %s", pk.Payload)
					}
					alice.puback(pk.PacketID)
				}
				// The connection goes on.
				alice.publish(3, 1, "inbox/bob", `{"id":"m2"}`)
				alice.wantPuback(3, 0)
			})
		}
	}
}

// TestPubackAdvancesDelivery: a device's PUBACK frees its window for the
// next message and moves its cursor in the store.
func TestPubackAdvancesDelivery(t *testing.T) {
	for _, v5 := range []bool{false, true} {
		t.Run(fmt.Sprintf("v5=%v", v5), func(t *testing.T) {
			it := newInboxTest(t, 1)
			bob := it.connect(session{user: "bob", device: "phone", v5: v5, persistent: true})
			bob.subscribe(1, "inbox/bob")
			alice := it.connect(session{user: "alice", v5: true})
			alice.publish(1, 1, "inbox/bob", `{"id":"m1"}`)
			alice.publish(2, 1, "inbox/bob", `{"id":"m2"}`)
			alice.wantPuback(1, 0)
			alice.wantPuback(2, 0)

			first := bob.readType(packets.Publish)
			if _, from, _, msg := envelopeOf(t, first.Payload); from != "alice" || string(msg) != `{"id":"m1"}` {
				t.Fatalf("first delivery %s", first.Payload)
			}
			// The window of one holds m2 back until the PUBACK.
			testutil.Eventually(t, inboxWait, func() bool {
				inflight, next, ok := it.path.Window("bob", "phone")
				return ok && inflight == 1 && next == 2
			}, "one message in flight to bob")
			bob.puback(first.PacketID)
			second := bob.readType(packets.Publish)
			if _, _, _, msg := envelopeOf(t, second.Payload); string(msg) != `{"id":"m2"}` {
				t.Fatalf("second delivery %s", second.Payload)
			}
			testutil.Eventually(t, inboxWait, func() bool {
				c, err := it.store.Cursor("bob", "phone")
				return err == nil && c == 1
			}, "bob's cursor at 1")
		})
	}
}

// TestDisconnectForgetsClient: a persistent client is removed from
// mochi's client map when it disconnects (chatd keeps the device's queue
// and subscription itself), as mochi removes a clean one.
func TestDisconnectForgetsClient(t *testing.T) {
	cases := []struct {
		name string
		s    session
		// bye sends DISCONNECT before closing.
		bye bool
	}{
		{"3.1.1 persistent", session{user: "bob", device: "phone", persistent: true}, false},
		{"v5 persistent, DISCONNECT", session{user: "bob", device: "phone", v5: true, persistent: true}, true},
		{"3.1.1 clean", session{user: "bob", device: "phone"}, true},
		{"v5 session expiry 0", session{user: "bob", device: "phone", v5: true}, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			it := newInboxTest(t, 8)
			bob := it.connect(c.s)
			bob.subscribe(1, "inbox/bob")
			id := c.s.clientID()
			if _, ok := it.srv.Clients.Get(id); !ok {
				t.Fatalf("%s is not in mochi's client map", id)
			}
			if c.bye {
				bob.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}})
			}
			it.close(bob, id)
			if got := it.reasons.all(); !slices.Equal(got, []string{string(ReasonClient)}) {
				t.Fatalf("disconnect reasons %v, want [%s]", got, ReasonClient)
			}
		})
	}
}

// TestTakeoverKeepsNewerClient: when a client ID connects again, the
// older connection's end removes nothing of the newer one: it stays in
// mochi's client map and is fed.
func TestTakeoverKeepsNewerClient(t *testing.T) {
	for _, v5 := range []bool{false, true} {
		t.Run(fmt.Sprintf("v5=%v", v5), func(t *testing.T) {
			it := newInboxTest(t, 8)
			s := session{user: "bob", device: "phone", v5: v5, persistent: true}
			older := it.connect(s)
			older.subscribe(1, "inbox/bob")
			newer := it.connect(s)
			// mochi sends DISCONNECT 0x8E whatever the version, though
			// 3.1.1 has no DISCONNECT from the server.
			if pk := older.readType(packets.Disconnect); v5 && pk.ReasonCode != packets.ErrSessionTakenOver.Code {
				t.Fatalf("DISCONNECT reason %#x, want %#x", pk.ReasonCode, packets.ErrSessionTakenOver.Code)
			}
			older.wantClosed()
			it.waitEnded(s.clientID())
			if got := it.reasons.all(); !slices.Equal(got, []string{string(ReasonTakenOver)}) {
				t.Fatalf("disconnect reasons %v, want [%s]", got, ReasonTakenOver)
			}
			cl, ok := it.srv.Clients.Get(s.clientID())
			if !ok || cl.Net.Remote != newer.conn.LocalAddr().String() {
				t.Fatalf("mochi's client map has %v (found %v), want the newer connection from %s", cl, ok, newer.conn.LocalAddr())
			}
			// The subscription is kept with the device: the newer
			// connection is fed without subscribing.
			alice := it.connect(session{user: "alice", v5: true})
			alice.publish(1, 1, "inbox/bob", `{"id":"m1"}`)
			alice.wantPuback(1, 0)
			pk := newer.readType(packets.Publish)
			if _, from, _, msg := envelopeOf(t, pk.Payload); from != "alice" || string(msg) != `{"id":"m1"}` {
				t.Fatalf("delivery to the newer connection: %s", pk.Payload)
			}
		})
	}
}

// TestUnsubscribeStopsFeeding: UNSUBSCRIBE from the inbox stops the
// device's deliveries; its messages wait in the queue.
func TestUnsubscribeStopsFeeding(t *testing.T) {
	it := newInboxTest(t, 8)
	bob := it.connect(session{user: "bob", v5: true})
	bob.subscribe(1, "inbox/bob")
	bob.send(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Unsubscribe, Qos: 1},
		PacketID:    2, Filters: packets.Subscriptions{{Filter: "inbox/bob"}},
	})
	bob.readType(packets.Unsuback)
	testutil.Eventually(t, inboxWait, func() bool {
		_, _, fed := it.path.Window("bob", "")
		return !fed
	}, "bob is no longer fed")
	alice := it.connect(session{user: "alice", v5: true})
	alice.publish(1, 1, "inbox/bob", `{"id":"m1"}`)
	alice.wantPuback(1, 0)
	if d, err := it.store.Depth("bob"); err != nil || d != 1 {
		t.Fatalf("bob's queue depth %d (%v), want the message waiting", d, err)
	}
	bob.subscribe(3, "inbox/bob")
	pk := bob.readType(packets.Publish)
	if _, _, _, msg := envelopeOf(t, pk.Payload); string(msg) != `{"id":"m1"}` {
		t.Fatalf("delivery after subscribing again: %s", pk.Payload)
	}
}

// TestOnlyInboxSubscriptionFeeds: a subscription to presence topics
// does not start the device's deliveries.
func TestOnlyInboxSubscriptionFeeds(t *testing.T) {
	it := newInboxTest(t, 8)
	bob := it.connect(session{user: "bob", v5: true})
	bob.subscribe(1, "presence/carol") // nothing retained there
	if _, _, fed := it.path.Window("bob", ""); fed {
		t.Fatal("bob is fed after subscribing to presence alone")
	}
	bob.subscribe(2, "inbox/bob")
	if _, _, fed := it.path.Window("bob", ""); !fed {
		t.Fatal("bob is not fed after subscribing to his inbox")
	}
}

// TestAbandonEndsSession: a connection whose serving goroutine panicked
// gets no disconnect hooks from mochi; Abandon ends its session instead,
// once.
func TestAbandonEndsSession(t *testing.T) {
	it := newInboxTest(t, 8)
	bob := it.connect(session{user: "bob", device: "phone", v5: true, persistent: true})
	bob.subscribe(1, "inbox/bob")
	cl, ok := it.srv.Clients.Get("bob/phone")
	if !ok {
		t.Fatal("bob/phone is not in mochi's client map")
	}
	it.inbox.Abandon(&net.TCPConn{}) // not a connection of the hook's: nothing happens
	if _, _, fed := it.path.Window("bob", "phone"); !fed {
		t.Fatal("Abandon of an unknown connection ended bob's session")
	}
	it.inbox.Abandon(cl.Net.Conn)
	if _, _, fed := it.path.Window("bob", "phone"); fed {
		t.Fatal("bob is still fed after Abandon")
	}
	if got := it.reasons.all(); !slices.Equal(got, []string{string(ReasonOther)}) {
		t.Fatalf("disconnect reasons %v, want [%s]", got, ReasonOther)
	}
	bob.wantClosed()
	it.waitEnded("bob/phone")
	if got := it.reasons.all(); len(got) != 1 {
		t.Fatalf("the session ended %d times: %v", len(got), got)
	}
}

// TestResumeRestoresSubscriptions: a persistent session that ended is
// resumed by the device's next connection: Session Present 1, and its
// inbox and presence subscriptions back in mochi; not after DropSession.
func TestResumeRestoresSubscriptions(t *testing.T) {
	for _, v5 := range []bool{false, true} {
		t.Run(fmt.Sprintf("v5=%v", v5), func(t *testing.T) {
			it := newInboxTest(t, 8)
			s := session{user: "bob", device: "phone", v5: v5, persistent: true}
			id := s.clientID()
			bob, ack := it.connectAck(s)
			if ack.SessionPresent {
				t.Fatal("first connection: Session Present 1")
			}
			// Nothing resumes: the hook is not handed every packet mochi
			// writes (it is while one resumes, or Session Present below
			// would be 0).
			if it.inbox.Provides(mqtt.OnPacketEncode) {
				t.Fatal("OnPacketEncode provided while no connection resumes")
			}
			bob.subscribe(1, "inbox/bob")
			bob.subscribe(2, "presence/alice")
			it.close(bob, id)
			bob, ack = it.connectAck(s)
			if !ack.SessionPresent {
				t.Fatal("resumed session: Session Present 0")
			}
			cl, ok := it.srv.Clients.Get(id)
			if !ok {
				t.Fatalf("%s not in mochi's map", id)
			}
			testutil.Eventually(t, inboxWait, func() bool { return cl.State.Subscriptions.Len() == 2 },
				"%s's subscriptions restored", id)
			for _, f := range []string{"inbox/bob", "presence/alice"} {
				if _, ok := it.srv.Topics.Subscribers(f).Subscriptions[id]; !ok {
					t.Fatalf("%s not back in mochi's topic tree", f)
				}
			}
			it.close(bob, id)
			it.inbox.DropSession(id)
			if _, ack = it.connectAck(s); ack.SessionPresent {
				t.Fatal("after DropSession: Session Present 1")
			}
		})
	}
}

// TestSessionPresentOnlyOnSuccess: OnPacketEncode sets Session Present in
// the successful CONNACK of the connection that resumes, and nowhere else.
func TestSessionPresentOnlyOnSuccess(t *testing.T) {
	srv := mqtt.New(&mqtt.Options{Logger: slog.New(slog.DiscardHandler)})
	h := &Inbox{Server: srv}
	client := func() *mqtt.Client {
		cl := srv.NewClient(nil, "t1", "bob/phone", false)
		cl.Properties.Username = []byte("bob")
		return cl
	}
	old := client()
	h.OnSessionEstablish(old, packets.Packet{})
	srv.Clients.Add(old)
	h.registry.Forget(srv, old, false, false, time.Now(), time.Hour)
	cl := client()
	h.OnSessionEstablish(cl, packets.Packet{})
	connack := func(code byte) packets.Packet {
		return packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connack}, ReasonCode: code}
	}
	if !h.OnPacketEncode(cl, connack(0)).SessionPresent {
		t.Fatal("successful CONNACK of the resuming connection: Session Present 0")
	}
	if h.OnPacketEncode(cl, connack(packets.ErrNotAuthorized.Code)).SessionPresent {
		t.Fatal("refusing CONNACK: Session Present 1")
	}
	if h.OnPacketEncode(old, connack(0)).SessionPresent {
		t.Fatal("another connection's CONNACK: Session Present 1")
	}
	if h.OnPacketEncode(cl, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Suback}}).SessionPresent {
		t.Fatal("a SUBACK changed")
	}
}
