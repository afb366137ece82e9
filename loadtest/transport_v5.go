package loadtest

import (
	"bufio"
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"slices"
	"sync"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
	"github.com/eclipse/paho.golang/paho/session"
	"github.com/eclipse/paho.golang/paho/session/state"
)

// v5SessionExpiry is the Session Expiry Interval the MQTT 5 phones ask
// for, in seconds: as chatd's Go SDK, 30 days, so that the broker keeps a
// phone's session and queue across its reconnections.
const v5SessionExpiry = 30 * 24 * 3600

// v5MaxBackoff bounds the pause between two rounds of reconnection
// attempts, as paho.mqtt.golang's MaxReconnectInterval does for MQTT 3.1.1.
const v5MaxBackoff = 2 * time.Second

// v5Transport is a phone's MQTT 5 connection: one paho.golang Client per
// network connection, all sharing one session state (v5Session), which
// keeps the QoS 1 publishes not yet acknowledged and resends them, in
// their order, when the next connection's CONNACK is handled, before any
// new publish can go out. A goroutine of its own (manage) connects,
// subscribes, watches the connection and reconnects over the run's broker
// list; disconnect stops it.
type v5Transport struct {
	p    *phone
	sess *v5Session
	// brokers are the URLs to try, in the phone's rotation; nodes their
	// indices in run.brokers.
	brokers  []string
	nodes    []int
	dialer   *net.Dialer
	connect5 paho.Connect

	// mu is held for writing while a connection comes up (its CONNACK
	// handled, the stored publishes resent and the dropped ones published
	// again) and by each publish for reading, so that no publish goes out
	// on a connection that is being replaced, nor between resends.
	mu sync.RWMutex
	pc *paho.Client // the live connection, nil while down

	stop     chan struct{} // closed by disconnect
	stopOnce sync.Once
	done     chan struct{} // closed when manage returns
	startMu  sync.Mutex
	started  bool
}

// newV5Transport builds p's MQTT 5 client; it does not connect.
func newV5Transport(p *phone) (*v5Transport, error) {
	r := p.r
	user, password, err := r.credentials(p.user)
	if err != nil {
		return nil, err
	}
	t := &v5Transport{
		p:       p,
		sess:    newV5Session(p),
		brokers: rotatedBrokers(r.brokers, p.slot()),
		dialer:  r.dialer(p.slot()),
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
	}
	for _, b := range t.brokers {
		t.nodes = append(t.nodes, indexOf(r.brokers, b))
	}
	expiry := uint32(v5SessionExpiry)
	t.connect5 = paho.Connect{
		ClientID:     p.id(),
		KeepAlive:    uint16(min(65535, max(1, r.cfg.Keepalive/time.Second))),
		CleanStart:   false,
		Username:     user,
		UsernameFlag: user != "",
		Password:     []byte(password),
		PasswordFlag: password != "",
		Properties:   &paho.ConnectProperties{SessionExpiryInterval: &expiry},
	}
	if n := r.cfg.ReceiveMaximum; n > 0 {
		rm := uint16(n)
		t.connect5.Properties.ReceiveMaximum = &rm
	}
	return t, nil
}

// indexOf returns the index of s in list, or 0 when it is not there.
func indexOf(list []string, s string) int {
	return max(0, slices.Index(list, s))
}

