package mochi

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/chatd/chatd/internal/testutil"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// scriptedConn is a net.Conn whose writes follow a script; only Write
// and SetWriteDeadline may be called.
type scriptedConn struct {
	net.Conn
	// script holds, for each Write in turn, how many bytes it takes
	// (negative: all) and the error it returns; past the script, writes
	// take everything.
	script      []scriptStep
	deadlineErr error

	got       []byte
	writes    []int
	deadlines []time.Time
}

type scriptStep struct {
	n   int
	err error
}

func (c *scriptedConn) Write(b []byte) (int, error) {
	c.writes = append(c.writes, len(b))
	step := scriptStep{n: -1}
	if len(c.script) > 0 {
		step, c.script = c.script[0], c.script[1:]
	}
	n := step.n
	if n < 0 || n > len(b) {
		n = len(b)
	}
	c.got = append(c.got, b[:n]...)
	return n, step.err
}

func (c *scriptedConn) SetWriteDeadline(t time.Time) error {
	c.deadlines = append(c.deadlines, t)
	return c.deadlineErr
}

// TestWriteProgressing: a write goes out in chunks of at most writeChunk,
// each with a fresh deadline; a deadline that strikes after the client
// took some bytes is passed over, one that strikes with none taken or any
// other error ends the write.
func TestWriteProgressing(t *testing.T) {
	const timeout = time.Minute
	errBroken := errors.New("broken pipe")
	errNoDeadline := errors.New("deadlines unsupported")
	tests := []struct {
		name        string
		size        int
		script      []scriptStep
		deadlineErr error
		wantErr     error
		wantWrites  []int
	}{
		{"small", 10, nil, nil, nil, []int{10}},
		{"in chunks", 2*writeChunk + 100, nil, nil, nil, []int{writeChunk, writeChunk, 100}},
		{"deadline after progress goes on", 100,
			[]scriptStep{{40, os.ErrDeadlineExceeded}, {10, os.ErrDeadlineExceeded}}, nil, nil, []int{100, 60, 50}},
		{"deadline with nothing taken fails", 100,
			[]scriptStep{{40, os.ErrDeadlineExceeded}, {0, os.ErrDeadlineExceeded}}, nil, os.ErrDeadlineExceeded, []int{100, 60}},
		{"other error fails at once", 100, []scriptStep{{40, errBroken}}, nil, errBroken, []int{100}},
		{"deadline not settable", 100, nil, errNoDeadline, errNoDeadline, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := make([]byte, tt.size)
			for i := range b {
				b[i] = byte(i % 251)
			}
			c := &scriptedConn{script: tt.script, deadlineErr: tt.deadlineErr}
			before := time.Now()
			err := writeProgressing(c, b, timeout)
			after := time.Now()
			if !errors.Is(err, tt.wantErr) || (tt.wantErr == nil) != (err == nil) {
				t.Fatalf("error %v, want %v", err, tt.wantErr)
			}
			if !slices.Equal(c.writes, tt.wantWrites) {
				t.Fatalf("writes of %v bytes, want %v", c.writes, tt.wantWrites)
			}
			if tt.wantErr == nil && !bytes.Equal(c.got, b) {
				t.Fatalf("wrote %d bytes, not the %d given", len(c.got), len(b))
			}
			if !bytes.Equal(c.got, b[:len(c.got)]) {
				t.Fatal("the bytes written are not those given, in order")
			}
			if want := max(len(c.writes), 1); len(c.deadlines) != want {
				t.Fatalf("%d deadlines set, want one per write (%d)", len(c.deadlines), want)
			}
			for _, d := range c.deadlines {
				if d.Before(before.Add(timeout)) || d.After(after.Add(timeout)) {
					t.Fatalf("deadline %v is not the timeout from the write", d)
				}
			}
		})
	}
}

// TestConnWithoutConnection: a write to a client with no connection
// fails instead of panicking.
func TestConnWithoutConnection(t *testing.T) {
	srv := mqtt.New(&mqtt.Options{Logger: slog.New(slog.DiscardHandler)})
	if err := (Conn{Client: srv.NewClient(nil, "t1", "bob/phone", false)}).Write([]byte{0xC0, 0}); err == nil {
		t.Fatal("a write without a connection succeeded")
	}
}

