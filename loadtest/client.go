package loadtest

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/chatd/chatd/broker/protocol/token"
)

// client is one simulated phone: the protocol-independent accounting of
// phone and an MQTT connection in one protocol version (transport) with a
// persistent session, subscribed to its own inbox, that may also send. It
// is device dev of its user; with one device per user its client ID is the
// user ID.
type client struct {
	*phone
	t transport
}

// transport is a phone's MQTT connection in one protocol version. It
// keeps the phone's session across connections, reconnects by itself over
// the run's broker list, subscribes to the phone's inbox on every
// connection, and reports what happens to its phone: connections, losses,
// deliveries and the PUBACK of each message, at the moment it arrives,
// even for a publish resent on a later connection.
type transport interface {
	// connect opens the first connection and returns once the broker's
	// CONNACK accepted it.
	connect(ctx context.Context) error
	// acquire waits until the message m may be sent without overtaking
	// the phone's earlier messages, and takes a slot of its send window.
	acquire(ctx context.Context, m *outgoing) error
	// publish sends message seq, once acquire returned; an error means the
	// message was neither sent nor kept to be resent.
	publish(ctx context.Context, seq uint64, topic string, payload []byte) error
	// sent ends the send acquire started, whatever publish returned.
	sent()
	// isOpen reports whether a connection is up.
	isOpen() bool
	// disconnect closes the connection, leaving the session on the
	// broker, after waiting up to quiesce for work under way, and stops
	// reconnecting.
	disconnect(quiesce time.Duration)
}

// phone is what a simulated phone counts whatever its protocol: its
// connections, its send window and where its deliveries go.
type phone struct {
	r        *run
	idx      int
	dev      int
	user     string
	protocol int

	// slots is the send window: a send takes a slot, its PUBACK frees it.
	slots chan struct{}

	readyOnce sync.Once
	ready     chan struct{}
	// connectedAt is when the first CONNACK arrived, Unix nanoseconds.
	connectedAt atomic.Int64

	// trying is the index in run.brokers of the broker the transport last
	// dialled: the node a connection that comes up is on.
	trying atomic.Int32
	// history lists the client's connections, oldest first; the crash
	// scenario reads from it when the clients of a killed node were back.
	histMu  sync.Mutex
	history []connEvent
}

// connEvent is one connection of a client: when its CONNACK was handled
// (Unix nanoseconds) and the index of the node it is on.
type connEvent struct {
	at   int64
	node int
}

// outgoing names a message being sent: recipient index, pair sequence
// number and copy number (see message.C).
type outgoing struct {
	to int
	n  uint64
	c  uint64
}

// newClient builds the client of user index idx; it does not connect.
func (r *run) newClient(idx int) (*client, error) {
	return r.newDevice(idx, 0)
}

// newDevice builds the client of device dev of user index idx, speaking
// the protocol its slot is given; it does not connect.
func (r *run) newDevice(idx, dev int) (*client, error) {
	p := &phone{
		r:     r,
		idx:   idx,
		dev:   dev,
		user:  r.users[idx],
		slots: make(chan struct{}, r.cfg.Inflight),
		ready: make(chan struct{}),
	}
	p.protocol = r.protocolOf(p.slot())
	if len(r.brokers) > 0 {
		p.trying.Store(int32(p.slot() % len(r.brokers)))
	}
	var (
		t   transport
		err error
	)
	switch p.protocol {
	case protocol5:
		t, err = newV5Transport(p)
	default:
		t, err = newV3Transport(p)
	}
	if err != nil {
		return nil, err
	}
	return &client{phone: p, t: t}, nil
}

// rotatedBrokers returns urls starting from the (idx mod n)th: client idx
// connects first to that node, which spreads the clients evenly, and its
// auto-reconnect falls back to the following ones in turn when it is down.
func rotatedBrokers(urls []string, idx int) []string {
	if len(urls) == 0 {
		return nil
	}
	k := idx % len(urls)
	out := make([]string, 0, len(urls))
	out = append(out, urls[k:]...)
	return append(out, urls[:k]...)
}

