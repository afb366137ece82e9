package broker

import (
	"context"
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
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		_, body := scrape(t, s, "/metrics")
		if strings.Contains(body, "\nchatd_connections 4\n") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("metrics never counted the 4 clients left connected:\n%s", body)
		}
	}
}

// TestFailedNewFreesItsPorts: when New fails after the plain MQTT listener
// is bound, that port is free again, so a corrected configuration can be
// started in the same process (or a supervisor's retry does not find it
// taken).
func TestFailedNewFreesItsPorts(t *testing.T) {
	certFile, keyFile, _ := selfSigned(t, t.TempDir())
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
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn, err := net.Dial("tcp", s.MQTTAddr())
		if err != nil {
			t.Fatal(err)
		}
		c := paho5.NewClient(paho5.ClientConfig{Conn: conn, ClientID: clientID})
		ca, err := c.Connect(ctx, &paho5.Connect{
			KeepAlive: 30, ClientID: clientID, CleanStart: true,
			Username: "dana", UsernameFlag: true, Password: []byte(mint(t, "dana")), PasswordFlag: true,
		})
		if err != nil {
			t.Fatalf("connect with client id %q: %v", clientID, err)
		}
		t.Cleanup(func() { _ = c.Disconnect(&paho5.Disconnect{}) })
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
