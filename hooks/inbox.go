package hooks

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/chatd/chatd/broker/msgpath/delivery"
	"github.com/chatd/chatd/broker/msgpath/wire"
	"github.com/chatd/chatd/broker/presence"
	"github.com/chatd/chatd/broker/protocol/envelope"
	"github.com/chatd/chatd/broker/protocol/topic"
	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/service/groups"
)

// Error codes of PROTOCOL.md section 5.
const (
	CodeNotAuthorized = "not_authorized"
	CodeBadTopic      = "bad_topic"
	CodeTooLarge      = "too_large"
	CodeBadPayload    = "bad_payload"
	CodeQueueFull     = "queue_full"
	CodeRateLimited   = "rate_limited"
	CodeUnknownGroup  = "unknown_group"

	// refusedNoSpace labels, in metrics only, publishes refused for lack
	// of disk space: clients see them as any other failure to store.
	refusedNoSpace = "no_space"
)

// reasonCodes maps a protocol error code to its MQTT 5 PUBACK reason code.
var reasonCodes = map[string]byte{
	CodeNotAuthorized: 0x87,
	CodeBadTopic:      0x90,
	CodeTooLarge:      0x95,
	CodeQueueFull:     0x97,
	CodeRateLimited:   0x97,
	CodeBadPayload:    0x99,
	CodeUnknownGroup:  0x90,
}

// errTokenExpired ends a session whose access token expired.
var errTokenExpired = errors.New("access token expired")

// unspecifiedError is the MQTT 5 reason code for a publish the server failed to store.
const unspecifiedError = 0x80

// Store is the durable queue the inbox hook writes to.
type Store interface {
	// Append queues a request for the committer.
	Append(r *queue.Request)
	// TryAppend queues a request unless the committer is saturated.
	TryAppend(r *queue.Request) bool
	// Attach registers a connected device and returns its cursor and
	// whether it subscribed to its inbox before.
	Attach(user, device string, transient bool) (cursor uint64, subscribed bool, err error)
	// Cursor returns the last sequence a registered device acknowledged.
	Cursor(user, device string) (uint64, error)
	// SetSubscribed records whether a device is subscribed to its inbox.
	SetSubscribed(user, device string, subscribed bool)
	// Detach records that a device disconnected.
	Detach(user, device string)
}

// Peers tells the other nodes of a cluster what happens on this one.
type Peers interface {
	// Typing passes a typing signal to user's devices on the other nodes.
	Typing(user, topic string, payload []byte)
	// SessionStarted ends the sessions of clientID on the other nodes.
	SessionStarted(clientID string)
}

// Observer counts what the message path does, for metrics.
type Observer interface {
	// Connected counts an established session.
	Connected()
	// Refused counts a refused publish by its protocol error code.
	Refused(code string)
	// Delayed counts a publish held back to its sender's rate.
	Delayed()
}

// Inbox turns publishes into durable queue entries and feeds subscribed
// devices: the message path of PROTOCOL.md sections 1, 3 and 5.
type Inbox struct {
	mqtt.HookBase
	// Server disconnects clients.
	Server *mqtt.Server
	// Queue stores messages.
	Queue Store
	// Delivery feeds online devices.
	Delivery *delivery.Delivery
	// Presence announces users coming online and going offline.
	Presence *presence.Tracker
	// Groups holds group memberships.
	Groups *groups.Store
	// Observe counts sessions and refusals.
	Observe Observer
	// Users holds each connected user's connection count and publish budgets.
	Users *Users
	// Peers is set in a cluster; nil on a single node.
	Peers Peers
	// TokenExpiry returns when the token a client connected with expires;
	// the client is disconnected then, to reconnect with a fresh one.
	TokenExpiry func(cl *mqtt.Client) (time.Time, bool)
	// MaxMessageBytes caps a message object.
	MaxMessageBytes int
	// MaxInflight caps unacknowledged deliveries per device.
	MaxInflight int
	// MaxPendingBytes disconnects a client that stops reading.
	MaxPendingBytes int
	// Log receives session errors; never message contents.
	Log *slog.Logger

	sessions sync.Map // *mqtt.Client -> *session
	current  sync.Map // client ID -> *session, the newest connection of each device
	closing  atomic.Bool

	// registry orders the removal of a closed connection from mochi's
	// client map against the registration of a newer one of the same
	// client ID (see unregister).
	registry sync.Mutex
	// newest is each client ID's latest connection to pass CONNECT,
	// under registry.
	newest map[string]*mqtt.Client
}

