package broker

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/chatd/chatd/config"
)

// TestSlowConsumer connects bob with a raw client that subscribes and then
// never reads its socket again. alice keeps sending to bob and carol:
// every publish is acknowledged, carol gets hers, bob's device holds no
// more than its window while the rest waits on disk, and all of it
// reaches bob, in order, once he reconnects.
func TestSlowConsumer(t *testing.T) {
	const (
		window = 16
		n      = 600
	)
	s := startServer(t, t.TempDir(), func(c *config.Config) {
		c.Limits.MaxInflight = window
		c.Receipts.Delivered = false
	})
	conn, err := net.Dial("tcp", s.MQTTAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Write(connectPacket("bob", mint(t, "bob"), 600, "", "")); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(conn)
	if connack := readPacket(t, conn, r); connack[0] != 0x20 || connack[len(connack)-1] != 0 {
		t.Fatalf("CONNACK % x", connack)
	}
	if _, err := conn.Write(subscribePacket(1, "inbox/bob")); err != nil {
		t.Fatal(err)
	}
	if suback := readPacket(t, conn, r); suback[0] != 0x90 {
		t.Fatalf("SUBACK % x", suback)
	}
	// From here on bob reads nothing.

	alice := mustDial(t, s, "alice", phoneOpt{noSub: true})
	carol := mustDial(t, s, "carol", phoneOpt{})
	pad := fmt.Sprintf(`,"text":%q`, strings.Repeat("x", 4096))
	var sent []string
	for i := range n {
		id := fmt.Sprintf("m-%d", i)
		alice.send("bob", id, pad)       // fails the test if the PUBACK does not come
		alice.send("carol", "c-"+id, "") // ids are unique per sender
		sent = append(sent, id)
	}
	if got := carol.waitFor(n); len(got) != n {
		t.Fatalf("carol got %d of %d", len(got), n)
	}
	inflight, _ := deviceWindow(t, s, "bob", "")
	if inflight > window {
		t.Fatalf("bob's device has %d deliveries in flight, over its window of %d", inflight, window)
	}
	if d, err := s.queue.Depth("bob"); err != nil || d != n {
		t.Fatalf("bob's queue holds %d (%v), want all %d waiting", d, err, n)
	}

	conn.Close()
	waitDisconnected(t, s, "bob")
	bob := mustDial(t, s, "bob", phoneOpt{})
	got := bob.waitFor(n)
	for i, e := range got[:n] {
		if id := innerID(t, e); id != sent[i] {
			t.Fatalf("bob's message %d = %s, want %s", i, id, sent[i])
		}
	}
}

// readPacket reads one MQTT packet from r, with a deadline on conn.
func readPacket(t *testing.T, conn net.Conn, r *bufio.Reader) []byte {
	t.Helper()
	if err := conn.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	defer conn.SetReadDeadline(time.Time{})
	head, err := r.ReadByte()
	if err != nil {
		t.Fatalf("read packet: %v", err)
	}
	pkt := []byte{head}
	size, shift := 0, 0
	for {
		b, err := r.ReadByte()
		if err != nil {
			t.Fatalf("read packet length: %v", err)
		}
		pkt = append(pkt, b)
		size |= int(b&0x7f) << shift
		if b < 0x80 {
			break
		}
		shift += 7
	}
	body := make([]byte, size)
	if _, err := io.ReadFull(r, body); err != nil {
		t.Fatalf("read packet body: %v", err)
	}
	return append(pkt, body...)
}

// subscribePacket encodes a v3.1.1 SUBSCRIBE to filter at QoS 1.
func subscribePacket(id uint16, filter string) []byte {
	body := []byte{byte(id >> 8), byte(id), byte(len(filter) >> 8), byte(len(filter))}
	body = append(body, filter...)
	body = append(body, 1)
	return append([]byte{0x82, byte(len(body))}, body...)
}
