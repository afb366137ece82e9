package loadtest

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"
)

// An agent serves three requests, all JSON:
//
//	POST /run          agentRequest -> agentAnswer, once the run is over
//	POST /cancel?id=ID ends run ID early (its /run still answers), or
//	                   refuses it if it has not started yet
//	GET  /status       agentStatus
//
// It carries out one run at a time (409 while busy). It has no
// authentication: agents belong on a trusted network.

// maxCancelled is how many runs cancelled before they started an agent remembers.
const maxCancelled = 16

// maxRequestBytes bounds a /run request: a Config is well under a kilobyte.
const maxRequestBytes = 1 << 20

// agentRequest is what a coordinator POSTs to an agent's /run.
type agentRequest struct {
	// ID names the run, for /cancel and the agent's log.
	ID string `json:"id"`
	// Config is the agent's share of the run, without secrets.
	Config Config `json:"config"`
}

// agentAnswer is an agent's answer to /run: its report, raw data
// included, and the error that cut the run short, if any.
type agentAnswer struct {
	// Report is the agent's report, Raw included.
	Report *Report `json:"report"`
	// Error is the error Run returned with it, if any.
	Error string `json:"error,omitempty"`
}

// agentStatus is an agent's answer to /status.
type agentStatus struct {
	// Busy says a run is under way.
	Busy bool `json:"busy"`
	// Run is its ID.
	Run string `json:"run,omitempty"`
	// Phase is what the run was doing at its last second: connect, send, grace.
	Phase string `json:"phase,omitempty"`
}

// phaseOf is a Progress that keeps the phase of an agent's run for its
// /status.
type phaseOf struct{ a *Agent }

// Update records s's phase.
func (p phaseOf) Update(s Status) {
	p.a.mu.Lock()
	p.a.phase = s.Phase
	p.a.mu.Unlock()
}

// Done does nothing: the phase is cleared with the run.
func (phaseOf) Done() error { return nil }

// AgentOptions configures an Agent. The secrets are the agent's own: a
// coordinator never sends them over the network.
type AgentOptions struct {
	// Secret signs the access tokens of the agent's users (chatd).
	Secret []byte
	// Password is the CONNECT password of --plain runs ("" sends none).
	Password string
	// Brokers are the brokers (host:port) coordinators may have the agent
	// load; none means brokers on loopback only. The agent's secret and
	// password go to these alone: a request naming another is refused.
	Brokers []string
	// MaxUsers and MaxDuration bound one run's users and sending time
	// (zero: 100,000 users, one hour).
	MaxUsers    int
	MaxDuration time.Duration
	// Logger receives a line as each run starts and ends; nil discards them.
	Logger *slog.Logger
}

// Agent runs chat scenarios on behalf of a coordinator (RunAgents), one
// at a time, and answers each with its report and raw data. It is an
// http.Handler.
type Agent struct {
	opts AgentOptions
	log  *slog.Logger
	mux  *http.ServeMux

	mu     sync.Mutex
	run    string             // the run under way, "" when idle
	phase  string             // its phase at its last second
	cancel context.CancelFunc // ends it
	closed bool
	// cancelled are the last runs cancelled before they started: a
	// coordinator that stops its agents may reach one before its /run.
	cancelled []string
}

// NewAgent returns an agent that runs what coordinators ask with opts.
func NewAgent(opts AgentOptions) *Agent {
	a := &Agent{opts: opts, log: opts.Logger, mux: http.NewServeMux()}
	if a.log == nil {
		a.log = slog.New(slog.DiscardHandler)
	}
	a.mux.HandleFunc("POST /run", a.serveRun)
	a.mux.HandleFunc("POST /cancel", a.serveCancel)
	a.mux.HandleFunc("GET /status", a.serveStatus)
	return a
}

// ServeHTTP serves the coordinator's requests.
func (a *Agent) ServeHTTP(w http.ResponseWriter, r *http.Request) { a.mux.ServeHTTP(w, r) }

// Close ends the run under way, whose /run then answers with its
// interrupted report, and refuses runs from now on.
func (a *Agent) Close() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.closed = true
	if a.cancel != nil {
		a.cancel()
	}
}

// begin makes id the run under way; it fails when there is one.
func (a *Agent) begin(id string, cancel context.CancelFunc) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	switch {
	case a.closed:
		return http.StatusServiceUnavailable, errors.New("the agent is stopping")
	case a.run != "":
		return http.StatusConflict, fmt.Errorf("busy with run %s: an agent carries out one run at a time", a.run)
	case slices.Contains(a.cancelled, id):
		return http.StatusConflict, fmt.Errorf("run %s was cancelled before it started", id)
	}
	a.run, a.cancel = id, cancel
	return http.StatusOK, nil
}

func (a *Agent) end() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.run, a.cancel, a.phase = "", nil, ""
}

// mayLoad reports whether the agent may drive the broker at hostport.
func (a *Agent) mayLoad(hostport string) bool {
	if len(a.opts.Brokers) > 0 {
		return slices.Contains(a.opts.Brokers, hostport)
	}
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	return host == "localhost" || (ip != nil && ip.IsLoopback())
}

// allowed describes the brokers the agent may drive.
func (a *Agent) allowed() string {
	if len(a.opts.Brokers) > 0 {
		return strings.Join(a.opts.Brokers, ", ")
	}
	return "brokers on loopback"
}

