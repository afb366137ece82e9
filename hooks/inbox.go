package hooks

import (
	"bytes"
	"errors"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/chatd/chatd/broker/msgpath"
	"github.com/chatd/chatd/broker/protocol/topic"
	"github.com/chatd/chatd/internal/mochi"
)

// Path is the message path the Inbox hook hands mochi's events to.
type Path interface {
	// Open registers a connection of a device.
	Open(c msgpath.Conn) (*msgpath.Session, error)
	// Subscribe starts feeding a device subscribed to its inbox.
	Subscribe(s *msgpath.Session) error
	// Unsubscribe stops feeding a device.
	Unsubscribe(s *msgpath.Session)
	// Acked takes a device's PUBACK.
	Acked(s *msgpath.Session, pid uint16)
	// Publish checks, stores and answers a client's publish.
	Publish(s *msgpath.Session, pub msgpath.Publish)
	// End ends a session opened by Open.
	End(s *msgpath.Session)
}

// Inbox connects mochi to the message path (broker/msgpath): it turns
// sessions, subscriptions, PUBACKs and publishes into calls of the path,
// and keeps mochi from handling the publishes itself.
type Inbox struct {
	mqtt.HookBase
	// Server disconnects clients.
	Server *mqtt.Server
	// Path stores and delivers messages.
	Path Path
	// Users holds each connected user's publish budget.
	Users *Users
	// Observe counts ended connections by reason.
	Observe DisconnectObserver
	// Log receives session errors; never message contents.
	Log *slog.Logger
	// Now is the clock of kept sessions' expiry; nil means time.Now.
	Now func() time.Time

	sessions sync.Map // *mqtt.Client -> *msgpath.Session
	closing  atomic.Bool
	registry mochi.Registry
}

// DisconnectObserver counts ended connections.
type DisconnectObserver interface {
	// Disconnected counts one ended connection by its reason.
	Disconnected(reason string)
}

// Closing tells the hook the server is shutting down.
func (h *Inbox) Closing() { h.closing.Store(true) }

// ID names the hook.
func (h *Inbox) ID() string { return "chatd-inbox" }

// Provides reports the events Inbox handles. mochi asks it for every
// packet it writes: OnPacketEncode, which takes and returns the whole
// packet by value, is provided only while a connection resumes a kept
// session, whose CONNACK it may change.
func (h *Inbox) Provides(b byte) bool {
	if b == mqtt.OnPacketEncode {
		return h.registry.AnyResuming()
	}
	return bytes.Contains([]byte{
		mqtt.OnSessionEstablish, mqtt.OnSessionEstablished, mqtt.OnDisconnect, mqtt.OnSubscribed,
		mqtt.OnUnsubscribed, mqtt.OnPublish, mqtt.OnPacketRead,
	}, []byte{b})
}

// OnSessionEstablish records cl as the newest connection of its client ID,
// before mochi takes over an older one and adds cl to its client map, and
// decides whether cl resumes a session the registry kept.
func (h *Inbox) OnSessionEstablish(cl *mqtt.Client, pk packets.Packet) {
	h.registry.Establish(h.Server, cl, h.now())
}

// OnPacketEncode sets Session Present in the successful CONNACK of a
// connection that resumes a session the registry kept, which mochi no
// longer holds (mochi.Registry).
func (h *Inbox) OnPacketEncode(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if pk.FixedHeader.Type == packets.Connack && pk.ReasonCode < packets.ErrUnspecifiedError.Code &&
		!pk.SessionPresent && h.registry.Resuming(cl) {
		pk.SessionPresent = true
	}
	return pk
}

func (h *Inbox) now() time.Time {
	if h.Now != nil {
		return h.Now()
	}
	return time.Now()
}

// sessionTTL is how long cl's session is kept once it closes: mochi's
// MaximumSessionExpiryInterval (chatd's device_ttl), or an MQTT 5
// client's shorter Session Expiry Interval; 0 for a clean session, which
// Abandon ends with expire unset.
func (h *Inbox) sessionTTL(cl *mqtt.Client) time.Duration {
	if cl.Properties.ProtocolVersion < 5 && cl.Properties.Clean {
		return 0
	}
	ttl := time.Duration(h.Server.Options.Capabilities.MaximumSessionExpiryInterval) * time.Second
	if cl.Properties.ProtocolVersion == 5 {
		ttl = min(ttl, time.Duration(cl.Properties.Props.SessionExpiryInterval)*time.Second)
	}
	return ttl
}

// DropSession discards the session the node keeps for clientID, and the
// one its connection here would leave: its device was removed, or it
// connected to another node.
func (h *Inbox) DropSession(clientID string) { h.registry.Drop(clientID) }

// DropUser discards the sessions the node keeps for user's devices, and
// those their connections here would leave: the user was erased.
func (h *Inbox) DropUser(user string) { h.registry.DropUser(user) }