// connectedClient connects a 3.1.1 client to a fresh mochi server and
// returns it with its mochi client, both socket buffers small so that a
// client that does not read holds the server's writes up at once.
func connectedClient(t *testing.T) (*mochiServer, *rawClient, *mqtt.Client) {
	t.Helper()
	ms := startMochi(t, mochiOptions{})
	c := ms.connect(t, session{id: "bob/phone"})
	cl := ms.client(t, c)
	if err := c.conn.(*net.TCPConn).SetReadBuffer(16 << 10); err != nil {
		t.Fatal(err)
	}
	if err := cl.Net.Conn.(*net.TCPConn).SetWriteBuffer(16 << 10); err != nil {
		t.Fatal(err)
	}
	return ms, c, cl
}

// TestConnWriteTimeout: a write to a client that stops reading fails
// once the client has taken nothing for the timeout, the connection's own
// or the default; Close then ends the connection with the reason given.
func TestConnWriteTimeout(t *testing.T) {
	const timeout = 200 * time.Millisecond
	tests := []struct {
		name string
		// conn makes the Conn under test.
		conn func(*mqtt.Client) Conn
		// defaultTimeout, if set, is set with SetWriteTimeout.
		defaultTimeout time.Duration
	}{
		{"own timeout", func(cl *mqtt.Client) Conn { return Conn{Client: cl, Timeout: timeout} }, 0},
		{"default timeout", func(cl *mqtt.Client) Conn { return Conn{Client: cl} }, timeout},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.defaultTimeout > 0 {
				previous := SetWriteTimeout(tt.defaultTimeout)
				t.Cleanup(func() { SetWriteTimeout(previous) })
			}
			ms, c, cl := connectedClient(t)
			conn := tt.conn(cl)
			big := make([]byte, 16<<20) // far beyond both socket buffers

			start := time.Now()
			err := conn.Write(big)
			took := time.Since(start)
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("write to a client that reads nothing: %v, want a deadline error", err)
			}
			if took < timeout {
				t.Fatalf("the write gave up after %v, before the timeout of %v", took, timeout)
			}

			reason := errors.New("write timed out")
			conn.Close(reason)
			if !cl.Closed() || !errors.Is(cl.StopCause(), reason) {
				t.Fatalf("after Close: closed %v, cause %v; want closed with %v", cl.Closed(), cl.StopCause(), reason)
			}
			waitClosed(t, c.conn, wait)
			ms.waitEnded(t, cl)
		})
	}
}

// TestConnServesSteadyReader: a client reading slowly but steadily gets
// every byte of a write that lasts several timeouts, each of its chunks
// taking longer than the timeout; afterwards mochi's own writes (a
// PINGRESP, well after the timeout) are not failed by a stale deadline.
func TestConnServesSteadyReader(t *testing.T) {
	const (
		timeout = 250 * time.Millisecond
		// 2 KiB every 10 ms, about 200 KB/s: a chunk of 64 KiB takes
		// some 320 ms, past the timeout.
		readSize  = 2 << 10
		readPause = 10 * time.Millisecond
	)
	_, c, cl := connectedClient(t)
	payload := make([]byte, 320<<10)
	for i := range payload {
		payload[i] = byte(i % 251)
	}
	if err := c.conn.SetReadDeadline(time.Now().Add(4 * wait)); err != nil {
		t.Fatal(err)
	}
	type result struct {
		b   []byte
		err error
	}
	got := make(chan result, 1)
	go func() {
		b := make([]byte, len(payload))
		n, err := io.ReadFull(testutil.Throttled{R: c.r, Size: readSize, Pause: readPause}, b)
		got <- result{b[:n], err}
	}()

	start := time.Now()
	if err := (Conn{Client: cl, Timeout: timeout}).Write(payload); err != nil {
		t.Fatalf("write to a steady reader: %v", err)
	}
	took := time.Since(start)
	if r := <-got; r.err != nil || !bytes.Equal(r.b, payload) {
		t.Fatalf("the reader got %d bytes of the %d written: %v", len(r.b), len(payload), r.err)
	}
	if took < 3*timeout {
		t.Fatalf("the write took %v, not several timeouts of %v: the test proves nothing", took, timeout)
	}
	// Past the write's last deadline: only a cleared one lets mochi
	// answer. Waiting is the point of this check.
	time.Sleep(2 * timeout)
	c.ping()
}

// boundaryPayload is the payload of the i-th PUBLISH of
// TestConnKeepsPacketBoundaries: its number, then bytes that depend on it.
func boundaryPayload(i, size int) []byte {
	p := make([]byte, size)
	binary.BigEndian.PutUint32(p, uint32(i))
	for j := 4; j < len(p); j++ {
		p[j] = byte((i + j) % 251)
	}
	return p
}

