package loadtest

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/url"
	"sync"
	"time"

	"github.com/gorilla/websocket"
)

// dialWebSocket opens an MQTT-over-WebSocket connection to u (ws:// or
// wss://, subprotocol mqtt) through dialer, never through a proxy: load
// only ever reaches the brokers named. paho.golang takes a net.Conn and
// has no WebSocket transport of its own (autopaho's is unexported); this
// is the same adapter.
func dialWebSocket(ctx context.Context, dialer *net.Dialer, u *url.URL) (net.Conn, error) {
	d := websocket.Dialer{
		NetDialContext:   dialer.DialContext,
		HandshakeTimeout: dialer.Timeout,
		Subprotocols:     []string{"mqtt"},
		TLSClientConfig:  &tls.Config{ServerName: u.Hostname()},
		ReadBufferSize:   readBufferSize,
	}
	ws, resp, err := d.DialContext(ctx, u.String(), nil)
	if resp != nil && resp.Body != nil {
		// The handshake's response has no body worth reading.
		_ = resp.Body.Close()
	}
	if err != nil {
		return nil, fmt.Errorf("websocket: %w", err)
	}
	return &wsConn{Conn: ws}, nil
}

// wsConn is a WebSocket connection as a net.Conn: each Write is one binary
// message, and Read reads the messages' payloads as one stream (MQTT
// packets may span messages). It is a sync.Locker, which paho.golang holds
// while it writes a packet in several writes.
type wsConn struct {
	*websocket.Conn
	sync.Mutex

	rmu sync.Mutex
	r   io.Reader // the message being read, nil between messages
}

// Write sends p as one binary message.
func (c *wsConn) Write(p []byte) (int, error) {
	if err := c.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Read reads from the current message, moving on to the next at its end.
func (c *wsConn) Read(p []byte) (int, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	for {
		if c.r == nil {
			_, r, err := c.NextReader()
			if err != nil {
				return 0, err
			}
			c.r = r
		}
		n, err := c.r.Read(p)
		if err == io.EOF {
			c.r = nil
			if n > 0 {
				return n, nil
			}
			continue
		}
		return n, err
	}
}

// SetDeadline sets the read and write deadlines.
func (c *wsConn) SetDeadline(t time.Time) error {
	if err := c.SetReadDeadline(t); err != nil {
		return err
	}
	return c.SetWriteDeadline(t)
}
