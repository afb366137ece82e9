package wire

import (
	"bufio"
	"bytes"
	"io"
	"strings"
	"sync"
	"testing"

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
	for _, v5 := range []bool{false, true} {
		version := byte(4)
		if v5 {
			version = 5
		}
		b := AppendPublishQoS0(nil, v5, "inbox/bob", []byte(`{"kind":"typing"}`))
		pk := decode(t, bufio.NewReader(bytes.NewReader(b)), version)
		if pk.TopicName != "inbox/bob" || pk.FixedHeader.Qos != 0 || string(pk.Payload) != `{"kind":"typing"}` {
			t.Fatalf("v5=%v decoded topic %q qos %d payload %q", v5, pk.TopicName, pk.FixedHeader.Qos, pk.Payload)
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
