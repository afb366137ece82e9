package mochi

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
)

// Conn adapts a mochi client to broker/msgpath/wire.Conn. Its writes
// take the client's lock, as mochi's own WritePacket does: mochi v2.7.9
// offers no other way to write packets of our own that never interleave
// with its PINGRESP and SUBACK (its outbound queue would copy every
// delivery and has no write timeout).
type Conn struct {
	// Client is the mochi client written to.
	Client *mqtt.Client
	// Timeout is how long a write may go without the client taking a
	// byte before it is taken for gone; zero means the default (see
	// SetWriteTimeout).
	Timeout time.Duration
}

// defaultWriteTimeout is Conn's Timeout when none is set, in
// nanoseconds; atomic, as writes of connections still closing may read it
// while a test sets it.
var defaultWriteTimeout atomic.Int64

func init() { defaultWriteTimeout.Store(int64(30 * time.Second)) }

// SetWriteTimeout sets how long a write may go without the client taking
// a byte before it is disconnected, for every Conn without a Timeout
// of its own (30 s unless set), and returns the previous value.
func SetWriteTimeout(d time.Duration) time.Duration {
	return time.Duration(defaultWriteTimeout.Swap(int64(d)))
}

// writeChunk is the most one system call is given. A write times out only
// when its client takes nothing for a whole timeout, however big the
// buffer, and over TLS or WebSocket, whose connections are broken by a
// timed-out write, a chunk is all that must go through in one timeout.
const writeChunk = 64 << 10

// Write writes b under the client's lock, the lock mochi's own WritePacket
// holds, so packets from both never interleave. It fails when the client
// takes no byte for the write timeout, even while it still answers
// keepalives without reading.
func (c Conn) Write(b []byte) error {
	c.Client.Lock()
	defer c.Client.Unlock()
	conn := c.Client.Net.Conn
	if conn == nil {
		return fmt.Errorf("client %s has no connection", c.Client.ID)
	}
	timeout := c.Timeout
	if timeout <= 0 {
		timeout = time.Duration(defaultWriteTimeout.Load())
	}
	err := writeProgressing(conn, b, timeout)
	// mochi's own writes (PINGRESP, SUBACK) must not inherit our deadline.
	if resetErr := conn.SetWriteDeadline(time.Time{}); err == nil && resetErr != nil {
		err = fmt.Errorf("clear write deadline: %w", resetErr)
	}
	if err != nil {
		return fmt.Errorf("write to %s: %w", c.Client.ID, err)
	}
	return nil
}

// writeProgressing writes b to conn in chunks, each with a deadline of
// timeout from when it starts, and goes on after a deadline as long as
// the write before it took some bytes: a slow but steady reader is served,
// one that stopped is given up on.
func writeProgressing(conn net.Conn, b []byte, timeout time.Duration) error {
	for len(b) > 0 {
		if err := conn.SetWriteDeadline(time.Now().Add(timeout)); err != nil {
			return fmt.Errorf("set write deadline: %w", err)
		}
		n, err := conn.Write(b[:min(len(b), writeChunk)])
		b = b[n:]
		if err != nil {
			if n > 0 && errors.Is(err, os.ErrDeadlineExceeded) {
				continue
			}
			return err
		}
	}
	return nil
}

// Close disconnects the client, telling it why.
func (c Conn) Close(reason error) {
	c.Client.Stop(reason)
}
