package loadtest

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/chatd/chatd/broker/protocol/token"
)

// client is one simulated phone: a paho client with a persistent session,
// subscribed to its own inbox, that may also send. It is device dev of its
// user; with one device per user its client ID is the user ID.
type client struct {
	r    *run
	idx  int
	dev  int
	user string
	mc   mqtt.Client

	store *ackStore
	// slots is the send window: a send takes a slot, its PUBACK frees it.
	slots chan struct{}
	// resync is set while paho reconnects; sending waits until the resent
	// publishes are acknowledged, because paho resends them concurrently with
	// new publishes and would reorder a pair's messages.
	resync atomic.Bool
	// publishing is the message being sent, from taking its slot until
	// paho's Publish returns, nil between sends: the one publish that a
	// reconnection can catch under way (see onReconnecting).
	publishing atomic.Pointer[outgoing]

	readyOnce sync.Once
	ready     chan struct{}
	// connectedAt is when the first CONNACK arrived, Unix nanoseconds.
	connectedAt atomic.Int64

	// trying is the index in run.brokers of the broker paho last dialled:
	// the node a connection that comes up is on.
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

// newDevice builds the client of device dev of user index idx; it does
// not connect.
func (r *run) newDevice(idx, dev int) (*client, error) {
	c := &client{
		r:     r,
		idx:   idx,
		dev:   dev,
		user:  r.users[idx],
		slots: make(chan struct{}, r.cfg.Inflight),
		ready: make(chan struct{}),
	}
	c.store = newAckStore(r.tag, c.onAck)
	opts, err := r.clientOptions(c)
	if err != nil {
		return nil, err
	}
	c.mc = mqtt.NewClient(opts)
	return c, nil
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

// brokerIndex returns the index in r.brokers of a URL paho dials, or -1.
func (r *run) brokerIndex(u *url.URL) int {
	s := u.String()
	for i, k := range r.brokerKeys {
		if k == s {
			return i
		}
	}
	return -1
}

// id returns the client ID: the user ID, or {user}/d{dev} when users
// have several devices.
func (c *client) id() string {
	if c.r.devices <= 1 {
		return c.user
	}
	return deviceClientID(c.user, c.dev)
}

// slot numbers the client among every device of every user, which
// spreads devices over the nodes and source addresses as users are.
func (c *client) slot() int { return c.idx*max(1, c.r.devices) + c.dev }

func (r *run) clientOptions(c *client) (*mqtt.ClientOptions, error) {
	o := mqtt.NewClientOptions()
	// paho tries its brokers in the order given, on the first connection
	// and on every reconnection.
	for _, b := range rotatedBrokers(r.brokers, c.slot()) {
		o.AddBroker(b)
	}
	o.SetClientID(c.id()).
		SetProtocolVersion(4).
		SetCleanSession(false).
		SetAutoReconnect(true).
		SetMaxReconnectInterval(2 * time.Second).
		SetConnectTimeout(r.cfg.ConnectTimeout).
		SetKeepAlive(r.cfg.Keepalive).
		SetPingTimeout(r.cfg.Keepalive).
		SetResumeSubs(false).
		SetStore(c.store).
		SetDefaultPublishHandler(c.onMessage).
		SetOnConnectHandler(c.onConnect).
		SetConnectionLostHandler(c.onConnectionLost).
		SetReconnectingHandler(c.onReconnecting)
	if err := r.signIn(o, c.user); err != nil {
		return nil, err
	}
	if len(r.brokers) > 1 {
		c.trying.Store(int32(c.slot() % len(r.brokers)))
		// paho names the broker it dials just before dialling it, in the
		// goroutine that then connects: the last one named is the node
		// the connection is on.
		o.SetConnectionNotificationHandler(func(_ mqtt.Client, n mqtt.ConnectionNotification) {
			if b, ok := n.(mqtt.ConnectionNotificationBroker); ok {
				if i := r.brokerIndex(b.Broker); i >= 0 {
					c.trying.Store(int32(i))
				}
			}
		})
	}
	dialer := &net.Dialer{Timeout: r.cfg.ConnectTimeout, LocalAddr: r.localAddr(c.slot())}
	o.SetDialer(dialer)
	// Every URL has the scheme of the first (Config.Validate).
	if u, err := url.Parse(r.brokers[0]); err == nil && (u.Scheme == "tcp" || u.Scheme == "mqtt") {
		// Dial directly: paho's own TCP dial honours proxy environment
		// variables, and load must only ever reach the brokers named. uri
		// is the broker paho is trying now, so that a reconnection moves
		// on to the next node when one is down.
		o.SetCustomOpenConnectionFn(func(uri *url.URL, _ mqtt.ClientOptions) (net.Conn, error) {
			conn, err := dialer.Dial("tcp", uri.Host)
			if err != nil {
				return nil, err
			}
			return bufferedConn{Conn: conn, r: bufio.NewReaderSize(conn, readBufferSize)}, nil
		})
	}
	return o, nil
}

// signIn sets o's username and password for user: a token of chatd, or
// in Plain mode the --username and --password given, if any.
func (r *run) signIn(o *mqtt.ClientOptions, user string) error {
	if !r.cfg.Plain {
		tok, err := token.Mint(r.cfg.Secret, user, r.cfg.Duration+r.cfg.Grace+r.cfg.Hold+time.Hour)
		if err != nil {
			return fmt.Errorf("token for %s: %w", user, err)
		}
		o.SetUsername(user).SetPassword(tok)
		return nil
	}
	if u := r.cfg.Username; u != "" {
		if strings.Contains(u, "%s") {
			u = fmt.Sprintf(u, user)
		}
		o.SetUsername(u)
	}
	if r.cfg.Password != "" {
		o.SetPassword(r.cfg.Password)
	}
	return nil
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

// localAddr spreads connections over several loopback source addresses
// when the broker is on loopback, so that a large connect run does not run
// out of ephemeral ports on one address.
func (r *run) localAddr(idx int) net.Addr {
	if r.sourceIPs <= 1 {
		return nil
	}
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(1+idx%r.sourceIPs))}
}

// connect opens the session and waits until the inbox subscription is
// acknowledged; it returns the CONNECT->CONNACK and CONNECT->SUBACK times.
func (c *client) connect(ctx context.Context) (connack, suback time.Duration, err error) {
	start := time.Now()
	tok := c.mc.Connect()
	select {
	case <-tok.Done():
	case <-ctx.Done():
		return 0, 0, fmt.Errorf("connect %s: %w", c.id(), ctx.Err())
	}
	if err := tok.Error(); err != nil {
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
	if c.mc.IsConnectionOpen() {
		c.r.conns.connected.Add(-1)
		if node, ok := c.node(); ok {
			c.r.nodes[node].atClose.Add(1)
		}
	}
	c.mc.Disconnect(100)
}

// node returns the node of the client's latest connection, if it had one.
func (c *client) node() (int, bool) {
	c.histMu.Lock()
	defer c.histMu.Unlock()
	if len(c.history) == 0 {
		return 0, false
	}
	return c.history[len(c.history)-1].node, true
}

// connectedAfter returns the time of the client's first connection after
// t (Unix nanoseconds), and false when it has not connected since.
func (c *client) connectedAfter(t int64) (int64, bool) {
	c.histMu.Lock()
	defer c.histMu.Unlock()
	for _, e := range c.history {
		if e.at > t {
			return e.at, true
		}
	}
	return 0, false
}

func (c *client) onConnect(mc mqtt.Client) {
	now := time.Now().UnixNano()
	c.r.conns.connected.Add(1)
	if !c.connectedAt.CompareAndSwap(0, now) {
		c.r.conns.reconnects.Add(1)
	}
	node := int(c.trying.Load())
	c.r.nodes[node].connects.Add(1)
	c.histMu.Lock()
	c.history = append(c.history, connEvent{at: now, node: node})
	c.histMu.Unlock()
	// Subscribe on every connection: a broker that lost the session (a
	// crash without persistence) would otherwise never deliver again.
	topic := c.r.topics[c.idx]
	tok := mc.Subscribe(topic, 1, nil)
	ok := tok.WaitTimeout(c.r.cfg.ConnectTimeout)
	if (!ok || tok.Error() != nil) && !mc.IsConnectionOpen() {
		// The connection dropped under the SUBSCRIBE (the flaky scenario
		// cuts them): the next connection subscribes again.
		return
	}
	if !ok {
		c.r.errs.add(fmt.Errorf("subscribe %s: no SUBACK within %s", c.id(), c.r.cfg.ConnectTimeout))
		return
	}
	if err := tok.Error(); err != nil {
		c.r.errs.add(fmt.Errorf("subscribe %s: %w", c.id(), err))
		return
	}
	if st, ok := tok.(*mqtt.SubscribeToken); ok && st.Result()[topic] >= 0x80 {
		c.r.errs.add(fmt.Errorf("subscribe %s: refused by the broker", c.id()))
		return
	}
	c.readyOnce.Do(func() { close(c.ready) })
}

func (c *client) onConnectionLost(_ mqtt.Client, err error) {
	c.r.conns.connected.Add(-1)
	c.r.conns.lost.Add(1)
	c.r.conns.noteLoss(fmt.Errorf("%s: %w", c.id(), err))
}

// onReconnecting holds sending until paho has resent the stored publishes,
// and accounts for the one publish the hold comes too late for. A Publish
// that found the connection up and was then stuck handing its packet to
// the dead connection's writer is taken up by the new connection's writer
// as soon as it starts, before paho resends the stored publishes. That
// message may reach the broker ahead of earlier messages of its pair still
// waiting for their PUBACK, or after them if the broker had them already:
// the ledger is told, so that it does not count either order as the
// broker's. paho calls this before it dials, so the marks are in place
// before the message can be sent. Marking the message itself, when it is
// already stored, is harmless: its own number never precedes it.
func (c *client) onReconnecting(mqtt.Client, *mqtt.ClientOptions) {
	c.resync.Store(true)
	if p := c.publishing.Load(); p != nil {
		for _, seq := range c.store.held() {
			c.r.ledger.Overtaken(seq, p.to, p.n, p.c)
		}
	}
}

func (c *client) onMessage(_ mqtt.Client, m mqtt.Message) {
	c.r.ledger.DeliverTo(c.idx, c.dev, m.Payload(), time.Now().UnixNano())
}

func (c *client) onAck(seq uint64) {
	c.r.ledger.Acked(seq, time.Now().UnixNano())
	c.release()
}

// send publishes one message to user index to with pair sequence number n
// and copy number cn (0 with one device per user), after waiting for room
// in the send window.
func (c *client) send(ctx context.Context, to int, n, cn uint64) error {
	if err := c.acquire(ctx, &outgoing{to: to, n: n, c: cn}); err != nil {
		return err
	}
	defer c.publishing.Store(nil)
	now := time.Now().UnixNano()
	seq, err := c.r.ledger.NewMessageFrom(c.idx, c.dev, to, now)
	if err != nil {
		c.release()
		return err
	}
	// paho keeps the payload until the PUBACK, so each message needs its own.
	payload := appendMessage(make([]byte, 0, c.r.cfg.Size+8), message{Tag: c.r.tag, Seq: seq, SentAt: now, Sender: c.user, N: n, C: cn}, c.r.cfg.Size)
	tok := c.mc.Publish(c.r.topics[to], 1, false, payload)
	// Every failure paho reports is decided inside Publish; one that left the
	// message in the store (a write timeout) is resent on reconnection.
	select {
	case <-tok.Done():
		if err := tok.Error(); err != nil && !c.store.holds(seq) {
			c.r.ledger.SendFailed(seq)
			c.release()
			return fmt.Errorf("publish %s->%s: %w", c.id(), c.r.users[to], err)
		}
	default:
	}
	return nil
}

// acquire takes a slot of the send window for message p once no resend is
// under way, and leaves p announced in c.publishing.
func (c *client) acquire(ctx context.Context, p *outgoing) error {
	for {
		if err := c.waitResync(ctx); err != nil {
			return err
		}
		select {
		case c.slots <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		}
		// Announce the message, then look for a reconnection: either
		// onReconnecting sees the message, or this sees the reconnection
		// and waits for its resends. The window may also have opened
		// because a reconnection's resends are being acknowledged.
		c.publishing.Store(p)
		if !c.resync.Load() {
			return nil
		}
		c.publishing.Store(nil)
		c.release()
	}
}

func (c *client) release() {
	select {
	case <-c.slots:
	default:
	}
}

// waitResync holds sending after a reconnection until paho has resent and
// the broker acknowledged every stored publish.
func (c *client) waitResync(ctx context.Context) error {
	if !c.resync.Load() {
		return nil
	}
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for {
		if c.mc.IsConnectionOpen() && c.store.pending() == 0 {
			c.resync.Store(false)
			return nil
		}
		select {
		case <-t.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
