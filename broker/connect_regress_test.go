package broker

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"

	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/testutil"
)

// TestMetricsConnectionsUnderChurn scrapes /metrics while clients connect
// and disconnect: the connection gauge is read from mochi's counter, which
// mochi updates atomically, so under -race a plain read is reported. Once
// the churn is over the gauge counts the clients still connected.
func TestMetricsConnectionsUnderChurn(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			scrape(t, s, "/metrics")
		}
	}()
	for i := range 8 {
		p := mustDial(t, s, fmt.Sprintf("churn%d", i), phoneOpt{noSub: true})
		if i%2 == 0 {
			p.client.Disconnect(50)
			waitDisconnected(t, s, p.user)
		}
	}
	close(stop)
	wg.Wait()
	testutil.EventuallyNoError(t, 10*time.Second, func() error {
		if _, body := scrape(t, s, "/metrics"); !strings.Contains(body, "\nchatd_connections 4\n") {
			return fmt.Errorf("metrics:\n%s", body)
		}
		return nil
	}, "metrics never counted the 4 clients left connected")
}

// TestFailedNewFreesItsPorts: when New fails after the plain MQTT listener
// is bound, that port is free again, so a corrected configuration can be
// started in the same process (or a supervisor's retry does not find it
// taken).
func TestFailedNewFreesItsPorts(t *testing.T) {
	certs := testutil.Certs(t)
	certFile, keyFile := certs.CertFile, certs.KeyFile
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	for _, tt := range []struct {
		name string
		tls  config.TLS
	}{
		{"TLS port in use", config.TLS{Listen: taken.Addr().String(), CertFile: certFile, KeyFile: keyFile}},
		{"missing certificate", config.TLS{Listen: "127.0.0.1:0", CertFile: filepath.Join(t.TempDir(), "missing.pem"), KeyFile: keyFile}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := config.Default()
			cfg.DataDir = t.TempDir()
			cfg.Listen = freeAddr(t)
			cfg.TLS = tt.tls
			if _, err := New(Options{Config: cfg, Secret: testSecret, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}); err == nil {
				t.Fatal("New succeeded")
			}
			l, err := net.Listen("tcp", cfg.Listen)
			if err != nil {
				t.Fatalf("the MQTT port of a failed New is still taken: %v", err)
			}
			l.Close()
		})
	}
}

// TestEmptyClientIDAssignedTheUser: an MQTT 5 client that connects with an
// empty client ID is told, in the CONNACK, the ID the server gave it, the
// user ID, and can reconnect with it.
func TestEmptyClientIDAssignedTheUser(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	connect := func(clientID string) *paho5.Connack {
		t.Helper()
		_, ca := connectV5(t, s, &paho5.Connect{
			KeepAlive: 30, ClientID: clientID, CleanStart: true,
			Username: "dana", UsernameFlag: true, Password: []byte(mint(t, "dana")), PasswordFlag: true,
		}, nil)
		return ca
	}
	ca := connect("")
	if ca.ReasonCode != 0 || ca.Properties == nil || ca.Properties.AssignedClientID != "dana" {
		t.Fatalf("CONNACK for an empty client id: reason 0x%x, properties %+v; want success assigning %q", ca.ReasonCode, ca.Properties, "dana")
	}
	if ca := connect(ca.Properties.AssignedClientID); ca.ReasonCode != 0 {
		t.Fatalf("reconnect with the assigned id: reason 0x%x", ca.ReasonCode)
	}
}

// rawConnack sends a v3.1.1 CONNECT for clientID of user, with a
// persistent session so that the device stays registered, on a new
// connection and returns the CONNACK's return code with the connection,
// which the caller closes. It reports errors rather than failing the test,
// so that it can run on any goroutine.
func rawConnack(s *Server, clientID, user, token string) (byte, net.Conn, error) {
	body := rawString("MQTT")
	body = append(body, 4, 0xC0, 0, 30) // level 4; username, password; keepalive 30 s
	body = append(body, rawString(clientID)...)
	body = append(body, rawString(user)...)
	body = append(body, rawString(token)...)
	c, err := net.Dial("tcp", s.MQTTAddr())
	if err != nil {
		return 0, nil, err
	}
	if err := c.SetDeadline(time.Now().Add(rawWait)); err != nil {
		c.Close()
		return 0, nil, err
	}
	if _, err := c.Write(rawPacket(0x10, body)); err != nil {
		c.Close()
		return 0, nil, fmt.Errorf("write CONNECT: %w", err)
	}
	ack := make([]byte, 4)
	if _, err := io.ReadFull(c, ack); err != nil {
		c.Close()
		return 0, nil, fmt.Errorf("read CONNACK: %w", err)
	}
	if ack[0] != 0x20 || ack[1] != 2 {
		c.Close()
		return 0, nil, fmt.Errorf("CONNACK % x", ack)
	}
	return ack[3], c, nil
}

// waitSeats waits until user holds n connection seats on s.
func waitSeats(t *testing.T, s *Server, user string, n int) {
	t.Helper()
	testutil.EventuallyNoError(t, 10*time.Second, func() error {
		if got := s.auth.Users.Connections(user); got != n {
			return fmt.Errorf("%s holds %d connection seats, want %d", user, got, n)
		}
		return nil
	}, "connection seats of %s", user)
}

