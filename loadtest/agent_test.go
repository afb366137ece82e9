package loadtest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"
)

// wiretap records the answers an agent sends to /run, as they cross the
// network, for the test to merge by itself.
type wiretap struct {
	next http.Handler
	mu   sync.Mutex
	runs [][]byte
}

func (w *wiretap) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/run" {
		w.next.ServeHTTP(rw, r)
		return
	}
	rec := httptest.NewRecorder()
	w.next.ServeHTTP(rec, r)
	w.mu.Lock()
	w.runs = append(w.runs, rec.Body.Bytes())
	w.mu.Unlock()
	for k, v := range rec.Header() {
		rw.Header()[k] = v
	}
	rw.WriteHeader(rec.Code)
	_, _ = rw.Write(rec.Body.Bytes())
}

// answers returns the agent's reports recorded so far.
func (w *wiretap) answers(t *testing.T) []*Report {
	t.Helper()
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []*Report
	for _, b := range w.runs {
		var ans agentAnswer
		if err := json.Unmarshal(b, &ans); err != nil {
			t.Fatalf("agent answer %q: %v", b, err)
		}
		out = append(out, ans.Report)
	}
	return out
}

// testAgent serves an agent on 127.0.0.1:0, with the test's token secret.
func testAgent(t *testing.T) (*Agent, *wiretap, string) {
	t.Helper()
	a := NewAgent(AgentOptions{Secret: testSecret, Logger: slog.New(slog.NewTextHandler(t.Output(), nil))})
	tap := &wiretap{next: a}
	srv := httptest.NewServer(tap)
	t.Cleanup(func() {
		a.Close()
		srv.Close()
	})
	return a, tap, srv.Listener.Addr().String()
}

// agentBusy reports whether the agent at addr is running something.
func agentBusy(t *testing.T, addr string) bool {
	t.Helper()
	st, err := agentState(addr)
	if err != nil {
		t.Fatal(err)
	}
	return st.Busy
}

// isSending reports whether the agent's run is in its sending phase.
func isSending(addr string) bool {
	st, err := agentState(addr)
	return err == nil && st.Phase == phaseSend
}

func agentState(addr string) (agentStatus, error) {
	var st agentStatus
	resp, err := http.Get("http://" + addr + "/status")
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	err = json.NewDecoder(resp.Body).Decode(&st)
	return st, err
}

