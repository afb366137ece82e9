// Package chatclient is chatd's Go client, for bots, IoT integrations
// and backend tests: it does what docs/PROTOCOL.md leaves to each app.
//
//   - A message is kept in an outbox (in memory, or on disk with
//     FileOutbox) until the server's PUBACK, and sent again with the same
//     id after a reconnect or a restart: the server drops the duplicate
//     of one it stored.
//   - What arrives is told once per (kind, sender, id), though the
//     server may deliver it again after a reconnect.
//   - The connection is kept up: a token is asked of Options.Token at
//     every connect, so an expired or refused one is replaced.
//
// It speaks MQTT 5 (github.com/eclipse/paho.golang's autopaho) over TCP
// or TLS, as one device of one user, on a persistent session.
package chatclient

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/eclipse/paho.golang/autopaho"
	"github.com/eclipse/paho.golang/paho"
)

// Options configures a Client.
type Options struct {
	// Server is the MQTT address: mqtt://host:1883 or tls://host:8883.
	Server string
	// User is the user ID; Device the device's name ("" for the bare
	// user client ID).
	User, Device string
	// Token returns a valid access token for User; it is called at every
	// connect.
	Token func(ctx context.Context) (string, error)
	// Outbox keeps unacknowledged messages; nil keeps them in memory.
	Outbox Outbox
	// Reconnect is the wait between connection attempts; zero means 1 s.
	Reconnect time.Duration
	// Logger receives connection errors; nil discards them.
	Logger *slog.Logger
	// SendOnly connects as a transient device that never subscribes to
	// its inbox: it sends (its outbox works as ever) and hears Stored and
	// Refused, but receives no message and, forgotten by the server when
	// it disconnects, holds none back from deletion. For scripts and
	// gateways that only send (chatcli send).
	SendOnly bool
}

// Event is what the client tells of: Message, Receipt, Stored, Refused,
// Presence, Typing, Error.
type Event interface{ event() }

// Message is a message (kind msg) or a copy of one a device of the user
// sent (kind sent), as PROTOCOL.md section 3 delivers it.
type Message struct {
	// Kind is "msg" or "sent".
	Kind string
	// From is the sender, To the recipient, Group the group if any.
	From, To, Group string
	// ID is the message's id.
	ID string
	// Server marks a message the app's backend sent.
	Server bool
	// TS is the server's time, Unix milliseconds.
	TS int64
	// Msg is the message object as its sender wrote it.
	Msg json.RawMessage
}

// Receipt is a delivered or read receipt of messages this user sent.
type Receipt struct {
	// Status is "delivered" or "read".
	Status string
	// By is the reader (or recipient), IDs the messages.
	By  string
	IDs []string
	// Peer is set on a read receipt one of this user's own devices sent:
	// the user whose messages it read.
	Peer string
}

// Presence tells that a watched user came online or went offline.
type Presence struct {
	// User is whose presence.
	User string
	// Online is whether a device of User is connected.
	Online bool
	// LastSeen is when User was last seen, for a user offline (zero if unknown).
	LastSeen time.Time
}

// Typing tells that a user is typing to this one; never stored.
type Typing struct{ From string }

// Error is a refusal the server queued to the inbox (MQTT 3.1.1, or a
// group message some members' queues refused; PROTOCOL.md section 5).
type Error struct {
	// Ref is the id of the message refused.
	Ref string
	// Code is the protocol error code: queue_full, rate_limited, unknown_group, ...
	Code string
	// Reason is for people.
	Reason string
}

// Stored tells that the server stored a message sent (its PUBACK).
type Stored struct{ ID string }

// Refused tells that the server refused a message sent; it is not sent
// again.
type Refused struct {
	// ID is the message's id.
	ID string
	// Code names the reason (PROTOCOL.md section 5).
	Code string
	// Reason is the MQTT 5 reason code.
	Reason byte
}

func (Message) event()  {}
func (Receipt) event()  {}
func (Stored) event()   {}
func (Refused) event()  {}
func (Presence) event() {}
func (Typing) event()   {}
func (Error) event()    {}

