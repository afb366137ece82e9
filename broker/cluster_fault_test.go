// Process tests of cluster mode: three chatd processes, each embedding a
// NATS server routed to the others. Without the race detector for the
// reason given in durability_test.go.

//go:build !race

package broker

import (
	"context"
	"fmt"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/chatd/chatd/broker/queue/jsqueue"
	"github.com/chatd/chatd/internal/testutil"
)

// clusterProcs starts n chatd processes forming one cluster.
func clusterProcs(t *testing.T, n int) []*serverProcess {
	t.Helper()
	procs := make([]*serverProcess, n)
	routes := make([]string, n)
	for i := range n {
		procs[i] = newStoppedProcess(t)
		routes[i] = "nats://" + freeAddr(t)
	}
	for i, p := range procs {
		p.env = []string{
			"CHATD_CLUSTER_ENABLED=true",
			fmt.Sprintf("CHATD_CLUSTER_NODE=n%d", i+1),
			"CHATD_CLUSTER_NATS_LISTEN=" + freeAddr(t),
			"CHATD_CLUSTER_NAME=chatd-test",
			"CHATD_CLUSTER_LISTEN=" + strings.TrimPrefix(routes[i], "nats://"),
			"CHATD_CLUSTER_ROUTES=" + strings.Join(routes, ","),
			"CHATD_CLUSTER_SHARDS=2",
		}
	}
	// No node serves until a quorum of them is up: start them together.
	for _, p := range procs {
		p.launch(p.env...)
	}
	for _, p := range procs {
		if err := p.waitListening(); err != nil {
			t.Fatal(err)
		}
	}
	return procs
}

// stop sends SIGTERM and waits for a clean exit.
func (p *serverProcess) stop() {
	p.t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		p.t.Fatal(err)
	}
	if err := p.cmd.Wait(); err != nil {
		p.t.Fatalf("chatd exit after SIGTERM: %v", err)
	}
	p.cmd = nil
}

// clusterClient connects user to the cluster, trying first its node and
// then the others, as a phone given every node's address would.
func clusterClient(t *testing.T, procs []*serverProcess, first int, user string, onMsg paho.MessageHandler, onReconnect func()) paho.Client {
	t.Helper()
	o := paho.NewClientOptions().
		SetClientID(user).SetUsername(user).SetPassword(mint(t, user)).
		SetCleanSession(false).SetAutoReconnect(true).SetMaxReconnectInterval(200 * time.Millisecond).
		SetConnectRetry(true).SetConnectRetryInterval(100 * time.Millisecond).
		SetOrderMatters(true).SetWriteTimeout(5 * time.Second)
	for i := range procs {
		o.AddBroker("tcp://" + procs[(first+i)%len(procs)].addr)
	}
	if onMsg != nil {
		o.SetDefaultPublishHandler(onMsg)
		o.SetOnConnectHandler(func(c paho.Client) {
			c.Subscribe("inbox/"+user, 1, onMsg)
			if onReconnect != nil {
				onReconnect()
			}
		})
	}
	c := paho.NewClient(o)
	if tk := c.Connect(); !tk.WaitTimeout(30*time.Second) || tk.Error() != nil {
		t.Fatalf("connect %s: %v", user, tk.Error())
	}
	t.Cleanup(func() { c.Disconnect(100) })
	return c
}

