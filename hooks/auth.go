// Package hooks connects the mochi broker to chatd: who may connect, what
// they may subscribe to, and what happens to what they publish.
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
	"golang.org/x/time/rate"

	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/chatd/chatd/broker/protocol/topic"
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
	// MayAttach reports whether a device may connect under the user's cap on devices.
	MayAttach func(user, device string) (bool, error)
	// Banned, if set, returns the reason of a ban that holds for user.
	Banned func(user string) (reason string, banned bool)
	// Revoked, if set, reports whether a valid token was revoked.
	Revoked func(c token.Claims) bool

	// Log receives refusals.
	Log *slog.Logger

	// admitted holds, for the connection of each client OnConnect let
	// through, what its end must undo. It is keyed by the connection, not
	// the client, so that Ended finds it: every net.Conn mochi's listeners
	// make is a pointer, hence a valid key.
	admitted sync.Map // net.Conn -> *admission
	// live holds the newest established connection of each client ID, so
	// that a session takeover is not counted against the user's cap.
	live sync.Map // client ID -> *mqtt.Client
}

// admission is what OnConnect holds for a client it let through.
type admission struct {
	// user holds one of its connection seats (Users.reserve).
	user string
	// expiry is when the client's token expires, Unix nanoseconds: a
	// re-authentication moves it.
	expiry atomic.Int64
	// claims are the token's, for revocations; a re-authentication
	// replaces them.
	claims atomic.Pointer[token.Claims]
	// timer ends the session at expiry, once it is established.
	timer atomic.Pointer[time.Timer]
	// client is the established session, whose live entry goes with it.
	client atomic.Pointer[mqtt.Client]
}

// ID names the hook.
func (h *Auth) ID() string { return "chatd-auth" }

// Provides reports the events Auth handles.
func (h *Auth) Provides(b byte) bool {
	return bytes.Contains([]byte{mqtt.OnConnect, mqtt.OnConnectAuthenticate, mqtt.OnSessionEstablish, mqtt.OnACLCheck, mqtt.OnDisconnect, mqtt.OnAuthPacket}, []byte{b})
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
	claims, exp, err := h.verify(string(pk.Connect.Password), user)
	if err != nil {
		code := packets.ErrBadUsernameOrPassword
		if errors.Is(err, ErrTokenRevoked) && cl.Properties.ProtocolVersion == 5 {
			code = packets.ErrNotAuthorized
		}
		return h.refuse(cl, code, fmt.Errorf("user %s: %w", user, err))
	}
	if h.Banned != nil {
		if reason, banned := h.Banned(user); banned {
			code := packets.ErrBanned
			if cl.Properties.ProtocolVersion < 5 {
				code = packets.ErrBadUsernameOrPassword // 3.1.1: not authorized
			}
			return h.refuse(cl, code, fmt.Errorf("user %s is banned: %s", user, reason))
		}
	}
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
	_, takeover := h.live.Load(cl.ID)
	n, ok := h.Users.reserve(user, takeover)
	if !ok {
		return h.refuse(cl, quota, fmt.Errorf("user %s has %d connections, the limit", user, n))
	}
	// mochi runs no hook for a client OnConnect refuses: until the client
	// is admitted below, its seat is given back on the way out, whatever
	// the way.
	admitted := false
	defer func() {
		if !admitted {
			h.Users.release(user)
		}
	}()
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
	a := &admission{user: user}
	a.expiry.Store(exp.UnixNano())
	a.claims.Store(&claims)
	h.admitted.Store(cl.Net.Conn, a)
	admitted = true
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
	v, ok := h.admitted.Load(cl.Net.Conn)
	if !ok {
		return time.Time{}, false
	}
	return time.Unix(0, v.(*admission).expiry.Load()), true
}

// verify checks tok for user, revocations included, and returns its
// claims and until when it is accepted.
func (h *Auth) verify(tok, user string) (token.Claims, time.Time, error) {
	c, err := h.Verifier.Check(tok)
	if err != nil {
		return c, time.Time{}, err
	}
	if c.User != user {
		return c, time.Time{}, fmt.Errorf("%w: it names user %q, not username %q", token.ErrInvalid, c.User, user)
	}
	if h.Revoked != nil && h.Revoked(c) {
		return c, time.Time{}, ErrTokenRevoked
	}
	return c, h.Verifier.AcceptedUntil(c), nil
}

// EndRevoked ends the sessions on this node whose tokens match reports
// revoked: MQTT 5 clients get DISCONNECT 0x87 (not authorized).
func (h *Auth) EndRevoked(match func(token.Claims) bool) {
	h.admitted.Range(func(_, v any) bool {
		a := v.(*admission)
		cl := a.client.Load()
		if c := a.claims.Load(); cl != nil && c != nil && match(*c) {
			h.Log.Info("session ended: token revoked", "client", cl.ID)
			if cl.Properties.ProtocolVersion == 5 {
				_ = h.Server.DisconnectClient(cl, packets.ErrNotAuthorized) // returns the code it sent
			} else {
				cl.Stop(ErrTokenRevoked)
			}
		}
		return true
	})
}

