package loadtest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// testConfig is a short, light run of scenario against broker.
func testConfig(scenario, broker string) Config {
	cfg := DefaultConfig()
	cfg.Scenario = scenario
	cfg.Broker = broker
	cfg.Secret = testSecret
	cfg.Users = 6
	cfg.Duration = 1500 * time.Millisecond
	cfg.Grace = 10 * time.Second
	cfg.Rate = 600
	cfg.Size = 200
	cfg.Seed = 1
	return cfg
}

func runOK(t *testing.T, cfg Config) *Report {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	rep, err := Run(ctx, cfg, nil)
	if err != nil {
		t.Fatalf("run %s: %v", cfg.Scenario, err)
	}
	return rep
}

// assertBalanced checks the run's accounting: every message sent is
// exactly one of failed, refused, in flight or stored, and each stored one
// delivered or lost at every device of its recipient; every sent copy
// owed was received or lost; nothing was lost, misrouted or reordered,
// and the run met no error.
func assertBalanced(t *testing.T, rep *Report) {
	t.Helper()
	c := rep.Counts
	d := int64(rep.devices())
	if stored := c.Sent - c.SendFailed - c.Refused - c.InFlight; c.Unique+c.Lost != stored*d {
		t.Errorf("unbalanced: (unique %d + lost %d) / %d devices != sent %d - failed %d - refused %d - in flight %d",
			c.Unique, c.Lost, d, c.Sent, c.SendFailed, c.Refused, c.InFlight)
	}
	if c.CopiesReceived+c.CopiesLost != c.CopiesExpected {
		t.Errorf("unbalanced: copies received %d + lost %d != expected %d", c.CopiesReceived, c.CopiesLost, c.CopiesExpected)
	}
	if c.CopiesLost != 0 {
		t.Errorf("%d sent copies lost: %v", c.CopiesLost, rep.LostSamples)
	}
	if c.Lost != 0 {
		t.Errorf("%d messages lost: %v", c.Lost, rep.LostSamples)
	}
	if c.Delivered != c.Unique+c.Duplicates {
		t.Errorf("delivered %d != unique %d + duplicates %d", c.Delivered, c.Unique, c.Duplicates)
	}
	if code := rep.ExitCode(); code != 0 {
		t.Errorf("exit code %d: %v; errors %q", code, rep.Failures(), rep.Errors)
	}
}

func TestRunChat(t *testing.T) {
	broker := startChatd(t)
	cfg := testConfig(ScenarioChat, broker)
	cfg.ServerPID = os.Getpid() // the server runs in this process
	rep := runOK(t, cfg)
	assertBalanced(t, rep)
	c := rep.Counts
	if c.Sent == 0 || c.Unique != c.Sent || c.Acked != c.Sent || c.InFlight != 0 {
		t.Errorf("counts %+v: want every message PUBACKed and delivered", c)
	}
	if rep.Deliver.Count != c.Unique || rep.Ack.Count != c.Acked {
		t.Errorf("latency samples: deliver %d, ack %d; counts %+v", rep.Deliver.Count, rep.Ack.Count, c)
	}
	if rep.Connections.Clients != cfg.Users || rep.Server == nil || len(rep.Series) == 0 {
		t.Errorf("clients %d, server %v, %d points", rep.Connections.Clients, rep.Server, len(rep.Series))
	}

	dir := t.TempDir()
	jsonPath, htmlPath := filepath.Join(dir, "r.json"), filepath.Join(dir, "r.html")
	if err := rep.WriteJSON(jsonPath); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(jsonPath)
	if err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatalf("report JSON: %v", err)
	}
	if back.Counts != rep.Counts || back.RunTag != rep.RunTag {
		t.Errorf("JSON round trip changed the counts: %+v vs %+v", back.Counts, rep.Counts)
	}
	if err := rep.WriteHTML(htmlPath); err != nil {
		t.Fatal(err)
	}
	page, err := os.ReadFile(htmlPath)
	if err != nil {
		t.Fatal(err)
	}
	if n := bytes.Count(page, []byte("<svg")); n < 4 {
		t.Errorf("HTML report has %d charts, want at least 4", n)
	}
	for _, external := range []string{"<script", "src=", "<link", "@import"} {
		if bytes.Contains(page, []byte(external)) {
			t.Errorf("HTML report is not self-contained: contains %q", external)
		}
	}
	var table bytes.Buffer
	if err := rep.WriteTable(&table); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"send->deliver", "PASS", "server"} {
		if !strings.Contains(table.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, table.String())
		}
	}
}