// Closing tells the hook the server is shutting down.
func (h *Inbox) Closing() { h.closing.Store(true) }

// session is one connection of one device.
type session struct {
	cl           *mqtt.Client
	user, device string
	clientID     string
	v5           bool
	transient    bool
	window       int
	w            *wire.Writer
	// dev is set once the inbox is subscribed; only the client's own
	// goroutine touches it.
	dev *delivery.Device
	// budget is the user's publish budget, shared by its connections.
	budget *userState
	// expiry disconnects the client when its token expires.
	expiry *time.Timer
}

// ID names the hook.
func (h *Inbox) ID() string { return "chatd-inbox" }

// Provides reports the events Inbox handles.
func (h *Inbox) Provides(b byte) bool {
	return bytes.Contains([]byte{
		mqtt.OnSessionEstablish, mqtt.OnSessionEstablished, mqtt.OnDisconnect, mqtt.OnSubscribed,
		mqtt.OnUnsubscribed, mqtt.OnPublish, mqtt.OnPacketRead,
	}, []byte{b})
}

// OnSessionEstablish records cl as the newest connection of its client ID,
// before mochi takes over an older one and adds cl to its client map.
func (h *Inbox) OnSessionEstablish(cl *mqtt.Client, pk packets.Packet) {
	h.registry.Lock()
	defer h.registry.Unlock()
	if h.newest == nil {
		h.newest = make(map[string]*mqtt.Client)
	}
	h.newest[cl.ID] = cl
}

// OnSessionEstablished registers the device and, when it subscribed to its
// inbox on an earlier connection, starts feeding it: its subscription is
// kept with the device, not in mochi's in-memory session.
func (h *Inbox) OnSessionEstablished(cl *mqtt.Client, pk packets.Packet) {
	user := string(cl.Properties.Username)
	device, err := topic.ParseClientID(cl.ID, user)
	if err != nil {
		h.Log.Error("session with invalid client id", "client", cl.ID, "error", err)
		cl.Stop(err)
		return
	}
	v5 := cl.Properties.ProtocolVersion == 5
	s := &session{
		cl: cl, user: user, device: device, clientID: cl.ID, v5: v5,
		transient: (v5 && cl.Properties.Props.SessionExpiryInterval == 0) || (!v5 && cl.Properties.Clean),
		window:    h.MaxInflight,
		w:         wire.NewWriter(wire.MochiConn{Client: cl, Server: h.Server}, v5, h.MaxPendingBytes),
	}
	if rm := int(cl.Properties.Props.ReceiveMaximum); v5 && rm > 0 && rm < s.window {
		s.window = rm
	}
	cursor, subscribed, err := h.Queue.Attach(user, device, s.transient)
	if err != nil {
		h.Log.Error("register device", "client", cl.ID, "error", err)
		cl.Stop(err)
		return
	}
	s.budget = h.Users.join(user)
	if exp, ok := h.TokenExpiry(cl); ok {
		s.expiry = time.AfterFunc(time.Until(exp), func() { cl.Stop(errTokenExpired) })
	}
	h.sessions.Store(cl, s)
	h.current.Store(cl.ID, s)
	h.Presence.Connected(user)
	if h.Peers != nil {
		h.Peers.SessionStarted(cl.ID)
	}
	h.Observe.Connected()
	if subscribed {
		h.startDelivery(cl, s, cursor)
	}
}

// OnSubscribed starts feeding a device once it subscribes to its inbox.
func (h *Inbox) OnSubscribed(cl *mqtt.Client, pk packets.Packet, codes []byte) {
	s, ok := h.session(cl)
	if !ok || s.dev != nil {
		return
	}
	inbox := topic.InboxOf(s.user)
	for i, f := range pk.Filters {
		if f.Filter == inbox && i < len(codes) && codes[i] < 0x80 {
			// Read the cursor now: a taken-over connection may have
			// advanced it since this session was registered.
			cursor, err := h.Queue.Cursor(s.user, s.device)
			if err != nil {
				h.Log.Error("read device cursor", "client", cl.ID, "error", err)
				cl.Stop(err)
				return
			}
			h.Queue.SetSubscribed(s.user, s.device, true)
			h.startDelivery(cl, s, cursor)
			return
		}
	}
}