// Client is one device of one user, connected (and reconnected) to chatd.
type Client struct {
	o      Options
	cm     *autopaho.ConnectionManager
	events chan Event
	wake   chan struct{}
	seen   *seen
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	// pending holds the events not yet read from events, forward's to
	// hand over; seen is forward's alone.
	pending chan delivery
	// lastAck is when forward last acknowledged a delivery, Unix nanoseconds.
	lastAck atomic.Int64

	// mu guards watched and typed.
	mu      sync.Mutex
	watched map[string]bool
	typed   map[string]time.Time
}

// TypingEvery is the least time between two typing signals to one peer.
const TypingEvery = 3 * time.Second

// ackInterval is how often paho sends the acknowledgements of deliveries
// read from Events; Close waits that long, twice, after the last one.
const ackInterval = 10 * time.Millisecond

// sessionExpiry keeps the device's session, and its queue position,
// while it is away (the server caps it at its device_ttl).
const sessionExpiry = 30 * 24 * 3600

// Dial starts a client: it connects, and keeps connecting, in the
// background; messages sent before the first connect wait in the outbox.
func Dial(o Options) (*Client, error) {
	if o.User == "" || o.Token == nil {
		return nil, errors.New("chatclient: User and Token are required")
	}
	u, err := url.Parse(o.Server)
	if err != nil {
		return nil, fmt.Errorf("chatclient: server: %w", err)
	}
	if o.Outbox == nil {
		o.Outbox = &MemoryOutbox{}
	}
	if o.Reconnect <= 0 {
		o.Reconnect = time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &Client{o: o, events: make(chan Event), pending: make(chan delivery, 256), wake: make(chan struct{}, 1), seen: newSeen(10000), ctx: ctx, cancel: cancel,
		watched: map[string]bool{}, typed: map[string]time.Time{}}
	clientID := o.User
	if o.Device != "" {
		clientID = o.User + "/" + o.Device
	}
	expiry := uint32(sessionExpiry)
	if o.SendOnly {
		// Session expiry 0: a transient device (PROTOCOL.md section 1).
		expiry = 0
	}
	cfg := autopaho.ClientConfig{
		ServerUrls:            []*url.URL{u},
		KeepAlive:             30,
		SessionExpiryInterval: expiry,
		ReconnectBackoff:      func(int) time.Duration { return o.Reconnect },
		ConnectPacketBuilder: func(cp *paho.Connect, _ *url.URL) (*paho.Connect, error) {
			tok, err := o.Token(ctx)
			if err != nil {
				return nil, fmt.Errorf("chatclient: token: %w", err)
			}
			cp.Username, cp.UsernameFlag = o.User, true
			cp.Password, cp.PasswordFlag = []byte(tok), true
			return cp, nil
		},
		OnConnectionUp: func(cm *autopaho.ConnectionManager, _ *paho.Connack) {
			// Must not block: the subscription is made aside.
			c.wg.Add(1)
			go func() {
				defer c.wg.Done()
				var subs []paho.SubscribeOptions
				if !o.SendOnly {
					subs = append(subs, paho.SubscribeOptions{Topic: "inbox/" + o.User, QoS: 1})
				}
				c.mu.Lock()
				for u := range c.watched {
					subs = append(subs, paho.SubscribeOptions{Topic: "presence/" + u})
				}
				c.mu.Unlock()
				if len(subs) == 0 {
					return
				}
				if _, err := cm.Subscribe(ctx, &paho.Subscribe{Subscriptions: subs}); err != nil && ctx.Err() == nil {
					o.Logger.Warn("chatclient: subscribe", "error", err)
				}
			}()
			c.poke()
		},
		OnConnectError: func(err error) { o.Logger.Warn("chatclient: connect", "error", err) },
		ClientConfig: paho.ClientConfig{
			ClientID:          clientID,
			OnPublishReceived: []func(paho.PublishReceived) (bool, error){c.received},
			// A delivery is acknowledged once the application has taken it
			// from Events (see forward): the server deletes what every
			// device acknowledged, so a PUBACK for an event still queued
			// here would lose it if the program stopped.
			EnableManualAcknowledgment: true,
			SendAcksInterval:           ackInterval,
		},
	}
	if c.cm, err = autopaho.NewConnection(ctx, cfg); err != nil {
		cancel()
		return nil, fmt.Errorf("chatclient: %w", err)
	}
	c.wg.Add(2)
	go c.sendLoop()
	go c.forward()
	c.poke()
	return c, nil
}

// AwaitConnection waits until the client is connected, or ctx is done.
func (c *Client) AwaitConnection(ctx context.Context) error {
	if err := c.cm.AwaitConnection(ctx); err != nil {
		return fmt.Errorf("chatclient: %w", err)
	}
	return nil
}

// WatchPresence tells Presence events of users, now (the last state of
// each first) and after every reconnect. Offline, it takes effect at the
// next connect.
func (c *Client) WatchPresence(users ...string) error {
	var subs []paho.SubscribeOptions
	c.mu.Lock()
	for _, u := range users {
		if !c.watched[u] {
			c.watched[u] = true
			subs = append(subs, paho.SubscribeOptions{Topic: "presence/" + u})
		}
	}
	c.mu.Unlock()
	if len(subs) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(c.ctx, 10*time.Second)
	defer cancel()
	if _, err := c.cm.Subscribe(ctx, &paho.Subscribe{Subscriptions: subs}); err != nil {
		if errors.Is(err, autopaho.ConnectionDownError) {
			return nil
		}
		return fmt.Errorf("chatclient: watch presence: %w", err)
	}
	return nil
}

// Typing tells the online devices of user to that this user is typing,
// at most once per TypingEvery per peer; it is never stored, and dropped
// while the client is offline.
func (c *Client) Typing(to string) error {
	c.mu.Lock()
	if time.Since(c.typed[to]) < TypingEvery {
		c.mu.Unlock()
		return nil
	}
	c.typed[to] = time.Now()
	c.mu.Unlock()
	ctx, cancel := context.WithTimeout(c.ctx, 10*time.Second)
	defer cancel()
	if _, err := c.cm.Publish(ctx, &paho.Publish{Topic: "typing/" + to, Payload: []byte("{}")}); err != nil && !errors.Is(err, autopaho.ConnectionDownError) {
		return fmt.Errorf("chatclient: typing: %w", err)
	}
	return nil
}

// Events returns what the client tells of, in order per kind; it is
// closed by Close. A delivery is acknowledged to the server only once it
// has been read from Events, so a message the program never read comes
// again after a restart. A reader slower than the server slows its
// deliveries.
func (c *Client) Events() <-chan Event { return c.events }

// Send stores msg (any JSON object) in the outbox for user to, giving it
// a random id if it has none, and returns that id; it goes as soon as
// the client is connected. Stored or Refused tells what became of it.
func (c *Client) Send(to string, msg any) (string, error) {
	return c.queue("inbox/"+to, msg)
}

// SendGroup is Send to every member of a group.
func (c *Client) SendGroup(group string, msg any) (string, error) {
	return c.queue("group/"+group, msg)
}

// MarkRead tells the sender of messages ids that this user read them.
func (c *Client) MarkRead(from string, ids ...string) error {
	_, err := c.queue("receipt/"+from, map[string]any{"status": "read", "ids": ids})
	return err
}

// Pending returns how many messages wait for the server's PUBACK.
func (c *Client) Pending() (int, error) {
	l, err := c.o.Outbox.List()
	return len(l), err
}

// Close disconnects and stops; what is pending stays in the outbox.
func (c *Client) Close(ctx context.Context) error {
	// The acknowledgement of what was read last leaves with paho's next
	// round: let it go before disconnecting, or the server sends it again.
	if wait := 2*ackInterval - time.Since(time.Unix(0, c.lastAck.Load())); wait > 0 {
		select {
		case <-time.After(wait):
		case <-ctx.Done():
		}
	}
	c.cancel()
	err := c.cm.Disconnect(ctx)
	<-c.cm.Done()
	c.wg.Wait()
	close(c.events)
	if errors.Is(err, autopaho.ConnectionDownError) {
		err = nil
	}
	return err
}

func (c *Client) queue(topic string, msg any) (string, error) {
	b, err := json.Marshal(msg)
	if err != nil {
		return "", fmt.Errorf("chatclient: %w", err)
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(b, &obj); err != nil {
		return "", fmt.Errorf("chatclient: a message is a JSON object: %w", err)
	}
	id := ""
	if raw, ok := obj["id"]; ok {
		if err := json.Unmarshal(raw, &id); err != nil {
			return "", fmt.Errorf("chatclient: id: %w", err)
		}
	} else if !strings.HasPrefix(topic, "receipt/") {
		id = newID()
		obj["id"], _ = json.Marshal(id)
		if b, err = json.Marshal(obj); err != nil {
			return "", fmt.Errorf("chatclient: %w", err)
		}
	}
	if _, err := c.o.Outbox.Add(Pending{Topic: topic, ID: id, Payload: b}); err != nil {
		return "", err
	}
	c.poke()
	return id, nil
}

// poke wakes the sender.
func (c *Client) poke() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// sendLoop publishes the outbox in order, one message at a time, each
// until the server answers it; a connection lost meanwhile sends it
// again on the next, with the same id.
func (c *Client) sendLoop() {
	defer c.wg.Done()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-c.wake:
		}
		for c.ctx.Err() == nil {
			list, err := c.o.Outbox.List()
			if err != nil {
				c.o.Logger.Error("chatclient: outbox", "error", err)
				break
			}
			if len(list) == 0 {
				break
			}
			if err := c.cm.AwaitConnection(c.ctx); err != nil {
				return
			}
			p := list[0]
			res, err := c.cm.Publish(c.ctx, &paho.Publish{QoS: 1, Topic: p.Topic, Payload: p.Payload})
			if err != nil {
				// Not answered: the connection went down. Again on the next.
				select {
				case <-c.ctx.Done():
					return
				case <-time.After(c.o.Reconnect / 4):
				}
				continue
			}
			var ev Event = Stored{ID: p.ID}
			if res.ReasonCode >= 0x80 {
				ev = Refused{ID: p.ID, Code: codeName(res.ReasonCode), Reason: res.ReasonCode}
			}
			if err := c.o.Outbox.Remove(p.Seq); err != nil {
				c.o.Logger.Error("chatclient: outbox", "error", err)
			}
			if p.ID != "" && !c.tell(ev) {
				return
			}
		}
	}
}

