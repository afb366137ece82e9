package msgpath

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"go.uber.org/goleak"

	"github.com/chatd/chatd/broker/presence"
	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/queue/badgerq"
	"github.com/chatd/chatd/broker/service/groups"
	"github.com/chatd/chatd/internal/testutil"
)

// wait is how long a test waits for something the path does in the
// background (a socket write, a receipt) before it fails.
const wait = 10 * time.Second

// testNow is the path's clock in every test: envelope timestamps are
// known in advance.
var testNow = time.UnixMilli(1_700_000_000_000)

// pathTest is a Path on a real Badger store, with real groups and
// presence in the store's database, and an Observer that records.
type pathTest struct {
	t        *testing.T
	store    *badgerq.Store
	groups   *groups.Store
	presence *presence.Tracker
	// announced records the presence publishes, as "topic payload".
	announced *recorder[string]
	obs       *observer
	p         *Path
}

// pathConfig changes a test's path and store before they are made.
type pathConfig struct {
	opts     func(*Options)
	settings func(*queue.Settings)
	store    func(*badgerq.Options)
	// wrap, if set, puts something between the path and the store.
	wrap func(queue.Store) queue.Store
}

// newPathTest opens a store in a temporary directory and builds a path on
// it as the server does. Cleanup closes the path, then the store, then
// checks that no goroutine is left.
func newPathTest(t *testing.T, cfg pathConfig) *pathTest {
	t.Helper()
	before := goleak.IgnoreCurrent()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	so := badgerq.Options{
		Dir: t.TempDir(), Settings: queue.DefaultSettings(), Sync: badgerq.SyncNone,
		Logger: log,
	}
	so.Settings.AckFlushInterval = time.Millisecond
	if cfg.settings != nil {
		cfg.settings(&so.Settings)
	}
	if cfg.store != nil {
		cfg.store(&so)
	}
	store, err := badgerq.Open(so)
	if err != nil {
		t.Fatal(err)
	}
	pt := &pathTest{t: t, store: store, announced: &recorder[string]{}, obs: &observer{}}
	pt.groups = groups.New(store.DB(), 16)
	pt.presence = presence.New(store.DB(), func(topic string, payload []byte, retain bool, qos byte) error {
		pt.announced.add(topic + " " + string(payload))
		return nil
	}, nil, log)
	var qs queue.Store = store
	if cfg.wrap != nil {
		qs = cfg.wrap(store)
	}
	opts := Options{
		Store: qs, Groups: pt.groups, Presence: pt.presence, Observe: pt.obs,
		MaxMessageBytes: 256, MaxInflight: 8, MaxPendingBytes: 1 << 20,
		Now: func() time.Time { return testNow }, Log: log,
	}
	if cfg.opts != nil {
		cfg.opts(&opts)
	}
	p, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	pt.p = p
	t.Cleanup(func() {
		p.Close()
		if err := pt.groups.Close(); err != nil {
			t.Error(err)
		}
		if err := store.Close(); err != nil {
			t.Error(err)
		}
		goleak.VerifyNone(t, before)
	})
	return pt
}

// client is one connection of a device on the path.
type client struct {
	s      *Session
	conn   *fakeConn
	budget *fakeBudget
	// ended records what the path ended the connection with (Conn.End).
	ended *recorder[error]
}

// conn describes a connection for open.
type conn struct {
	user, device  string
	v5, transient bool
	receiveMax    int
}

// open opens a session for c on the path, as the Inbox hook does.
func (pt *pathTest) open(c conn) *client {
	pt.t.Helper()
	cl := &client{conn: newFakeConn(pt.t, c.v5), budget: &fakeBudget{}, ended: &recorder[error]{}}
	clientID := c.user
	if c.device != "" {
		clientID += "/" + c.device
	}
	s, err := pt.p.Open(Conn{
		User: c.user, Device: c.device, ClientID: clientID, V5: c.v5, Transient: c.transient,
		ReceiveMaximum: c.receiveMax, Out: cl.conn, Budget: cl.budget, End: cl.ended.add,
	})
	if err != nil {
		pt.t.Fatalf("open %s: %v", clientID, err)
	}
	cl.s = s
	return cl
}

