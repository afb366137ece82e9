package loadtest

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"math"
	mrand "math/rand/v2"
	"net"
	"net/url"
	"os"
	"sync"
	"sync/atomic"
	"time"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"
)

// Phases a run goes through, shown on the progress line.
const (
	phaseStart   = "start"
	phaseConnect = "connect"
	phaseSend    = "send"
	phaseQueue   = "queue"
	phaseDrain   = "drain"
	phaseHold    = "hold"
	phaseRestart = "restart"
	phaseGrace   = "grace"
	phaseClose   = "close"
)

// connectWorkers bounds the connections being opened at once.
const connectWorkers = 64

// portsPerSourceIP is how many connections one loopback source address
// carries before the next one is used; Linux offers ~28k ephemeral ports.
const portsPerSourceIP = 20_000

// run is the state of one Run call; every goroutine it starts ends before
// Run returns.
type run struct {
	cfg       Config
	tag       string
	users     []string
	topics    []string
	ledger    *Ledger
	sourceIPs int
	start     time.Time
	phase     atomic.Value // string
	progress  Progress

	errs  errorLog
	conns connStats
	// protos counts the clients of each protocol version, reasons the
	// MQTT 5 reason codes they received.
	protos  protocolStats
	reasons reasonCounts
	// mix gives each slot of a protocol mix its version (see mixPattern);
	// nil without one.
	mix []int

	// devices is how many devices, each a client, every user has: 1
	// except in the chat scenarios with Config.Devices above 1.
	devices int
	// seedV seeds every random choice of the run: Config.Seed, or one
	// drawn at random and reported so that the run can be repeated.
	seedV uint64

	// brokers are the URLs the clients connect to, one per node; the flaky
	// scenario replaces its one URL by its proxy's before any client
	// exists. brokerKeys are their normalised forms and nodes their
	// connection counts, in the same order.
	brokers    []string
	brokerKeys []string
	nodes      []nodeStats
	// chatters are the chat scenario's connected clients, every device of
	// every user, set before its sending phase starts.
	chatters []*client

	servers []*serverProc // started by ServerCmds, one per node or one for all
	watch   *procWatch    // the (first) server, when known
	self    *procWatch

	latMu      sync.Mutex
	connectH   *hdrhistogram.Histogram
	subscribeH *hdrhistogram.Histogram

	seriesMu sync.Mutex
	series   []Point
	// seriesHists holds, with Config.Raw, the send->deliver histogram of
	// each point of series, encoded at once: a run of hours keeps a few
	// kilobytes a second rather than a whole histogram.
	seriesHists []EncodedHistogram
	prev        Counts
	prevErrs    int64
	prevAt      time.Time

	// book is the workload scenario's accounting, in place of the ledger's.
	book     *book
	workload *WorkloadResult

	drain   *DrainResult
	connect *ConnectResult
	faults  *FaultResult
	crash   *CrashResult
	restart *RestartResult
	flood   *FloodResult
}

// errorLog counts errors and keeps the first few messages for the report.
type errorLog struct {
	mu    sync.Mutex
	n     int64
	first []string
}

const maxErrorSamples = 20

func (e *errorLog) add(err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.n++
	if len(e.first) < maxErrorSamples {
		e.first = append(e.first, err.Error())
	}
}

func (e *errorLog) snapshot() (int64, []string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.n, append([]string(nil), e.first...)
}

// connStats follows the clients' connections.
type connStats struct {
	connected  atomic.Int64
	reconnects atomic.Int64
	// sessionsLost counts MQTT 5 reconnections the broker answered
	// without the phone's session.
	sessionsLost atomic.Int64
	lost         atomic.Int64

	mu      sync.Mutex
	reasons []string
}

// nodeStats counts the connections to one broker URL.
type nodeStats struct {
	// clients counts the clients whose first connection was to the node.
	clients atomic.Int64
	// connects counts every connection to the node, reconnections included.
	connects atomic.Int64
	// atClose counts the clients connected to the node when the run closed them.
	atClose atomic.Int64
}

func (s *connStats) noteLoss(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.reasons) < maxErrorSamples {
		s.reasons = append(s.reasons, err.Error())
	}
}