// TestRunChatWithFlooder runs the chat users beside one abusive client:
// the flood is answered, and every chat message still arrives once.
func TestRunChatWithFlooder(t *testing.T) {
	cfg := testConfig(ScenarioChat, startChatd(t))
	cfg.Flooders = 1
	rep := runOK(t, cfg)
	assertBalanced(t, rep)
	if c := rep.Counts; c.Sent == 0 || c.Unique != c.Sent {
		t.Errorf("counts %+v: want every chat message delivered", c)
	}
	if f := rep.Flood; f == nil || f.Clients != 1 || f.Sent == 0 || f.Acked == 0 {
		t.Errorf("flood %+v: want one flooder whose publishes were answered", f)
	}
}

func TestRunChatPlain(t *testing.T) {
	cfg := testConfig(ScenarioChat, "tcp://"+startMochi(t))
	cfg.Plain = true
	cfg.Secret = nil
	cfg.Duration = time.Second
	rep := runOK(t, cfg)
	assertBalanced(t, rep)
	if rep.Counts.Sent == 0 || rep.Counts.Unique != rep.Counts.Sent {
		t.Errorf("counts %+v", rep.Counts)
	}
}

// TestRunChatPlainWithPasswords drives a broker that checks usernames and
// passwords, with another topic layout, as EMQX or HiveMQ set up for a
// chat would: the run passes with the accounts' credentials, and cannot
// connect without them.
func TestRunChatPlainWithPasswords(t *testing.T) {
	broker := "tcp://" + startMochiWith(t, &passwordAuth{password: "s3cret"})
	cfg := testConfig(ScenarioChat, broker)
	cfg.Plain, cfg.Secret = true, nil
	cfg.Duration = time.Second
	cfg.Topic = "chat/%s/inbox"
	cfg.Username, cfg.Password = "acct-%s", "s3cret"
	rep := runOK(t, cfg)
	assertBalanced(t, rep)
	if rep.Counts.Sent == 0 || rep.Counts.Unique != rep.Counts.Sent {
		t.Errorf("counts %+v", rep.Counts)
	}

	cfg.Password = "wrong"
	cfg.ConnectTimeout = 2 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if rep, err := Run(ctx, cfg, nil); err == nil && rep.ExitCode() == 0 {
		t.Error("a run with the wrong password passed")
	}
}

func TestRunDrain(t *testing.T) {
	cfg := testConfig(ScenarioDrain, startChatd(t))
	cfg.Messages = 2000
	cfg.Senders = 2
	cfg.Rate = 0
	cfg.Duration = 20 * time.Second // a bound; the drain ends when the queue is empty
	rep := runOK(t, cfg)
	assertBalanced(t, rep)
	d := rep.Drain
	if d == nil || !d.Complete || d.Queued != int64(cfg.Messages) || rep.Counts.Unique != int64(cfg.Messages) {
		t.Fatalf("drain %+v, counts %+v", d, rep.Counts)
	}
	if d.DrainSec <= 0 || d.DrainRate <= 0 || d.QueueRate <= 0 {
		t.Errorf("drain timings %+v", d)
	}
}

func TestRunConnect(t *testing.T) {
	cfg := testConfig(ScenarioConnect, startChatd(t))
	cfg.Users = 40
	cfg.ConnectRate = 0
	cfg.Hold = 300 * time.Millisecond
	cfg.ServerPID = os.Getpid()
	rep := runOK(t, cfg)
	assertBalanced(t, rep)
	k := rep.Connect
	if k == nil || k.Connected != cfg.Users || k.Failed != 0 {
		t.Fatalf("connect %+v", k)
	}
	if rep.Connections.Connack.Count != int64(cfg.Users) || rep.Connections.Suback.Count != int64(cfg.Users) {
		t.Errorf("connect latencies %+v", rep.Connections)
	}
	if k.ServerRSSHeldMB <= 0 {
		t.Errorf("server memory not measured: %+v", k)
	}
	// Memory is read once the hold after the last connection is over.
	if k.SettledSec < cfg.Hold.Seconds() || k.SettledSec > k.HoldSec+time.Second.Seconds() {
		t.Errorf("settled %.3f s, hold %.3f s (asked %s): want the reading a hold after the last CONNACK", k.SettledSec, k.HoldSec, cfg.Hold)
	}
}