// subscribe opens a session for c and subscribes it to its inbox.
func (pt *pathTest) subscribe(c conn) *client {
	pt.t.Helper()
	cl := pt.open(c)
	if err := pt.p.Subscribe(cl.s); err != nil {
		pt.t.Fatalf("subscribe %s: %v", c.user, err)
	}
	return cl
}

// publish hands a QoS 1 publish to the path, as the Inbox hook does.
func (pt *pathTest) publish(cl *client, pid uint16, topic, payload string) {
	pt.p.Publish(cl.s, Publish{Topic: topic, Payload: []byte(payload), PacketID: pid, QoS: 1})
}

// barrier waits until the store's committer has run the callbacks of
// every request appended before it: it stores nothing itself.
func (pt *pathTest) barrier() {
	pt.t.Helper()
	done := make(chan struct{})
	pt.store.Append(&queue.Request{Done: func(queue.Status, queue.Message, error) { close(done) }})
	select {
	case <-done:
	case <-time.After(wait):
		pt.t.Fatal("the committer did not answer a barrier")
	}
}

// queued returns the envelopes stored for user, decoded, after a barrier.
func (pt *pathTest) queued(user string) []event {
	pt.t.Helper()
	pt.barrier()
	msgs, err := pt.store.Read(user, 0, 100)
	if err != nil {
		pt.t.Fatal(err)
	}
	out := make([]event, len(msgs))
	for i, m := range msgs {
		out[i] = decodeEvent(pt.t, m.Data)
	}
	return out
}

// event is any envelope the server sends (PROTOCOL.md sections 3 and 5).
type event struct {
	Kind   string          `json:"kind"`
	From   string          `json:"from"`
	To     string          `json:"to"`
	Group  string          `json:"group"`
	TS     int64           `json:"ts"`
	Msg    json.RawMessage `json:"msg"`
	Status string          `json:"status"`
	By     string          `json:"by"`
	IDs    []string        `json:"ids"`
	Ref    string          `json:"ref"`
	Code   string          `json:"code"`
	Reason string          `json:"reason"`
}

func decodeEvent(t testing.TB, b []byte) event {
	t.Helper()
	var e event
	if err := json.Unmarshal(b, &e); err != nil {
		t.Fatalf("envelope %q: %v", b, err)
	}
	return e
}

// fakeConn is an in-memory client connection: it decodes what the path
// writes into the MQTT packets a client would read.
type fakeConn struct {
	t       testing.TB
	version byte
	// onWrite, if set, runs before each write is taken, on the writing
	// goroutine; set it before the connection is used.
	onWrite func()

	mu      sync.Mutex
	pending []byte
	got     []packets.Packet
	closed  []error
}

func newFakeConn(t testing.TB, v5 bool) *fakeConn {
	c := &fakeConn{t: t, version: 4}
	if v5 {
		c.version = 5
	}
	return c
}

// Write implements wire.Conn.
func (c *fakeConn) Write(b []byte) error {
	if c.onWrite != nil {
		c.onWrite()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pending = append(c.pending, b...)
	for len(c.pending) > 0 {
		pk, n, err := decodePacket(c.pending, c.version)
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return nil // the rest comes with the next write
		}
		if err != nil {
			c.t.Errorf("the path wrote a packet mochi cannot decode: %v (% x)", err, c.pending)
			c.pending = nil
			return nil
		}
		c.got = append(c.got, pk)
		c.pending = c.pending[n:]
	}
	return nil
}

// Close implements wire.Conn.
func (c *fakeConn) Close(reason error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = append(c.closed, reason)
}

// packets returns what the connection received so far.
func (c *fakeConn) packets() []packets.Packet {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.got)
}

// closes returns the reasons the connection was closed with.
func (c *fakeConn) closes() []error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.closed)
}

