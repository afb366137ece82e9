package mochi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Guard wraps a mochi listener for the public internet. A peer must send
// its CONNECT within Timeout: mochi sets no deadline before CONNECT, so a
// silent peer would hold a connection, and its goroutines, for ever (once
// the CONNECT is read, mochi's keepalive deadline replaces this one). And a
// panic while serving one connection, such as mochi v2.7.9's decoder on a
// malformed MQTT 5 SUBSCRIBE (mochi-mqtt/server#501), closes that
// connection instead of the whole server.
type Guard struct {
	listeners.Listener
	// Timeout is how long a new connection may stay silent.
	Timeout time.Duration
	// OnPanic, if set, cleans up after a connection whose serving panicked.
	OnPanic func(c net.Conn, recovered any)
	// CloseClients, if set, disconnects the listener's clients at shutdown
	// in place of mochi's own, which takes its client map's read lock twice
	// (Clients.GetByListener calls Len) and so deadlocks against any client
	// removed from the map at the same moment.
	CloseClients func(listenerID string)
	// Ended, if set, is passed when a connection is closed, and by the
	// server before it shuts mochi down (see Ends).
	Ended *Ends
	// Clients, if set with Ended, is mochi's Listeners.ClientsWg: each
	// connection is counted in it through Ended.Admit before mochi's own
	// goroutine adds to it (see Ends).
	Clients *sync.WaitGroup
	// OnEnd, if set, is called with each connection once mochi is done
	// with it, however that came about. mochi v2.7.9's hooks miss two
	// ends: a client admitted by OnConnect whose CONNACK could not be
	// written, and a connection whose serving panicked (OnEnd runs before
	// the panic is recovered).
	OnEnd func(net.Conn)
}

// Ends orders the end of every connection against the server's shutdown.
// mochi v2.7.9 adds to its client WaitGroup inside each connection's
// goroutine and waits on it at shutdown; for a connection that never sent
// CONNECT nothing else orders the two, which the race detector reports.
// Each connection's Close and the server's shutdown Pass through one
// mutex, so that one of them happens before the other.
//
// The same mutex orders the start of each connection against the shutdown
// (Admit and Shut): mochi's Add for a connection accepted just before
// Server.Close could otherwise come while Close already waits on a
// WaitGroup at zero, a misuse the race detector reports.
type Ends struct {
	mu   sync.Mutex
	shut bool
}

// Admit counts a new connection in wg unless Shut was called, and reports
// whether it did; the caller calls wg.Done when the connection's serving
// ends. Counted here, before mochi's goroutine adds to wg, the connection
// keeps wg above zero while mochi adds its own count.
func (e *Ends) Admit(wg *sync.WaitGroup) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.shut {
		return false
	}
	wg.Add(1)
	return true
}

// Shut refuses every connection not yet admitted and, like Pass, orders
// what happened before it before what the caller does next: the server
// calls it before mochi's Close waits on its clients.
func (e *Ends) Shut() {
	e.mu.Lock()
	e.shut = true
	e.mu.Unlock()
}

// Pass waits for a connection closing at the moment, and orders what
// happened before it before what the caller does next.
func (e *Ends) Pass() {
	e.mu.Lock()
	//lint:ignore SA2001 the critical section is empty on purpose: only the order it imposes matters.
	e.mu.Unlock()
}

// endedConn is a connection whose Close passes through Ends.
type endedConn struct {
	net.Conn
	ends *Ends
}

// Close closes the connection after passing through Ends.
func (c endedConn) Close() error {
	c.ends.Pass()
	return c.Conn.Close()
}

// errShuttingDown refuses a connection accepted as the server shuts down.
var errShuttingDown = errors.New("connection refused: the server is shutting down")

// Close stops the listener and disconnects its clients.
func (l Guard) Close(closeClients listeners.CloseFn) {
	if l.CloseClients != nil {
		closeClients = l.CloseClients
	}
	l.Listener.Close(closeClients)
}

// Serve accepts connections through the guard.
func (l Guard) Serve(establish listeners.EstablishFn) {
	l.Listener.Serve(func(id string, c net.Conn) (err error) {
		defer func() {
			if p := recover(); p != nil {
				c.Close()
				if l.OnPanic != nil {
					l.OnPanic(c, p)
				}
				err = fmt.Errorf("connection from %s closed after a panic: %v", c.RemoteAddr(), p)
			}
		}()
		if err := c.SetReadDeadline(time.Now().Add(l.Timeout)); err != nil {
			c.Close()
			return fmt.Errorf("set connect deadline: %w", err)
		}
		if l.Ended != nil {
			if l.Clients != nil {
				if !l.Ended.Admit(l.Clients) {
					c.Close()
					return errShuttingDown
				}
				defer l.Clients.Done()
			}
			c = endedConn{Conn: c, ends: l.Ended}
		}
		if l.OnEnd != nil {
			defer l.OnEnd(c)
		}
		return establish(id, c)
	})
}

// QuietPackets drops the attributes mochi adds to some of its log lines
// that hold a whole packet, and with it a password or a message: chatd
// never logs either.
type QuietPackets struct {
	slog.Handler
}

// Handle drops the packet attribute before passing the record on.
func (q QuietPackets) Handle(ctx context.Context, r slog.Record) error {
	out := slog.NewRecord(r.Time, r.Level, r.Message, r.PC)
	r.Attrs(func(a slog.Attr) bool {
		if a.Key != "pk" && a.Key != "packet" {
			out.AddAttrs(a)
		}
		return true
	})
	return q.Handler.Handle(ctx, out)
}

// WithAttrs keeps the filter on derived handlers.
func (q QuietPackets) WithAttrs(attrs []slog.Attr) slog.Handler {
	return QuietPackets{q.Handler.WithAttrs(attrs)}
}

// WithGroup keeps the filter on derived handlers.
func (q QuietPackets) WithGroup(name string) slog.Handler {
	return QuietPackets{q.Handler.WithGroup(name)}
}

// DisconnectOnShutdown returns a Guard.CloseClients for server: it tells
// the listener's clients the server is shutting down, walking
// Clients.GetAll, which takes the client map's lock once (see #488 in the
// package doc).
func DisconnectOnShutdown(server *mqtt.Server) func(listenerID string) {
	return func(id string) {
		for _, cl := range server.Clients.GetAll() {
			if cl.Net.Listener == id && !cl.Closed() {
				// The client is going either way; a failed DISCONNECT
				// write changes nothing.
				_ = server.DisconnectClient(cl, packets.ErrServerShuttingDown)
			}
		}
	}
}