// AuthMethod is the MQTT 5 Authentication Method of a re-authentication
// with a fresh token (PROTOCOL.md section 6).
const AuthMethod = "chatd-token"

// OnAuthPacket takes an MQTT 5 client's re-authentication: an AUTH packet
// with reason 0x19, method AuthMethod and a fresh token for the same user
// as its data. A valid one moves the session's end to the new token's
// expiry and is answered with AUTH success; any other ends the
// connection (DISCONNECT 0x8C bad method, 0x82 protocol error, 0x87 not
// authorized, 0x8A banned), as a token refused at CONNECT would.
func (h *Auth) OnAuthPacket(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if m := pk.Properties.AuthenticationMethod; m != AuthMethod {
		h.Log.Info("re-authentication refused", "client", cl.ID, "reason", fmt.Sprintf("method %q, want %q", m, AuthMethod))
		return pk, packets.ErrBadAuthenticationMethod
	}
	if pk.ReasonCode != packets.CodeReAuthenticate.Code {
		h.Log.Info("re-authentication refused", "client", cl.ID, "reason", fmt.Sprintf("reason code 0x%02x, want 0x19", pk.ReasonCode))
		return pk, packets.ErrProtocolViolation
	}
	v, ok := h.admitted.Load(cl.Net.Conn)
	if !ok {
		return pk, packets.ErrNotAuthorized
	}
	a := v.(*admission)
	claims, exp, err := h.verify(string(pk.Properties.AuthenticationData), a.user)
	if err != nil {
		h.Log.Info("re-authentication refused", "client", cl.ID, "reason", err.Error())
		return pk, packets.ErrNotAuthorized
	}
	if h.Banned != nil {
		if reason, banned := h.Banned(a.user); banned {
			h.Log.Info("re-authentication refused", "client", cl.ID, "reason", "banned: "+reason)
			return pk, packets.ErrBanned
		}
	}
	a.expiry.Store(exp.UnixNano())
	a.claims.Store(&claims)
	if t := a.timer.Load(); t != nil {
		t.Reset(time.Until(exp))
	}
	ack := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Auth},
		ReasonCode:  packets.CodeSuccess.Code,
		Properties:  packets.Properties{AuthenticationMethod: AuthMethod},
	}
	if err := cl.WritePacket(ack); err != nil {
		return pk, fmt.Errorf("answer re-authentication: %w", err)
	}
	return pk, nil
}

// OnSessionEstablish records cl as the live connection of its client ID,
// before mochi writes the CONNACK (a client may connect again, a takeover,
// the moment it reads it), and disconnects it when its token expires, to
// reconnect with a fresh one. A connection whose CONNACK cannot be written
// is forgotten by Ended.
func (h *Auth) OnSessionEstablish(cl *mqtt.Client, pk packets.Packet) {
	h.live.Store(cl.ID, cl)
	if v, ok := h.admitted.Load(cl.Net.Conn); ok {
		a := v.(*admission)
		a.client.Store(cl)
		// OnSessionEstablish, OnDisconnect and Ended all run on the
		// connection's own goroutine: forget cannot run meanwhile.
		a.timer.Store(time.AfterFunc(time.Until(time.Unix(0, a.expiry.Load())), func() { cl.Stop(ErrTokenExpired) }))
		// A revocation made since OnConnect checked the token found no
		// established session to end (EndRevoked looks at a.client),
		// or finds this one: either way it ends.
		if c := a.claims.Load(); h.Revoked != nil && c != nil && h.Revoked(*c) {
			cl.Stop(ErrTokenRevoked)
		}
	}
}

// OnDisconnect frees the client's connection seat and forgets its token
// expiry.
func (h *Auth) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	h.live.CompareAndDelete(cl.ID, cl)
	h.forget(cl.Net.Conn)
}

// Ended frees what OnConnect holds for the client of conn, if anything,
// once mochi is done with the connection. mochi runs no hook when a client
// it admitted fails before its session starts (a CONNACK it cannot write)
// or when serving it panics; without Ended those would hold a connection
// seat and memory for ever.
func (h *Auth) Ended(conn net.Conn) {
	h.forget(conn)
}

// forget undoes OnConnect's admission of the client of conn, once.
func (h *Auth) forget(conn net.Conn) {
	if v, ok := h.admitted.LoadAndDelete(conn); ok {
		a := v.(*admission)
		if t := a.timer.Load(); t != nil {
			t.Stop()
		}
		if c := a.client.Load(); c != nil {
			h.live.CompareAndDelete(c.ID, c)
		}
		h.Users.release(a.user)
	}
}

// admittedCount returns how many clients OnConnect let through and nothing
// has forgotten yet.
func (h *Auth) admittedCount() int {
	n := 0
	h.admitted.Range(func(_, _ any) bool { n++; return true })
	return n
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

// Connected reports whether clientID has an established connection here.
func (h *Auth) Connected(clientID string) bool {
	_, ok := h.live.Load(clientID)
	return ok
}