// TestRunRestart queues messages for a few offline users on a real chatd
// (this test binary serving), SIGKILLs it, starts it again and drains:
// every PUBACKed message arrives once, in order, and the start-up times
// are measured on the new process.
func TestRunRestart(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	addr := freeAddr(t)
	t.Setenv(serveEnv, t.TempDir()+" "+addr)
	cfg := testConfig(ScenarioRestart, "tcp://"+addr)
	// Within chatd's default per-user publish burst: 1000 per sender.
	cfg.Messages = 3000
	cfg.Senders = 3
	cfg.Recipients = 4
	cfg.Rate = 0
	cfg.Duration = 15 * time.Second // a bound; the run ends when the queues are drained
	cfg.ServerCmds = []string{exe + " -test.run=^$"}
	cfg.ServerLog = filepath.Join(t.TempDir(), "server.log")
	rep := runOK(t, cfg)
	assertBalanced(t, rep)
	k := rep.Restart
	if k == nil || rep.Server == nil {
		t.Fatalf("restart %+v, server %+v", k, rep.Server)
	}
	if k.Queued != int64(cfg.Messages) || k.Delivered != int64(cfg.Messages) || !k.Complete || k.Recipients != cfg.Recipients {
		t.Errorf("restart %+v: want all %d messages queued and delivered", k, cfg.Messages)
	}
	if c := rep.Counts; c.Acked != int64(cfg.Messages) || c.Unique != c.Acked || c.Refused != 0 {
		t.Errorf("counts %+v: want every message PUBACKed and delivered after the restart", c)
	}
	if k.ReadySec <= 0 || k.ConnackSec < k.ReadySec || k.FirstDeliverySec < k.ReadySec || k.FirstDeliverySec > cfg.Duration.Seconds() {
		t.Errorf("restart timings %+v: want 0 < ready <= CONNACK, ready <= first delivery", k)
	}
	if k.QueueRate <= 0 || k.DrainSec <= 0 || k.DrainRate <= 0 {
		t.Errorf("restart rates %+v", k)
	}
	if rep.Settings.Recipients != cfg.Recipients || rep.Settings.Messages != cfg.Messages || rep.Settings.Users != cfg.Senders+cfg.Recipients {
		t.Errorf("settings %+v", rep.Settings)
	}
}

// flakyConfig is the flaky scenario against broker as the tests run it:
// 3 s at 300 msg/s through a slow link cut every 700 ms for 200 ms.
func flakyConfig(broker string) Config {
	cfg := testConfig(ScenarioFlaky, broker)
	cfg.Duration = 3 * time.Second
	cfg.Rate = 300
	cfg.Latency = 10 * time.Millisecond
	cfg.Jitter = 5 * time.Millisecond
	cfg.Bandwidth = 512
	cfg.CutEvery = 700 * time.Millisecond
	cfg.CutFor = 200 * time.Millisecond
	return cfg
}

func TestRunFlaky(t *testing.T) {
	cfg := flakyConfig(startChatd(t))
	rep := runOK(t, cfg)
	assertBalanced(t, rep)
	cuts := 0
	for _, n := range rep.Faults.Cuts {
		cuts += n
	}
	if cuts == 0 || rep.Connections.Lost == 0 || rep.Connections.Reconnects == 0 {
		t.Errorf("faults %+v, connections %+v: want cuts, lost connections and reconnections", rep.Faults, rep.Connections)
	}
	if rep.Counts.Unique == 0 || rep.Counts.InFlight != 0 {
		t.Errorf("counts %+v: want every message delivered after the faults", rep.Counts)
	}
}

// TestRunCrash SIGKILLs and restarts the server under load, with phones
// of either protocol version: nothing PUBACKed is lost.
func TestRunCrash(t *testing.T) {
	for _, protocol := range []int{protocol3, protocol5} {
		t.Run(fmt.Sprintf("MQTT %d", protocol), func(t *testing.T) { testRunCrash(t, protocol) })
	}
}