// delivery is an event waiting to be read from Events: key identifies a
// message for deduplication ("" for none), ack acknowledges it to the
// server (nil for an event that is not a delivery).
type delivery struct {
	ev  Event
	key string
	ack func()
}

// tell queues ev for Events, unless the client is closing.
func (c *Client) tell(ev Event) bool { return c.enqueue(delivery{ev: ev}) }

// enqueue queues d for forward, unless the client is closing.
func (c *Client) enqueue(d delivery) bool {
	select {
	case c.pending <- d:
		return true
	case <-c.ctx.Done():
		return false
	}
}

// forward hands the queued events to the application, one at a time, and
// acknowledges each delivery once it was read, or at once when it is a
// message told before (a resend after a reconnect). A delivery not read
// when the client closes is never acknowledged: the server sends it again.
func (c *Client) forward() {
	defer c.wg.Done()
	for {
		var d delivery
		select {
		case d = <-c.pending:
		case <-c.ctx.Done():
			return
		}
		if d.key != "" && !c.seen.first(d.key) {
			d.ack()
			continue
		}
		select {
		case c.events <- d.ev:
			if d.ack != nil {
				d.ack()
				c.lastAck.Store(time.Now().UnixNano())
			}
		case <-c.ctx.Done():
			return
		}
	}
}