// TestRunAgents drives a real chatd from two agents and checks the
// coordinator's merge against the agents' own reports.
func TestRunAgents(t *testing.T) {
	broker := startChatd(t)
	_, tap1, addr1 := testAgent(t)
	_, tap2, addr2 := testAgent(t)
	cfg := testConfig(ScenarioChat, broker)
	cfg.Secret = nil // the agents have their own
	cfg.Users = 9
	cfg.Rate = 900
	cfg.Flooders = 1
	addrs := []string{addr1, addr2}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var progress bytes.Buffer
	type result struct {
		rep *Report
		err error
	}
	done := make(chan result, 1)
	go func() {
		rep, err := RunAgents(ctx, cfg, addrs, &progress)
		done <- result{rep, err}
	}()
	// While it runs, another coordinator is turned away, naming the agent.
	deadline := time.Now().Add(10 * time.Second)
	for !agentBusy(t, addr1) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := RunAgents(ctx, cfg, []string{addr1, addr2}, nil); err == nil ||
		!strings.Contains(err.Error(), "agent "+addr1) || !strings.Contains(err.Error(), "busy") {
		t.Errorf("second coordinator: err = %v, want agent %s busy", err, addr1)
	}
	res := <-done
	if res.err != nil {
		t.Fatalf("run on agents: %v\n%s", res.err, progress.String())
	}
	rep := res.rep
	assertBalanced(t, rep)
	if !strings.Contains(progress.String(), "waiting for 2 agents") || strings.Count(progress.String(), " answered after ") != 2 {
		t.Errorf("progress lines:\n%s", progress.String())
	}

	// The agents' own reports, as they sent them.
	var agents []*Report
	for _, tap := range []*wiretap{tap1, tap2} {
		got := tap.answers(t)
		if len(got) != 1 {
			t.Fatalf("%d answers from an agent, want 1", len(got))
		}
		agents = append(agents, got[0])
	}
	if agents[0].Settings.Users != 5 || agents[1].Settings.Users != 4 || agents[0].Settings.Rate != 500 || agents[1].Settings.Rate != 400 {
		t.Errorf("shares: %+v, %+v", agents[0].Settings, agents[1].Settings)
	}
	if agents[0].Flood == nil || agents[0].Flood.Clients != 1 || agents[1].Flood != nil {
		t.Errorf("flooders: %+v, %+v", agents[0].Flood, agents[1].Flood)
	}
	for i, a := range agents {
		assertBalanced(t, a)
		if a.Counts.Foreign != 0 || a.Counts.Sent == 0 {
			t.Errorf("agent %d: counts %+v: want its own messages only", i+1, a.Counts)
		}
	}
	if want := sumCountsReflect(agents[0].Counts, agents[1].Counts); rep.Counts != want {
		t.Errorf("counts %+v, want the agents' sum %+v", rep.Counts, want)
	}
	if rep.Settings.Users != 9 || rep.Settings.Rate != 900 || !slices.Equal(rep.Settings.Agents, addrs) ||
		rep.Connections.Clients != 9 || len(rep.Agents) != 2 || rep.Flood == nil || rep.Flood.Clients != 1 {
		t.Errorf("settings %+v, clients %d, agents %+v, flood %+v", rep.Settings, rep.Connections.Clients, rep.Agents, rep.Flood)
	}
	if rep.SendRate != agents[0].SendRate+agents[1].SendRate {
		t.Errorf("send rate %v, want %v + %v", rep.SendRate, agents[0].SendRate, agents[1].SendRate)
	}

	// Every percentile, recomputed here from the agents' raw histograms.
	merge := func(pick func(*RawData) EncodedHistogram) *hdrhistogram.Histogram {
		h := newHist()
		for _, a := range agents {
			d, err := pick(a.Raw).Histogram()
			if err != nil {
				t.Fatal(err)
			}
			h.Merge(d)
		}
		return h
	}
	for _, x := range []struct {
		name string
		got  Percentiles
		pick func(*RawData) EncodedHistogram
	}{
		{"deliver", rep.Deliver, func(r *RawData) EncodedHistogram { return r.Deliver }},
		{"ack", rep.Ack, func(r *RawData) EncodedHistogram { return r.Ack }},
		{"receipt", rep.Receipt, func(r *RawData) EncodedHistogram { return r.Receipt }},
		{"copy", rep.Copy, func(r *RawData) EncodedHistogram { return r.Copy }},
		{"connack", rep.Connections.Connack, func(r *RawData) EncodedHistogram { return r.Connack }},
		{"suback", rep.Connections.Suback, func(r *RawData) EncodedHistogram { return r.Suback }},
	} {
		if want := PercentilesOf(merge(x.pick)); x.got != want {
			t.Errorf("%s: %+v, want %+v", x.name, x.got, want)
		}
	}
	if rep.Deliver.Count != rep.Counts.Unique || rep.Deliver.Count != agents[0].Deliver.Count+agents[1].Deliver.Count {
		t.Errorf("deliver count %d, unique %d", rep.Deliver.Count, rep.Counts.Unique)
	}
	first := min(agents[0].Raw.FirstSend, agents[1].Raw.FirstSend)
	last := max(agents[0].Raw.LastDelivery, agents[1].Raw.LastDelivery)
	if want := float64(rep.Counts.Unique) / (float64(last-first) / 1e9); rep.Throughput != want {
		t.Errorf("throughput %v, want %v", rep.Throughput, want)
	}
	for i, p := range rep.Series {
		h := newHist()
		for _, a := range agents {
			if i < len(a.Raw.Series) {
				d, err := a.Raw.Series[i].Histogram()
				if err != nil {
					t.Fatal(err)
				}
				h.Merge(d)
			}
		}
		if want := PercentilesOf(h).P99; p.P99Ms != want {
			t.Errorf("second %d: p99 %v, want %v", i+1, p.P99Ms, want)
		}
	}

	// Thresholds hold or fail on the merged report: the total, not one agent's.
	var gates []Threshold
	for _, s := range []string{
		"lost==0",
		fmt.Sprintf("unique==%d", rep.Counts.Unique),
		fmt.Sprintf("p99(send->deliver)<=%gms", rep.Deliver.P99),
		fmt.Sprintf("sent<=%d", agents[0].Counts.Sent), // one agent's: fails on the whole
	} {
		g, err := ParseThreshold(s)
		if err != nil {
			t.Fatal(err)
		}
		gates = append(gates, g)
	}
	v, err := Evaluate(rep, gates)
	if err != nil {
		t.Fatal(err)
	}
	rep.Verdict = v
	if v.Passed || len(v.Failed()) != 1 || v.Failed()[0].Figure != "counts.sent" || rep.ExitCode() != 3 {
		t.Errorf("verdict %+v, exit code %d: want only the one-agent bound to fail", v, rep.ExitCode())
	}
	var table strings.Builder
	if err := rep.WriteTable(&table); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(table.String(), "agent 2\t") && !strings.Contains(table.String(), "agent 2 ") {
		t.Errorf("table without the agents:\n%s", table.String())
	}
}