// accept checks a coordinator's share and completes it with the agent's
// own secrets.
func (a *Agent) accept(cfg *Config) error {
	switch {
	case cfg.Scenario != ScenarioChat:
		return fmt.Errorf("scenario %q: agents run the chat scenario only", cfg.Scenario)
	case len(cfg.Secret) > 0 || cfg.Password != "":
		return errors.New("the request carries a secret: an agent takes its token secret and password from its own flags, never from the network")
	case len(cfg.ServerCmds) > 0 || cfg.ServerPID != 0 || cfg.ServerLog != "":
		return errors.New("an agent neither starts nor measures servers (--server-cmd, --server-pid, --server-log)")
	case cfg.Users > cmp.Or(a.opts.MaxUsers, 100_000):
		return fmt.Errorf("--users %d: this agent runs at most %d", cfg.Users, cmp.Or(a.opts.MaxUsers, 100_000))
	case cfg.Duration > cmp.Or(a.opts.MaxDuration, time.Hour) || cfg.Grace > cmp.Or(a.opts.MaxDuration, time.Hour):
		return fmt.Errorf("--duration %s, --grace %s: this agent runs at most %s", cfg.Duration, cfg.Grace, cmp.Or(a.opts.MaxDuration, time.Hour))
	}
	urls, err := cfg.brokerURLs()
	if err != nil {
		return fmt.Errorf("on this agent: %w", err)
	}
	for _, raw := range urls {
		u, err := url.Parse(raw)
		if err != nil || !a.mayLoad(u.Host) {
			return fmt.Errorf("broker %s: this agent loads only %s (loadtest agent --brokers)", raw, a.allowed())
		}
	}
	cfg.Secret = a.opts.Secret
	if cfg.Plain {
		cfg.Password = a.opts.Password
	}
	cfg.Raw = true
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("on this agent: %w", err)
	}
	return nil
}

func (a *Agent) serveRun(w http.ResponseWriter, r *http.Request) {
	var req agentRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxRequestBytes))
	// A coordinator of another version may send settings this agent
	// does not know: refuse rather than ignore them.
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		a.refuse(w, r, req.ID, http.StatusBadRequest, fmt.Errorf("decode run request: %w", err))
		return
	}
	if req.ID == "" {
		a.refuse(w, r, req.ID, http.StatusBadRequest, errors.New("run request without id"))
		return
	}
	cfg := req.Config
	if err := a.accept(&cfg); err != nil {
		a.refuse(w, r, req.ID, http.StatusBadRequest, err)
		return
	}
	// The run ends early when the coordinator goes away, as well as on
	// /cancel and Close.
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	if code, err := a.begin(req.ID, cancel); err != nil {
		a.refuse(w, r, req.ID, code, err)
		return
	}
	defer a.end()

	start := time.Now()
	a.log.Info("run started", "run", req.ID, "coordinator", r.RemoteAddr, "broker", cfg.Broker,
		"users", cfg.Users, "user_prefix", cfg.UserPrefix, "rate", cfg.Rate, "duration", cfg.Duration)
	rep, err := Run(ctx, cfg, phaseOf{a})
	ans := agentAnswer{Report: rep}
	if err != nil {
		ans.Error = err.Error()
	}
	if rep == nil {
		a.log.Error("run failed", "run", req.ID, "err", err)
		http.Error(w, fmt.Sprintf("run %s: %v", req.ID, err), http.StatusInternalServerError)
		return
	}
	a.log.Info("run finished", "run", req.ID, "tag", rep.RunTag, "elapsed", time.Since(start).Round(time.Millisecond),
		"sent", rep.Counts.Sent, "delivered", rep.Counts.Unique, "lost", rep.Counts.Lost,
		"errors", rep.ErrorCount, "interrupted", rep.Interrupted, "err", ans.Error)
	b, err := json.Marshal(ans)
	if err != nil {
		a.log.Error("encode report", "run", req.ID, "err", err)
		http.Error(w, fmt.Sprintf("encode report: %v", err), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	if _, err := w.Write(b); err != nil {
		a.log.Warn("report not delivered: the coordinator went away", "run", req.ID, "err", err)
	}
}

// refuse answers a /run request that will not run, and logs it.
func (a *Agent) refuse(w http.ResponseWriter, r *http.Request, id string, code int, err error) {
	a.log.Warn("run refused", "run", id, "coordinator", r.RemoteAddr, "status", code, "err", err)
	http.Error(w, err.Error(), code)
}

func (a *Agent) serveCancel(w http.ResponseWriter, r *http.Request) {
	id := r.URL.Query().Get("id")
	if id == "" {
		http.Error(w, "cancel without id", http.StatusBadRequest)
		return
	}
	a.mu.Lock()
	running := id == a.run
	if running {
		a.cancel()
	} else if !slices.Contains(a.cancelled, id) {
		a.cancelled = append(a.cancelled, id)
		if len(a.cancelled) > maxCancelled {
			a.cancelled = a.cancelled[1:]
		}
	}
	a.mu.Unlock()
	if running {
		a.log.Info("run cancelled by the coordinator", "run", id, "coordinator", r.RemoteAddr)
	} else {
		a.log.Info("run cancelled before it started, or after it ended", "run", id, "coordinator", r.RemoteAddr)
	}
	w.WriteHeader(http.StatusNoContent)
}

func (a *Agent) serveStatus(w http.ResponseWriter, _ *http.Request) {
	a.mu.Lock()
	st := agentStatus{Busy: a.run != "", Run: a.run, Phase: a.phase}
	a.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	// A write error means the client went away; there is no one to tell.
	_ = json.NewEncoder(w).Encode(st)
}
