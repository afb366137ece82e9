package jsqueue

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/chatd/chatd/broker/cluster/natsnode"
	"github.com/chatd/chatd/broker/cluster/natsnode/natstest"
	"github.com/chatd/chatd/broker/queue"
)

// cluster is three routed NATS nodes on loopback, each with a Store, R3.
type cluster struct {
	t      *testing.T
	nodes  []*natsnode.Node
	stores []*Store
}

func newCluster(t *testing.T) *cluster {
	before := goleak.IgnoreCurrent()
	c := &cluster{t: t}
	// Registered first, so it runs after the nodes' and stores' cleanups.
	t.Cleanup(func() { goleak.VerifyNone(t, before) })
	c.nodes = natstest.Cluster(t, 3)
	for i, n := range c.nodes {
		s, err := Open(context.Background(), Options{
			Conn: n.Conn(), Settings: testQueue(nil), Replicas: 3, Shards: 2, Logger: quiet(),
			PublishTimeout: 2 * time.Second,
		})
		if err != nil {
			t.Fatalf("store on node %d: %v", i+1, err)
		}
		c.stores = append(c.stores, s)
		t.Cleanup(func() {
			if err := s.Close(); err != nil {
				t.Error(err)
			}
		})
	}
	return c
}

func TestClusterReadsAndCursorsAcrossNodes(t *testing.T) {
	c := newCluster(t)
	s1, s3 := c.stores[0], c.stores[2]
	if _, _, err := s3.Attach("bob", "phone", false); err != nil {
		t.Fatal(err)
	}
	var seqs []uint64
	for i := range 3 {
		st, m := appendMsg(t, s1, &queue.Request{To: "bob", Sender: "alice", ID: fmt.Sprint(i), Data: []byte(fmt.Sprint("m", i))})
		if st != queue.Stored {
			t.Fatalf("append %d through node 1: %v", i, st)
		}
		seqs = append(seqs, m.Seq)
	}
	eq(t, "read on node 3", readData(t, s3, "bob", 0), []string{"m0", "m1", "m2"})
	// A resend through another node is still a duplicate.
	if st, _ := appendMsg(t, c.stores[1], &queue.Request{To: "bob", Sender: "alice", ID: "1", Data: []byte("again")}); st != queue.Duplicate {
		t.Fatalf("resend through node 2: %v, want Duplicate", st)
	}
	if head, err := s3.Head("bob"); err != nil || head != seqs[2] {
		t.Fatalf("head on node 3: %d, %v; want %d", head, err, seqs[2])
	}

	// The phone acknowledges on node 3, then moves to node 1: it resumes there.
	s3.Ack("bob", "phone", seqs[1])
	s3.Detach("bob", "phone")
	waitDepth(t, s1, "bob", 1)
	if cur, _, err := s1.Attach("bob", "phone", false); err != nil || cur != seqs[1] {
		t.Fatalf("phone on node 1: cursor %d, %v; want %d", cur, err, seqs[1])
	}
	eq(t, "left for the phone", readData(t, s1, "bob", seqs[1]), []string{"m2"})

	// A laptop added on node 2 holds back what it has not received, though
	// node 1, where the phone acknowledges everything, never saw it attach.
	if cur, _, err := c.stores[1].Attach("bob", "laptop", false); err != nil || cur != seqs[2] {
		t.Fatalf("laptop on node 2: cursor %d, %v; want %d", cur, err, seqs[2])
	}
	st, m := appendMsg(t, s1, &queue.Request{To: "bob", Sender: "alice", ID: "3", Data: []byte("m3")})
	if st != queue.Stored {
		t.Fatal(st)
	}
	s1.Ack("bob", "phone", m.Seq)
	waitDepth(t, s1, "bob", 1)
	eq(t, "kept for the laptop", readData(t, c.stores[1], "bob", seqs[2]), []string{"m3"})
}

// waitDepth waits until the lazy flush brought user's queue to depth.
func waitDepth(t *testing.T, s *Store, user string, depth uint64) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		d, err := s.Depth(user)
		if err == nil && d == depth {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("depth of %s stays %d (%v), want %d", user, d, err, depth)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestClusterLosesNothingAcknowledgedWhenANodeStops appends through node 1
// while the leader of the stream it writes to is shut down: every message
// reported Stored is there afterwards, in order, read from a node that is
// still up.
func TestClusterLosesNothingAcknowledgedWhenANodeStops(t *testing.T) {
	for _, victim := range []string{"stream leader", "node 1"} {
		t.Run(victim, func(t *testing.T) { testNodeStops(t, victim == "node 1") })
	}
}

func testNodeStops(t *testing.T, ownNode bool) {
	const n, users = 3000, 5
	c := newCluster(t)
	s1 := c.stores[0]
	// The victim is node 1, whose client connection then moves to another
	// node, or the leader of the stream of u0 (both shards are written).
	_, shard := s1.names.subject("u0")
	info, err := s1.streams[shard].Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	victim := -1
	for i := range c.nodes {
		if info.Cluster != nil && info.Cluster.Leader == fmt.Sprintf("n%d", i+1) {
			victim = i
		}
	}
	if victim < 0 {
		t.Fatalf("no leader for shard %d: %+v", shard, info.Cluster)
	}
	if ownNode {
		victim = 0
	}
	t.Logf("shutting down n%d midway; %s is led by %s", victim+1, info.Config.Name, info.Cluster.Leader)

	type outcome struct {
		st  queue.Status
		seq uint64
		err error
	}
	results := make([]outcome, n)
	var order []int
	var mu sync.Mutex
	var wg sync.WaitGroup
	var stored atomic.Int64
	halfway := make(chan struct{})
	for i := range n {
		wg.Add(1)
		s1.Append(&queue.Request{To: fmt.Sprint("u", i%users), Sender: "s", ID: fmt.Sprint(i), Data: []byte(fmt.Sprint(i)),
			Done: func(st queue.Status, m queue.Message, err error) {
				mu.Lock()
				results[i] = outcome{st, m.Seq, err}
				order = append(order, i)
				mu.Unlock()
				if stored.Add(1) == n/3 {
					close(halfway)
				}
				wg.Done()
			}})
		if i == n/2 {
			<-halfway
			if victim == 0 {
				// Only the server: the store's client connection survives
				// it and moves to another node.
				c.nodes[0].Server().Shutdown()
			} else {
				c.stores[victim].Close()
				c.nodes[victim].Shutdown()
			}
		}
	}
	wg.Wait()
	if !slices.IsSorted(order) {
		t.Fatal("Done was not called in request order")
	}
	reader := c.stores[(victim+1)%3]
	var failed int
	for u := range users {
		user := fmt.Sprint("u", u)
		msgs, err := reader.Read(user, 0, n)
		if err != nil {
			t.Fatal(err)
		}
		have := make(map[string]uint64)
		for _, m := range msgs {
			have[string(m.Data)] = m.Seq
		}
		for i := u; i < n; i += users {
			r := results[i]
			switch r.st {
			case queue.Stored:
				if seq, ok := have[fmt.Sprint(i)]; !ok || seq != r.seq {
					t.Fatalf("message %d to %s acknowledged as seq %d, read back: %v (seq %d)", i, user, r.seq, ok, seq)
				}
			case queue.Failed:
				failed++
				t.Logf("message %d: %v", i, r.err)
			default:
				t.Fatalf("message %d: status %v", i, r.st)
			}
		}
	}
	t.Logf("%d publishes sent again", s1.retries.Load())
	if failed > 0 {
		t.Fatalf("%d of %d messages failed across the leader's shutdown", failed, n)
	}
}
