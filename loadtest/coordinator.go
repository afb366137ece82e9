package loadtest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"
)

// maxAnswerBytes bounds an agent's answer: its raw data grows by a few
// kilobytes a second of run.
const maxAnswerBytes = 1 << 30

// agentTimeout bounds the requests to an agent that are not a run.
const agentTimeout = 10 * time.Second

// agentWaitLine is how often the coordinator says which agents it still waits for.
const agentWaitLine = 10 * time.Second

// splitConfig checks cfg for a run on the agents at addrs and returns the
// share of each: its own users (the run's prefix + "-a{k}"), their share
// of the rate and of the flooders, and seed+k. Messages stay within a
// share, so each agent's accounting is complete on its own, and each
// latency is measured on one machine.
func splitConfig(cfg Config, addrs []string) ([]Config, error) {
	n := len(addrs)
	switch {
	case n == 0:
		return nil, errors.New("--agents: no agent")
	case cfg.Scenario != ScenarioChat:
		return nil, fmt.Errorf("--agents: agents run the chat scenario only, not %s", cfg.Scenario)
	case len(cfg.ServerCmds) > 0 || cfg.ServerPID != 0 || cfg.ServerLog != "":
		return nil, errors.New("--agents: --server-cmd, --server-pid and --server-log are not for runs on agents, which neither start nor measure servers")
	case cfg.Password != "":
		return nil, errors.New("--agents: --password is never sent to agents: give it to each agent (loadtest agent --password)")
	case cfg.Users < 2*n:
		return nil, fmt.Errorf("--users %d for %d agents: each agent needs at least 2 users", cfg.Users, n)
	}
	for i, a := range addrs {
		if host, port, err := net.SplitHostPort(a); err != nil || host == "" || port == "" {
			return nil, fmt.Errorf("--agents: %q: want host:port", a)
		}
		if slices.Contains(addrs[:i], a) {
			return nil, fmt.Errorf("--agents: %s listed twice", a)
		}
	}
	// The token secret is each agent's own; the coordinator needs none.
	check := cfg
	if len(check.Secret) == 0 {
		check.Secret = []byte("each agent's own")
	}
	if err := check.Validate(); err != nil {
		return nil, err
	}
	seed := cfg.Seed
	for seed == 0 {
		// Positive and far from overflowing when the agents' k is added.
		seed = mrand.Int64N(math.MaxInt64 / 2)
	}
	shares := make([]Config, n)
	for k := range shares {
		s := cfg
		s.Secret, s.Password = nil, ""
		s.UserPrefix = fmt.Sprintf("%s-a%d", cfg.UserPrefix, k)
		s.Users = cfg.Users/n + boolInt(k < cfg.Users%n)
		s.Flooders = cfg.Flooders/n + boolInt(k < cfg.Flooders%n)
		s.Rate = cfg.Rate * float64(s.Users) / float64(cfg.Users)
		// Distinct seeds: agents with the same one would pace their senders in step.
		s.Seed = seed + int64(k)
		s.Raw = true
		if last := fmt.Sprintf("%s-u%d", s.UserPrefix, s.Users-1); !validUserID(last) {
			return nil, fmt.Errorf("user ID %q of agent %s: 1-64 characters of [A-Za-z0-9_.-]; shorten --user-prefix", last, addrs[k])
		}
		shares[k] = s
	}
	return shares, nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// coordinator drives the agents of one run.
type coordinator struct {
	client *http.Client
	id     string
	addrs  []string
}

// RunAgents runs the chat scenario cfg describes on the agents at addrs
// (host:port, each serving an Agent), each driving its own share of the
// users (see splitConfig), and returns their reports merged by
// MergeReports. cfg.Secret and cfg.Password are never sent: each agent
// has its own. progress, when not nil, receives a line as the agents
// start and as each answers. On ctx's end the agents are asked to stop,
// and their reports, interrupted, are merged. The error names each agent
// that failed; the report is then nil, unless the agents all answered and
// only their runs met errors, which a single Run would return too.
func RunAgents(ctx context.Context, cfg Config, addrs []string, progress io.Writer) (*Report, error) {
	shares, err := splitConfig(cfg, addrs)
	if err != nil {
		return nil, err
	}
	id, err := newTag()
	if err != nil {
		return nil, err
	}
	// No proxy from the environment: agents are on the local network.
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	c := &coordinator{client: &http.Client{Transport: tr}, id: id, addrs: addrs}
	say := func(format string, a ...any) {
		if progress != nil {
			fmt.Fprintf(progress, format+"\n", a...)
		}
	}

	if err := c.preflight(ctx); err != nil {
		return nil, err
	}

	// The runs outlive ctx, so that an interrupted run still brings back
	// the agents' reports; /cancel ends them. The budget covers what Run
	// may spend: connecting, sending, reconnecting, the grace period.
	budget := 2*(cfg.Duration+cfg.Grace+cfg.ConnectTimeout) + time.Minute
	runCtx, cancelRuns := context.WithTimeout(context.WithoutCancel(ctx), budget)
	defer cancelRuns()
	type answer struct {
		k      int
		rep    *Report
		runErr string
		err    error
		took   time.Duration
	}
	answers := make(chan answer, len(addrs))
	start := time.Now()
	for k, addr := range addrs {
		go func() {
			rep, runErr, err := c.postRun(runCtx, addr, shares[k])
			answers <- answer{k, rep, runErr, err, time.Since(start)}
		}()
	}
	var parts []string
	for k, a := range addrs {
		parts = append(parts, fmt.Sprintf("%s (%d users)", a, shares[k].Users))
	}
	say("waiting for %s: %s; sending lasts %s", agentsN(len(addrs)), strings.Join(parts, ", "), cfg.Duration)

	var (
		stopping   sync.WaitGroup
		stopOnce   sync.Once
		failures   []error
		runErrs    []error
		reps       = make([]*Report, len(addrs))
		done       = ctx.Done()
		tick       = time.NewTicker(agentWaitLine)
		stopAgents = func() { stopOnce.Do(func() { c.cancelAll(&stopping) }) }
	)
	defer tick.Stop()
	for pending := len(addrs); pending > 0; {
		select {
		case a := <-answers:
			pending--
			addr := addrs[a.k]
			if a.err != nil {
				failures = append(failures, fmt.Errorf("agent %s: %w", addr, a.err))
				say("agent %s failed: %v", addr, a.err)
				if pending > 0 {
					say("stopping the other agents")
				}
				stopAgents()
				continue
			}
			reps[a.k] = a.rep
			if a.runErr != "" {
				runErrs = append(runErrs, fmt.Errorf("agent %s: %s", addr, a.runErr))
			}
			cn := a.rep.Counts
			say("agent %s answered after %.1f s: sent %d, delivered %d, lost %d, errors %d (%d of %d)",
				addr, a.took.Seconds(), cn.Sent, cn.Unique, cn.Lost, a.rep.ErrorCount, len(addrs)-pending, len(addrs))
		case <-done:
			done = nil
			say("interrupted: stopping the agents")
			stopAgents()
		case <-tick.C:
			var left []string
			for k, r := range reps {
				if r == nil {
					left = append(left, addrs[k])
				}
			}
			say("waiting for %s: %s (%.0f s)", agentsN(pending), strings.Join(left, ", "), time.Since(start).Seconds())
		}
	}
	stopping.Wait()
	if len(failures) > 0 {
		return nil, errors.Join(failures...)
	}
	rep, err := MergeReports(reps)
	if err != nil {
		return nil, err
	}
	return rep, errors.Join(runErrs...)
}

// preflight checks that every agent answers and is idle before any
// starts, so that a missing agent fails the run at once.
func (c *coordinator) preflight(ctx context.Context) error {
	errs := make([]error, len(c.addrs))
	var wg sync.WaitGroup
	for k, addr := range c.addrs {
		wg.Go(func() {
			if err := c.status(ctx, addr); err != nil {
				errs[k] = fmt.Errorf("agent %s: %w", addr, err)
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// status asks the agent at addr whether it is idle.
func (c *coordinator) status(ctx context.Context, addr string) error {
	ctx, cancel := context.WithTimeout(ctx, agentTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, agentURL(addr, "/status"), nil)
	if err != nil {
		return fmt.Errorf("status: %w", err)
	}
	resp, err := c.client.Do(req)
	if err != nil {
		return fmt.Errorf("not reachable (is loadtest agent running there?): %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status: %s", answerError(resp))
	}
	var st agentStatus
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxRequestBytes)).Decode(&st); err != nil {
		return fmt.Errorf("status: decode: %w", err)
	}
	if st.Busy {
		return fmt.Errorf("busy with run %s: an agent carries out one run at a time", st.Run)
	}
	return nil
}

// postRun has the agent at addr carry out share and returns its report,
// with Raw.Agent set to addr, and the error its run met, if any.
func (c *coordinator) postRun(ctx context.Context, addr string, share Config) (*Report, string, error) {
	body, err := json.Marshal(agentRequest{ID: c.id, Config: share})
	if err != nil {
		return nil, "", fmt.Errorf("encode run request: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, agentURL(addr, "/run"), bytes.NewReader(body))
	if err != nil {
		return nil, "", fmt.Errorf("run: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.client.Do(req)
	if err != nil {
		return nil, "", fmt.Errorf("run: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, "", fmt.Errorf("run refused: %s", answerError(resp))
	}
	var ans agentAnswer
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxAnswerBytes)).Decode(&ans); err != nil {
		return nil, "", fmt.Errorf("decode its report: %w", err)
	}
	if ans.Report == nil || ans.Report.Raw == nil {
		return nil, "", errors.New("answered without a report and its raw data")
	}
	ans.Report.Raw.Agent = addr
	return ans.Report, ans.Error, nil
}

// cancelAll asks every agent to end the coordinator's run, in the
// background; wg tracks the requests.
func (c *coordinator) cancelAll(wg *sync.WaitGroup) {
	for _, addr := range c.addrs {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), agentTimeout)
			defer cancel()
			u := agentURL(addr, "/cancel") + "?id=" + url.QueryEscape(c.id)
			req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, nil)
			if err != nil {
				return
			}
			// An agent that has finished, or cannot be reached, has
			// nothing to stop: its /run answer tells what happened.
			if resp, err := c.client.Do(req); err == nil {
				resp.Body.Close()
			}
		})
	}
}

// agentsN says "1 agent", "2 agents"...
func agentsN(n int) string {
	if n == 1 {
		return "1 agent"
	}
	return fmt.Sprintf("%d agents", n)
}

func agentURL(addr, path string) string { return "http://" + addr + path }

// answerError describes a refusal: its status and the start of its body.
func answerError(resp *http.Response) string {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if msg := strings.TrimSpace(string(b)); msg != "" {
		return fmt.Sprintf("%s: %s", resp.Status, msg)
	}
	return resp.Status
}