// OnUnsubscribed stops feeding a device that unsubscribes from its inbox;
// its messages wait in the queue.
func (h *Inbox) OnUnsubscribed(cl *mqtt.Client, pk packets.Packet) {
	s, ok := h.session(cl)
	if !ok || s.dev == nil {
		return
	}
	inbox := topic.InboxOf(s.user)
	for _, f := range pk.Filters {
		if f.Filter == inbox {
			h.Delivery.Stop(s.dev)
			s.dev = nil
			h.Queue.SetSubscribed(s.user, s.device, false)
			return
		}
	}
}

func (h *Inbox) startDelivery(cl *mqtt.Client, s *session, cursor uint64) {
	dev, err := h.Delivery.Start(s.user, s.device, cursor, s.window, s.w)
	if err != nil {
		h.Log.Error("start delivery", "client", cl.ID, "error", err)
		cl.Stop(err)
		return
	}
	s.dev = dev
}

// OnDisconnect stops feeding the device; its unacknowledged messages wait
// in the queue for its next connection.
func (h *Inbox) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	defer h.unregister(cl, expire)
	v, ok := h.sessions.LoadAndDelete(cl)
	if !ok {
		return
	}
	s := v.(*session)
	if s.dev != nil {
		h.Delivery.Stop(s.dev)
	}
	s.w.Close()
	if s.expiry != nil {
		s.expiry.Stop()
	}
	h.Users.leave(s.user)
	h.Presence.Disconnected(s.user)
	h.current.CompareAndDelete(s.clientID, s)
	// Every Attach is matched by one Detach, a taken-over connection's
	// too: the store counts a device's connections, and only when the last
	// is gone does it forget a transient device or start its device_ttl.
	h.Queue.Detach(s.user, s.device)
}

// unregister removes a closed persistent connection from mochi's client
// map, which would otherwise hold every disconnected session in memory
// for device_ttl: the device's queue and subscription are kept by chatd.
//
// mochi's map has no compare-and-delete, and a newer connection of the
// same client ID may be added to it at any time: a Get and Delete without
// a lock could remove the newer one, which a later takeover would then
// miss. mochi adds a connection after OnSessionEstablish, so that hook
// records it under registry, and only the newest connection to pass it
// removes itself, under registry too: a newer one is either recorded
// already, and nothing is removed, or waits in OnSessionEstablish, and is
// added after the removal. Unsubscribing happens under the lock for the
// same reason: mochi's topic tree keys subscriptions by client ID, which
// the newer connection shares.
//
// A connection whose CONNACK mochi fails to write gets no OnDisconnect;
// its entry stays until its client ID connects again, as the client
// stays in mochi's own map.
func (h *Inbox) unregister(cl *mqtt.Client, expire bool) {
	h.registry.Lock()
	defer h.registry.Unlock()
	if h.newest[cl.ID] != cl {
		return
	}
	delete(h.newest, cl.ID)
	// mochi removes a clean session itself. During shutdown mochi walks
	// its client map holding a read lock it takes twice
	// (Clients.GetByListener calls Len): a Delete waiting between the two
	// deadlocks the shutdown. The map dies with the process then anyway.
	if expire || cl.IsTakenOver() || h.closing.Load() {
		return
	}
	h.Server.UnsubscribeClient(cl)
	if cur, ok := h.Server.Clients.Get(cl.ID); ok && cur == cl {
		h.Server.Clients.Delete(cl.ID)
	}
}

// Abandon cleans up after a connection whose serving goroutine panicked,
// which mochi ends without its disconnect hooks.
func (h *Inbox) Abandon(conn net.Conn) {
	var found *mqtt.Client
	h.sessions.Range(func(k, _ any) bool {
		if cl := k.(*mqtt.Client); cl.Net.Conn == conn {
			found = cl
			return false
		}
		return true
	})
	if found == nil {
		return
	}
	h.OnDisconnect(found, errors.New("connection abandoned after a panic"), false)
	found.Stop(errors.New("connection abandoned after a panic"))
}

