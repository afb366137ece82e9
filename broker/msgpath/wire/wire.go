// Package wire writes the server's own PUBLISH and PUBACK packets to a
// client connection, coalescing everything pending into one socket write.
//
// Why not mochi's WritePacket: it allocates and issues one write(2) per
// packet, and blocks the caller on a slow socket. Here callers append
// packets to a buffer and then Flush: the connection's own goroutine
// writes in place (it only waits for its own client), any other goroutine,
// such as the committer, hands the writing to a goroutine started on
// demand that ends when the buffer is empty, so a phone that stops reading
// stalls nobody else. A failed write, such as one to a phone that took no
// byte for the write timeout, closes the connection: a packet may have
// gone out in part, and nothing can follow it.
package wire

import (
	"errors"
	"fmt"
	"sync"
)

// Conn is the part of an MQTT connection the writer needs.
type Conn interface {
	// Write writes b to the client in one piece, serialised with any other writer of the connection.
	Write(b []byte) error
	// Close disconnects the client.
	Close(reason error)
}

// ErrOverflow is given to Conn.Close when a client stopped reading.
var ErrOverflow = errors.New("client is not reading: pending writes over limit")

// ErrWrite wraps the error of a write that failed, which closes the connection.
var ErrWrite = errors.New("write failed")

// Writer is the outbound packet queue of one connection. The zero value is not usable.
type Writer struct {
	conn       Conn
	v5         bool
	maxPending int

	mu      sync.Mutex
	buf     []byte
	spare   []byte
	busy    bool
	closed  bool
	written sync.WaitGroup
}

// NewWriter returns a Writer for conn; v5 selects MQTT 5 encodings and a
// client with more than maxPending unwritten bytes is disconnected.
func NewWriter(conn Conn, v5 bool, maxPending int) *Writer {
	return &Writer{conn: conn, v5: v5, maxPending: maxPending}
}

// Puback queues a PUBACK for packet id pid with an MQTT 5 reason code (0
// = success; ignored for v3). It is written at the next Flush.
func (w *Writer) Puback(pid uint16, reason byte) {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return
	}
	if w.v5 && reason != 0 {
		w.buf = append(w.buf, 0x40, 3, byte(pid>>8), byte(pid), reason)
	} else {
		w.buf = append(w.buf, 0x40, 2, byte(pid>>8), byte(pid))
	}
	w.checkOverflow()
}

// Publish queues a QoS 1 PUBLISH of payload on topic with packet id pid.
// It is written at the next Flush.
func (w *Writer) Publish(pid uint16, topic string, payload []byte, dup bool) {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return
	}
	w.buf = AppendPublish(w.buf, w.v5, pid, topic, payload, dup)
	w.checkOverflow()
}

// qos0Backlog is the unwritten bytes past which QoS 0 packets are dropped:
// an ephemeral signal to a client that is behind is worth nothing, and a
// flood of them must not get it disconnected.
const qos0Backlog = 64 << 10

// PublishQoS0 queues a QoS 0 PUBLISH of payload on topic, for what is sent
// once and never stored, unless the client is behind. It is written at the
// next Flush.
func (w *Writer) PublishQoS0(topic string, payload []byte) {
	w.mu.Lock()
	if w.closed || len(w.buf) > qos0Backlog {
		w.mu.Unlock()
		return
	}
	w.buf = AppendPublishQoS0(w.buf, w.v5, topic, payload)
	w.checkOverflow()
}

// Flush writes what is queued. With inline, the caller writes it itself
// and returns when the buffer is empty: only the connection's own
// goroutine should, since it then waits for its client. Otherwise a
// goroutine is started to write it. Either way, a write already under way
// takes the queued bytes along and Flush returns at once.
func (w *Writer) Flush(inline bool) {
	w.mu.Lock()
	if w.busy || w.closed || len(w.buf) == 0 {
		w.mu.Unlock()
		return
	}
	w.busy = true
	w.written.Add(1)
	w.mu.Unlock()
	if inline {
		w.run()
		return
	}
	go w.run()
}

// Close stops the writer; queued bytes not yet written are dropped.
func (w *Writer) Close() {
	w.mu.Lock()
	w.closed = true
	w.buf = nil
	w.spare = nil
	w.mu.Unlock()
}

// Wait blocks until no write goroutine is running.
func (w *Writer) Wait() { w.written.Wait() }

// checkOverflow disconnects a client whose unwritten bytes exceed the
// limit; called with w.mu held, releases it.
func (w *Writer) checkOverflow() {
	if len(w.buf) <= w.maxPending {
		w.mu.Unlock()
		return
	}
	w.closed = true
	w.buf = nil
	w.mu.Unlock()
	w.conn.Close(ErrOverflow)
}

// spareCap is the largest buffer kept between bursts, so an idle
// connection holds little memory.
const spareCap = 64 << 10

func (w *Writer) run() {
	defer w.written.Done()
	for {
		w.mu.Lock()
		if len(w.buf) == 0 || w.closed {
			w.busy = false
			w.mu.Unlock()
			return
		}
		b := w.buf
		w.buf = w.spare[:0]
		w.spare = nil
		w.mu.Unlock()

		err := w.conn.Write(b)

		w.mu.Lock()
		if cap(b) <= spareCap {
			w.spare = b[:0]
		}
		if err != nil {
			w.closed = true
			w.buf = nil
			w.busy = false
			w.mu.Unlock()
			// Part of a packet may have gone out: the connection can carry
			// nothing more, and a client left connected would hold its
			// device online with a full window and read a torn packet.
			w.conn.Close(fmt.Errorf("%w: %w", ErrWrite, err))
			return
		}
		w.mu.Unlock()
	}
}

// AppendPublish appends the encoding of a QoS 1 PUBLISH to b.
func AppendPublish(b []byte, v5 bool, pid uint16, topic string, payload []byte, dup bool) []byte {
	h := byte(0x32)
	if dup {
		h |= 0x08
	}
	n := 2 + len(topic) + 2 + len(payload)
	if v5 {
		n++ // empty property set
	}
	b = append(b, h)
	b = appendVarint(b, n)
	b = append(b, byte(len(topic)>>8), byte(len(topic)))
	b = append(b, topic...)
	b = append(b, byte(pid>>8), byte(pid))
	if v5 {
		b = append(b, 0)
	}
	return append(b, payload...)
}

// AppendPublishQoS0 appends the encoding of a QoS 0 PUBLISH to b.
func AppendPublishQoS0(b []byte, v5 bool, topic string, payload []byte) []byte {
	return appendQoS0(b, 0x30, v5, topic, payload)
}

// AppendRetained appends the encoding of a QoS 0 PUBLISH with the RETAIN
// flag set, as a retained message is sent to a new subscriber.
func AppendRetained(b []byte, v5 bool, topic string, payload []byte) []byte {
	return appendQoS0(b, 0x31, v5, topic, payload)
}

// appendQoS0 appends a QoS 0 PUBLISH with the fixed header byte h.
func appendQoS0(b []byte, h byte, v5 bool, topic string, payload []byte) []byte {
	n := 2 + len(topic) + len(payload)
	if v5 {
		n++ // empty property set
	}
	b = append(b, h)
	b = appendVarint(b, n)
	b = append(b, byte(len(topic)>>8), byte(len(topic)))
	b = append(b, topic...)
	if v5 {
		b = append(b, 0)
	}
	return append(b, payload...)
}

func appendVarint(b []byte, n int) []byte {
	for {
		c := byte(n & 0x7f)
		n >>= 7
		if n > 0 {
			c |= 0x80
		}
		b = append(b, c)
		if n == 0 {
			return b
		}
	}
}
