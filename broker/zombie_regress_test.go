package broker

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/mochi"
)

// TestWriteTimeoutDisconnects: a client that stops reading while the
// server writes to it is disconnected once a write takes nothing for the
// write timeout: its socket is closed and its device goes offline, rather
// than staying online with a full window and a PUBLISH cut in the middle
// waiting in its socket. Reconnected, it receives every message whole and
// in order.
func TestWriteTimeoutDisconnects(t *testing.T) {
	const (
		timeout = 500 * time.Millisecond
		n       = 160 // of 60 KB each: far more than both socket buffers hold
	)
	previous := mochi.SetWriteTimeout(timeout)
	t.Cleanup(func() { mochi.SetWriteTimeout(previous) })
	s := startServer(t, t.TempDir(), func(c *config.Config) {
		c.Limits.MaxInflight = 2 * n
		// The writes must time out, not overflow the pending limit.
		c.Limits.MaxPendingBytes = 64 << 20
		c.Receipts.Delivered = false
	})

	conn, err := net.Dial("tcp", s.MQTTAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// A small receive buffer, so that the server's writes wait for bob.
	if err := conn.(*net.TCPConn).SetReadBuffer(16 << 10); err != nil {
		t.Fatal(err)
	}
	// A persistent session with a keepalive far longer than the test: only
	// the write timeout can end this connection.
	body := rawString("MQTT")
	body = append(body, 4, 0xC0, 0x02, 0x58) // level 4; username, password; keepalive 600 s
	body = append(body, rawString("bob")...)
	body = append(body, rawString("bob")...)
	body = append(body, rawString(mint(t, "bob"))...)
	if _, err := conn.Write(rawPacket(0x10, body)); err != nil {
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
	// From here on bob reads nothing until the server gives up on him.

	alice := mustDial(t, s, "alice", phoneOpt{noSub: true})
	pad := fmt.Sprintf(`,"text":%q`, strings.Repeat("x", 60_000))
	sent := make([]string, n)
	for i := range n {
		sent[i] = fmt.Sprintf("m-%d", i)
		alice.send("bob", sent[i], pad)
	}

	waitDisconnected(t, s, "bob")
	if _, _, online := s.path.Window("bob", ""); online {
		t.Fatal("bob's device is still being fed after his connection was dropped")
	}
	// The server closed bob's socket: reading drains what was sent and ends.
	if err := conn.SetReadDeadline(time.Now().Add(rawWait)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(io.Discard, r); err != nil {
		if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
			t.Fatal("the server left bob's socket open after dropping him")
		}
	}

	bob := mustDial(t, s, "bob", phoneOpt{})
	got := bob.waitFor(n) // fails on any payload that is not whole JSON
	for i, e := range got[:n] {
		if id := innerID(t, e); id != sent[i] {
			t.Fatalf("bob's message %d = %s, want %s", i, id, sent[i])
		}
	}
}
