package hooks

import (
	"errors"
	"io"
	"net"
	"os"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/chatd/chatd/broker/msgpath"
	"github.com/chatd/chatd/broker/msgpath/wire"
)

// Reason is why a connection ended, as logs and the
// chatd_disconnects_total metric name it.
type Reason string

// Reasons a connection ends.
const (
	// ReasonClient: the client sent DISCONNECT or closed its connection.
	ReasonClient Reason = "client"
	// ReasonWriteError: a write to the client failed or timed out.
	ReasonWriteError Reason = "write_error"
	// ReasonSlowReader: the client stopped reading and its pending writes
	// passed limits.max_pending_bytes.
	ReasonSlowReader Reason = "slow_reader"
	// ReasonTokenExpired: the access token the client connected with expired.
	ReasonTokenExpired Reason = "token_expired"
	// ReasonTakenOver: the same client ID connected again, here or on
	// another node.
	ReasonTakenOver Reason = "taken_over"
	// ReasonAdministrative: the device's user removed it (the devices
	// API), or an app backend disconnected or banned it (the server API).
	ReasonAdministrative Reason = "administrative"
	// ReasonShuttingDown: the server is stopping.
	ReasonShuttingDown Reason = "shutting_down"
	// ReasonKeepalive: the client sent nothing for 1.5 keepalives.
	ReasonKeepalive Reason = "keepalive_timeout"
	// ReasonProtocol: the client broke the protocol (a malformed packet,
	// QoS 2) or a publish could not be stored and a 3.1.1 client must
	// send it again.
	ReasonProtocol Reason = "protocol_error"
	// ReasonOther: anything else, such as a read error.
	ReasonOther Reason = "other"
)

// ErrTokenExpired ends a session whose access token expired.
var ErrTokenExpired = errors.New("access token expired")

// ErrTokenRevoked refuses, or ends the session of, a token the app's
// backend revoked.
var ErrTokenRevoked = errors.New("access token revoked")

// ErrTakenOver ends a connection whose client connected again on another node.
var ErrTakenOver = errors.New("session taken over on another node")

// ErrDeviceRemoved ends the connections of a device its user removed.
var ErrDeviceRemoved = errors.New("device removed by its user")

// ErrModerated ends the connections an app backend disconnected, or of a
// user it banned.
var ErrModerated = errors.New("disconnected by the app's backend")

// EndAdministrative ends cl's connection for cause (ErrDeviceRemoved or
// ErrModerated): an MQTT 5 client is told so (DISCONNECT 0x98,
// administrative action); MQTT 3.1.1 has no server DISCONNECT.
func EndAdministrative(s *mqtt.Server, cl *mqtt.Client, cause error) {
	if cl.Properties.ProtocolVersion == 5 {
		// DisconnectClient returns the code it disconnected with.
		_ = s.DisconnectClient(cl, packets.ErrAdministrativeAction)
		return
	}
	cl.Stop(cause)
}

// ReasonOf names why a connection ended from its stop cause (the first
// error it was stopped with) and the error its read loop ended with.
func ReasonOf(cause, err error) Reason {
	for _, e := range []error{cause, err} {
		if e == nil {
			continue
		}
		switch {
		case errors.Is(e, errAbandoned):
			// Before the read error that follows it, which would pass
			// for the client's leaving.
			return ReasonOther
		case errors.Is(e, ErrTokenExpired):
			return ReasonTokenExpired
		case errors.Is(e, ErrTakenOver), errors.Is(e, packets.ErrSessionTakenOver):
			return ReasonTakenOver
		case errors.Is(e, ErrDeviceRemoved), errors.Is(e, ErrModerated), errors.Is(e, ErrTokenRevoked), errors.Is(e, packets.ErrNotAuthorized), errors.Is(e, packets.ErrAdministrativeAction):
			return ReasonAdministrative
		case errors.Is(e, packets.ErrServerShuttingDown):
			return ReasonShuttingDown
		case errors.Is(e, wire.ErrOverflow):
			return ReasonSlowReader
		case errors.Is(e, wire.ErrWrite):
			return ReasonWriteError
		case errors.Is(e, packets.ErrKeepAliveTimeout), errors.Is(e, os.ErrDeadlineExceeded):
			return ReasonKeepalive
		case errors.Is(e, msgpath.ErrResend), errors.Is(e, errQoS2), errors.Is(e, packets.ErrProtocolViolation),
			errors.Is(e, packets.ErrMalformedPacket), errors.Is(e, packets.ErrQosNotSupported):
			return ReasonProtocol
		case errors.Is(e, packets.CodeDisconnect), errors.Is(e, io.EOF), errors.Is(e, net.ErrClosed),
			errors.Is(e, mqtt.ErrConnectionClosed):
			return ReasonClient
		}
	}
	return ReasonOther
}

// Abnormal reports whether a connection that ended for r is worth a log
// line. Phones on poor networks leave, time out and come back all day,
// tokens expire and sessions are taken over: those are counted, not
// logged.
func (r Reason) Abnormal() bool {
	switch r {
	case ReasonWriteError, ReasonSlowReader, ReasonProtocol, ReasonOther:
		return true
	}
	return false
}
