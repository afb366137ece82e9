package broker

import (
	"io"
	"net"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/chatd/chatd/config"
)

// connectWithWill connects user with a Will and reads its CONNACK.
func connectWithWill(t *testing.T, addr, user, willTopic, willMsg string) net.Conn {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if _, err := conn.Write(connectPacket(user, mint(t, user), 60, willTopic, willMsg)); err != nil {
		t.Fatal(err)
	}
	ack := make([]byte, 4)
	if _, err := io.ReadFull(conn, ack); err != nil || ack[0] != 0x20 || ack[3] != 0 {
		t.Fatalf("CONNACK %x, %v", ack, err)
	}
	return conn
}

func TestWillsAreDropped(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	bob := mustDial(t, s, "bob", phoneOpt{})
	w := watchPresence(t, s, "carol")
	w.waitUser(t, "bob", 1)
	// A Will is published by the broker itself, past every check of the
	// message path: a forged envelope, a rewritten presence.
	m1 := connectWithWill(t, s.MQTTAddr(), "mallory", "inbox/bob", `{"kind":"msg","from":"ceo","msg":{"id":"x"}}`)
	m2 := connectWithWill(t, s.MQTTAddr(), "mallory2", "presence/bob", `{"user":"bob","online":false}`)
	m1.Close() // without DISCONNECT: the Will would fire
	m2.Close()
	w.waitUser(t, "mallory2", 2) // mallory2 went offline: its Will, if any, came before
	alice := mustDial(t, s, "alice", phoneOpt{noSub: true})
	alice.send("bob", "marker", "")
	if e := bob.waitFor(1)[0]; e.From != "alice" || innerID(t, e) != "marker" {
		t.Fatalf("bob's first message: %+v", e)
	}
	if got := w.waitUser(t, "bob", 1); len(got) != 1 || got[0]["online"] != true {
		t.Fatalf("bob's presence was rewritten: %v", got)
	}
}

func TestSilentConnectionIsClosed(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *config.Config) { c.Limits.ConnectTimeout = 200 * time.Millisecond })
	conn, err := net.Dial("tcp", s.MQTTAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := conn.SetReadDeadline(time.Now().Add(20 * time.Second)); err != nil {
		t.Fatal(err)
	}
	// Nothing is sent: the server must hang up, not wait for ever.
	if n, err := conn.Read(make([]byte, 1)); err == nil || isTimeout(err) {
		t.Fatalf("read %d, %v: a silent connection was kept open", n, err)
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

func TestSessionEndsWhenTokenExpires(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	tok, err := token.Mint(testSecret, "bob", 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	lost := make(chan error, 1)
	opts := paho.NewClientOptions().AddBroker("tcp://" + s.MQTTAddr()).
		SetClientID("bob").SetUsername("bob").SetPassword(tok).SetAutoReconnect(false).
		SetConnectionLostHandler(func(_ paho.Client, err error) { lost <- err })
	c := paho.NewClient(opts)
	if tk := c.Connect(); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("connect: %v", tk.Error())
	}
	defer c.Disconnect(50)
	select {
	case <-lost:
	case <-time.After(30 * time.Second):
		t.Fatal("a session outlived its token")
	}
}
