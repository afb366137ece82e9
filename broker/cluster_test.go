package broker

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chatd/chatd/broker/cluster/natsnode"
	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/testutil"
	"github.com/nats-io/nats.go"
)

// testClusterPassword secures the test clusters' NATS.
const testClusterPassword = "test-cluster-password-0123456789abcdef"

// startTestCluster runs n chatd nodes in this process, each embedding a NATS
// server routed to the others, with queues replicated on every node.
func startTestCluster(t *testing.T, n int) []*Server {
	t.Helper()
	return startTestClusterWith(t, n, nil)
}

// startTestClusterWith is startTestCluster with mutate, if set, applied
// to every node's configuration.
func startTestClusterWith(t *testing.T, n int, mutate func(*config.Config)) []*Server {
	t.Helper()
	routes := make([]string, n)
	cfgs := make([]config.Config, n)
	for i := range n {
		routes[i] = "nats://" + freeAddr(t)
	}
	for i := range n {
		cfg := config.Default()
		cfg.DataDir = t.TempDir()
		cfg.Listen = "127.0.0.1:0"
		cfg.HTTP = "127.0.0.1:0"
		cfg.Limits.PublishRate = 1e6
		cfg.Limits.PublishBytesRate = 1 << 30
		cfg.Limits.ConnectRate = 1e6
		cfg.Queue.MinFreeBytes = 1 << 20
		cl := &cfg.Cluster
		cl.Enabled, cl.Node, cl.Name = true, fmt.Sprintf("n%d", i+1), "chatd-test"
		cl.NATSListen, cl.Listen = freeAddr(t), strings.TrimPrefix(routes[i], "nats://")
		cl.Routes, cl.Replicas, cl.Shards = strings.Join(routes, ","), min(3, n), 2
		// Every test cluster asks its NATS clients and routes for it.
		cl.Password = testClusterPassword
		if mutate != nil {
			mutate(&cfg)
		}
		cfgs[i] = cfg
	}
	// A JetStream cluster has no leader until a quorum is up: the nodes
	// must start side by side.
	servers := make([]*Server, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := New(Options{Config: cfgs[i], Secret: testSecret, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			if err == nil {
				err = s.Start()
			}
			servers[i], errs[i] = s, err
		}()
	}
	wg.Wait()
	// The nodes stop side by side too, as a whole cluster stopped at once
	// would: one after the other, the last would flush its cursors to a
	// JetStream without quorum and wait out the request's 5 s timeout.
	t.Cleanup(func() {
		var wg sync.WaitGroup
		for _, s := range servers {
			if s != nil {
				wg.Go(func() { stopServer(t, s) })
			}
		}
		wg.Wait()
	})
	for i := range servers {
		if errs[i] != nil {
			t.Fatalf("node %d: %v", i+1, errs[i])
		}
	}
	return servers
}

// TestClusterSecured: nodes whose NATS asks for a password and speaks
// TLS only (mutual on routes) form a cluster that carries messages
// between them and reports itself healthy on /cluster/status, and a
// plain NATS client gets nothing from them.
func TestClusterSecured(t *testing.T) {
	certs := testutil.Certs(t)
	nodes := startTestClusterWith(t, 3, func(c *config.Config) {
		c.Cluster.TLS = config.ClusterTLS{CertFile: certs.CertFile, KeyFile: certs.KeyFile, CAFile: certs.CAFile}
	})
	alice := mustDial(t, nodes[0], "alice", phoneOpt{})
	bob := mustDial(t, nodes[1], "bob", phoneOpt{})
	alice.send("bob", "secured-1", "")
	if id := innerID(t, bob.waitFor(1)[0]); id != "secured-1" {
		t.Fatalf("bob got %s", id)
	}
	// Its status: quorum, the other nodes heard, every group led and
	// replicated on the three nodes.
	var st ClusterStatus
	testutil.EventuallyNoError(t, 20*time.Second, func() error {
		code, body := scrape(t, nodes[0], "/cluster/status")
		if err := json.Unmarshal([]byte(body), &st); err != nil {
			return fmt.Errorf("status %d %s: %w", code, body, err)
		}
		switch {
		case code != 200 || !st.Quorum || len(st.Peers) != 2 || st.Meta == nil || st.Meta.Leader == "" || len(st.Streams) == 0:
			return fmt.Errorf("status %d: %s", code, body)
		case len(st.Lagging) > 0:
			return fmt.Errorf("lagging: %v", st.Lagging)
		}
		return nil
	}, "node 1 never reported a healthy cluster")
	for _, g := range st.Streams {
		if g.Leader == "" || len(g.Replicas) != 2 {
			t.Errorf("stream %s: leader %q, replicas %+v; want a leader and 2 replicas", g.Name, g.Leader, g.Replicas)
		}
	}
	url := nodes[2].cluster.node.ClientURL()
	if nc, err := nats.Connect(url, nats.Timeout(5*time.Second)); err == nil {
		nc.Close()
		t.Fatalf("a plain NATS client connected to %s", url)
	}
}

// TestClusterCrossNode sends from alice on node 1 to bob on node 2: bob
// gets every message in order with the same envelope as on one node, and
// alice gets the delivered receipts bob's node makes.
func TestClusterCrossNode(t *testing.T) {
	nodes := startTestCluster(t, 3)
	alice := mustDial(t, nodes[0], "alice", phoneOpt{})
	bob := mustDial(t, nodes[1], "bob", phoneOpt{})
	const n = 50
	for i := range n {
		alice.send("bob", fmt.Sprintf("m-%d", i), `,"text":"hi"`)
	}
	got := bob.waitFor(n)
	for i, e := range got[:n] {
		if id := innerID(t, e); id != fmt.Sprintf("m-%d", i) || e.Kind != "msg" || e.From != "alice" || e.To != "bob" {
			t.Fatalf("bob's message %d: %+v (id %s)", i, e, id)
		}
	}
	delivered := map[string]bool{}
	for seen := 0; len(delivered) < n; {
		events := alice.events()
		for _, e := range events[seen:] {
			if e["status"] == "delivered" {
				for _, id := range strings.Split(ids(e), ",") {
					delivered[id] = true
				}
			}
		}
		seen = len(events)
		if len(delivered) < n {
			alice.waitFor(seen + 1)
		}
	}

	// A message to a user with no device online waits in the replicated
	// queue and reaches that user's first device on any node.
	alice.send("carol", "offline-1", "")
	carol := mustDial(t, nodes[2], "carol", phoneOpt{})
	if id := innerID(t, carol.waitFor(1)[0]); id != "offline-1" {
		t.Fatalf("carol got %s, want offline-1", id)
	}
}

// TestClusterPresenceTypingTakeover: presence counts devices on every
// node, typing crosses nodes, and a device reconnecting to another node
// takes its session over there.
func TestClusterPresenceTypingTakeover(t *testing.T) {
	nodes := startTestCluster(t, 3)
	w := watchPresence(t, nodes[2], "carol")

	handset := mustDial(t, nodes[0], "bob", phoneOpt{clientID: "bob/phone"})
	if e := w.waitUser(t, "bob", 1)[0]; e["online"] != true {
		t.Fatalf("bob's first device, on another node: %v", e)
	}
	laptop := mustDial(t, nodes[1], "bob", phoneOpt{clientID: "bob/laptop"})

	// Typing from node 3 reaches both of bob's devices, on nodes 1 and 2.
	alice := mustDial(t, nodes[2], "alice", phoneOpt{})
	alice.publish("typing/bob", []byte("{}"))
	for _, p := range []*phone{handset, laptop} {
		if e := p.waitFor(1)[0]; e.Kind != "typing" || e.From != "alice" {
			t.Fatalf("typing on another node: %+v", e)
		}
	}

	// The phone moves to node 3: its old connection on node 1 is ended,
	// and it gets what is sent from then on, once.
	moved := mustDial(t, nodes[2], "bob", phoneOpt{clientID: "bob/phone"})
	testutil.Eventually(t, 10*time.Second, func() bool { return !handset.client.IsConnectionOpen() },
		"the phone's connection on node 1 survived its takeover on node 3")
	alice.send("bob", "after-move", "")
	if id := innerID(t, moved.waitFor(1)[0]); id != "after-move" {
		t.Fatalf("moved phone got %s", id)
	}

	// Bob stays online through the move; he goes offline when his last
	// device, on any node, leaves.
	laptop.client.Disconnect(100)
	moved.client.Disconnect(100)
	got := w.waitUser(t, "bob", 2)
	if got[1]["online"] != false || len(got) != 2 {
		t.Fatalf("bob's presence on a third node: %v", got)
	}
}

// TestClusterGroups: a group made through one node's API is known to the
// others, and a group message from one node reaches members on the others.
func TestClusterGroups(t *testing.T) {
	nodes := startTestCluster(t, 3)
	if st, body := httpJSON(t, nodes[0], "POST", "/v1/groups", "alice", map[string]any{"id": "g1", "members": []string{"bob", "carol"}}); st != 201 {
		t.Fatalf("create on node 1: %d %v", st, body)
	}
	// Membership changes on node 2 are seen by node 3.
	if st, body := httpJSON(t, nodes[1], "PUT", "/v1/groups/g1/members/dave", "alice", nil); st != 200 {
		t.Fatalf("add dave on node 2: %d %v", st, body)
	}
	testutil.EventuallyNoError(t, 20*time.Second, func() error {
		if _, g := httpJSON(t, nodes[2], "GET", "/v1/groups/g1", "alice", nil); fmt.Sprint(g["members"]) != "[alice bob carol dave]" {
			return fmt.Errorf("node 3 sees %v", g)
		}
		return nil
	}, "dave's membership never reached node 3")
	alice := mustDial(t, nodes[2], "alice", phoneOpt{})
	bob := mustDial(t, nodes[0], "bob", phoneOpt{})
	carol := mustDial(t, nodes[1], "carol", phoneOpt{})
	dave := mustDial(t, nodes[2], "dave", phoneOpt{})
	alice.publish("group/g1", []byte(`{"id":"gm-1","text":"hi all"}`))
	for _, p := range []*phone{bob, carol, dave} {
		if e := p.waitFor(1)[0]; e.Kind != "msg" || e.From != "alice" || e.To != p.user || p.events()[0]["group"] != "g1" {
			t.Fatalf("%s got %+v", p.user, e)
		}
	}
}

// TestClusterMedia: a file uploaded through one node is served, in
// ranges too, by the others.
func TestClusterMedia(t *testing.T) {
	nodes := startTestCluster(t, 3)
	do := func(s *Server, method, path, user string, body []byte, hdr map[string]string) (*http.Response, []byte) {
		t.Helper()
		h := http.Header{}
		h.Set("Authorization", "Bearer "+mint(t, user))
		for k, v := range hdr {
			h.Set(k, v)
		}
		return httpCall(t, nil, s, method, path, h, bytes.NewReader(body))
	}
	photo := bytes.Repeat([]byte("0123456789"), 50000)
	resp, b := do(nodes[0], "POST", "/v1/media", "alice", photo, map[string]string{"Content-Type": "image/jpeg"})
	var up struct {
		ID string `json:"id"`
	}
	if err := json.Unmarshal(b, &up); err != nil || resp.StatusCode != 201 {
		t.Fatalf("upload on node 1: %d %s", resp.StatusCode, b)
	}
	for _, s := range nodes[1:] {
		resp, got := do(s, "GET", "/v1/media/"+up.ID, "bob", nil, map[string]string{"Range": "bytes=200000-200009"})
		if resp.StatusCode != 206 || string(got) != "0123456789" || resp.Header.Get("Content-Type") != "image/jpeg" {
			t.Fatalf("range from another node: %d %q", resp.StatusCode, got)
		}
		if resp, got := do(s, "GET", "/v1/media/"+up.ID, "bob", nil, nil); resp.StatusCode != 200 || !bytes.Equal(got, photo) {
			t.Fatalf("whole file from another node: %d, %d bytes", resp.StatusCode, len(got))
		}
	}
}

// TestClusterJoinByURL runs two chatd nodes on a NATS server they did not
// start, as with cluster.url, and sends across them.
func TestClusterJoinByURL(t *testing.T) {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	existing, err := natsnode.Start(context.Background(), natsnode.Config{Name: "existing", Dir: t.TempDir(), Listen: "127.0.0.1:0", Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(existing.Shutdown)
	var nodes []*Server
	for i := range 2 {
		s := startServer(t, t.TempDir(), func(c *config.Config) {
			cl := &c.Cluster
			cl.Enabled, cl.Node, cl.URL, cl.Replicas, cl.Shards = true, fmt.Sprintf("n%d", i+1), existing.ClientURL(), 1, 2
		})
		nodes = append(nodes, s)
	}
	alice := mustDial(t, nodes[0], "alice", phoneOpt{})
	bob := mustDial(t, nodes[1], "bob", phoneOpt{})
	alice.send("bob", "by-url", "")
	if id := innerID(t, bob.waitFor(1)[0]); id != "by-url" {
		t.Fatalf("bob got %s", id)
	}
}