// connect starts the goroutine that keeps the phone connected and
// returns once its first connection is up, or failed on every broker.
func (t *v5Transport) connect(ctx context.Context) error {
	t.startMu.Lock()
	if t.started {
		t.startMu.Unlock()
		return errors.New("connect called twice")
	}
	t.started = true
	t.startMu.Unlock()
	first := make(chan error, 1)
	go t.manage(first)
	select {
	case err := <-first:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// manage connects, then reconnects whenever the connection drops, until
// disconnect. The outcome of the first attempt goes to first; when it
// failed, manage returns.
func (t *v5Transport) manage(first chan<- error) {
	defer close(t.done)
	backoff := time.Duration(0)
	for {
		pc, err := t.dialAll()
		if first != nil {
			first <- err
			if err != nil {
				return
			}
			first = nil
		}
		if err != nil {
			// A round of every broker failed: wait before the next,
			// longer each time, as paho.mqtt.golang does.
			backoff = min(max(2*backoff, 50*time.Millisecond), v5MaxBackoff)
			if !t.pause(backoff) {
				return
			}
			continue
		}
		backoff = 0
		t.p.connected()
		t.subscribe(pc)
		select {
		case <-pc.Done():
			t.down()
			t.p.connectionLost(t.sess.lossReason())
		case <-t.stop:
			// The DISCONNECT with reason 0 leaves the session on the
			// broker; closing first ends any publish waiting for quota.
			_ = pc.Disconnect(&paho.Disconnect{ReasonCode: 0})
			<-pc.Done()
			t.down()
			return
		}
	}
}

// pause waits for d, and reports false when disconnect came first.
func (t *v5Transport) pause(d time.Duration) bool {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-t.stop:
		return false
	}
}

// down marks the connection gone, once no publish is using it.
func (t *v5Transport) down() {
	t.mu.Lock()
	t.pc = nil
	t.mu.Unlock()
}

// dialAll tries each broker of the rotation in turn and returns the first
// connection the broker accepted, or every attempt's error.
func (t *v5Transport) dialAll() (*paho.Client, error) {
	var errs []error
	for i, b := range t.brokers {
		select {
		case <-t.stop:
			return nil, errors.New("disconnected")
		default:
		}
		t.p.trying.Store(int32(t.nodes[i]))
		pc, err := t.dial(b)
		if err == nil {
			return pc, nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", b, err))
	}
	return nil, errors.Join(errs...)
}

// dial opens one connection to broker and brings it up: CONNECT, CONNACK
// and, while no publish can go out, the session's resends and the
// publishes a lost session dropped.
func (t *v5Transport) dial(broker string) (*paho.Client, error) {
	r := t.p.r
	u, err := url.Parse(broker)
	if err != nil {
		return nil, fmt.Errorf("broker URL: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), r.cfg.ConnectTimeout)
	defer cancel()
	// The attempt ends early when disconnect is called.
	go func() {
		select {
		case <-t.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	var conn net.Conn
	switch u.Scheme {
	case "ws", "wss":
		// dialWebSocket's connection has its own lock and framing.
		conn, err = dialWebSocket(ctx, t.dialer, u)
	case "tls", "ssl", "mqtts":
		d := tls.Dialer{NetDialer: t.dialer, Config: &tls.Config{ServerName: u.Hostname()}}
		conn, err = d.DialContext(ctx, "tcp", u.Host)
	default:
		// Dialled directly, as for MQTT 3.1.1: load only ever reaches the
		// brokers named, whatever the proxy environment variables say.
		conn, err = t.dialer.DialContext(ctx, "tcp", u.Host)
	}
	if err != nil {
		return nil, err
	}
	if u.Scheme != "ws" && u.Scheme != "wss" {
		// paho.golang writes a packet in several writes, from several
		// goroutines, and holds the connection's lock when it has one.
		conn = packets.NewThreadSafeConn(bufferedConn{Conn: conn, r: bufio.NewReaderSize(conn, readBufferSize)})
	}
	pc := paho.NewClient(paho.ClientConfig{
		ClientID:          t.connect5.ClientID,
		Conn:              conn,
		Session:           t.sess,
		PacketTimeout:     r.cfg.ConnectTimeout,
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){t.onPublish},
	})
	cp := t.connect5
	t.mu.Lock()
	defer t.mu.Unlock()
	ca, err := pc.Connect(ctx, &cp)
	if err != nil {
		if ca != nil && ca.ReasonCode >= 0x80 {
			r.reasons.add(packetConnack, ca.ReasonCode)
			return nil, fmt.Errorf("CONNACK 0x%02X %s: %w", ca.ReasonCode, reasonName(packetConnack, ca.ReasonCode), err)
		}
		return nil, err
	}
	if ca.ReasonCode != 0 {
		r.reasons.add(packetConnack, ca.ReasonCode)
	}
	granted := 65535
	if ca.Properties != nil && ca.Properties.ReceiveMaximum != nil {
		granted = int(*ca.Properties.ReceiveMaximum)
	}
	r.protos.granted(granted)
	if err := t.sess.republish(ctx, pc); err != nil {
		// The connection failed under the publishes: they wait for the next.
		_ = pc.Disconnect(&paho.Disconnect{ReasonCode: 0})
		<-pc.Done()
		return nil, err
	}
	t.pc = pc
	return pc, nil
}

// subscribe subscribes to the phone's inbox on the new connection pc: a
// broker that lost the session (a crash without persistence) would
// otherwise never deliver again.
func (t *v5Transport) subscribe(pc *paho.Client) {
	p := t.p
	ctx, cancel := context.WithTimeout(context.Background(), p.r.cfg.ConnectTimeout)
	defer cancel()
	go func() {
		select {
		case <-pc.Done():
			cancel()
		case <-ctx.Done():
		}
	}()
	var err error
	for attempt := 1; ; attempt++ {
		var sa *paho.Suback
		sa, err = pc.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: p.r.topics[p.idx], QoS: 1}}})
		inUse := false
		if sa != nil {
			for _, code := range sa.Reasons {
				if code >= 0x80 {
					p.r.reasons.add(packetSuback, code)
					err = fmt.Errorf("SUBACK 0x%02X %s: %w", code, reasonName(packetSuback, code), err)
				}
				inUse = inUse || code == packets.SubackPacketIdentifierinuse
			}
		}
		// A broker that keeps its own deliveries' identifiers and the
		// client's in one space (mochi) refuses a SUBSCRIBE whose
		// identifier one of its deliveries holds: the next one is free.
		if !inUse || attempt == 3 {
			break
		}
	}
	select {
	case <-pc.Done():
		// The connection dropped under the SUBSCRIBE (the flaky scenario
		// cuts them): the next connection subscribes again.
		return
	default:
	}
	if err != nil {
		p.r.errs.add(fmt.Errorf("subscribe %s: %w", p.id(), err))
		return
	}
	p.subscribed()
}

// onPublish hands a delivery to the ledger; paho acknowledges it after.
func (t *v5Transport) onPublish(m paho.PublishReceived) (bool, error) {
	t.p.received(m.Packet.Payload)
	return true, nil
}

// acquire takes a slot of the send window: the session resends stored
// publishes before a new connection lets any new one out (see dial), so
// there is no resend to wait for.
func (t *v5Transport) acquire(ctx context.Context, _ *outgoing) error { return t.p.takeSlot(ctx) }

func (t *v5Transport) sent() {}

// errWait says a publish found no connection to take it.
var errWait = errors.New("no connection")

// publish adds the message to the session and writes it to the live
// connection. While there is none, or when the connection dropped before
// the session took the message, it waits for the next connection; when
// ctx ends meanwhile, the message is left to the session to send on the
// next connection, as paho.mqtt.golang does for MQTT 3.1.1. Either way it
// goes out after the resends, in its place. Once the session holds the
// message it is sent or resent whatever happens to the connection, so a
// later error is no failure.
func (t *v5Transport) publish(ctx context.Context, seq uint64, topic string, payload []byte) error {
	pp := pendingPublish{seq: seq, topic: topic, payload: payload}
	var tick *time.Ticker
	for {
		t.mu.RLock()
		err := t.tryPublish(ctx, pp)
		t.mu.RUnlock()
		if err != errWait {
			return err
		}
		if tick == nil {
			tick = time.NewTicker(5 * time.Millisecond)
			defer tick.Stop()
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
		case <-t.done:
			return errors.New("disconnected")
		}
	}
}

// tryPublish is one attempt of publish; the caller holds t.mu for reading,
// so that the connection cannot be replaced meanwhile.
func (t *v5Transport) tryPublish(ctx context.Context, pp pendingPublish) error {
	if t.pc != nil {
		// The end of the sending phase must not abandon a publish the
		// broker's Receive Maximum holds back: the connection's loss
		// or paho's packet timeout ends that wait.
		_, err := t.pc.PublishWithOptions(context.WithoutCancel(ctx), &paho.Publish{QoS: 1, Topic: pp.topic, Payload: pp.payload},
			paho.PublishOptions{Method: paho.PublishMethod_AsyncSend})
		if err == nil || t.sess.holds(pp.seq) {
			return nil
		}
		if !errors.Is(err, session.ErrNoConnection) {
			return err
		}
	}
	if ctx.Err() != nil {
		t.sess.later(pp)
		return nil
	}
	return errWait
}

func (t *v5Transport) isOpen() bool {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.pc != nil
}

// disconnect stops reconnecting and closes the connection with a
// DISCONNECT that keeps the session; work under way is not waited for.
func (t *v5Transport) disconnect(time.Duration) {
	t.stopOnce.Do(func() { close(t.stop) })
	t.startMu.Lock()
	started := t.started
	t.started = true // a connect after disconnect must not start manage
	t.startMu.Unlock()
	if started {
		<-t.done
	}
}

// pendingPublish is a publish of this run the session holds until its
// PUBACK. Its sequence number also orders it among the phone's publishes:
// a phone numbers its messages in the order it sends them.
type pendingPublish struct {
	seq     uint64
	topic   string
	payload []byte
}

// v5Session is the session state of an MQTT 5 phone: paho.golang's
// in-memory state, which stores and resends the QoS 1 publishes, and
// around it what the phone must learn of the packets it handles: which
// message each packet identifier carries, so that a PUBACK, and its reason
// code, reaches the ledger the moment it is read, whichever connection
// carried the publish; the reason codes of PUBACK and server DISCONNECT;
// and the publishes a broker without the session made the state drop.
type v5Session struct {
	*state.State
	p *phone

	mu      sync.Mutex
	pending map[uint16]pendingPublish // by packet identifier
	// dropped are the publishes a CONNACK without a session present made
	// the state forget, and those left for the next connection (later),
	// oldest first: republish sends them.
	dropped []pendingPublish
	// lastLoss is the server's DISCONNECT that ended the last connection,
	// nil when it just dropped.
	lastLoss *packets.Disconnect
}

func newV5Session(p *phone) *v5Session {
	return &v5Session{State: state.NewInMemory(), p: p, pending: make(map[uint16]pendingPublish)}
}

// AddToSession adds a packet to the state and, for a publish of this
// run, remembers its message under the identifier the state gave it.
func (s *v5Session) AddToSession(ctx context.Context, packet session.Packet, resp chan<- packets.ControlPacket) error {
	if err := s.State.AddToSession(ctx, packet, resp); err != nil {
		return err
	}
	if pb, ok := packet.(*packets.Publish); ok {
		if seq, ok := parseID(leadingID(pb.Payload), s.p.r.tag); ok {
			s.mu.Lock()
			s.pending[pb.PacketID] = pendingPublish{seq: seq, topic: pb.Topic, payload: pb.Payload}
			s.mu.Unlock()
		}
	}
	return nil
}

// PacketReceived tells the phone of a PUBACK before the state frees its
// identifier, then lets the state handle the packet.
func (s *v5Session) PacketReceived(recv *packets.ControlPacket, pubs chan<- *packets.Publish) error {
	if pa, ok := recv.Content.(*packets.Puback); ok {
		s.mu.Lock()
		pp, ok := s.pending[pa.PacketID]
		delete(s.pending, pa.PacketID)
		s.mu.Unlock()
		if pa.ReasonCode != 0 {
			s.p.r.reasons.add(packetPuback, pa.ReasonCode)
		}
		if ok {
			if pa.ReasonCode >= 0x80 {
				s.p.refused(pp.seq)
			} else {
				s.p.acked(pp.seq)
			}
		}
	}
	return s.State.PacketReceived(recv, pubs)
}

// ConAckReceived sets aside the publishes of a session the broker no
// longer has, which the state is about to drop, then lets the state take
// the connection and resend what it stores.
func (s *v5Session) ConAckReceived(conn io.Writer, cp *packets.Connect, ca *packets.Connack) error {
	if !ca.SessionPresent && s.p.connectedAt.Load() != 0 {
		s.p.r.conns.sessionsLost.Add(1)
	}
	s.mu.Lock()
	s.lastLoss = nil
	if !ca.SessionPresent && len(s.pending) > 0 {
		for _, pp := range s.pending {
			s.dropped = append(s.dropped, pp)
		}
		clear(s.pending)
		slices.SortFunc(s.dropped, func(a, b pendingPublish) int { return cmp.Compare(a.seq, b.seq) })
	}
	s.mu.Unlock()
	return s.State.ConAckReceived(conn, cp, ca)
}

// ConnectionLost counts the reason code of a server's DISCONNECT, then
// lets the state forget the connection.
func (s *v5Session) ConnectionLost(dp *packets.Disconnect) error {
	if dp != nil {
		s.p.r.reasons.add(packetDisconnect, dp.ReasonCode)
		s.mu.Lock()
		s.lastLoss = dp
		s.mu.Unlock()
	}
	return s.State.ConnectionLost(dp)
}

// lossReason says why the last connection ended.
func (s *v5Session) lossReason() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if dp := s.lastLoss; dp != nil {
		return fmt.Errorf("server DISCONNECT 0x%02X %s", dp.ReasonCode, reasonName(packetDisconnect, dp.ReasonCode))
	}
	return errors.New("connection lost")
}

// later leaves pp to be published on the next connection, after what
// the session holds.
func (s *v5Session) later(pp pendingPublish) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dropped = append(s.dropped, pp)
}

// holds reports whether the session holds message seq, to send or resend it.
func (s *v5Session) holds(seq uint64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, pp := range s.pending {
		if pp.seq == seq {
			return true
		}
	}
	return false
}

// republish publishes again, in order, on the new connection pc, the
// messages a lost session dropped; those the connection could not take
// wait for the next one.
func (s *v5Session) republish(ctx context.Context, pc *paho.Client) error {
	s.mu.Lock()
	todo := s.dropped
	s.dropped = nil
	s.mu.Unlock()
	for i, pp := range todo {
		_, err := pc.PublishWithOptions(ctx, &paho.Publish{QoS: 1, Topic: pp.topic, Payload: pp.payload},
			paho.PublishOptions{Method: paho.PublishMethod_AsyncSend})
		if err != nil && !s.holds(pp.seq) {
			s.mu.Lock()
			s.dropped = append(slices.Clone(todo[i:]), s.dropped...)
			s.mu.Unlock()
			return fmt.Errorf("publish again what the broker's lost session held: %w", err)
		}
	}
	return nil
}