// OnSessionEstablished opens the device's session on the message path,
// and restores the subscriptions of a session cl resumes: the inbox's
// feed starts as a SUBSCRIBE to it would start it.
func (h *Inbox) OnSessionEstablished(cl *mqtt.Client, pk packets.Packet) {
	resumed := h.registry.Resumed(cl)
	user := string(cl.Properties.Username)
	device, err := topic.ParseClientID(cl.ID, user)
	if err != nil {
		h.Log.Error("session with invalid client id", "client", cl.ID, "error", err)
		cl.Stop(err)
		return
	}
	v5 := cl.Properties.ProtocolVersion == 5
	s, err := h.Path.Open(msgpath.Conn{
		User: user, Device: device, ClientID: cl.ID, V5: v5,
		Transient:      (v5 && cl.Properties.Props.SessionExpiryInterval == 0) || (!v5 && cl.Properties.Clean),
		ReceiveMaximum: int(cl.Properties.Props.ReceiveMaximum),
		NoCopies:       noCopies(cl.Properties.Props.User),
		Out:            mochi.Conn{Client: cl},
		Budget:         h.Users.join(user),
		End:            cl.Stop,
	})
	if s == nil {
		h.Users.leave(user)
	} else {
		h.sessions.Store(cl, s)
	}
	if err != nil {
		h.Log.Error("open session", "client", cl.ID, "error", err)
		cl.Stop(err)
		return
	}
	if len(resumed) > 0 {
		h.resume(cl, s, resumed)
	}
}

// resume restores the subscriptions of the session cl resumed, and feeds
// the inbox if it was one of them.
func (h *Inbox) resume(cl *mqtt.Client, s *msgpath.Session, subs []mochi.Sub) {
	mochi.Restore(h.Server, cl, subs)
	inbox := topic.InboxOf(s.User())
	for _, sub := range subs {
		if sub.Filter == inbox {
			if err := h.Path.Subscribe(s); err != nil {
				h.Log.Error("resume subscription", "client", cl.ID, "error", err)
				cl.Stop(err)
			}
			return
		}
	}
}

// CopiesProperty is the MQTT 5 CONNECT user property by which a client
// asks, with the value "off", that what it sends make no copies for its
// user's other devices (PROTOCOL.md section 4).
const CopiesProperty = "carbons"

// noCopies reports whether CONNECT's user properties turn copies off.
func noCopies(props []packets.UserProperty) bool {
	for _, p := range props {
		if p.Key == CopiesProperty && p.Val == "off" {
			return true
		}
	}
	return false
}

// OnSubscribed starts feeding a device once it subscribes to its inbox.
func (h *Inbox) OnSubscribed(cl *mqtt.Client, pk packets.Packet, codes []byte) {
	s, ok := h.session(cl)
	if !ok {
		return
	}
	inbox := topic.InboxOf(s.User())
	for i, f := range pk.Filters {
		if f.Filter == inbox && i < len(codes) && codes[i] < 0x80 {
			if err := h.Path.Subscribe(s); err != nil {
				h.Log.Error("subscribe", "client", cl.ID, "error", err)
				cl.Stop(err)
			}
			return
		}
	}
}

// OnUnsubscribed stops feeding a device that unsubscribes from its inbox.
func (h *Inbox) OnUnsubscribed(cl *mqtt.Client, pk packets.Packet) {
	s, ok := h.session(cl)
	if !ok {
		return
	}
	inbox := topic.InboxOf(s.User())
	for _, f := range pk.Filters {
		if f.Filter == inbox {
			h.Path.Unsubscribe(s)
			return
		}
	}
}

// OnDisconnect ends the device's session, counts why the connection ended,
// and removes a persistent connection from mochi's client map.
func (h *Inbox) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	defer h.registry.Forget(h.Server, cl, expire, h.closing.Load(), h.now(), h.sessionTTL(cl))
	v, ok := h.sessions.LoadAndDelete(cl)
	if !ok {
		return
	}
	s := v.(*msgpath.Session)
	h.Path.End(s)
	h.Users.leave(s.User())
	reason := ReasonOf(cl.StopCause(), err)
	if h.Observe != nil {
		h.Observe.Disconnected(string(reason))
	}
	if reason.Abnormal() {
		h.Log.Info("connection ended", "client", cl.ID, "reason", string(reason), "error", errors.Join(cl.StopCause(), err))
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
	found.Stop(errAbandoned)
	h.OnDisconnect(found, errAbandoned, false)
}

// errAbandoned stops a connection whose serving goroutine panicked. Where
// that goroutine still reads, its read then fails on the closed
// connection and it ends the session first, with both errors.
var errAbandoned = errors.New("connection abandoned after a panic")

// errQoS2 ends an MQTT 3.1.1 connection that published at QoS 2.
var errQoS2 = errors.New("QoS 2 publish: the server grants at most QoS 1")

// OnPacketRead takes the device's PUBACKs for the server's own deliveries
// and answers the publishes mochi would otherwise mishandle.
func (h *Inbox) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	switch pk.FixedHeader.Type {
	case packets.Puback:
		if s, ok := h.session(cl); ok {
			h.Path.Acked(s, pk.PacketID)
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
			// The path refuses it as bad_topic, in publish order.
			if s, ok := h.session(cl); ok {
				h.Path.Publish(s, publishOf(pk))
			}
		}
	}
	return pk, nil
}

// OnPublish hands a client's publish to the message path, which answers
// it when it is durable. Returning ErrRejectPacket keeps mochi from
// acknowledging or routing it itself.
func (h *Inbox) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		return pk, nil // the server's own presence announcements
	}
	if s, ok := h.session(cl); ok {
		h.Path.Publish(s, publishOf(pk))
	}
	return pk, packets.ErrRejectPacket
}

func publishOf(pk packets.Packet) msgpath.Publish {
	return msgpath.Publish{Topic: pk.TopicName, Payload: pk.Payload, PacketID: pk.PacketID, QoS: pk.FixedHeader.Qos}
}

func (h *Inbox) session(cl *mqtt.Client) (*msgpath.Session, bool) {
	v, ok := h.sessions.Load(cl)
	if !ok {
		return nil, false
	}
	return v.(*msgpath.Session), true
}