// TestRunAgentsInterrupted ends a run on agents early: the agents stop and
// their interrupted reports merge into an interrupted report.
func TestRunAgentsInterrupted(t *testing.T) {
	broker := startChatd(t)
	_, _, addr1 := testAgent(t)
	_, _, addr2 := testAgent(t)
	cfg := testConfig(ScenarioChat, broker)
	// Uninterrupted, the run would take a minute: well over the bound below
	// even on a loaded machine.
	cfg.Duration = time.Minute
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		// Once both send (or after 30 s), interrupt the coordinator: an
		// interrupt while they connect is an error, not an interrupted run.
		deadline := time.Now().Add(30 * time.Second)
		for (!isSending(addr1) || !isSending(addr2)) && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		cancel()
	}()
	start := time.Now()
	rep, err := RunAgents(ctx, cfg, []string{addr1, addr2}, nil)
	if err != nil {
		t.Fatalf("interrupted run: %v", err)
	}
	if !rep.Interrupted || rep.ExitCode() != 2 || len(rep.Agents) != 2 {
		t.Errorf("interrupted %v, exit code %d, %d agents", rep.Interrupted, rep.ExitCode(), len(rep.Agents))
	}
	if took := time.Since(start); took > 30*time.Second {
		t.Errorf("the agents took %s to stop", took)
	}
	if agentBusy(t, addr1) || agentBusy(t, addr2) {
		t.Error("an agent is still busy")
	}
}

