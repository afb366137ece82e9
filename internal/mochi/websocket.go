package mochi

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/mochi-mqtt/server/v2/listeners"
)

// ErrNotBinary ends a WebSocket connection that sent a text frame: MQTT
// over WebSocket is binary frames only.
var ErrNotBinary = errors.New("websocket: MQTT needs binary frames")

// WebSocket is an MQTT-over-WebSocket listener that binds its address
// in Init, so that a port in use fails the server's start as the TCP
// listeners do (mochi's own binds in Serve, where a failure is only
// logged), and that reports the address it bound (for ":0").
type WebSocket struct {
	id, address string
	tlsConfig   *tls.Config

	mu     sync.Mutex
	ln     net.Listener
	srv    *http.Server
	log    *slog.Logger
	closed bool
}

// NewWebSocket returns a listener with id on address, over TLS when
// tlsConfig is set. It answers on every path, /mqtt included.
func NewWebSocket(id, address string, tlsConfig *tls.Config) *WebSocket {
	return &WebSocket{id: id, address: address, tlsConfig: tlsConfig}
}

// ID names the listener.
func (l *WebSocket) ID() string { return l.id }

// Address is the bound address once Init succeeded, else the configured one.
func (l *WebSocket) Address() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ln != nil {
		return l.ln.Addr().String()
	}
	return l.address
}

// Protocol is "wss" over TLS, else "ws".
func (l *WebSocket) Protocol() string {
	if l.tlsConfig != nil {
		return "wss"
	}
	return "ws"
}

// Init binds the address.
func (l *WebSocket) Init(log *slog.Logger) error {
	ln, err := net.Listen("tcp", l.address)
	if err != nil {
		return fmt.Errorf("websocket listener %s: %w", l.id, err)
	}
	if l.tlsConfig != nil {
		ln = tls.NewListener(ln, l.tlsConfig)
	}
	l.mu.Lock()
	l.ln, l.log = ln, log
	l.mu.Unlock()
	return nil
}

// Serve upgrades each request and hands its connection to establish,
// until Close.
func (l *WebSocket) Serve(establish listeners.EstablishFn) {
	up := &websocket.Upgrader{
		Subprotocols: []string{"mqtt"},
		// Browsers send their page's origin; the token, not the origin,
		// authorizes a client.
		CheckOrigin: func(*http.Request) bool { return true },
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			c, err := up.Upgrade(w, r, nil)
			if err != nil {
				return // the upgrader answered the request
			}
			defer c.Close()
			if err := establish(l.id, &wsConn{Conn: c.UnderlyingConn(), c: c}); err != nil && !errors.Is(err, io.EOF) {
				l.log.Debug("websocket connection ended", "listener", l.id, "error", err)
			}
		}),
		ReadHeaderTimeout: 10 * time.Second,
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	l.srv = srv
	ln := l.ln
	l.mu.Unlock()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		l.log.Error("websocket listener stopped", "listener", l.id, "error", err)
	}
}

// Close stops accepting and closes the listener's clients.
func (l *WebSocket) Close(closeClients listeners.CloseFn) {
	l.mu.Lock()
	srv, ln := l.srv, l.ln
	l.closed = true
	l.mu.Unlock()
	if srv != nil {
		// Shutdown does not wait for upgraded connections (hijacked):
		// closeClients ends those.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
	} else if ln != nil {
		_ = ln.Close()
	}
	closeClients(l.id)
}

// wsConn is a WebSocket connection as the byte stream mochi reads
// packets from: the payloads of binary messages, one after another.
type wsConn struct {
	net.Conn
	c *websocket.Conn
	// r reads the current message; nil between messages.
	r io.Reader
}

// Read reads from the current binary message, moving to the next one
// when it is used up.
func (ws *wsConn) Read(p []byte) (int, error) {
	for {
		if ws.r == nil {
			op, r, err := ws.c.NextReader()
			if err != nil {
				return 0, err
			}
			if op != websocket.BinaryMessage {
				return 0, ErrNotBinary
			}
			ws.r = r
		}
		n, err := ws.r.Read(p)
		if errors.Is(err, io.EOF) {
			ws.r = nil
			if n == 0 {
				continue // an empty message, or the end of one
			}
			return n, nil
		}
		return n, err
	}
}

// Write sends p as one binary message.
func (ws *wsConn) Write(p []byte) (int, error) {
	if err := ws.c.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}
