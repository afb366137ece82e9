package msgpath

import (
	"fmt"

	"github.com/chatd/chatd/broker/msgpath/delivery"
	"github.com/chatd/chatd/broker/msgpath/wire"
	"github.com/chatd/chatd/broker/protocol/envelope"
	"github.com/chatd/chatd/broker/service/events"
)

// Budget is a user's publish budget, shared by its connections.
type Budget interface {
	// Spend takes msgs messages of n bytes in all from the budget: ok is
	// false when they are over the limit, waited when the call slowed the
	// publisher down to the rate first.
	Spend(msgs, n int) (ok, waited bool)
}

// Conn is a new connection of a device, as the broker hands it over.
type Conn struct {
	// User and Device name the device; ClientID is its MQTT client ID.
	User, Device, ClientID string
	// V5 is set for MQTT 5 clients.
	V5 bool
	// Transient is set for a clean session (3.1.1) or a session expiry
	// of 0 (5): the device is forgotten when it disconnects.
	Transient bool
	// ReceiveMaximum is the client's own cap on unacknowledged
	// deliveries; 0 means none.
	ReceiveMaximum int
	// NoCopies is set when the client asked that what it sends make no
	// copies for the user's other devices (an app that encrypts for each
	// device sends its own).
	NoCopies bool
	// Out writes packets to the client and closes its connection.
	Out wire.Conn
	// Budget is the user's publish budget.
	Budget Budget
	// End ends the connection: the path asks a 3.1.1 client to resend a
	// publish it could not store this way (PROTOCOL.md section 9).
	End func(error)
}

// Session is one connection of one device on the path. Its methods run on
// the connection's own goroutine, except what the committer calls back.
type Session struct {
	user, device, clientID string
	v5                     bool
	// copyMeta is the Meta of the copies of what this connection sends
	// for the user's other devices, nil when it makes none.
	copyMeta []byte
	window   int
	w        *wire.Writer
	budget   Budget
	end      func(error)
	// dev is set while the inbox is subscribed; only the client's own
	// goroutine touches it.
	dev *delivery.Device
}

// User returns the session's user.
func (s *Session) User() string { return s.user }

// Open registers a connection of a device with the store and starts
// feeding it when it was subscribed to its inbox on an earlier
// connection: the subscription is kept with the device, not in mochi's
// in-memory session.
func (p *Path) Open(c Conn) (*Session, error) {
	s := &Session{
		user: c.User, device: c.Device, clientID: c.ClientID, v5: c.V5,
		window: p.limits.maxInflight, budget: c.Budget, end: c.End,
	}
	if p.copies && !c.NoCopies {
		s.copyMeta = envelope.CopyMeta(c.Device)
	}
	if c.V5 && c.ReceiveMaximum > 0 && c.ReceiveMaximum < s.window {
		s.window = c.ReceiveMaximum
	}
	cursor, subscribed, err := p.store.Attach(c.User, c.Device, c.Transient)
	if err != nil {
		return nil, fmt.Errorf("register device %s of %s: %w", c.Device, c.User, err)
	}
	s.w = wire.NewWriter(c.Out, c.V5, p.limits.maxPendingBytes)
	p.presence.Connected(c.User)
	if p.peers != nil {
		p.peers.SessionStarted(c.ClientID)
	}
	p.observe.Connected()
	if p.events.Enabled() {
		p.events.Emit(events.UserConnected, events.Connection{User: c.User, ClientID: c.ClientID})
	}
	if subscribed {
		if err := p.startDelivery(s, cursor); err != nil {
			// The caller ends the connection, and calls End.
			return s, err
		}
	}
	return s, nil
}

// Subscribe starts feeding a device that subscribed to its inbox.
func (p *Path) Subscribe(s *Session) error {
	if s.dev != nil {
		return nil
	}
	// Read the cursor now: a taken-over connection may have advanced it
	// since this session was registered.
	cursor, err := p.store.Cursor(s.user, s.device)
	if err != nil {
		return fmt.Errorf("read cursor of device %s of %s: %w", s.device, s.user, err)
	}
	p.store.SetSubscribed(s.user, s.device, true)
	return p.startDelivery(s, cursor)
}

// Unsubscribe stops feeding a device that unsubscribed from its inbox;
// its messages wait in the queue.
func (p *Path) Unsubscribe(s *Session) {
	if s.dev == nil {
		return
	}
	p.delivery.Stop(s.dev)
	s.dev = nil
	p.store.SetSubscribed(s.user, s.device, false)
}

func (p *Path) startDelivery(s *Session, cursor uint64) error {
	dev, err := p.delivery.Start(s.user, s.device, cursor, s.window, s.w)
	if err != nil {
		return fmt.Errorf("start delivery to device %s of %s: %w", s.device, s.user, err)
	}
	s.dev = dev
	return nil
}

// Acked takes the device's PUBACK of one of the server's deliveries.
func (p *Path) Acked(s *Session, pid uint16) {
	if s.dev != nil {
		p.delivery.Acked(s.dev, pid)
	}
}

// End stops feeding the device; its unacknowledged messages wait in the
// queue for its next connection. It is called once per opened session.
func (p *Path) End(s *Session) {
	if s.dev != nil {
		p.delivery.Stop(s.dev)
		s.dev = nil
	}
	s.w.Close()
	p.presence.Disconnected(s.user)
	if p.events.Enabled() {
		p.events.Emit(events.UserDisconnected, events.Connection{User: s.user, ClientID: s.clientID})
	}
	// Every Attach is matched by one Detach, a taken-over connection's
	// too: the store counts a device's connections, and only when the last
	// is gone does it forget a transient device or start its device_ttl.
	p.store.Detach(s.user, s.device)
}
