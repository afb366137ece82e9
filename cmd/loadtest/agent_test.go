package main

import (
	"bytes"
	"context"
	"encoding/csv"
	"errors"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chatd/chatd/internal/chatdtest"

	"github.com/chatd/chatd/loadtest"
)

const testSecret = "agent-test-secret-0123456789-0123456789"

// syncBuffer is a bytes.Buffer safe for a command's writes and the test's reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startChatd runs chatd in-process on a free loopback port.
func startChatd(t *testing.T) string {
	t.Helper()
	s := chatdtest.Start(t, []byte(testSecret), nil)
	return "tcp://" + s.MQTTAddr()
}

var listeningRE = regexp.MustCompile(`msg="agent listening" addr=(\S+)`)

// startAgent runs "loadtest agent" in-process and returns its address
// and a function that stops it as SIGTERM would and returns its error.
func startAgent(t *testing.T) (string, func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var stderr syncBuffer
	cmd := newRootCmd(io.Discard, &stderr)
	cmd.SetArgs([]string{"agent", "--listen", "127.0.0.1:0", "--secret", testSecret})
	done := make(chan error, 1)
	go func() { done <- cmd.ExecuteContext(ctx) }()
	stop := sync.OnceValue(func() error {
		cancel()
		select {
		case err := <-done:
			if !strings.Contains(stderr.String(), "agent stopped") {
				return errors.New("no \"agent stopped\" in its log:\n" + stderr.String())
			}
			return err
		case <-time.After(30 * time.Second):
			return errors.New("the agent did not stop")
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if m := listeningRE.FindStringSubmatch(stderr.String()); m != nil {
			t.Cleanup(func() { _ = stop() })
			return m[1], stop
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	t.Fatalf("the agent did not start:\n%s", stderr.String())
	return "", nil
}

// TestRunOnAgents runs the chat scenario from two "loadtest agent"
// commands, as on two machines: the coordinator merges their reports,
// checks the thresholds on the whole and exits as a single run would.
func TestRunOnAgents(t *testing.T) {
	broker := startChatd(t)
	addr1, stop1 := startAgent(t)
	addr2, stop2 := startAgent(t)
	dir := t.TempDir()
	jsonPath, csvPath := filepath.Join(dir, "report.json"), filepath.Join(dir, "series.csv")

	var stdout, stderr syncBuffer
	cmd := newRootCmd(&stdout, &stderr)
	// The coordinator has no secret: the agents have theirs.
	t.Setenv("CHATD_AUTH_SECRET", "")
	cmd.SetArgs([]string{"run", "chat", "--agents", addr1 + "," + addr2, "--broker", broker,
		"--users", "6", "--rate", "300", "--duration", "1500ms", "--grace", "10s", "--seed", "5",
		"--json", jsonPath, "--csv", csvPath,
		"--threshold", "lost==0", "--threshold", "sent<1"})
	err := cmd.ExecuteContext(context.Background())
	var ee exitError
	if !errors.As(err, &ee) || ee.code != 3 {
		t.Fatalf("err = %v, want exit status 3 (a threshold failed)\nstdout:\n%s\nstderr:\n%s", err, stdout.String(), stderr.String())
	}
	for _, want := range []string{"waiting for 2 agents", "agent " + addr1 + " answered", "agent " + addr2 + " answered"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("stderr lacks %q:\n%s", want, stderr.String())
		}
	}
	table := strings.Join(strings.Fields(stdout.String()), " ")
	for _, want := range []string{"users 6 ", "load testers 2 agents", "agent 2 " + addr2 + ": 3 users", "threshold lost==0 ok", "threshold sent<1 FAILED"} {
		if !strings.Contains(table, want) {
			t.Errorf("table lacks %q:\n%s", want, stdout.String())
		}
	}
	rep, err := loadtest.ReadReport(jsonPath)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Counts.Sent == 0 || rep.Counts.Lost != 0 || rep.Counts.Unique != rep.Counts.Sent || rep.Settings.Users != 6 ||
		len(rep.Settings.Agents) != 2 || rep.Settings.Seed != 5 || rep.Verdict == nil || rep.Verdict.Passed {
		t.Errorf("report: counts %+v, settings %+v, verdict %+v", rep.Counts, rep.Settings, rep.Verdict)
	}
	f, err := os.Open(csvPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rows, err := csv.NewReader(f).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != len(rep.Series)+1 || rows[0][0] != "t_s" {
		t.Errorf("%d CSV rows for %d points", len(rows), len(rep.Series))
	}
	for _, stop := range []func() error{stop1, stop2} {
		if err := stop(); err != nil {
			t.Errorf("stop agent: %v", err)
		}
	}
}

// TestRunProtocolMixOnAgents runs a protocol mix from two agents: the
// mix reaches them without --protocol, each runs both versions, and the
// merged report counts the clients of each and the reason codes.
func TestRunProtocolMixOnAgents(t *testing.T) {
	broker := startChatd(t)
	addr1, stop1 := startAgent(t)
	addr2, stop2 := startAgent(t)
	jsonPath := filepath.Join(t.TempDir(), "report.json")
	var stdout, stderr syncBuffer
	cmd := newRootCmd(&stdout, &stderr)
	t.Setenv("CHATD_AUTH_SECRET", "")
	cmd.SetArgs([]string{"run", "chat", "--agents", addr1 + "," + addr2, "--broker", broker,
		"--users", "4", "--rate", "200", "--duration", "1s", "--grace", "10s", "--seed", "5",
		"--protocol-mix", "5:50,3:50", "--receive-maximum", "4", "--json", jsonPath, "-q",
		"--threshold", "reason(puback:0x97)==0"})
	if err := cmd.ExecuteContext(context.Background()); err != nil {
		t.Fatalf("run: %v\nstdout:\n%s\nstderr:\n%s", err, stdout.String(), stderr.String())
	}
	rep, err := loadtest.ReadReport(jsonPath)
	if err != nil {
		t.Fatal(err)
	}
	if p := rep.Protocols; p.MQTT5 != 2 || p.MQTT311 != 2 || p.ReceiveMaximum != 4 || p.GrantedMin == 0 {
		t.Errorf("protocols %+v: want 2 clients of each version, Receive Maximum 4 asked and one granted", p)
	}
	if c := rep.Counts; c.Sent == 0 || c.Lost != 0 || c.Unique != c.Sent {
		t.Errorf("counts %+v: want every message delivered", c)
	}
	if !strings.Contains(stdout.String(), "MQTT 5: 2 clients, MQTT 3.1.1: 2, receive maximum 4") {
		t.Errorf("table lacks the protocols:\n%s", stdout.String())
	}
	for _, stop := range []func() error{stop1, stop2} {
		if err := stop(); err != nil {
			t.Errorf("stop agent: %v", err)
		}
	}
}
