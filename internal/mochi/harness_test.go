package mochi

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/chatd/chatd/internal/testutil"
)

// wait bounds every wait of these tests for something that should happen
// at once: only a bug makes a test wait that long.
const wait = 10 * time.Second

// mochiServer is a real mochi server on a loopback TCP listener behind a
// Guard, with a hook that records sessions and, given a Registry, forgets
// them as chatd's Inbox hook does.
type mochiServer struct {
	srv  *mqtt.Server
	addr string
	hook *sessionHook

	closeOnce sync.Once
	closeErr  error
}

// mochiOptions configures startMochi.
type mochiOptions struct {
	// registry, if set, is given every session (see sessionHook).
	registry *Registry
	// onEnd is the Guard's OnEnd.
	onEnd func(net.Conn)
	// onEstablish, if set, runs in OnSessionEstablish after the registry.
	onEstablish func(*mqtt.Client)
}

// startMochi serves a mochi server on loopback, closed when the test
// ends. Its Guard disconnects clients at shutdown the way chatd does (one
// walk of Clients.GetAll), never through mochi's GetByListener.
func startMochi(t *testing.T, o mochiOptions) *mochiServer {
	t.Helper()
	srv := mqtt.New(&mqtt.Options{Logger: slog.New(slog.DiscardHandler)})
	h := &sessionHook{
		srv:         srv,
		registry:    o.registry,
		onEstablish: o.onEstablish,
		established: make(map[string]*mqtt.Client),
		ended:       make(map[*mqtt.Client]bool),
	}
	if err := srv.AddHook(h, nil); err != nil {
		t.Fatal(err)
	}
	tcp := listeners.NewTCP(listeners.Config{ID: "t1", Address: "127.0.0.1:0"})
	g := Guard{Listener: tcp, Timeout: wait, OnEnd: o.onEnd, CloseClients: func(id string) {
		for _, cl := range srv.Clients.GetAll() {
			if cl.Net.Listener == id && !cl.Closed() {
				_ = srv.DisconnectClient(cl, packets.ErrServerShuttingDown) // the client goes either way
			}
		}
	}}
	if err := srv.AddListener(g); err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(); err != nil {
		t.Fatal(err)
	}
	ms := &mochiServer{srv: srv, addr: tcp.Address(), hook: h}
	t.Cleanup(func() {
		if err := ms.close(); err != nil {
			t.Error(err)
		}
	})
	return ms
}

// close shuts the server down once, as chatd does: the hook is told
// first, so that Forget deletes nothing meanwhile.
func (ms *mochiServer) close() error { return ms.closeTelling(true) }

// closeTelling shuts the server down once, telling the hook first if
// tell is set.
func (ms *mochiServer) closeTelling(tell bool) error {
	ms.closeOnce.Do(func() {
		if tell {
			ms.hook.closing.Store(true)
		}
		ms.closeErr = ms.srv.Close()
	})
	return ms.closeErr
}

// client returns the mochi client of c once its session is established.
func (ms *mochiServer) client(t *testing.T, c *rawClient) *mqtt.Client {
	t.Helper()
	var cl *mqtt.Client
	testutil.Eventually(t, wait, func() bool {
		cl = ms.hook.establishedFrom(c.conn.LocalAddr().String())
		return cl != nil
	}, "the session of %s is established", c.conn.LocalAddr())
	return cl
}

// waitEnded waits until OnDisconnect has run for cl, Forget included.
func (ms *mochiServer) waitEnded(t *testing.T, cl *mqtt.Client) {
	t.Helper()
	testutil.Eventually(t, wait, func() bool { return ms.hook.hasEnded(cl) }, "OnDisconnect ran for %s", cl.Net.Remote)
}

// inMap reports the entry of id in mochi's client map.
func (ms *mochiServer) inMap(id string) (*mqtt.Client, bool) {
	return ms.srv.Clients.Get(id)
}

// subscribed reports whether mochi's topic tree holds a subscription of
// client id to filter.
func (ms *mochiServer) subscribed(id, filter string) bool {
	_, ok := ms.srv.Topics.Subscribers(filter).Subscriptions[id]
	return ok
}

// sessionHook admits every client and records sessions; with a registry
// it calls Establish and Forget where chatd's Inbox hook does.
type sessionHook struct {
	mqtt.HookBase
	srv         *mqtt.Server
	registry    *Registry
	onEstablish func(*mqtt.Client)
	// closing is Forget's closing argument.
	closing atomic.Bool

	mu sync.Mutex
	// established holds each established session by its remote address.
	established map[string]*mqtt.Client
	// ended holds the clients OnDisconnect ran for.
	ended map[*mqtt.Client]bool
}

func (h *sessionHook) ID() string { return "session-recorder" }

func (h *sessionHook) Provides(b byte) bool {
	return bytes.Contains([]byte{
		mqtt.OnConnectAuthenticate, mqtt.OnACLCheck, mqtt.OnSessionEstablish,
		mqtt.OnSessionEstablished, mqtt.OnDisconnect,
	}, []byte{b})
}

func (h *sessionHook) OnConnectAuthenticate(*mqtt.Client, packets.Packet) bool { return true }

func (h *sessionHook) OnACLCheck(*mqtt.Client, string, bool) bool { return true }

