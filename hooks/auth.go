// Package hooks connects the mochi broker to chatd: who may connect, what
// they may subscribe to, and what happens to what they publish.
package hooks

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"golang.org/x/time/rate"

	"github.com/chatd/chatd/broker/token"
	"github.com/chatd/chatd/broker/topic"
)

// Auth checks client IDs and access tokens at CONNECT, caps keepalive, and
// allows subscriptions only to the client's own inbox and to presence topics.
type Auth struct {
	mqtt.HookBase
	// Server sends CONNACK refusals.
	Server *mqtt.Server
	// Verifier checks tokens.
	Verifier *token.Verifier
	// MaxSubscriptions caps one connection's subscriptions.
	MaxSubscriptions int
	// MaxKeepalive caps the keepalive a client may ask for, in seconds.
	MaxKeepalive uint16
	// Connects limits new connections, server-wide.
	Connects *rate.Limiter
	// Users counts each user's connections.
	Users *Users
	// Connected reports whether a client ID has a live connection, so a
	// session takeover is not counted against the user's cap.
	Connected func(clientID string) bool
	// MayAttach reports whether a device may connect under the user's cap on devices.
	MayAttach func(user, device string) (bool, error)

	expiries sync.Map // *mqtt.Client -> time.Time its token expires
	// Log receives refusals.
	Log *slog.Logger
}

// ID names the hook.
func (h *Auth) ID() string { return "chatd-auth" }

// Provides reports the events Auth handles.
func (h *Auth) Provides(b byte) bool {
	return bytes.Contains([]byte{mqtt.OnConnect, mqtt.OnConnectAuthenticate, mqtt.OnACLCheck, mqtt.OnDisconnect}, []byte{b})
}

// OnConnect checks the username and client ID before authentication, so a
// bad client ID gets "identifier rejected" rather than a bad-password code.
func (h *Auth) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	user := string(pk.Connect.Username)
	if pk.Connect.ClientIdentifier == "" && topic.ValidUser(user) {
		// mochi has assigned a random ID and would tell an MQTT 5 client
		// so in the CONNACK: tell it the ID it really has, which it may
		// reconnect with.
		cl.ID = user
		cl.Properties.Props.AssignedClientID = user
	}
	if !topic.ValidUser(user) {
		return h.refuse(cl, packets.ErrBadUsernameOrPassword, fmt.Errorf("username %q is not a valid user ID", user))
	}
	device, err := topic.ParseClientID(cl.ID, user)
	if err != nil {
		return h.refuse(cl, packets.ErrClientIdentifierNotValid, err)
	}
	// The token is checked here rather than in OnConnectAuthenticate so
	// that the connect rate below is spent by authenticated clients only:
	// a flood of bad CONNECTs must not lock everyone else out.
	exp, err := h.Verifier.Verify(string(pk.Connect.Password), user)
	if err != nil {
		return h.refuse(cl, packets.ErrBadUsernameOrPassword, fmt.Errorf("user %s: %w", user, err))
	}
	h.expiries.Store(cl, exp)
	// A Will would be published by mochi as this client, past every check
	// of the message path (spoofed envelopes, retained presence, packet IDs
	// of our own deliveries): the protocol has none, so it is dropped.
	cl.Properties.Will = mqtt.Will{}
	busy := packets.ErrServerBusy
	if cl.Properties.ProtocolVersion < 5 {
		busy = packets.ErrServerUnavailable
	}
	if !h.Connects.Allow() {
		return h.refuse(cl, busy, errors.New("connect rate limit"))
	}
	quota := packets.ErrQuotaExceeded
	if cl.Properties.ProtocolVersion < 5 {
		quota = packets.ErrServerUnavailable
	}
	if n := h.Users.Connections(user); n >= h.Users.MaxConnections && !h.Connected(cl.ID) {
		return h.refuse(cl, quota, fmt.Errorf("user %s has %d connections, the limit", user, n))
	}
	// Device names are the client's choice: without a cap, one user could
	// register devices without end, each holding messages back.
	if ok, err := h.MayAttach(user, device); err != nil {
		return h.refuse(cl, busy, fmt.Errorf("check devices of %s: %w", user, err))
	} else if !ok {
		return h.refuse(cl, quota, fmt.Errorf("user %s has the most devices allowed", user))
	}
	if ka := cl.State.Keepalive; ka == 0 || ka > h.MaxKeepalive {
		cl.State.Keepalive = h.MaxKeepalive
		cl.State.ServerKeepalive = true
	}
	return nil
}

func (h *Auth) refuse(cl *mqtt.Client, code packets.Code, err error) error {
	h.Log.Info("connect refused", "remote", cl.Net.Remote, "reason", err.Error())
	if sendErr := h.Server.SendConnack(cl, code, false, nil); sendErr != nil {
		return fmt.Errorf("refuse connect: %w (sending connack: %w)", err, sendErr)
	}
	return fmt.Errorf("refuse connect: %w", err)
}

// TokenExpiry returns when the token cl connected with expires.
func (h *Auth) TokenExpiry(cl *mqtt.Client) (time.Time, bool) {
	v, ok := h.expiries.Load(cl)
	if !ok {
		return time.Time{}, false
	}
	return v.(time.Time), true
}

// OnDisconnect forgets the client's token expiry.
func (h *Auth) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	h.expiries.Delete(cl)
}

// OnConnectAuthenticate accepts the clients OnConnect let through: it has
// checked their tokens already.
func (h *Auth) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	return true
}

// OnACLCheck allows every publish (OnPublish decides, so that a v3 client
// gets an error event instead of being disconnected) and only the
// protocol's subscriptions.
func (h *Auth) OnACLCheck(cl *mqtt.Client, filter string, write bool) bool {
	if write {
		return true
	}
	if !topic.MaySubscribe(string(cl.Properties.Username), filter) {
		return false
	}
	// Each subscription costs memory in mochi's topic tree: past the cap
	// only filters the client already has are granted (again). mochi
	// checks and adds one filter at a time, so the count is exact.
	if _, has := cl.State.Subscriptions.Get(filter); !has && cl.State.Subscriptions.Len() >= h.MaxSubscriptions {
		return false
	}
	return true
}
