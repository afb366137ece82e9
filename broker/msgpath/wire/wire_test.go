package wire

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chatd/chatd/internal/testutil"

	"github.com/chatd/chatd/internal/mochi"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// decode reads one packet from r with mochi's codec, the reference here.
func decode(t *testing.T, r *bufio.Reader, version byte) packets.Packet {
	t.Helper()
	b, err := r.ReadByte()
	if err != nil {
		t.Fatal(err)
	}
	var fh packets.FixedHeader
	if err := fh.Decode(b); err != nil {
		t.Fatal(err)
	}
	n, _, err := packets.DecodeLength(r)
	if err != nil {
		t.Fatal(err)
	}
	fh.Remaining = n
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		t.Fatal(err)
	}
	pk := packets.Packet{FixedHeader: fh, ProtocolVersion: version}
	switch fh.Type {
	case packets.Publish:
		err = pk.PublishDecode(body)
	case packets.Puback:
		err = pk.PubackDecode(body)
	}
	if err != nil {
		t.Fatalf("decode %v: %v", fh.Type, err)
	}
	return pk
}

func TestAppendPublishDecodes(t *testing.T) {
	cases := []struct {
		name    string
		v5      bool
		payload string
		dup     bool
	}{
		{"v3 small", false, `{"id":"1"}`, false},
		{"v5 small", true, `{"id":"1"}`, false},
		{"v3 two-byte length", false, strings.Repeat("x", 300), true},
		{"v5 three-byte length", true, strings.Repeat("y", 70000), false},
		{"empty", false, "", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := AppendPublish(nil, c.v5, 4242, "inbox/bob", []byte(c.payload), c.dup)
			version := byte(4)
			if c.v5 {
				version = 5
			}
			pk := decode(t, bufio.NewReader(bytes.NewReader(b)), version)
			if pk.TopicName != "inbox/bob" || pk.PacketID != 4242 || string(pk.Payload) != c.payload ||
				pk.FixedHeader.Qos != 1 || pk.FixedHeader.Dup != c.dup {
				t.Fatalf("decoded topic %q id %d qos %d dup %v payload of %d bytes", pk.TopicName, pk.PacketID, pk.FixedHeader.Qos, pk.FixedHeader.Dup, len(pk.Payload))
			}
		})
	}
}

func TestAppendPublishQoS0Decodes(t *testing.T) {
	for _, c := range []struct {
		name   string
		append func(b []byte, v5 bool, topic string, payload []byte) []byte
		retain bool
	}{
		{"AppendPublishQoS0", AppendPublishQoS0, false},
		{"AppendRetained", AppendRetained, true},
	} {
		for _, v5 := range []bool{false, true} {
			version := byte(4)
			if v5 {
				version = 5
			}
			b := c.append(nil, v5, "inbox/bob", []byte(`{"kind":"typing"}`))
			pk := decode(t, bufio.NewReader(bytes.NewReader(b)), version)
			if pk.TopicName != "inbox/bob" || pk.FixedHeader.Qos != 0 || pk.FixedHeader.Retain != c.retain || string(pk.Payload) != `{"kind":"typing"}` {
				t.Fatalf("%s v5=%v decoded topic %q qos %d retain %v payload %q", c.name, v5, pk.TopicName, pk.FixedHeader.Qos, pk.FixedHeader.Retain, pk.Payload)
			}
		}
	}
}

// memConn records what the writer writes; while stalled is open, writes
// block like those to a client that stopped reading.
type memConn struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	stalled chan struct{}
	closed  chan error
}

func newMemConn() *memConn { return &memConn{closed: make(chan error, 1)} }

func (c *memConn) Write(b []byte) error {
	if c.stalled != nil {
		<-c.stalled
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.buf.Write(b)
	return nil
}

func (c *memConn) Close(reason error) { c.closed <- reason }

func TestWriterKeepsOrder(t *testing.T) {
	for _, v5 := range []bool{false, true} {
		c := newMemConn()
		w := NewWriter(c, v5, 1<<20)
		for i := range 1000 {
			if i%3 == 0 {
				w.Puback(uint16(i+1), 0)
			} else {
				w.Publish(uint16(i+1), "inbox/a", []byte("x"), false)
			}
		}
		w.Puback(9999, 0x97)
		w.Flush(false)
		w.Wait()
		version := byte(4)
		if v5 {
			version = 5
		}
		r := bufio.NewReader(bytes.NewReader(c.buf.Bytes()))
		for i := range 1000 {
			pk := decode(t, r, version)
			if pk.PacketID != uint16(i+1) {
				t.Fatalf("packet %d has id %d", i, pk.PacketID)
			}
		}
		last := decode(t, r, version)
		wantCode := byte(0)
		if v5 {
			wantCode = 0x97
		}
		if last.FixedHeader.Type != packets.Puback || last.ReasonCode != wantCode {
			t.Fatalf("v5=%v last packet type %d reason 0x%x", v5, last.FixedHeader.Type, last.ReasonCode)
		}
	}
}

func TestWriterDisconnectsClientThatStopsReading(t *testing.T) {
	c := newMemConn()
	c.stalled = make(chan struct{})
	w := NewWriter(c, false, 1000)
	for range 200 {
		w.Publish(1, "inbox/a", []byte("0123456789"), false)
		w.Flush(false)
	}
	if reason := <-c.closed; reason != ErrOverflow {
		t.Fatalf("closed with %v, want ErrOverflow", reason)
	}
	close(c.stalled)
	w.Wait()
}

// failConn fails every write, as a socket whose peer is gone does.
type failConn struct{ closed chan error }

func (c failConn) Write([]byte) error { return errors.New("broken pipe") }

func (c failConn) Close(reason error) { c.closed <- reason }

func TestWriterClosesConnectionOnWriteError(t *testing.T) {
	for _, inline := range []bool{false, true} {
		c := failConn{closed: make(chan error, 1)}
		w := NewWriter(c, false, 1<<20)
		w.Publish(1, "inbox/a", []byte("x"), false)
		w.Flush(inline)
		w.Wait()
		select {
		case reason := <-c.closed:
			if reason == nil || !strings.Contains(reason.Error(), "broken pipe") {
				t.Fatalf("inline=%v: closed with %v, want the write error", inline, reason)
			}
		default:
			t.Fatalf("inline=%v: a failed write left the connection open", inline)
		}
		// Nothing more is written to a connection that failed.
		w.Publish(2, "inbox/a", []byte("x"), false)
		w.Flush(inline)
		w.Wait()
		if len(c.closed) != 0 {
			t.Fatalf("inline=%v: closed twice", inline)
		}
	}
}

// tcpClient returns a mochi client over the server end of a real loopback
// TCP connection, and the client end. Both have small socket buffers, so
// that a write of a few MiB waits for the reader instead of landing in
// the kernel.
func tcpClient(t *testing.T) (*mqtt.Server, *mqtt.Client, *net.TCPConn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			t.Errorf("accept: %v", err)
		}
		accepted <- c
	}()
	client, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server := <-accepted
	if server == nil {
		t.FailNow()
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	if err := client.(*net.TCPConn).SetReadBuffer(16 << 10); err != nil {
		t.Fatal(err)
	}
	if err := server.(*net.TCPConn).SetWriteBuffer(16 << 10); err != nil {
		t.Fatal(err)
	}
	srv := mqtt.New(nil)
	return srv, srv.NewClient(server, "tcp", "alice:phone", false), client.(*net.TCPConn)
}

