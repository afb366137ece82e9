package broker

import (
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/testutil"
)

// dialURL connects a v3 client of user to broker and subscribes it to its inbox.
func dialURL(t *testing.T, broker, user string, tlsConfig *tls.Config, p *phone) {
	t.Helper()
	opts := paho.NewClientOptions().AddBroker(broker).
		SetClientID(user).SetUsername(user).SetPassword(mint(t, user)).
		SetCleanSession(false).SetAutoReconnect(false).SetDefaultPublishHandler(p.handle)
	if tlsConfig != nil {
		opts.SetTLSConfig(tlsConfig)
	}
	c := paho.NewClient(opts)
	if tk := c.Connect(); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("connect %s to %s: %v", user, broker, tk.Error())
	}
	t.Cleanup(func() { c.Disconnect(50) })
	if tk := c.Subscribe("inbox/"+user, 1, p.handle); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("subscribe %s: %v", user, tk.Error())
	}
	p.client = c
}

func TestTLSAndWebSocketListeners(t *testing.T) {
	certs := testutil.Certs(t)
	certFile, keyFile, pool := certs.CertFile, certs.KeyFile, certs.CAPool(t)
	cases := []struct {
		name   string
		broker func(s *Server) string
		tls    bool
	}{
		{"tls", func(s *Server) string { return "tls://" + s.TLSAddr() }, true},
		{"websocket", func(s *Server) string { return "ws://" + s.WebSocketAddr() + "/mqtt" }, false},
	}
	s := startServer(t, t.TempDir(), func(c *config.Config) {
		c.TLS = config.TLS{Listen: "127.0.0.1:0", CertFile: certFile, KeyFile: keyFile}
		c.WebSocket = config.WebSocket{Listen: "127.0.0.1:0"}
	})
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var tc *tls.Config
			if c.tls {
				tc = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
			}
			bob := &phone{t: t, user: "bob-" + c.name, signal: make(chan struct{}, 1)}
			dialURL(t, c.broker(s), bob.user, tc, bob)
			alice := &phone{t: t, user: "alice-" + c.name, signal: make(chan struct{}, 1)}
			dialURL(t, c.broker(s), alice.user, tc, alice)
			alice.send(bob.user, "over-"+c.name, "")
			if got := bob.waitFor(1)[0]; innerID(t, got) != "over-"+c.name || got.From != alice.user {
				t.Fatalf("got %+v", got)
			}
		})
	}
	t.Run("plain TCP client on the TLS port is refused", func(t *testing.T) {
		p := &phone{t: t, user: "mallory", signal: make(chan struct{}, 1)}
		opts := paho.NewClientOptions().AddBroker("tcp://" + s.TLSAddr()).SetClientID("mallory").
			SetUsername("mallory").SetPassword(mint(t, "mallory")).SetAutoReconnect(false).
			SetConnectTimeout(3 * time.Second).SetDefaultPublishHandler(p.handle)
		c := paho.NewClient(opts)
		if tk := c.Connect(); tk.WaitTimeout(10*time.Second) && tk.Error() == nil {
			c.Disconnect(50)
			t.Fatal("a plain MQTT connection to the TLS listener succeeded")
		}
	})
}

func TestTLSConfigErrors(t *testing.T) {
	cfg := config.Default()
	cfg.DataDir = t.TempDir()
	cfg.Listen = "127.0.0.1:0"
	cfg.TLS = config.TLS{Listen: "127.0.0.1:0", CertFile: filepath.Join(cfg.DataDir, "missing.pem"), KeyFile: filepath.Join(cfg.DataDir, "missing.key")}
	if _, err := New(Options{Config: cfg, Secret: testSecret}); err == nil {
		t.Fatal("a missing certificate was accepted")
	}
}

// TestWebSocketPortInUse: a WebSocket address already taken fails the
// server's start, as a TCP one does, instead of a log line and a server
// without its WebSocket listener.
func TestWebSocketPortInUse(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cfg := config.Default()
	cfg.DataDir = t.TempDir()
	cfg.Listen, cfg.HTTP = "127.0.0.1:0", ""
	cfg.WebSocket = config.WebSocket{Listen: ln.Addr().String()}
	s, err := New(Options{Config: cfg, Secret: testSecret, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err == nil {
		stopServer(t, s)
		t.Fatal("started with its WebSocket port taken")
	}
	if !strings.Contains(err.Error(), "websocket") || !strings.Contains(err.Error(), ln.Addr().String()) {
		t.Errorf("error %q: want it to name the websocket listener and its address", err)
	}
}
