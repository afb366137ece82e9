package hooks

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"testing"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/chatd/chatd/broker/msgpath"
	"github.com/chatd/chatd/broker/msgpath/wire"
)

func TestReasonOf(t *testing.T) {
	other := errors.New("read tcp: connection reset by peer")
	cases := []struct {
		name       string
		cause, err error
		want       Reason
	}{
		{"nothing", nil, nil, ReasonOther},
		{"unknown error", other, nil, ReasonOther},
		{"slow reader", wire.ErrOverflow, nil, ReasonSlowReader},
		{"write failed", fmt.Errorf("%w: %w", wire.ErrWrite, io.ErrClosedPipe), nil, ReasonWriteError},
		// A write that timed out is the client not reading, not keepalive.
		{"write timed out", fmt.Errorf("%w: %w", wire.ErrWrite, os.ErrDeadlineExceeded), io.EOF, ReasonWriteError},
		{"token expired", ErrTokenExpired, nil, ReasonTokenExpired},
		{"taken over on another node", ErrTakenOver, nil, ReasonTakenOver},
		{"taken over here", packets.ErrSessionTakenOver, nil, ReasonTakenOver},
		{"shutting down", packets.ErrServerShuttingDown, nil, ReasonShuttingDown},
		{"removed, 3.1.1", ErrDeviceRemoved, nil, ReasonAdministrative},
		{"moderated, 3.1.1", ErrModerated, nil, ReasonAdministrative},
		{"removed or moderated, 5", packets.ErrAdministrativeAction, nil, ReasonAdministrative},
		{"keepalive", nil, packets.ErrKeepAliveTimeout, ReasonKeepalive},
		{"read deadline", nil, fmt.Errorf("read: %w", os.ErrDeadlineExceeded), ReasonKeepalive},
		{"publish to resend", fmt.Errorf("%w: %w", msgpath.ErrResend, errors.New("disk")), nil, ReasonProtocol},
		{"QoS 2 on 3.1.1", errQoS2, nil, ReasonProtocol},
		{"QoS 2 on v5", packets.ErrQosNotSupported, nil, ReasonProtocol},
		{"malformed packet", nil, packets.ErrMalformedPacket, ReasonProtocol},
		{"protocol violation", nil, packets.ErrProtocolViolation, ReasonProtocol},
		{"client closed", nil, io.EOF, ReasonClient},
		{"client closed, wrapped", nil, fmt.Errorf("read: %w", io.EOF), ReasonClient},
		{"connection closed", nil, net.ErrClosed, ReasonClient},
		{"mochi closed it", nil, mqtt.ErrConnectionClosed, ReasonClient},
		{"DISCONNECT", packets.CodeDisconnect, nil, ReasonClient},
		// The stop cause says why the server ended it; the read error
		// that follows is only its echo.
		{"cause before err", ErrTokenExpired, io.EOF, ReasonTokenExpired},
		{"cause before err, both known", io.EOF, ErrTokenExpired, ReasonClient},
		{"unknown cause, known err", other, io.EOF, ReasonClient},
		{"unknown cause and err", other, other, ReasonOther},
		// Abandon stops the connection; a read loop still running then
		// ends the session with the read error of the closed connection.
		{"abandoned after a panic", errAbandoned, net.ErrClosed, ReasonOther},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := ReasonOf(c.cause, c.err); got != c.want {
				t.Fatalf("ReasonOf(%v, %v) = %s, want %s", c.cause, c.err, got, c.want)
			}
		})
	}
}

func TestReasonAbnormal(t *testing.T) {
	cases := []struct {
		reason   Reason
		abnormal bool
	}{
		{ReasonClient, false},
		{ReasonTokenExpired, false},
		{ReasonTakenOver, false},
		{ReasonShuttingDown, false},
		{ReasonAdministrative, false},
		{ReasonKeepalive, false},
		{ReasonWriteError, true},
		{ReasonSlowReader, true},
		{ReasonProtocol, true},
		{ReasonOther, true},
	}
	for _, c := range cases {
		if got := c.reason.Abnormal(); got != c.abnormal {
			t.Errorf("%s.Abnormal() = %v, want %v", c.reason, got, c.abnormal)
		}
	}
}