// Run executes the scenario cfg describes and returns its report. It stops
// by itself: sending lasts cfg.Duration, then at most cfg.Grace is spent
// waiting for deliveries. The error is non-nil when the run could not be
// carried out; lost messages are reported, not returned as an error.
// progress may be nil.
func Run(ctx context.Context, cfg Config, progress Progress) (*Report, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	r, err := newRun(cfg, progress)
	if err != nil {
		return nil, err
	}
	if len(cfg.ServerCmds) > 0 {
		srvs, err := startServers(ctx, cfg.ServerCmds, cfg.ServerLog, r.brokerHosts())
		if err != nil {
			return nil, err
		}
		r.servers = srvs
		// One node is measured: summing several processes' CPU and memory
		// would hide how the load is spread over them.
		r.watch = newProcWatch(srvs[0].pid())
	} else if cfg.ServerPID != 0 {
		if _, err := ReadProc(cfg.ServerPID); err != nil {
			return nil, fmt.Errorf("--server-pid: %w", err)
		}
		r.watch = newProcWatch(cfg.ServerPID)
	}

	samplerCtx, stopSampler := context.WithCancel(context.Background())
	var samplerDone sync.WaitGroup
	samplerDone.Add(1)
	go func() {
		defer samplerDone.Done()
		r.sampleEverySecond(samplerCtx)
	}()

	var runErr error
	switch cfg.Scenario {
	case ScenarioChat:
		runErr = r.runChat(ctx, nil)
	case ScenarioDrain:
		runErr = r.runDrain(ctx)
	case ScenarioConnect:
		runErr = r.runConnect(ctx)
	case ScenarioFlaky:
		runErr = r.runFlaky(ctx)
	case ScenarioCrash:
		runErr = r.runCrash(ctx)
	case ScenarioRestart:
		runErr = r.runRestart(ctx)
	case ScenarioWorkload:
		runErr = r.runWorkload(ctx)
	}

	stopSampler()
	samplerDone.Wait()
	r.takeSample(time.Now())
	if r.progress != nil {
		if err := r.progress.Done(); err != nil {
			r.errs.add(err)
		}
	}
	for _, err := range stopServers(r.servers) {
		r.errs.add(err)
	}
	if runErr != nil {
		r.errs.add(runErr)
	}
	return r.report(ctx.Err() != nil), runErr
}

func newRun(cfg Config, progress Progress) (*run, error) {
	tag, err := newTag()
	if err != nil {
		return nil, err
	}
	brokers, err := cfg.brokerURLs()
	if err != nil {
		return nil, err
	}
	r := &run{
		cfg:        cfg,
		tag:        tag,
		start:      time.Now(),
		progress:   progress,
		self:       newProcWatch(os.Getpid()),
		connectH:   newHist(),
		subscribeH: newHist(),
	}
	r.setBrokers(brokers)
	if cfg.ProtocolMix != "" {
		mix, err := parseProtocolMix(cfg.ProtocolMix)
		if err != nil {
			return nil, err
		}
		r.mix = mixPattern(mix)
	}
	r.devices = max(1, cfg.Devices)
	r.seedV = uint64(cfg.Seed)
	for r.seedV == 0 {
		// Positive, so that --seed can repeat it.
		r.seedV = mrand.Uint64() >> 1
	}
	r.phase.Store(phaseStart)
	r.prevAt = r.start
	switch cfg.Scenario {
	case ScenarioDrain:
		for i := range cfg.Senders {
			r.users = append(r.users, fmt.Sprintf("%s-s%d", cfg.UserPrefix, i))
		}
		r.users = append(r.users, cfg.UserPrefix+"-r")
	case ScenarioRestart:
		// Senders first, then recipients: see restartUsers.
		for i := range cfg.Senders {
			r.users = append(r.users, fmt.Sprintf("%s-s%d", cfg.UserPrefix, i))
		}
		for i := range cfg.Recipients {
			r.users = append(r.users, fmt.Sprintf("%s-r%d", cfg.UserPrefix, i))
		}
	case ScenarioConnect:
		for i := range cfg.Users {
			r.users = append(r.users, fmt.Sprintf("%s-c%d", cfg.UserPrefix, i))
		}
	default:
		for i := range cfg.Users {
			r.users = append(r.users, fmt.Sprintf("%s-u%d", cfg.UserPrefix, i))
		}
	}
	for _, u := range r.users {
		if !validUserID(u) {
			return nil, fmt.Errorf("user ID %q: 1-64 characters of [A-Za-z0-9_.-]; shorten --user-prefix", u)
		}
		r.topics = append(r.topics, fmt.Sprintf(cfg.Topic, u))
	}
	r.ledger = NewDeviceLedger(tag, r.users, r.devices, cfg.Plain)
	if cfg.Scenario == ScenarioWorkload {
		r.book = newBook(tag, r.users)
	}
	r.sourceIPs = cfg.SourceIPs
	if r.sourceIPs == 0 && r.brokerOnLoopback() {
		r.sourceIPs = (len(r.users)*r.devices + portsPerSourceIP - 1) / portsPerSourceIP
	}
	return r, nil
}

// newTag returns a random run tag: message ids of one run never collide
// with those left on a broker by another.
func newTag() (string, error) {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("run tag: %w", err)
	}
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return string(b), nil
}

// setBrokers sets the URLs clients connect to, before any client exists.
func (r *run) setBrokers(urls []string) {
	r.brokers = urls
	r.brokerKeys = make([]string, len(urls))
	for i, s := range urls {
		// paho hands its broker URLs back parsed; they are matched by
		// their string form.
		if u, err := url.Parse(s); err == nil {
			r.brokerKeys[i] = u.String()
		}
	}
	r.nodes = make([]nodeStats, len(urls))
}

