package loadtest

import (
	"bytes"
	"context"
	"encoding/json"
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
// exactly one of failed, delivered, refused, lost or in flight; nothing
// was lost, misrouted or reordered, and the run met no error.
func assertBalanced(t *testing.T, rep *Report) {
	t.Helper()
	c := rep.Counts
	if sum := c.SendFailed + c.Unique + c.Refused + c.Lost + c.InFlight; sum != c.Sent {
		t.Errorf("unbalanced: failed %d + unique %d + refused %d + lost %d + in flight %d != sent %d",
			c.SendFailed, c.Unique, c.Refused, c.Lost, c.InFlight, c.Sent)
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
}

func TestRunFlaky(t *testing.T) {
	cfg := testConfig(ScenarioFlaky, startChatd(t))
	cfg.Duration = 3 * time.Second
	cfg.Rate = 300
	cfg.Latency = 10 * time.Millisecond
	cfg.Jitter = 5 * time.Millisecond
	cfg.Bandwidth = 512
	cfg.CutEvery = 700 * time.Millisecond
	cfg.CutFor = 200 * time.Millisecond
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

func TestRunCrash(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	addr := freeAddr(t)
	t.Setenv(serveEnv, t.TempDir()+" "+addr)
	cfg := testConfig(ScenarioCrash, "tcp://"+addr)
	cfg.Users = 4
	cfg.Duration = 2500 * time.Millisecond
	cfg.Rate = 200
	cfg.KillEvery = time.Second
	cfg.ServerCmd = exe + " -test.run=^$"
	cfg.ServerLog = filepath.Join(t.TempDir(), "server.log")
	rep := runOK(t, cfg)
	assertBalanced(t, rep)
	if rep.Crash == nil || rep.Crash.Kills == 0 || rep.Server == nil {
		t.Fatalf("crash %+v, server %+v", rep.Crash, rep.Server)
	}
	if rep.Counts.Unique == 0 || rep.Counts.InFlight != 0 {
		t.Errorf("counts %+v: want every message delivered across the kills", rep.Counts)
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