// waitPackets waits until the connection received n packets of type
// typ, and returns those.
func (c *fakeConn) waitPackets(t testing.TB, typ byte, n int) []packets.Packet {
	t.Helper()
	var got []packets.Packet
	testutil.Eventually(t, wait, func() bool {
		got = c.ofType(typ)
		return len(got) >= n
	}, "%d packets of type %d (have %d)", n, typ, len(got))
	return got
}

// ofType returns the packets of type typ received so far.
func (c *fakeConn) ofType(typ byte) []packets.Packet {
	var out []packets.Packet
	for _, pk := range c.packets() {
		if pk.FixedHeader.Type == typ {
			out = append(out, pk)
		}
	}
	return out
}

// decodePacket decodes the PUBLISH or PUBACK at the start of b with
// mochi's codec and returns it and its length; io.ErrUnexpectedEOF when b
// holds only part of it.
func decodePacket(b []byte, version byte) (packets.Packet, int, error) {
	var fh packets.FixedHeader
	if err := fh.Decode(b[0]); err != nil {
		return packets.Packet{}, 0, err
	}
	r := bytes.NewReader(b[1:])
	n, lenBytes, err := packets.DecodeLength(r)
	if errors.Is(err, io.EOF) {
		return packets.Packet{}, 0, io.ErrUnexpectedEOF
	}
	if err != nil {
		return packets.Packet{}, 0, err
	}
	total := 1 + lenBytes + n
	if len(b) < total {
		return packets.Packet{}, 0, io.ErrUnexpectedEOF
	}
	fh.Remaining = n
	// The writer reuses its buffers: the packet keeps a copy.
	body := bytes.Clone(b[1+lenBytes : total])
	pk := packets.Packet{FixedHeader: fh, ProtocolVersion: version}
	switch fh.Type {
	case packets.Publish:
		err = pk.PublishDecode(body)
	case packets.Puback:
		err = pk.PubackDecode(body)
	default:
		err = errors.New("neither PUBLISH nor PUBACK")
	}
	return pk, total, err
}

// fakeBudget is a user's publish budget that the test sets.
type fakeBudget struct {
	mu sync.Mutex
	// limit is set by refuseAfter: then allow more Spend calls succeed
	// and the rest refuse. The zero value allows everything.
	limit  bool
	allow  int
	waited bool
	// spent is the messages each Spend asked for.
	spent []int
}

// refuseAfter makes Spend succeed n more times, then refuse.
func (b *fakeBudget) refuseAfter(n int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.limit, b.allow = true, n
}

// slowDown makes every Spend report that it waited.
func (b *fakeBudget) slowDown() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.waited = true
}

// Spend implements Budget.
func (b *fakeBudget) Spend(msgs, n int) (ok, waited bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.spent = append(b.spent, msgs)
	if b.limit {
		if b.allow <= 0 {
			return false, b.waited
		}
		b.allow--
	}
	return true, b.waited
}

// observer records what the path reports.
type observer struct {
	mu        sync.Mutex
	connected int
	refused   []string
	delayed   int
	acked     int
}

func (o *observer) Connected() { o.mu.Lock(); o.connected++; o.mu.Unlock() }
func (o *observer) Refused(code string) {
	o.mu.Lock()
	o.refused = append(o.refused, code)
	o.mu.Unlock()
}
func (o *observer) Delayed()                 { o.mu.Lock(); o.delayed++; o.mu.Unlock() }
func (o *observer) Acked(took time.Duration) { o.mu.Lock(); o.acked++; o.mu.Unlock() }

// snapshot returns a copy of the counts.
func (o *observer) snapshot() (connected int, refused []string, delayed, acked int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.connected, slices.Clone(o.refused), o.delayed, o.acked
}

// recorder collects values from any goroutine.
type recorder[T any] struct {
	mu   sync.Mutex
	vals []T
}

func (r *recorder[T]) add(v T) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.vals = append(r.vals, v)
}

func (r *recorder[T]) all() []T {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.vals)
}
