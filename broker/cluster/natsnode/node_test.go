package natsnode

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// freePorts returns n loopback ports free right now.
func freePorts(t *testing.T, n int) []int {
	t.Helper()
	var ls []net.Listener
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		l.Close()
	}
	return ports
}

// verifyNoLeaks checks that Shutdown stopped every goroutine it started.
func verifyNoLeaks(t *testing.T) {
	before := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, before) })
}

func TestSingleNodeServesJetStream(t *testing.T) {
	verifyNoLeaks(t)
	n, err := Start(context.Background(), Config{Name: "solo", Dir: t.TempDir(), Listen: "127.0.0.1:0", Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Shutdown()
	ctx := context.Background()
	if _, err := n.JetStream().CreateStream(ctx, jetstream.StreamConfig{Name: "T", Subjects: []string{"t.>"}}); err != nil {
		t.Fatal(err)
	}
	ack, err := n.JetStream().Publish(ctx, "t.a", []byte("x"))
	if err != nil || ack.Sequence != 1 {
		t.Fatalf("publish: %+v, %v", ack, err)
	}

	// A second node can join the same server by URL.
	joined, err := Start(ctx, Config{URL: n.ClientURL(), Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	if joined.Server() != nil {
		t.Fatal("a joined node has no server of its own")
	}
	s, err := joined.JetStream().Stream(ctx, "T")
	if err != nil {
		t.Fatal(err)
	}
	if m, err := s.GetMsg(ctx, 1); err != nil || string(m.Data) != "x" {
		t.Fatalf("read through the joined connection: %v, %v", m, err)
	}
	joined.Shutdown()
	n.Shutdown()
	n.Shutdown() // idempotent
}

func TestStartFailsClearly(t *testing.T) {
	verifyNoLeaks(t)
	ports := freePorts(t, 2)
	cases := []struct {
		name string
		cfg  Config
		want string
	}{
		{"no dir", Config{Name: "x"}, "Dir is required"},
		{"bad listen", Config{Name: "x", Dir: t.TempDir(), Listen: "nonsense"}, "Listen"},
		{"cluster without name", Config{Dir: t.TempDir(), ClusterName: "c"}, "Name is required"},
		{"bad route", Config{Name: "x", Dir: t.TempDir(), ClusterName: "c", Routes: []string{"::"}}, "route"},
		{
			// One node of three cannot elect a meta leader.
			"no quorum",
			Config{
				Name: "lonely", Dir: t.TempDir(), ClusterName: "c", ClusterListen: fmt.Sprintf("127.0.0.1:%d", ports[0]),
				Routes:       []string{fmt.Sprintf("nats://127.0.0.1:%d", ports[0]), fmt.Sprintf("nats://127.0.0.1:%d", ports[1]), "nats://127.0.0.1:1"},
				ReadyTimeout: 2 * time.Second,
			},
			"no JetStream meta leader",
		},
		{"unreachable url", Config{URL: fmt.Sprintf("nats://127.0.0.1:%d", ports[1]), ReadyTimeout: time.Second}, "connect to nats"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			c.cfg.Logger = quiet()
			n, err := Start(context.Background(), c.cfg)
			if err == nil {
				n.Shutdown()
				t.Fatal("started")
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q does not say %q", err, c.want)
			}
		})
	}
}