// brokerHosts returns the host:port of each broker URL.
func (r *run) brokerHosts() []string {
	hosts := make([]string, len(r.brokers))
	for i, s := range r.brokers {
		if u, err := url.Parse(s); err == nil {
			hosts[i] = u.Host
		}
	}
	return hosts
}

// brokerOnLoopback reports whether every broker is on an IPv4 loopback
// address, from which any 127.0.0.0/8 source address can reach it.
func (r *run) brokerOnLoopback() bool {
	for _, h := range r.brokerHosts() {
		host, _, err := net.SplitHostPort(h)
		if err != nil {
			return false
		}
		ip := net.ParseIP(host)
		if ip == nil || !ip.IsLoopback() || ip.To4() == nil {
			return false
		}
	}
	return true
}

func (r *run) setPhase(p string) { r.phase.Store(p) }

// sleep waits for d or until ctx ends, and reports whether d elapsed.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// connectAll opens the clients of the given user indices, at most rate
// per second (0: as fast as connectWorkers allow). The result is aligned
// with idxs, nil where a connection failed; failures are counted in the
// error log and the first is returned.
func (r *run) connectAll(ctx context.Context, idxs []int, rate float64) ([]*client, int, error) {
	return r.connectDevices(ctx, idxs, 1, rate)
}

// connectDevices is connectAll for devices clients per user: the result
// holds device k of idxs[i] at i*devices+k.
func (r *run) connectDevices(ctx context.Context, idxs []int, devices int, rate float64) ([]*client, int, error) {
	r.setPhase(phaseConnect)
	n := len(idxs) * devices
	clients := make([]*client, n)
	jobs := make(chan int)
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		failed   int
		firstErr error
	)
	for range min(connectWorkers, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				c, err := r.newDevice(idxs[j/devices], j%devices)
				var connack, suback time.Duration
				if err == nil {
					connack, suback, err = c.connect(ctx)
					if err != nil {
						c.abort()
					}
				}
				if err != nil {
					r.errs.add(err)
					mu.Lock()
					failed++
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					continue
				}
				r.latMu.Lock()
				recordMicros(r.connectH, int64(connack))
				recordMicros(r.subscribeH, int64(suback))
				r.latMu.Unlock()
				if node, ok := c.node(); ok {
					r.nodes[node].clients.Add(1)
				}
				clients[j] = c
			}
		}()
	}
	var interval time.Duration
	if rate > 0 {
		interval = time.Duration(float64(time.Second) / rate)
	}
	next := time.Now()
	for j := range n {
		if interval > 0 {
			if d := time.Until(next); d > 0 && !sleep(ctx, d) {
				break
			}
			next = next.Add(interval)
		}
		select {
		case jobs <- j:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
	}
	close(jobs)
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	return clients, failed, firstErr
}

// disconnectAll closes every non-nil client, several at a time.
func (r *run) disconnectAll(clients []*client) {
	r.setPhase(phaseClose)
	jobs := make(chan *client)
	var wg sync.WaitGroup
	for range min(connectWorkers, max(1, len(clients))) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := range jobs {
				c.disconnect()
			}
		}()
	}
	for _, c := range clients {
		if c != nil {
			jobs <- c
		}
	}
	close(jobs)
	wg.Wait()
}

// awaitDelivery waits up to grace for every sent message to be delivered
// (or refused), and reports whether that happened.
func (r *run) awaitDelivery(ctx context.Context, grace time.Duration) bool {
	deadline := time.Now().Add(grace)
	for r.ledger.Outstanding() > 0 {
		if time.Now().After(deadline) || !sleep(ctx, 10*time.Millisecond) {
			return false
		}
	}
	return true
}

// awaitConnected waits up to d for every client to have a live connection.
func (r *run) awaitConnected(ctx context.Context, clients []*client, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		all := true
		for _, c := range clients {
			if c != nil && !c.t.isOpen() {
				all = false
				break
			}
		}
		if all {
			return true
		}
		if time.Now().After(deadline) || !sleep(ctx, 20*time.Millisecond) {
			return false
		}
	}
}

// sendInterval returns the pause between two sends of one of n senders
// sharing rate messages per second; 0 means no pacing.
func sendInterval(rate float64, n int) time.Duration {
	if rate <= 0 || n <= 0 {
		return 0
	}
	return time.Duration(math.Round(float64(n) * float64(time.Second) / rate))
}

// pacer spaces sends by interval without drifting: a sender that fell
// behind catches up, but never by more than one second of sends.
type pacer struct {
	interval time.Duration
	next     time.Time
}

func (p *pacer) wait(ctx context.Context) bool {
	if p.interval <= 0 {
		return ctx.Err() == nil
	}
	now := time.Now()
	if p.next.Before(now.Add(-time.Second)) {
		p.next = now
	}
	if d := p.next.Sub(now); d > 0 && !sleep(ctx, d) {
		return false
	}
	p.next = p.next.Add(p.interval)
	return ctx.Err() == nil
}

var errNoClients = errors.New("no client could connect")