// errQoS2 ends an MQTT 3.1.1 connection that published at QoS 2.
var errQoS2 = errors.New("QoS 2 publish: the server grants at most QoS 1")

// OnPacketRead takes the device's PUBACKs for the server's own deliveries
// and answers the publishes mochi would otherwise mishandle.
func (h *Inbox) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	switch pk.FixedHeader.Type {
	case packets.Puback:
		if s, ok := h.session(cl); ok && s.dev != nil {
			h.Delivery.Acked(s.dev, pk.PacketID)
		}
	case packets.Publish:
		if pk.FixedHeader.Qos > 1 {
			// mochi would downgrade it to QoS 1, store it and answer with
			// a PUBACK, which a QoS 2 sender takes for a protocol error.
			// The CONNACK said Maximum QoS 1: an MQTT 5 client is told why
			// it is disconnected, a 3.1.1 one has no way to be. Returning
			// ErrRejectPacket ends the connection: nothing is stored.
			if cl.Properties.ProtocolVersion == 5 {
				// DisconnectClient returns the code it disconnected with.
				_ = h.Server.DisconnectClient(cl, packets.ErrQosNotSupported)
			} else {
				cl.Stop(errQoS2)
			}
			return pk, packets.ErrRejectPacket
		}
		// mochi drops a publish to a topic it reserves ($SYS/..., $share,
		// $share/{group}) before OnPublish, without a PUBACK, which
		// would leave a phone's outbox stuck: it is answered here like
		// any refused publish. Malformed publishes fail mochi's own
		// PublishValidate after this hook and close the connection.
		if pk.PublishValidate(h.Server.Options.Capabilities.TopicAliasMaximum) == packets.CodeSuccess &&
			!mqtt.IsValidFilter(pk.TopicName, true) {
			// Always ErrRejectPacket, and mochi drops the packet anyway.
			_, _ = h.OnPublish(cl, pk)
		}
	}
	return pk, nil
}

// OnPublish validates a publish and queues it; the PUBACK is sent when the
// message is durable. Returning ErrRejectPacket keeps mochi from
// acknowledging or routing it itself.
func (h *Inbox) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		return pk, nil // the server's own presence announcements
	}
	s, ok := h.session(cl)
	if !ok {
		return pk, packets.ErrRejectPacket
	}
	ok, waited := s.budget.spend(len(pk.Payload))
	if waited {
		h.Observe.Delayed()
	}
	if !ok {
		h.refuse(s, pk, CodeRateLimited, "publish rate limit: slow down")
		return pk, packets.ErrRejectPacket
	}
	kind, to := topic.Parse(pk.TopicName)
	switch kind {
	case topic.Inbox:
		h.publishInbox(s, pk, to)
	case topic.Group:
		h.publishGroup(s, pk, to)
	case topic.Receipt:
		h.publishReceipt(s, pk, to)
	case topic.Typing:
		h.publishTyping(s, pk, to)
	case topic.Presence:
		h.refuse(s, pk, CodeNotAuthorized, "presence topics are published by the server only")
	default:
		h.refuse(s, pk, CodeBadTopic, fmt.Sprintf("cannot publish to %q", pk.TopicName))
	}
	return pk, packets.ErrRejectPacket
}

func (h *Inbox) publishInbox(s *session, pk packets.Packet, to string) {
	id, ok := h.validate(s, pk, envelope.Validate)
	if !ok {
		return
	}
	h.Queue.Append(&queue.Request{
		To: to, Sender: s.user, ID: id, Meta: envelope.Meta(s.user, "", id),
		Data: envelope.Message(s.user, to, "", time.Now().UnixMilli(), pk.Payload),
		Done: h.answer(s, pk, id, fmt.Sprintf("the queue of %s is full", to)),
	})
}

// validate checks a payload with check and refuses the publish with the
// matching error code when it fails.
func (h *Inbox) validate(s *session, pk packets.Packet, check func([]byte, int) (string, error)) (string, bool) {
	v, err := check(pk.Payload, h.MaxMessageBytes)
	switch {
	case errors.Is(err, envelope.ErrTooLarge):
		h.refuse(s, pk, CodeTooLarge, err.Error())
		return "", false
	case err != nil:
		h.refuse(s, pk, CodeBadPayload, err.Error())
		return "", false
	}
	return v, true
}