// envelope is what the server delivers (PROTOCOL.md section 3).
type envelope struct {
	Kind   string          `json:"kind"`
	From   string          `json:"from"`
	To     string          `json:"to"`
	Group  string          `json:"group"`
	Server bool            `json:"server"`
	TS     int64           `json:"ts"`
	Msg    json.RawMessage `json:"msg"`
	Status string          `json:"status"`
	By     string          `json:"by"`
	IDs    []string        `json:"ids"`
	Peer   string          `json:"peer"`
	Ref    string          `json:"ref"`
	Code   string          `json:"code"`
	Reason string          `json:"reason"`
}

// received queues a delivery for Events; its PUBACK is sent once the
// application has read it (see forward).
func (c *Client) received(pr paho.PublishReceived) (bool, error) {
	ack := func() {
		// Acknowledgements of a connection that has ended are dropped with
		// it, and the message comes again on the next.
		if err := pr.Client.Ack(pr.Packet); err != nil {
			c.o.Logger.Debug("chatclient: ack", "error", err)
		}
	}
	var d delivery
	if u, ok := strings.CutPrefix(pr.Packet.Topic, "presence/"); ok {
		var p struct {
			Online   bool  `json:"online"`
			LastSeen int64 `json:"last_seen"`
		}
		if json.Unmarshal(pr.Packet.Payload, &p) != nil {
			ack()
			return true, nil
		}
		ev := Presence{User: u, Online: p.Online}
		if p.LastSeen > 0 {
			ev.LastSeen = time.UnixMilli(p.LastSeen)
		}
		d = delivery{ev: ev, ack: ack}
	} else {
		ev, key := decode(pr.Packet.Payload)
		if ev == nil {
			ack()
			return true, nil
		}
		d = delivery{ev: ev, key: key, ack: ack}
	}
	c.enqueue(d)
	return true, nil
}