// publishFrame encodes a QoS 0 PUBLISH to topic.
func publishFrame(topic string, payload []byte) ([]byte, error) {
	var buf bytes.Buffer
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Publish},
		ProtocolVersion: 4,
		TopicName:       topic,
		Payload:         payload,
	}
	if err := pk.PublishEncode(&buf); err != nil {
		return nil, fmt.Errorf("encode PUBLISH: %w", err)
	}
	return buf.Bytes(), nil
}

// TestConnKeepsPacketBoundaries: packets written through Conn and mochi's
// own (PINGRESPs, written by its read loop) reach the client whole, each
// of ours intact and in order however many system calls it takes, mochi's
// only between two of ours.
func TestConnKeepsPacketBoundaries(t *testing.T) {
	const (
		pings       = 50
		payloadSize = 160 << 10 // more than two chunks of writeChunk
		minFrames   = 8
		dataTopic   = "inbox/bob"
		endTopic    = "end" // the last frame: its payload is the count
	)
	_, c, cl := connectedClient(t)
	conn := Conn{Client: cl, Timeout: wait}
	pingreq := encode(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingreq}})

	// The pinger starts once our first packet arrives and the writer
	// goes on until every PINGREQ is sent, so that the two overlap.
	started, pinged := make(chan struct{}), make(chan struct{})
	errs := make(chan error, 2)
	go func() {
		defer close(pinged)
		select {
		case <-started:
		case <-time.After(wait):
			errs <- errors.New("no frame arrived to start pinging")
			return
		}
		for range pings {
			if _, err := c.conn.Write(pingreq); err != nil {
				errs <- fmt.Errorf("PINGREQ: %w", err)
				return
			}
			time.Sleep(time.Millisecond)
		}
	}()
	written := make(chan struct{})
	go func() {
		defer close(written)
		n := 0
		for ; n < minFrames || !isClosed(pinged); n++ {
			f, err := publishFrame(dataTopic, boundaryPayload(n, payloadSize))
			if err == nil {
				err = conn.Write(f)
			}
			if err != nil {
				errs <- fmt.Errorf("frame %d: %w", n, err)
				return
			}
		}
		f, err := publishFrame(endTopic, binary.BigEndian.AppendUint32(nil, uint32(n)))
		if err == nil {
			err = conn.Write(f)
		}
		if err != nil {
			errs <- fmt.Errorf("last frame: %w", err)
		}
	}()
	t.Cleanup(func() {
		c.conn.Close() // unblocks a writer left waiting by a failure
		<-written
		<-pinged
	})

	if err := c.conn.SetReadDeadline(time.Now().Add(4 * wait)); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReaderSize(c.r, 64<<10)
	var order []byte // p for one of our PUBLISHes, r for a PINGRESP
	published, pingresps, total := 0, 0, -1
	for total < 0 || pingresps < pings {
		fh, body, err := readPacket(r)
		if err != nil {
			t.Fatalf("after %d frames and %d PINGRESPs: %v (%v)", published, pingresps, err, drain(errs))
		}
		switch fh.Type {
		case packets.Publish:
			pk := packets.Packet{FixedHeader: fh, ProtocolVersion: 4}
			if err := pk.PublishDecode(body); err != nil {
				t.Fatalf("frame %d: %v", published, err)
			}
			if pk.TopicName == endTopic {
				total = int(binary.BigEndian.Uint32(pk.Payload))
				break
			}
			if pk.TopicName != dataTopic || !bytes.Equal(pk.Payload, boundaryPayload(published, payloadSize)) {
				t.Fatalf("frame %d arrived altered: topic %q, %d bytes", published, pk.TopicName, len(pk.Payload))
			}
			if published == 0 {
				close(started)
			}
			published++
			order = append(order, 'p')
		case packets.Pingresp:
			pingresps++
			order = append(order, 'r')
		default:
			t.Fatalf("packet type %d after %d frames: a packet was cut", fh.Type, published)
		}
	}
	if published != total {
		t.Fatalf("%d frames arrived, %d written", published, total)
	}
	if err := drain(errs); err != nil {
		t.Fatal(err)
	}
	first, last := bytes.IndexByte(order, 'p'), bytes.LastIndexByte(order, 'p')
	if !bytes.Contains(order[first:last+1], []byte("r")) {
		t.Fatalf("no PINGRESP came between two of our packets (%s): the test proves nothing", order)
	}
}

// drain returns the first error sent on errs so far, if any.
func drain(errs chan error) error {
	select {
	case err := <-errs:
		return err
	default:
		return nil
	}
}

// isClosed reports whether ch is closed.
func isClosed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