// clusterLoad sends total messages from alice (first on node 1) to bob
// (first on node 2), 64 in flight, calling fault before message i for
// every i in faults, and checks that every PUBACKed message reached bob.
func clusterLoad(t *testing.T, procs []*serverProcess, total int, faults map[int]func()) {
	var mu sync.Mutex
	got := map[string]int{}
	var reconnects []time.Time
	onMsg := func(_ paho.Client, m paho.Message) {
		id := innerID(t, decodeEnvelope(t, m.Payload()))
		mu.Lock()
		got[id]++
		mu.Unlock()
	}
	clusterClient(t, procs, 1, "bob", onMsg, func() {
		mu.Lock()
		reconnects = append(reconnects, time.Now())
		mu.Unlock()
	})
	alice := clusterClient(t, procs, 0, "alice", nil, nil)

	acked := publishToBob(alice, total, func(i int) {
		if f := faults[i]; f != nil {
			f()
		}
	})

	err := testutil.Poll(90*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if n := len(got); n < total {
			return fmt.Errorf("%d of %d messages delivered", n, total)
		}
		return nil
	})
	if err != nil {
		// Only what was PUBACKed must arrive: checked below. What the
		// cluster holds for bob tells a stalled delivery (messages
		// waiting past his cursor) from a loss (none left).
		t.Logf("waiting for every message: %v", err)
		inspectBob(t, procs)
	}
	mu.Lock()
	defer mu.Unlock()
	lost, dups := 0, 0
	acked.Range(func(k, _ any) bool {
		if got[k.(string)] == 0 {
			lost++
			if lost <= 10 {
				t.Errorf("PUBACKed message %s never delivered", k)
			}
		}
		return true
	})
	for _, n := range got {
		dups += n - 1
	}
	if lost > 0 {
		t.Fatalf("%d PUBACKed messages lost", lost)
	}
	t.Logf("%d messages, %d delivered twice, bob connected %d times, 0 lost", total, dups, len(reconnects))
}

// inspectBob logs bob's queue and cursors as each reachable node's NATS
// sees them.
func inspectBob(t *testing.T, procs []*serverProcess) {
	for i, p := range procs {
		var addr string
		for _, e := range p.env {
			if v, ok := strings.CutPrefix(e, "CHATD_CLUSTER_NATS_LISTEN="); ok {
				addr = v
			}
		}
		nc, err := nats.Connect("nats://"+addr, nats.Timeout(5*time.Second))
		if err != nil {
			t.Logf("inspect via node %d: %v", i+1, err)
			continue
		}
		js, err := jetstream.New(nc)
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			var in jsqueue.Inspection
			in, err = jsqueue.Inspect(ctx, js, clusterPrefix, 2, "bob")
			cancel()
			t.Logf("bob via node %d: %v (error: %v)", i+1, in, err)
		}
		nc.Close()
	}
}

// TestClusterSIGKILLOneNode kills each node of three in turn with SIGKILL
// mid-stream and restarts it: its clients move to the other nodes, nothing
// PUBACKed is lost, and the node rejoins.
func TestClusterSIGKILLOneNode(t *testing.T) {
	if testing.Short() {
		t.Skip("starts and kills server processes")
	}
	procs := clusterProcs(t, 3)
	const total = 6000
	faults := map[int]func(){}
	for k, node := range []int{0, 1, 2} {
		faults[(k+1)*total/4] = func() {
			procs[node].kill()
			// The messages in flight go on through the other nodes while
			// this one is down.
			time.Sleep(time.Second)
			procs[node].launch(procs[node].env...)
			if err := procs[node].waitListening(); err != nil {
				t.Error(err)
			}
		}
	}
	clusterLoad(t, procs, total, faults)
}

// TestClusterRollingRestart restarts every node in turn, cleanly, with the
// clients connected to the cluster throughout, as docs/cluster.md's
// rolling upgrade does: before each restart, "chatd cluster status" on
// the next node must say the cluster has quorum and every replica is
// caught up.
func TestClusterRollingRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("starts and restarts server processes")
	}
	procs := clusterProcs(t, 3)
	const total = 3000
	faults := map[int]func(){}
	for k, node := range []int{0, 1, 2} {
		faults[(k+1)*total/4] = func() {
			waitHealthy(t, procs[node])
			procs[node].stop()
			procs[node].launch(procs[node].env...)
			if err := procs[node].waitListening(); err != nil {
				t.Error(err)
			}
		}
	}
	clusterLoad(t, procs, total, faults)
	waitHealthy(t, procs[0])
}

// waitHealthy runs "chatd cluster status" against p until it exits 0:
// quorum, and every replica caught up.
func waitHealthy(t *testing.T, p *serverProcess) {
	t.Helper()
	var out []byte
	err := testutil.Poll(60*time.Second, func() error {
		var err error
		out, err = exec.Command(p.bin, "cluster", "status", "--http", p.http).CombinedOutput()
		return err
	})
	if err != nil {
		t.Fatalf("chatd cluster status on %s: %v\n%s", p.http, err, out)
	}
	if !regexp.MustCompile(`(?m)^quorum\s+true$`).Match(out) {
		t.Fatalf("chatd cluster status exited 0 without saying quorum true:\n%s", out)
	}
}