// id returns the client ID: the user ID, or {user}/d{dev} when users
// have several devices.
func (p *phone) id() string {
	if p.r.devices <= 1 {
		return p.user
	}
	return deviceClientID(p.user, p.dev)
}

// slot numbers the client among every device of every user, which
// spreads devices over the nodes and source addresses as users are.
func (p *phone) slot() int { return p.idx*max(1, p.r.devices) + p.dev }

// credentials returns the CONNECT username and password of user: a token
// of chatd, or in Plain mode the --username and --password given, if any
// ("" for none).
func (r *run) credentials(user string) (username, password string, err error) {
	if !r.cfg.Plain {
		tok, err := token.Mint(r.cfg.Secret, user, r.cfg.Duration+r.cfg.Grace+r.cfg.Hold+time.Hour)
		if err != nil {
			return "", "", fmt.Errorf("token for %s: %w", user, err)
		}
		return user, tok, nil
	}
	username = r.cfg.Username
	if strings.Contains(username, "%s") {
		username = fmt.Sprintf(username, user)
	}
	return username, r.cfg.Password, nil
}

// readBufferSize is each simulated phone's read buffer. paho reads every
// packet header a byte at a time, one system call each; without a buffer
// the load tool, not the broker under test, would be the bottleneck.
const readBufferSize = 4096

// bufferedConn is a connection whose reads go through a buffer.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

// Read reads from the buffer.
func (c bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// dialer returns the dialer of the client in the given slot: the connect
// timeout, and its source address (see localAddr).
func (r *run) dialer(slot int) *net.Dialer {
	return &net.Dialer{Timeout: r.cfg.ConnectTimeout, LocalAddr: r.localAddr(slot)}
}

// localAddr spreads connections over several loopback source addresses
// when the broker is on loopback, so that a large connect run does not run
// out of ephemeral ports on one address.
func (r *run) localAddr(idx int) net.Addr {
	if r.sourceIPs <= 1 {
		return nil
	}
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(1+idx%r.sourceIPs))}
}

// protocolOf returns the protocol version of the client in the given
// slot: Config.Protocol, or with a ProtocolMix the version that slot gets
// in r.mix.
func (r *run) protocolOf(slot int) int {
	if len(r.mix) == 0 {
		return max(r.cfg.Protocol, protocol3)
	}
	return r.mix[slot%len(r.mix)]
}

// mixPattern spreads the versions of a protocol mix over 100 slots in
// proportion to their shares, interleaved (smooth weighted round robin),
// so that even a handful of clients gets every version of the mix.
func mixPattern(mix []protocolShare) []int {
	if len(mix) == 0 {
		return nil
	}
	out := make([]int, 100)
	current := make([]int, len(mix))
	for i := range out {
		best := 0
		for k, m := range mix {
			current[k] += m.percent
			if current[k] > current[best] {
				best = k
			}
		}
		current[best] -= 100
		out[i] = mix[best].version
	}
	return out
}

// connect opens the session and waits until the inbox subscription is
// acknowledged; it returns the CONNECT->CONNACK and CONNECT->SUBACK times.
func (c *client) connect(ctx context.Context) (connack, suback time.Duration, err error) {
	start := time.Now()
	if err := c.t.connect(ctx); err != nil {
		return 0, 0, fmt.Errorf("connect %s: %w", c.id(), err)
	}
	connack = time.Since(start)
	timer := time.NewTimer(c.r.cfg.ConnectTimeout)
	defer timer.Stop()
	select {
	case <-c.ready:
	case <-timer.C:
		return connack, 0, fmt.Errorf("subscribe %s: no SUBACK within %s", c.id(), c.r.cfg.ConnectTimeout)
	case <-ctx.Done():
		return connack, 0, fmt.Errorf("subscribe %s: %w", c.id(), ctx.Err())
	}
	return connack, time.Since(start), nil
}

// disconnect closes the session, leaving it on the broker.
func (c *client) disconnect() {
	if c.t.isOpen() {
		c.r.conns.connected.Add(-1)
		if node, ok := c.node(); ok {
			c.r.nodes[node].atClose.Add(1)
		}
	}
	c.t.disconnect(100 * time.Millisecond)
}