// decode reads an envelope and the key that identifies it for dedup.
func decode(payload []byte) (Event, string) {
	var e envelope
	if err := json.Unmarshal(payload, &e); err != nil {
		return nil, ""
	}
	switch e.Kind {
	case "msg", "sent":
		var m struct {
			ID string `json:"id"`
		}
		_ = json.Unmarshal(e.Msg, &m) // a message without an id is told, and not deduplicated
		key := e.Kind + "\x00" + e.From + "\x00" + m.ID
		if m.ID == "" {
			key = ""
		}
		return Message{Kind: e.Kind, From: e.From, To: e.To, Group: e.Group, ID: m.ID, Server: e.Server, TS: e.TS, Msg: e.Msg}, key
	case "receipt":
		return Receipt{Status: e.Status, By: e.By, IDs: e.IDs, Peer: e.Peer}, ""
	case "typing":
		return Typing{From: e.From}, ""
	case "error":
		return Error{Ref: e.Ref, Code: e.Code, Reason: e.Reason}, ""
	}
	return nil, ""
}

// codeName names an MQTT 5 PUBACK reason code as PROTOCOL.md section 5.
func codeName(code byte) string {
	switch code {
	case 0x87:
		return "not_authorized"
	case 0x90:
		return "bad_topic"
	case 0x95:
		return "too_large"
	case 0x97:
		return "queue_full_or_rate_limited"
	case 0x99:
		return "bad_payload"
	}
	return fmt.Sprintf("reason_0x%02x", code)
}

func newID() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b) // crypto/rand.Read never fails (Go 1.24)
	return hex.EncodeToString(b)
}

// seen remembers the last n keys told.
type seen struct {
	mu   sync.Mutex
	keys map[string]struct{}
	ring []string
	next int
}

func newSeen(n int) *seen { return &seen{keys: make(map[string]struct{}, n), ring: make([]string, n)} }

// first reports whether key is new, and remembers it; "" is always new.
func (s *seen) first(key string) bool {
	if key == "" {
		return true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.keys[key]; ok {
		return false
	}
	if old := s.ring[s.next]; old != "" {
		delete(s.keys, old)
	}
	s.ring[s.next] = key
	s.next = (s.next + 1) % len(s.ring)
	s.keys[key] = struct{}{}
	return true
}