func (h *sessionHook) OnSessionEstablish(cl *mqtt.Client, _ packets.Packet) {
	if h.registry != nil {
		h.registry.Establish(h.srv, cl, time.Now())
	}
	if h.onEstablish != nil {
		h.onEstablish(cl)
	}
}

func (h *sessionHook) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.established[cl.Net.Remote] = cl
}

func (h *sessionHook) OnDisconnect(cl *mqtt.Client, _ error, expire bool) {
	if h.registry != nil {
		h.registry.Forget(h.srv, cl, expire, h.closing.Load(), time.Now(), time.Hour)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.ended[cl] = true
}

func (h *sessionHook) establishedFrom(remote string) *mqtt.Client {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.established[remote]
}

func (h *sessionHook) hasEnded(cl *mqtt.Client) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.ended[cl]
}

func (h *sessionHook) endedCount() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.ended)
}

// rawClient is a bare MQTT client: packets are encoded with mochi's own
// codec and read off the socket one by one.
type rawClient struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
	v5   bool
}

// session is what a rawClient connects with.
type session struct {
	id string
	v5 bool
	// persistent asks for a session that outlives the connection: clean
	// session (clean start) off, and on 5 a session expiry interval.
	persistent bool
}

// dial opens a bare TCP connection to ms, closed when the test ends.
func (ms *mochiServer) dial(t *testing.T) *rawClient {
	t.Helper()
	c, err := net.DialTimeout("tcp", ms.addr, wait)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return &rawClient{t: t, conn: c, r: bufio.NewReader(c)}
}

// connectPacket is s's CONNECT.
func connectPacket(s session) packets.Packet {
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: 4,
		Connect: packets.ConnectParams{
			ProtocolName:     []byte("MQTT"),
			Clean:            !s.persistent,
			Keepalive:        60,
			ClientIdentifier: s.id,
		},
	}
	if s.v5 {
		pk.ProtocolVersion = 5
		if s.persistent {
			pk.Properties.SessionExpiryInterval = 3600
			pk.Properties.SessionExpiryIntervalFlag = true
		}
	}
	return pk
}

// connect dials ms and connects with s, failing the test unless the
// CONNACK accepts it.
func (ms *mochiServer) connect(t *testing.T, s session) *rawClient {
	t.Helper()
	c := ms.dial(t)
	c.v5 = s.v5
	c.send(connectPacket(s))
	fh, body := c.read()
	if fh.Type != packets.Connack || len(body) < 2 || body[1] != 0 {
		t.Fatalf("%s: got packet type %d % x, want an accepting CONNACK", s.id, fh.Type, body)
	}
	return c
}

// encode encodes pk with mochi's codec.
func encode(t *testing.T, pk packets.Packet) []byte {
	t.Helper()
	b, err := testutil.Encode(pk)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// send writes pk.
func (c *rawClient) send(pk packets.Packet) {
	c.t.Helper()
	if c.v5 {
		pk.ProtocolVersion = 5
	} else if pk.ProtocolVersion == 0 {
		pk.ProtocolVersion = 4
	}
	if _, err := c.conn.Write(encode(c.t, pk)); err != nil {
		c.t.Fatalf("send packet type %d: %v", pk.FixedHeader.Type, err)
	}
}

// read reads the next packet's fixed header and body.
func (c *rawClient) read() (packets.FixedHeader, []byte) {
	c.t.Helper()
	if err := c.conn.SetReadDeadline(time.Now().Add(wait)); err != nil {
		c.t.Fatal(err)
	}
	fh, body, err := readPacket(c.r)
	if err != nil {
		c.t.Fatalf("read a packet: %v", err)
	}
	return fh, body
}

// readPacket reads one MQTT packet from r.
func readPacket(r *bufio.Reader) (packets.FixedHeader, []byte, error) {
	var fh packets.FixedHeader
	b, err := r.ReadByte()
	if err != nil {
		return fh, nil, err
	}
	if err := fh.Decode(b); err != nil {
		return fh, nil, fmt.Errorf("fixed header %#x: %w", b, err)
	}
	if fh.Remaining, _, err = packets.DecodeLength(r); err != nil {
		return fh, nil, fmt.Errorf("remaining length: %w", err)
	}
	body := make([]byte, fh.Remaining)
	if _, err := io.ReadFull(r, body); err != nil {
		return fh, nil, fmt.Errorf("body of %d bytes: %w", fh.Remaining, err)
	}
	return fh, body, nil
}

// subscribe subscribes to filter and waits for the SUBACK granting it.
func (c *rawClient) subscribe(filter string) {
	c.t.Helper()
	c.send(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1},
		PacketID:    1,
		Filters:     packets.Subscriptions{{Filter: filter}},
	})
	fh, body := c.read()
	if fh.Type != packets.Suback || len(body) == 0 || body[len(body)-1] >= 0x80 {
		c.t.Fatalf("got packet type %d % x, want a SUBACK granting %s", fh.Type, body, filter)
	}
}

// ping sends PINGREQ and waits for the PINGRESP: the connection is served.
func (c *rawClient) ping() {
	c.t.Helper()
	c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingreq}})
	if fh, _ := c.read(); fh.Type != packets.Pingresp {
		c.t.Fatalf("got packet type %d, want PINGRESP", fh.Type)
	}
}

// held returns the connection r holds for client ID id, and how many it
// holds in all.
func (r *Registry) held(id string) (*mqtt.Client, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.newest[id], len(r.newest)
}