func testRunCrash(t *testing.T, protocol int) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	addr := freeAddr(t)
	t.Setenv(serveEnv, t.TempDir()+" "+addr)
	cfg := testConfig(ScenarioCrash, "tcp://"+addr)
	cfg.Protocol = protocol
	cfg.Users = 4
	cfg.Duration = 2500 * time.Millisecond
	cfg.Rate = 200
	cfg.KillEvery = time.Second
	cfg.ServerCmds = []string{exe + " -test.run=^$"}
	cfg.ServerLog = filepath.Join(t.TempDir(), "server.log")
	rep := runOK(t, cfg)
	assertBalanced(t, rep)
	if rep.Crash == nil || rep.Crash.Kills == 0 || rep.Server == nil {
		t.Fatalf("crash %+v, server %+v", rep.Crash, rep.Server)
	}
	if rep.Counts.Unique == 0 || rep.Counts.InFlight != 0 {
		t.Errorf("counts %+v: want every message delivered across the kills", rep.Counts)
	}
	// A restarted chatd has lost the sessions it kept in memory: the MQTT
	// 5 phones publish again what their session state then drops.
	if protocol == 5 && rep.Connections.SessionsLost == 0 {
		t.Errorf("connections %+v: want reconnections without the session after the kills", rep.Connections)
	}
	k := rep.Crash
	if len(k.Nodes) != 0 || len(k.Clients) != k.Kills || len(k.ResumeMs) != k.Kills {
		t.Fatalf("crash %+v: want clients and resume times per kill, no nodes", k)
	}
	for i := range k.Kills {
		// The only server went down: every client was on it, and none
		// can be back before it restarted.
		if k.Clients[i] != cfg.Users || k.ResumeMs[i] < k.RestartMs[i] {
			t.Errorf("kill %d: %d clients back after %.1f ms, restart %.1f ms", i+1, k.Clients[i], k.ResumeMs[i], k.RestartMs[i])
		}
	}
	if len(rep.Connections.Nodes) != 0 {
		t.Errorf("one broker URL, yet nodes %+v", rep.Connections.Nodes)
	}
}

// TestRunChatTwoURLs spreads the users over two URLs of the same server:
// both get half the clients and nothing is lost. (Two separate single-node
// servers would not share queues.)
func TestRunChatTwoURLs(t *testing.T) {
	one := startChatd(t)
	port := one[strings.LastIndexByte(one, ':')+1:]
	two := "tcp://localhost:" + port
	cfg := testConfig(ScenarioChat, one+","+two)
	rep := runOK(t, cfg)
	assertBalanced(t, rep)
	if c := rep.Counts; c.Sent == 0 || c.Unique != c.Sent {
		t.Errorf("counts %+v: want every message delivered", c)
	}
	nodes := rep.Connections.Nodes
	if len(nodes) != 2 || nodes[0].URL != one || nodes[1].URL != two {
		t.Fatalf("nodes %+v: want %s and %s", nodes, one, two)
	}
	for _, n := range nodes {
		if n.Clients != int64(cfg.Users/2) || n.Connects < n.Clients || n.AtClose != n.Clients {
			t.Errorf("node %+v: want %d clients, connected until the end", n, cfg.Users/2)
		}
	}
	var table bytes.Buffer
	if err := rep.WriteTable(&table); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(table.String(), "node 2") || !strings.Contains(table.String(), two) {
		t.Errorf("table lacks the nodes:\n%s", table.String())
	}
}

// TestRunChatFailover lists a URL nobody listens on first for half the
// clients: paho moves them on to the next URL, and the report counts every
// client on the node that answered.
func TestRunChatFailover(t *testing.T) {
	dead := "tcp://" + freeAddr(t)
	live := startChatd(t)
	cfg := testConfig(ScenarioChat, dead+","+live)
	rep := runOK(t, cfg)
	assertBalanced(t, rep)
	nodes := rep.Connections.Nodes
	if len(nodes) != 2 || nodes[0].Clients != 0 || nodes[0].Connects != 0 || nodes[1].Clients != int64(cfg.Users) {
		t.Errorf("nodes %+v: want every client on %s", nodes, live)
	}
}

