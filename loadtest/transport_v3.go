package loadtest

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/url"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
)

// v3Transport is a phone's MQTT 3.1.1 connection: an
// eclipse/paho.mqtt.golang client whose store (ackStore) tells the moment
// of each PUBACK.
type v3Transport struct {
	p     *phone
	mc    mqtt.Client
	store *ackStore
	// resync is set while paho reconnects; sending waits until the resent
	// publishes are acknowledged, because paho resends them concurrently with
	// new publishes and would reorder a pair's messages.
	resync atomic.Bool
	// publishing is the message being sent, from taking its slot until
	// paho's Publish returns, nil between sends: the one publish that a
	// reconnection can catch under way (see onReconnecting).
	publishing atomic.Pointer[outgoing]
}

// newV3Transport builds p's MQTT 3.1.1 client; it does not connect.
func newV3Transport(p *phone) (*v3Transport, error) {
	t := &v3Transport{p: p, store: newAckStore(p.r.tag, p.acked)}
	opts, err := t.options()
	if err != nil {
		return nil, err
	}
	t.mc = mqtt.NewClient(opts)
	return t, nil
}

// v3Options returns the options every MQTT 3.1.1 phone of the run shares:
// its brokers in the rotation of slot, a persistent session under
// clientID, paho's auto-reconnect, and the direct dial from slot's source
// address.
func (r *run) v3Options(clientID string, slot int) *mqtt.ClientOptions {
	o := mqtt.NewClientOptions()
	// paho tries its brokers in the order given, on the first connection
	// and on every reconnection.
	for _, b := range rotatedBrokers(r.brokers, slot) {
		o.AddBroker(b)
	}
	o.SetClientID(clientID).
		SetProtocolVersion(4).
		SetCleanSession(false).
		SetAutoReconnect(true).
		SetMaxReconnectInterval(2 * time.Second).
		SetConnectTimeout(r.cfg.ConnectTimeout).
		SetKeepAlive(r.cfg.Keepalive).
		SetPingTimeout(r.cfg.Keepalive).
		SetResumeSubs(false)
	dialer := r.dialer(slot)
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
	return o
}

func (t *v3Transport) options() (*mqtt.ClientOptions, error) {
	p, r := t.p, t.p.r
	o := r.v3Options(p.id(), p.slot())
	o.SetStore(t.store).
		SetDefaultPublishHandler(t.onMessage).
		SetOnConnectHandler(t.onConnect).
		SetConnectionLostHandler(t.onConnectionLost).
		SetReconnectingHandler(t.onReconnecting)
	if err := r.signIn(o, p.user); err != nil {
		return nil, err
	}
	if len(r.brokers) > 1 {
		// paho names the broker it dials just before dialling it, in the
		// goroutine that then connects: the last one named is the node
		// the connection is on.
		o.SetConnectionNotificationHandler(func(_ mqtt.Client, n mqtt.ConnectionNotification) {
			if b, ok := n.(mqtt.ConnectionNotificationBroker); ok {
				if i := r.brokerIndex(b.Broker); i >= 0 {
					p.trying.Store(int32(i))
				}
			}
		})
	}
	return o, nil
}

// connect opens the first connection.
func (t *v3Transport) connect(ctx context.Context) error {
	tok := t.mc.Connect()
	select {
	case <-tok.Done():
	case <-ctx.Done():
		return ctx.Err()
	}
	return tok.Error()
}

func (t *v3Transport) isOpen() bool { return t.mc.IsConnectionOpen() }

func (t *v3Transport) disconnect(quiesce time.Duration) {
	t.mc.Disconnect(uint(quiesce.Milliseconds()))
}

func (t *v3Transport) onConnect(mc mqtt.Client) {
	t.p.connected()
	// Subscribe on every connection: a broker that lost the session (a
	// crash without persistence) would otherwise never deliver again.
	p := t.p
	topic := p.r.topics[p.idx]
	tok := mc.Subscribe(topic, 1, nil)
	ok := tok.WaitTimeout(p.r.cfg.ConnectTimeout)
	if (!ok || tok.Error() != nil) && !mc.IsConnectionOpen() {
		// The connection dropped under the SUBSCRIBE (the flaky scenario
		// cuts them): the next connection subscribes again.
		return
	}
	if !ok {
		p.r.errs.add(fmt.Errorf("subscribe %s: no SUBACK within %s", p.id(), p.r.cfg.ConnectTimeout))
		return
	}
	if err := tok.Error(); err != nil {
		p.r.errs.add(fmt.Errorf("subscribe %s: %w", p.id(), err))
		return
	}
	if st, ok := tok.(*mqtt.SubscribeToken); ok && st.Result()[topic] >= 0x80 {
		p.r.errs.add(fmt.Errorf("subscribe %s: refused by the broker", p.id()))
		return
	}
	p.subscribed()
}

func (t *v3Transport) onConnectionLost(_ mqtt.Client, err error) { t.p.connectionLost(err) }

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
func (t *v3Transport) onReconnecting(mqtt.Client, *mqtt.ClientOptions) {
	t.resync.Store(true)
	if m := t.publishing.Load(); m != nil {
		for _, seq := range t.store.held() {
			t.p.r.ledger.Overtaken(seq, m.to, m.n, m.c)
		}
	}
}

func (t *v3Transport) onMessage(_ mqtt.Client, m mqtt.Message) { t.p.received(m.Payload()) }

// publish hands the message to paho. Every failure paho reports is
// decided inside Publish; one that left the message in the store (a write
// timeout) is resent on reconnection, so it is no failure.
func (t *v3Transport) publish(_ context.Context, seq uint64, topic string, payload []byte) error {
	tok := t.mc.Publish(topic, 1, false, payload)
	select {
	case <-tok.Done():
		if err := tok.Error(); err != nil && !t.store.holds(seq) {
			return err
		}
	default:
	}
	return nil
}

func (t *v3Transport) sent() { t.publishing.Store(nil) }

// acquire takes a slot of the send window for message m once no resend is
// under way, and leaves m announced in t.publishing.
func (t *v3Transport) acquire(ctx context.Context, m *outgoing) error {
	for {
		if err := t.waitResync(ctx); err != nil {
			return err
		}
		if err := t.p.takeSlot(ctx); err != nil {
			return err
		}
		// Announce the message, then look for a reconnection: either
		// onReconnecting sees the message, or this sees the reconnection
		// and waits for its resends. The window may also have opened
		// because a reconnection's resends are being acknowledged.
		t.publishing.Store(m)
		if !t.resync.Load() {
			return nil
		}
		t.publishing.Store(nil)
		t.p.release()
	}
}

// waitResync holds sending after a reconnection until paho has resent and
// the broker acknowledged every stored publish.
func (t *v3Transport) waitResync(ctx context.Context) error {
	if !t.resync.Load() {
		return nil
	}
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if t.mc.IsConnectionOpen() && t.store.pending() == 0 {
			t.resync.Store(false)
			return nil
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
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

// signIn sets o's username and password for user (see credentials).
func (r *run) signIn(o *mqtt.ClientOptions, user string) error {
	u, pw, err := r.credentials(user)
	if err != nil {
		return err
	}
	if u != "" {
		o.SetUsername(u)
	}
	if pw != "" {
		o.SetPassword(pw)
	}
	return nil
}