// bigBurst queues n PUBLISHes of 64 KiB each on w.
func bigBurst(w *Writer, n int) {
	payload := bytes.Repeat([]byte("x"), 64<<10)
	for i := range n {
		w.Publish(uint16(i+1), "inbox/alice", payload, false)
	}
}

// TestWriteTimeoutClosesConnection: a client that stops reading is
// disconnected once a write takes nothing for the write timeout, its
// socket closed rather than left open with a packet cut in the middle.
func TestWriteTimeoutClosesConnection(t *testing.T) {
	_, cl, client := tcpClient(t)
	const timeout = 200 * time.Millisecond
	w := NewWriter(mochi.Conn{Client: cl, Timeout: timeout}, false, 64<<20)
	bigBurst(w, 64) // 4 MiB, far beyond both socket buffers
	start := time.Now()
	w.Flush(false)
	done := make(chan struct{})
	go func() { w.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the write to a client that reads nothing never ended")
	}
	if took := time.Since(start); took < timeout {
		t.Fatalf("write gave up after %v, before the timeout of %v", took, timeout)
	}
	if !cl.Closed() {
		t.Fatal("the client is still open after its write timed out")
	}
	if cause := cl.StopCause(); !errors.Is(cause, os.ErrDeadlineExceeded) {
		t.Fatalf("client stopped with %v, want a write timeout", cause)
	}
	// The client end sees the connection end after what was sent.
	if err := client.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(io.Discard, client); err != nil {
		if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
			t.Fatal("the server end of the connection was never closed")
		}
	}
}

// TestSlowReaderIsServed: a client that reads slowly but steadily gets
// every byte of a write that takes many times the write timeout.
func TestSlowReaderIsServed(t *testing.T) {
	_, cl, client := tcpClient(t)
	const (
		timeout = 300 * time.Millisecond
		n       = 48 // 3 MiB
	)
	w := NewWriter(mochi.Conn{Client: cl, Timeout: timeout}, false, 64<<20)
	bigBurst(w, n)
	if err := client.SetReadDeadline(time.Now().Add(20 * time.Second)); err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() {
		// 16 KiB every 10 ms: about 1.6 MB/s, two seconds for the burst.
		r := bufio.NewReaderSize(testutil.Throttled{R: client, Size: 16 << 10, Pause: 10 * time.Millisecond}, 64<<10)
		for i := range n {
			pk, err := decodeErr(r, 4)
			if err != nil {
				got <- fmt.Errorf("packet %d: %w", i, err)
				return
			}
			if pk.PacketID != uint16(i+1) || len(pk.Payload) != 64<<10 {
				got <- fmt.Errorf("packet %d has id %d and %d bytes", i, pk.PacketID, len(pk.Payload))
				return
			}
		}
		got <- nil
	}()
	start := time.Now()
	w.Flush(true)
	took := time.Since(start)
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	if cl.Closed() {
		t.Fatalf("a steady reader was disconnected: %v", cl.StopCause())
	}
	if took < 3*timeout {
		t.Fatalf("the write took %v, not several write timeouts of %v: the test proves nothing", took, timeout)
	}
}

// decodeErr reads one PUBLISH from r, reporting errors instead of failing
// the test, for use off the test goroutine.
func decodeErr(r *bufio.Reader, version byte) (packets.Packet, error) {
	b, err := r.ReadByte()
	if err != nil {
		return packets.Packet{}, err
	}
	var fh packets.FixedHeader
	if err := fh.Decode(b); err != nil {
		return packets.Packet{}, err
	}
	n, _, err := packets.DecodeLength(r)
	if err != nil {
		return packets.Packet{}, err
	}
	fh.Remaining = n
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return packets.Packet{}, err
	}
	pk := packets.Packet{FixedHeader: fh, ProtocolVersion: version}
	if fh.Type != packets.Publish {
		return pk, fmt.Errorf("packet type %d, want PUBLISH", fh.Type)
	}
	return pk, pk.PublishDecode(body)
}