// TestClientDialsTheTriedURL checks that the direct dial goes to the
// broker paho hands it, not to the client's first URL: otherwise a
// reconnection would never leave a dead node.
func TestClientDialsTheTriedURL(t *testing.T) {
	var lns [2]net.Listener
	var urls [2]string
	for i := range lns {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		lns[i], urls[i] = ln, "tcp://"+ln.Addr().String()
	}
	cfg := testConfig(ScenarioChat, urls[0]+","+urls[1])
	r, err := newRun(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	c := &v3Transport{p: &phone{r: r, idx: 1, user: r.users[1]}}
	c.store = newAckStore(r.tag, c.p.acked)
	o, err := c.options()
	if err != nil {
		t.Fatal(err)
	}
	if len(o.Servers) != 2 || o.Servers[0].String() != urls[1] || o.Servers[1].String() != urls[0] {
		t.Fatalf("client 1's brokers %v, want %s then %s", o.Servers, urls[1], urls[0])
	}
	for i, u := range o.Servers {
		conn, err := o.CustomOpenConnectionFn(u, *o)
		if err != nil {
			t.Fatalf("dial %s: %v", u, err)
		}
		want := lns[1-i]
		if err := want.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
			t.Fatal(err)
		}
		got, err := want.Accept()
		if err != nil {
			t.Fatalf("dialling %s did not reach %s: %v", u, want.Addr(), err)
		}
		if got.RemoteAddr().String() != conn.LocalAddr().String() {
			t.Errorf("dialling %s: %s accepted %s, want %s", u, want.Addr(), got.RemoteAddr(), conn.LocalAddr())
		}
		got.Close()
		conn.Close()
	}
}

// TestRunCrashTwoNodes kills two server processes in turn: node 1 is
// chatd, node 2 a TCP relay to it that takes 2s to start, so that both
// serve the same queues without a cluster. Node 2's clients move to node 1
// while it restarts, and nothing PUBACKed is lost.
func TestRunCrashTwoNodes(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	chatd, relay := freeAddr(t), freeAddr(t)
	t.Setenv(serveEnv, t.TempDir()+" "+chatd)
	cfg := testConfig(ScenarioCrash, "tcp://"+chatd+",tcp://"+relay)
	cfg.Users = 4
	cfg.Duration = 3500 * time.Millisecond
	cfg.Rate = 200
	cfg.KillEvery = time.Second
	cfg.ServerCmds = []string{
		exe + " -test.run=^$",
		exe + " -test.run=^$ " + relayFlag + relay + "," + chatd + ",2s",
	}
	cfg.ServerLog = filepath.Join(t.TempDir(), "server.log")
	rep := runOK(t, cfg)
	assertBalanced(t, rep)
	k := rep.Crash
	if k == nil || k.Kills != 2 || rep.Server == nil {
		// Kill 1 at 1s, kill 2 at ~2s; its restart outlasts the sending.
		t.Fatalf("crash %+v, server %+v: want two kills", k, rep.Server)
	}
	if len(k.Nodes) != 2 || len(k.Clients) != 2 || len(k.ResumeMs) != 2 || k.Nodes[0] != 1 || k.Nodes[1] != 2 {
		t.Fatalf("crash %+v: want node 1 then node 2, with clients and resume time", k)
	}
	for i := range k.Kills {
		if k.Clients[i] != 2 || k.ResumeMs[i] < 0 {
			t.Errorf("kill %d: %d clients back after %.0f ms, want 2 back", i+1, k.Clients[i], k.ResumeMs[i])
		}
	}
	// paho's reconnection delay (1s) is shorter than node 2's restart.
	if k.ResumeMs[1] >= k.RestartMs[1] {
		t.Errorf("node 2's clients back after %.0f ms, not before its restart (%.0f ms)", k.ResumeMs[1], k.RestartMs[1])
	}
	nodes := rep.Connections.Nodes
	if len(nodes) != 2 || nodes[0].Clients != 2 || nodes[1].Clients != 2 || nodes[0].AtClose != 4 || nodes[1].AtClose != 0 {
		t.Errorf("nodes %+v: want 2 clients first on each, all 4 on node 1 at the end", nodes)
	}
	if rep.Counts.Unique == 0 || rep.Counts.InFlight != 0 {
		t.Errorf("counts %+v: want every message delivered across the kills", rep.Counts)
	}
	for _, n := range []int{1, 2} {
		if _, err := os.Stat(fmt.Sprintf("%s.%d", cfg.ServerLog, n)); err != nil {
			t.Errorf("node %d's log: %v", n, err)
		}
	}
}

// freeAddr returns a loopback address nothing listens on right now.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	return addr
}

func TestRunRejectsBadConfig(t *testing.T) {
	cfg := testConfig("gossip", "tcp://127.0.0.1:1")
	if _, err := Run(context.Background(), cfg, nil); err == nil {
		t.Error("unknown scenario accepted")
	}
}