// abort closes a client whose connection attempt failed, at once.
func (c *client) abort() { c.t.disconnect(0) }

// node returns the node of the client's latest connection, if it had one.
func (p *phone) node() (int, bool) {
	p.histMu.Lock()
	defer p.histMu.Unlock()
	if len(p.history) == 0 {
		return 0, false
	}
	return p.history[len(p.history)-1].node, true
}

// connectedAfter returns the time of the client's first connection after
// t (Unix nanoseconds), and false when it has not connected since.
func (p *phone) connectedAfter(t int64) (int64, bool) {
	p.histMu.Lock()
	defer p.histMu.Unlock()
	for _, e := range p.history {
		if e.at > t {
			return e.at, true
		}
	}
	return 0, false
}

// connected accounts for a connection the broker accepted, on the node
// the transport last dialled.
func (p *phone) connected() {
	now := time.Now().UnixNano()
	p.r.conns.connected.Add(1)
	if p.connectedAt.CompareAndSwap(0, now) {
		if p.protocol == protocol5 {
			p.r.protos.v5.Add(1)
		} else {
			p.r.protos.v3.Add(1)
		}
	} else {
		p.r.conns.reconnects.Add(1)
	}
	node := int(p.trying.Load())
	p.r.nodes[node].connects.Add(1)
	p.histMu.Lock()
	p.history = append(p.history, connEvent{at: now, node: node})
	p.histMu.Unlock()
}

// subscribed records that the broker acknowledged the inbox subscription:
// the first one makes the client ready.
func (p *phone) subscribed() { p.readyOnce.Do(func() { close(p.ready) }) }

// connectionLost accounts for a connection that dropped.
func (p *phone) connectionLost(err error) {
	p.r.conns.connected.Add(-1)
	p.r.conns.lost.Add(1)
	p.r.conns.noteLoss(fmt.Errorf("%s: %w", p.id(), err))
}

// received hands a delivery to the ledger.
func (p *phone) received(payload []byte) {
	p.r.ledger.DeliverTo(p.idx, p.dev, payload, time.Now().UnixNano())
}

// acked records the PUBACK of message seq, now, and frees its slot.
func (p *phone) acked(seq uint64) {
	p.r.ledger.Acked(seq, time.Now().UnixNano())
	p.release()
}

// refused records a PUBACK that refused message seq (an MQTT 5 reason
// code of 0x80 or above), and frees its slot.
func (p *phone) refused(seq uint64) {
	p.r.ledger.RefusedByAck(seq)
	p.release()
}

// send publishes one message to user index to with pair sequence number n
// and copy number cn (0 with one device per user), after waiting for room
// in the send window.
func (c *client) send(ctx context.Context, to int, n, cn uint64) error {
	if err := c.t.acquire(ctx, &outgoing{to: to, n: n, c: cn}); err != nil {
		return err
	}
	defer c.t.sent()
	now := time.Now().UnixNano()
	seq, err := c.r.ledger.NewMessageFrom(c.idx, c.dev, to, now)
	if err != nil {
		c.release()
		return err
	}
	// The client keeps the payload until the PUBACK, so each message needs its own.
	payload := appendMessage(make([]byte, 0, c.r.cfg.Size+8), message{Tag: c.r.tag, Seq: seq, SentAt: now, Sender: c.user, N: n, C: cn}, c.r.cfg.Size)
	if err := c.t.publish(ctx, seq, c.r.topics[to], payload); err != nil {
		c.r.ledger.SendFailed(seq)
		c.release()
		return fmt.Errorf("publish %s->%s: %w", c.id(), c.r.users[to], err)
	}
	return nil
}

// takeSlot waits for room in the send window and takes a slot.
func (p *phone) takeSlot(ctx context.Context) error {
	select {
	case p.slots <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// release frees a slot of the send window.
func (p *phone) release() {
	select {
	case <-p.slots:
	default:
	}
}