// TestConnectionCapUnderParallelConnects: 40 devices of one user connect
// at once against limits.max_connections_per_user of 16: exactly 16 are
// accepted, the others refused, and closing them gives every seat back.
func TestConnectionCapUnderParallelConnects(t *testing.T) {
	const tries, limit = 40, 16
	s := startServer(t, t.TempDir(), func(c *config.Config) {
		c.Limits.MaxConnectionsPerUser = limit
		c.Queue.MaxDevices = 64
	})
	tok := mint(t, "bob")
	codes := make([]byte, tries)
	conns := make([]net.Conn, tries)
	errs := make([]error, tries)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range tries {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			codes[i], conns[i], errs[i] = rawConnack(s, fmt.Sprintf("bob/d%d", i), "bob", tok)
		}()
	}
	close(start)
	wg.Wait()
	accepted, refused := 0, 0
	for i := range tries {
		if errs[i] != nil {
			t.Fatalf("device %d: %v", i, errs[i])
		}
		defer conns[i].Close()
		switch codes[i] {
		case 0:
			accepted++
		case 3: // server unavailable: the v3 answer to a quota
			refused++
		default:
			t.Errorf("device %d: CONNACK code %d", i, codes[i])
		}
	}
	if accepted != limit || refused != tries-limit {
		t.Fatalf("%d accepted and %d refused of %d parallel connects, want %d accepted", accepted, refused, tries, limit)
	}
	if n := s.auth.Users.Connections("bob"); n != limit {
		t.Fatalf("server counts %d connections of bob, want %d", n, limit)
	}
	for _, c := range conns {
		c.Close()
	}
	waitSeats(t, s, "bob", 0)
}

// TestConnectionSeatsAreGivenBack: however a connection ends (refused
// for a device over queue.max_devices, closed by the client, taken over,
// closed after a panic) it gives its seat back, so with a cap of one
// connection the user can always connect again.
func TestConnectionSeatsAreGivenBack(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *config.Config) {
		c.Limits.MaxConnectionsPerUser = 1
		c.Queue.MaxDevices = 1
	})
	tok := mint(t, "bob")
	connect := func(clientID string, want byte) net.Conn {
		t.Helper()
		code, c, err := rawConnack(s, clientID, "bob", tok)
		if err != nil {
			t.Fatalf("%s: %v", clientID, err)
		}
		t.Cleanup(func() { c.Close() })
		if code != want {
			t.Fatalf("%s: CONNACK code %d, want %d", clientID, code, want)
		}
		return c
	}
	connect("bob/a", 0).Close()
	waitSeats(t, s, "bob", 0)

	// A user looping on a device over the cap is refused every time, and
	// each refusal leaves nothing behind.
	for i := range 50 {
		connect(fmt.Sprintf("bob/x%d", i), 3).Close()
	}
	waitSeats(t, s, "bob", 0)

	// A takeover is not refused by the cap, and the connection it replaces
	// gives its seat back.
	first := connect("bob/a", 0)
	connect("bob/a", 0).Close()
	serverClosed(t, first)
	waitSeats(t, s, "bob", 0)

	// A panic while serving the connection (mochi-mqtt/server#501): the
	// recovery gives the seat back too.
	panicky := rawDial(t, s)
	body := rawString("MQTT")
	body = append(body, 5, 0xC2, 0, 30, 0) // level 5; username, password, clean; keepalive; no properties
	body = append(body, rawString("bob/a")...)
	body = append(body, rawString("bob")...)
	body = append(body, rawString(tok)...)
	if _, err := panicky.Write(rawPacket(0x10, body)); err != nil {
		t.Fatal(err)
	}
	ack := make([]byte, 5)
	if _, err := io.ReadFull(panicky, ack); err != nil || ack[3] != 0 {
		t.Fatalf("v5 CONNACK % x: %v", ack, err)
	}
	_, _ = panicky.Write([]byte{0x82, 0x06, 0x00, 0x01, 0x00, 0x00, 0x01, 0x61})
	serverClosed(t, panicky)
	waitSeats(t, s, "bob", 0)
	connect("bob/a", 0)
}

// TestSpentBudgetOutlivesReconnect: a user who spent its publish burst
// and reconnects at once finds it still spent: the next publish waits for
// the budget to refill when limits.publish_max_delay allows it, and is
// refused when it does not.
func TestSpentBudgetOutlivesReconnect(t *testing.T) {
	for _, tt := range []struct {
		name     string
		rate     float64
		maxDelay time.Duration
		// burst is what the rate gives: twice the rate, at least one.
		burst int
		// refused is the reason code expected after the reconnect; 0
		// means the publish is accepted, but no sooner than the budget
		// allows.
		refused byte
	}{
		{"refused past a short delay", 0.5, 100 * time.Millisecond, 1, 0x97},
		{"delayed until refilled", 1, 10 * time.Second, 2, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := startServer(t, t.TempDir(), func(c *config.Config) {
				c.Limits.PublishRate = tt.rate
				c.Limits.PublishMaxDelay = tt.maxDelay
			})
			publish := func(c *paho5.Client, id string) byte {
				t.Helper()
				return publishV5(t, c, "inbox/bob", `{"id":"`+id+`"}`)
			}
			alice := dialV5(t, s, "alice", nil)
			spent := time.Now()
			for i := range tt.burst {
				if code := publish(alice, fmt.Sprintf("burst-%d", i)); code != 0 {
					t.Fatalf("publish %d of the burst: 0x%x", i, code)
				}
			}
			if err := alice.Disconnect(&paho5.Disconnect{}); err != nil {
				t.Fatal(err)
			}
			waitDisconnected(t, s, "alice")
			again := dialV5(t, s, "alice", nil)
			code := publish(again, "after reconnect")
			if code != tt.refused {
				t.Fatalf("publish after reconnecting: 0x%x, want 0x%x", code, tt.refused)
			}
			// One publish refills in 1/rate from when the burst was spent;
			// a fresh budget would have let it through at once.
			if wait := time.Duration(float64(time.Second) / tt.rate); code == 0 && time.Since(spent) < wait*9/10 {
				t.Fatalf("publish after reconnecting accepted %v after the burst was spent, want at least %v", time.Since(spent), wait)
			}
		})
	}
}