// answer returns the Done of a stored publish: the PUBACK, or the refusal.
func (h *Inbox) answer(s *session, pk packets.Packet, id, fullReason string) func(queue.Status, queue.Message, error) {
	pid, qos1 := pk.PacketID, pk.FixedHeader.Qos > 0
	return func(st queue.Status, _ queue.Message, err error) {
		switch st {
		case queue.Stored, queue.Duplicate, queue.Passed:
			if qos1 {
				s.w.Puback(pid, 0)
				s.w.Flush(false)
			}
		case queue.Full:
			h.refuseStored(s, pid, qos1, id, CodeQueueFull, fullReason)
		default:
			h.failed(s, pid, qos1, err)
		}
	}
}

// refuse answers a publish that is refused before it reaches the queue.
// The answer goes through the committer so PUBACKs stay in publish order.
func (h *Inbox) refuse(s *session, pk packets.Packet, code, reason string) {
	h.Observe.Refused(code)
	pid, qos1 := pk.PacketID, pk.FixedHeader.Qos > 0
	if s.v5 {
		if qos1 {
			h.Queue.Append(&queue.Request{Done: func(queue.Status, queue.Message, error) {
				s.w.Puback(pid, reasonCodes[code])
				s.w.Flush(false)
			}})
		}
		return
	}
	h.Queue.Append(&queue.Request{
		To:   s.user,
		Data: envelope.Error(envelope.RefOf(pk.Payload), code, reason),
		Done: func(queue.Status, queue.Message, error) {
			if qos1 {
				s.w.Puback(pid, 0)
				s.w.Flush(false)
			}
		},
	})
}

// refuseStored answers a publish the committer refused; it runs on the
// committer goroutine, so it must not wait for the committer.
func (h *Inbox) refuseStored(s *session, pid uint16, qos1 bool, ref, code, reason string) {
	h.Observe.Refused(code)
	if s.v5 {
		if qos1 {
			s.w.Puback(pid, reasonCodes[code])
			s.w.Flush(false)
		}
		return
	}
	if qos1 {
		s.w.Puback(pid, 0)
		s.w.Flush(false)
	}
	ok := h.Queue.TryAppend(&queue.Request{
		To: s.user, Data: envelope.Error(ref, code, reason),
		Done: func(queue.Status, queue.Message, error) {},
	})
	if !ok {
		h.Log.Warn("error event dropped: queue busy", "user", s.user, "code", code)
	}
}

// failed answers a publish that could not be stored. A v3 client has no
// negative PUBACK, so it is disconnected and will resend after reconnecting.
func (h *Inbox) failed(s *session, pid uint16, qos1 bool, err error) {
	if errors.Is(err, queue.ErrNoSpace) {
		// The store logs the low-disk state once; a line per refused
		// publish would fill the disk's last room with logs.
		h.Observe.Refused(refusedNoSpace)
	} else {
		h.Log.Error("store message", "user", s.user, "error", err)
	}
	h.resend(s, pid, qos1, err)
}

// notStored answers, in publish order, a publish that could not be stored
// for err, already logged: as failed does, so that the client resends it.
func (h *Inbox) notStored(s *session, pk packets.Packet, err error) {
	pid, qos1 := pk.PacketID, pk.FixedHeader.Qos > 0
	h.Queue.Append(&queue.Request{Done: func(queue.Status, queue.Message, error) {
		h.resend(s, pid, qos1, err)
	}})
}

// resend asks the client to send a publish again: MQTT 5 PUBACK 0x80, or
// for v3 the end of the connection (PROTOCOL.md section 9).
func (h *Inbox) resend(s *session, pid uint16, qos1 bool, err error) {
	if s.v5 {
		if qos1 {
			s.w.Puback(pid, unspecifiedError)
			s.w.Flush(false)
		}
		return
	}
	// The connection the publish came on; stopping one already closed
	// does nothing.
	s.cl.Stop(fmt.Errorf("publish not stored, to be sent again: %w", err))
}

// Connected reports whether clientID has a live connection.
func (h *Inbox) Connected(clientID string) bool {
	_, ok := h.current.Load(clientID)
	return ok
}

func (h *Inbox) session(cl *mqtt.Client) (*session, bool) {
	v, ok := h.sessions.Load(cl)
	if !ok {
		return nil, false
	}
	return v.(*session), true
}
