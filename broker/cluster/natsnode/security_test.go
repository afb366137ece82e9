package natsnode_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/chatd/chatd/broker/cluster/natsnode"
	"github.com/chatd/chatd/broker/cluster/natsnode/natstest"
	"github.com/chatd/chatd/internal/testutil"
)

const (
	password = "0123456789abcdef0123456789abcdef-good"
	wrong    = "0123456789abcdef0123456789abcdef-bad!"
)

func tlsFiles(f testutil.TLSFiles) *natsnode.TLSFiles {
	return &natsnode.TLSFiles{CertFile: f.CertFile, KeyFile: f.KeyFile, CAFile: f.CAFile}
}

// TestSecuredNode: with a password and TLS, a client needs both to
// connect, and one that cannot connect cannot read a stream; the node's
// own connection, and a node joining by URL with both, work.
func TestSecuredNode(t *testing.T) {
	certs := testutil.Certs(t)
	n, err := natsnode.Start(context.Background(), natsnode.Config{
		Name: "secure", Dir: t.TempDir(), Listen: "127.0.0.1:0",
		Password: password, TLS: tlsFiles(certs), Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Shutdown()
	ctx := context.Background()
	if _, err := n.JetStream().CreateStream(ctx, jetstream.StreamConfig{Name: "Q", Subjects: []string{"q.>"}}); err != nil {
		t.Fatalf("the node's own connection: %v", err)
	}
	if _, err := n.JetStream().Publish(ctx, "q.bob", []byte("secret")); err != nil {
		t.Fatal(err)
	}
	url := n.ClientURL()
	secure := nats.Secure(&tls.Config{RootCAs: certs.CAPool(t), ServerName: "localhost", MinVersion: tls.VersionTLS12})
	for _, c := range []struct {
		name string
		opts []nats.Option
		want string
	}{
		{"no TLS, no password", nil, "tls"},
		{"TLS, no password", []nats.Option{secure}, "authorization violation"},
		{"TLS, wrong password", []nats.Option{secure, nats.UserInfo(natsnode.AuthUser, wrong)}, "authorization violation"},
		{"password, no TLS", []nats.Option{nats.UserInfo(natsnode.AuthUser, password)}, "tls"},
	} {
		t.Run(c.name, func(t *testing.T) {
			nc, err := nats.Connect(url, append(c.opts, nats.Timeout(5*time.Second))...)
			if err == nil {
				defer nc.Close()
				// Connected anyway: it must still read nothing.
				js, _ := jetstream.New(nc)
				_, serr := js.Stream(ctx, "Q")
				t.Fatalf("connected without credentials (stream read: %v)", serr)
			}
			if !strings.Contains(strings.ToLower(err.Error()), c.want) {
				t.Fatalf("refused with %q, want it to say %q", err, c.want)
			}
		})
	}
	nc, err := nats.Connect(url, secure, nats.UserInfo(natsnode.AuthUser, password))
	if err != nil {
		t.Fatalf("a client with the CA and the password: %v", err)
	}
	nc.Close()

	joined, err := natsnode.Start(ctx, natsnode.Config{URL: url, Password: password, TLS: &natsnode.TLSFiles{CAFile: certs.CAFile}, ReadyTimeout: 10 * time.Second, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatalf("join by URL with the password and the CA: %v", err)
	}
	joined.Shutdown()
	if j, err := natsnode.Start(ctx, natsnode.Config{URL: url, TLS: &natsnode.TLSFiles{CAFile: certs.CAFile}, ReadyTimeout: 3 * time.Second, Logger: slog.New(slog.DiscardHandler)}); err == nil {
		j.Shutdown()
		t.Fatal("joined by URL without the password")
	}
}

// TestWrongCredentialsCannotJoin: a node with the wrong password, or
// with a certificate of another CA, never joins a cluster secured with a
// password and mutual TLS: it never becomes ready, and no member routes
// to it.
func TestWrongCredentialsCannotJoin(t *testing.T) {
	certs := testutil.Certs(t)
	ports := natstest.FreePorts(t, 4)
	var routes []string
	for _, p := range ports {
		routes = append(routes, fmt.Sprintf("nats://127.0.0.1:%d", p))
	}
	start := func(i int, pw string, f testutil.TLSFiles, routes []string, ready time.Duration) (*natsnode.Node, error) {
		return natsnode.Start(context.Background(), natsnode.Config{
			Name: fmt.Sprintf("n%d", i+1), Dir: t.TempDir(), Listen: "127.0.0.1:0",
			ClusterName: "secured", ClusterListen: fmt.Sprintf("127.0.0.1:%d", ports[i]), Routes: routes,
			Password: pw, TLS: tlsFiles(f), ReadyTimeout: ready, Logger: slog.New(slog.DiscardHandler),
		})
	}
	// A new JetStream cluster elects its first meta leader once every
	// configured peer is up: the three members start side by side.
	members := make([]*natsnode.Node, 3)
	errs := make([]error, 3)
	var wg sync.WaitGroup
	for i := range members {
		wg.Go(func() { members[i], errs[i] = start(i, password, certs, routes[:3], 30*time.Second) })
	}
	wg.Wait()
	for i, n := range members {
		if n != nil {
			defer n.Shutdown()
		}
		if errs[i] != nil {
			t.Fatalf("member %d: %v", i+1, errs[i])
		}
	}
	for _, c := range []struct {
		name string
		pw   string
		tls  testutil.TLSFiles
	}{
		{"wrong password", wrong, certs},
		{"certificate of another CA", password, testutil.Certs(t)},
	} {
		t.Run(c.name, func(t *testing.T) {
			n, err := start(3, c.pw, c.tls, routes, 5*time.Second)
			if err == nil {
				n.Shutdown()
				t.Fatal("the node with wrong credentials joined")
			}
			for i, m := range members {
				rz, err := m.Server().Routez(nil)
				if err != nil {
					t.Fatal(err)
				}
				for _, r := range rz.Routes {
					if r.RemoteName != "n1" && r.RemoteName != "n2" && r.RemoteName != "n3" {
						t.Fatalf("member %d routes to %q", i+1, r.RemoteName)
					}
				}
			}
		})
	}
}