// TestRunAgentsUnreachable runs against an address where no agent
// listens: a clear error naming it, and the live agent never started.
func TestRunAgentsUnreachable(t *testing.T) {
	_, tap, live := testAgent(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(ScenarioChat, "tcp://127.0.0.1:1")
	_, err = RunAgents(context.Background(), cfg, []string{live, dead}, nil)
	if err == nil || !strings.Contains(err.Error(), "agent "+dead+": not reachable") || strings.Contains(err.Error(), live) {
		t.Errorf("err = %v, want agent %s not reachable", err, dead)
	}
	if n := len(tap.answers(t)); n != 0 {
		t.Errorf("the live agent ran %d times", n)
	}
}

// TestRunAgentsFailing has an agent refuse its share (it has no token
// secret): the error names it and the other agent is stopped.
func TestRunAgentsFailing(t *testing.T) {
	broker := startChatd(t)
	_, _, good := testAgent(t)
	bad := httptest.NewServer(NewAgent(AgentOptions{}))
	defer bad.Close()
	badAddr := bad.Listener.Addr().String()
	cfg := testConfig(ScenarioChat, broker)
	cfg.Duration = 20 * time.Second
	start := time.Now()
	_, err := RunAgents(context.Background(), cfg, []string{good, badAddr}, nil)
	if err == nil || !strings.Contains(err.Error(), "agent "+badAddr) || !strings.Contains(err.Error(), "no token secret") {
		t.Errorf("err = %v, want agent %s without a token secret", err, badAddr)
	}
	if took := time.Since(start); took > 30*time.Second {
		t.Errorf("the other agent ran on for %s", took)
	}
}

func TestSplitConfig(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Users, cfg.Rate, cfg.Flooders, cfg.Seed, cfg.Secret = 9, 900, 3, 7, []byte("s")
	shares, err := splitConfig(cfg, []string{"a:1", "b:1"})
	if err != nil {
		t.Fatal(err)
	}
	want := []struct {
		prefix          string
		users, flooders int
		rate            float64
		seed            int64
	}{{"lt-a0", 5, 2, 500, 7}, {"lt-a1", 4, 1, 400, 8}}
	for k, s := range shares {
		w := want[k]
		if s.UserPrefix != w.prefix || s.Users != w.users || s.Flooders != w.flooders || s.Rate != w.rate || s.Seed != w.seed ||
			s.Secret != nil || !s.Raw {
			t.Errorf("share %d: prefix %s users %d flooders %d rate %v seed %d secret %q raw %v, want %+v",
				k, s.UserPrefix, s.Users, s.Flooders, s.Rate, s.Seed, s.Secret, s.Raw, w)
		}
	}
	cfg.Seed = 0
	if shares, err = splitConfig(cfg, []string{"a:1", "b:1"}); err != nil || shares[0].Seed <= 0 || shares[1].Seed != shares[0].Seed+1 {
		t.Errorf("drawn seeds: %v, %v", shares, err)
	}
	for name, tt := range map[string]struct {
		mod   func(*Config)
		addrs []string
	}{
		"chat scenario only":     {func(c *Config) { c.Scenario = ScenarioCrash }, []string{"a:1"}},
		"never sent to agents":   {func(c *Config) { c.Plain, c.Password = true, "pw" }, []string{"a:1"}},
		"at least 2 users":       {func(c *Config) { c.Users = 3 }, []string{"a:1", "b:1"}},
		"neither start nor":      {func(c *Config) { c.ServerPID = 1 }, []string{"a:1"}},
		"listed twice":           {func(*Config) {}, []string{"a:1", "a:1"}},
		"want host:port":         {func(*Config) {}, []string{"a"}},
		"no agent":               {func(*Config) {}, nil},
		"shorten --user-prefix":  {func(c *Config) { c.UserPrefix = strings.Repeat("x", 60) }, []string{"a:1"}},
		"--size: invalid value":  {func(c *Config) { c.Size = 0 }, []string{"a:1"}},
		"no secret is no matter": {func(c *Config) { c.Secret = nil }, []string{"a:1"}},
	} {
		c := cfg
		tt.mod(&c)
		_, err := splitConfig(c, tt.addrs)
		if name == "no secret is no matter" {
			if err != nil {
				t.Errorf("%s: %v", name, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("%s: err = %v", name, err)
		}
	}
}

// TestAgentRefuses sends an agent requests it must turn away.
func TestAgentRefuses(t *testing.T) {
	_, _, addr := testAgent(t)
	share := DefaultConfig()
	post := func(body any) (int, string) {
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := http.Post("http://"+addr+"/run", "application/json", bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		msg, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(msg)
	}
	withSecret := share
	withSecret.Secret = []byte("leaked")
	crash := share
	crash.Scenario = ScenarioCrash
	server := share
	server.ServerCmds = []string{"chatd"}
	elsewhere := share
	elsewhere.Broker = "tcp://192.0.2.1:1883"
	huge := share
	huge.Users = 1_000_000
	long := share
	long.Duration = 48 * time.Hour
	for name, tt := range map[string]struct {
		body any
		want string
	}{
		"secret":        {agentRequest{ID: "x", Config: withSecret}, "carries a secret"},
		"scenario":      {agentRequest{ID: "x", Config: crash}, "chat scenario only"},
		"server":        {agentRequest{ID: "x", Config: server}, "neither starts nor measures"},
		"no id":         {agentRequest{Config: share}, "without id"},
		"unknown field": {map[string]any{"id": "x", "config": map[string]any{"Scenario": "chat", "Warp": 9}}, "unknown field"},
		"invalid":       {agentRequest{ID: "x", Config: Config{Scenario: ScenarioChat}}, "on this agent"},
		// Its secret and password would go to the broker a run names.
		"broker elsewhere": {agentRequest{ID: "x", Config: elsewhere}, "loads only brokers on loopback"},
		"too many users":   {agentRequest{ID: "x", Config: huge}, "at most 100000"},
		"too long":         {agentRequest{ID: "x", Config: long}, "at most 1h"},
	} {
		if code, msg := post(tt.body); code != http.StatusBadRequest || !strings.Contains(msg, tt.want) {
			t.Errorf("%s: %d %q, want 400 mentioning %q", name, code, msg, tt.want)
		}
	}
	// A run cancelled before it starts is refused when it comes.
	resp, err := http.Post("http://"+addr+"/cancel?id=early", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Errorf("cancel of a run not started: %s", resp.Status)
	}
	if code, msg := post(agentRequest{ID: "early", Config: share}); code != http.StatusConflict || !strings.Contains(msg, "cancelled before it started") {
		t.Errorf("run cancelled before it started: %d %q", code, msg)
	}
}
