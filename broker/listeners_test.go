package broker

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/chatd/chatd/config"
)

// selfSigned writes a certificate for 127.0.0.1 and its key to dir and
// returns their paths and a pool that trusts it.
func selfSigned(t *testing.T, dir string) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "chatd test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}

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
	certFile, keyFile, pool := selfSigned(t, t.TempDir())
	wsAddr := freeAddr(t)
	cases := []struct {
		name   string
		broker func(s *Server) string
		tls    bool
	}{
		{"tls", func(s *Server) string { return "tls://" + s.TLSAddr() }, true},
		{"websocket", func(*Server) string { return "ws://" + wsAddr + "/mqtt" }, false},
	}
	s := startServer(t, t.TempDir(), func(c *config.Config) {
		c.TLS = config.TLS{Listen: "127.0.0.1:0", CertFile: certFile, KeyFile: keyFile}
		c.WebSocket = config.WebSocket{Listen: wsAddr}
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
