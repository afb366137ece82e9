package natsnode_test

import (
	"context"
	"strings"
	"testing"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"

	"github.com/chatd/chatd/broker/natsnode/natstest"
)

// TestClusterReplicatesAcrossNodes lives in package natsnode_test, as
// natstest imports natsnode.
func TestClusterReplicatesAcrossNodes(t *testing.T) {
	before := goleak.IgnoreCurrent()
	// Registered first, so it runs after the nodes' shutdown.
	t.Cleanup(func() { goleak.VerifyNone(t, before) })
	nodes := natstest.Cluster(t, 3)
	ctx := context.Background()
	if got := nodes[0].ClusterURL(); !strings.HasPrefix(got, "nats://127.0.0.1:") {
		t.Fatalf("cluster URL %q", got)
	}
	_, err := nodes[0].JetStream().CreateStream(ctx, jetstream.StreamConfig{Name: "R", Subjects: []string{"r.>"}, Replicas: 3})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := nodes[0].JetStream().Publish(ctx, "r.a", []byte("replicated")); err != nil {
		t.Fatal(err)
	}
	s, err := nodes[2].JetStream().Stream(ctx, "R")
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.Cluster == nil || len(info.Cluster.Replicas) != 2 {
		t.Fatalf("stream cluster info %+v, want a leader and 2 replicas", info.Cluster)
	}
	if m, err := s.GetMsg(ctx, 1); err != nil || string(m.Data) != "replicated" {
		t.Fatalf("read on node 3: %v, %v", m, err)
	}
}
