package hooks

import (
	"fmt"
	"log/slog"
	"strings"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/chatd/chatd/broker/msgpath/wire"
	"github.com/chatd/chatd/broker/protocol/topic"
	"github.com/chatd/chatd/internal/mochi"
)

// Retained is where the presence states a new subscriber is sent come from.
type Retained interface {
	// Retained calls fn with the topic and message of the last state of
	// every user the presence filter matches, and stops at fn's first error.
	Retained(filter string, fn func(topic string, msg []byte) error) error
}

// retainedChunk bounds the presence states buffered before a write, so
// that a presence/+ subscriber of a large server costs bounded memory.
const retainedChunk = 64 << 10

// Presence sends a new subscriber of presence topics the last state of
// every user its filters match, flagged retained, as MQTT sends retained
// messages. The states come from the presence store rather than mochi's
// retained messages, which keeps every user's state in memory and walks
// them all every second.
type Presence struct {
	mqtt.HookBase
	// Retained reads the stored states.
	Retained Retained
	// Log receives read and write errors.
	Log *slog.Logger
}

// ID names the hook.
func (h *Presence) ID() string { return "chatd-presence" }

// Provides reports the events Presence handles.
func (h *Presence) Provides(b byte) bool { return b == mqtt.OnSubscribe || b == mqtt.OnSubscribed }

// OnSubscribe turns MQTT 5's Retain Handling 1 ("only for a new
// subscription") into 2 ("none") for a presence filter the client is
// already subscribed to: mochi tells OnSubscribed only what it granted,
// not whether the subscription existed, which it knows only before it
// subscribes.
func (h *Presence) OnSubscribe(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	for i, f := range pk.Filters {
		if f.RetainHandling != 1 || !strings.HasPrefix(f.Filter, topic.PresencePrefix) {
			continue
		}
		if _, existed := cl.State.Subscriptions.Get(f.Filter); existed {
			pk.Filters[i].RetainHandling = 2
		}
	}
	return pk
}

// OnSubscribed sends the stored states of the presence filters granted.
// mochi calls it just before it writes the SUBACK, which MQTT allows
// ("the Server is permitted to start sending PUBLISH packets matching
// the Subscription before the Server sends the SUBACK"). A failed write
// closes the connection.
func (h *Presence) OnSubscribed(cl *mqtt.Client, pk packets.Packet, codes []byte) {
	if cl.Net.Inline {
		return // the server's own client has no connection to write to
	}
	v5 := cl.Properties.ProtocolVersion == 5
	out := mochi.Conn{Client: cl}
	var buf []byte
	for i, f := range pk.Filters {
		if i >= len(codes) || codes[i] >= packets.ErrUnspecifiedError.Code ||
			!strings.HasPrefix(f.Filter, topic.PresencePrefix) || f.RetainHandling == 2 {
			continue
		}
		err := h.Retained.Retained(f.Filter, func(name string, msg []byte) error {
			buf = wire.AppendRetained(buf, v5, name, msg)
			if len(buf) < retainedChunk {
				return nil
			}
			err := out.Write(buf)
			buf = buf[:0]
			return err
		})
		if err != nil {
			h.fail(cl, fmt.Errorf("send presence states of %s: %w", f.Filter, err))
			return
		}
	}
	if len(buf) > 0 {
		if err := out.Write(buf); err != nil {
			h.fail(cl, fmt.Errorf("send presence states: %w", err))
		}
	}
}

// fail logs why the states could not be sent and closes the connection,
// whose subscriber would otherwise go on without them.
func (h *Presence) fail(cl *mqtt.Client, err error) {
	h.Log.Warn("presence subscriber closed", "client", cl.ID, "error", err)
	cl.Stop(err)
}
