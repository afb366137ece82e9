// Package natstest starts in-process NATS JetStream clusters for tests.
// Only _test.go files import it.
package natstest

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"testing"

	"github.com/chatd/chatd/broker/cluster/natsnode"
)

// Cluster starts n routed JetStream nodes on loopback, named n1, n2, ...,
// each in its own t.TempDir, and shuts them down when t ends.
func Cluster(t testing.TB, n int) []*natsnode.Node {
	t.Helper()
	ports := FreePorts(t, n)
	var routes []string
	for _, p := range ports {
		routes = append(routes, fmt.Sprintf("nats://127.0.0.1:%d", p))
	}
	// Side by side: a JetStream cluster has no meta leader, and Start does
	// not return, until a quorum of its nodes is up.
	nodes := make([]*natsnode.Node, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			nodes[i], errs[i] = natsnode.Start(context.Background(), natsnode.Config{
				Name: fmt.Sprintf("n%d", i+1), Dir: t.TempDir(), Listen: "127.0.0.1:0",
				ClusterName: "natstest", ClusterListen: fmt.Sprintf("127.0.0.1:%d", ports[i]), Routes: routes,
				Logger: slog.New(slog.DiscardHandler),
			})
		})
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, node := range nodes {
			if node != nil {
				node.Shutdown()
			}
		}
	})
	for i, err := range errs {
		if err != nil {
			t.Fatalf("node %d: %v", i+1, err)
		}
	}
	return nodes
}

// FreePorts returns n loopback ports free right now.
func FreePorts(t testing.TB, n int) []int {
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
