package natsnode_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"

	"github.com/chatd/chatd/broker/cluster/natsnode"
	"github.com/chatd/chatd/broker/cluster/natsnode/natstest"
)

// TestClusterReplicatesAcrossNodes lives in package natsnode_test, as
// natstest imports natsnode.
func TestClusterReplicatesAcrossNodes(t *testing.T) {
	before := goleak.IgnoreCurrent()
	// Registered first, so it runs after the nodes' shutdown.
	t.Cleanup(func() { goleak.VerifyNone(t, before) })
	nodes := natstest.Cluster(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if got := nodes[0].ClusterURL(); !strings.HasPrefix(got, "nats://127.0.0.1:") {
		t.Fatalf("cluster URL %q", got)
	}
	// A new cluster may leave a request unanswered while its groups
	// elect leaders: each step is asked again until answered.
	var (
		st   jetstream.Stream
		info *jetstream.StreamInfo
	)
	err := natsnode.UntilAnswered(ctx, func(ctx context.Context) error {
		_, err := nodes[0].JetStream().CreateOrUpdateStream(ctx, jetstream.StreamConfig{Name: "R", Subjects: []string{"r.>"}, Replicas: 3})
		return err
	})
	if err == nil {
		err = natsnode.UntilAnswered(ctx, func(ctx context.Context) error {
			_, err := nodes[0].JetStream().Publish(ctx, "r.a", []byte("replicated"), jetstream.WithMsgID("once"))
			return err
		})
	}
	if err == nil {
		err = natsnode.UntilAnswered(ctx, func(ctx context.Context) (err error) {
			if st, err = nodes[2].JetStream().Stream(ctx, "R"); err != nil {
				return err
			}
			info, err = st.Info(ctx)
			return err
		})
	}
	if err != nil {
		t.Fatal(err)
	}
	if info.Cluster == nil || len(info.Cluster.Replicas) != 2 {
		t.Fatalf("stream cluster info %+v, want a leader and 2 replicas", info.Cluster)
	}
	var m *jetstream.RawStreamMsg
	err = natsnode.UntilAnswered(ctx, func(ctx context.Context) (err error) {
		m, err = st.GetMsg(ctx, 1)
		return err
	})
	if err != nil || string(m.Data) != "replicated" {
		t.Fatalf("read on node 3: %v, %v", m, err)
	}
}
