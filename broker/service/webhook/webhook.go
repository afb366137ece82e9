// Package webhook POSTs JSON bodies to an app's webhook in the background,
// reliably enough and never at the message path's expense: a bounded queue
// (what does not fit is dropped and counted, never waited for), a few
// workers, retries with jittered exponential backoff or the webhook's
// Retry-After, and counters. Push notifications and events use it.
package webhook

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults for the zero values of Options, and fixed tuning.
const (
	defaultQueueSize   = 10000
	defaultMaxAttempts = 5
	defaultBackoff     = 500 * time.Millisecond
	defaultMaxBackoff  = 30 * time.Second
	defaultTimeout     = 10 * time.Second

	// workers is how many requests are in flight at most. Retries wait on
	// timers, not in a worker, so a slow or failing notification never
	// holds up the others for longer than one request.
	workers = 4
	// maxDrain is how much of an answer body is read so that the
	// connection can be reused; a longer answer costs a new connection.
	maxDrain = 64 << 10
	// dropLogEvery spaces out the warnings about a full queue, which would
	// otherwise be written once per message on the message path.
	dropLogEvery = time.Minute
)

// Options configures a Sender. Zero or negative numbers take the
// defaults named on each field.
type Options struct {
	// URL is the webhook (http or https); empty disables the Sender.
	URL string
	// Name names the webhook in logs and errors ("push", "events").
	Name string
	// UserAgent is sent with every request.
	UserAgent string
	// QueueSize bounds the bodies accepted and not yet finished: waiting,
	// being sent or waiting to be retried (default 10000).
	QueueSize int
	// MaxAttempts is how often one body is tried (default 5).
	MaxAttempts int
	// Client sends the requests; nil means a client of this package's own
	// with a 10s timeout, whose idle connections Close closes.
	Client *http.Client
	// Logger receives failures (nil: slog.Default()).
	Logger *slog.Logger
	// Backoff is the ceiling of the first retry delay (default 500ms); it
	// doubles per attempt up to MaxBackoff, and each delay is drawn
	// uniformly below the ceiling (full jitter).
	Backoff time.Duration
	// MaxBackoff caps retry delays, including a webhook's Retry-After
	// (default 30s).
	MaxBackoff time.Duration
	// Sign, if set, adds headers to each attempt's request for the body
	// sent with label: a signature made at now, so that a retry carries a
	// fresh timestamp.
	Sign func(h http.Header, label string, body []byte, now time.Time)
	// Now reads the clock (nil: time.Now).
	Now func() time.Time
}

// Stats are a Sender's counters since New.
type Stats struct {
	// Sent counts bodies the webhook answered with a 2xx.
	Sent uint64
	// Failed counts bodies given up: a non-retryable answer, or
	// MaxAttempts attempts without success.
	Failed uint64
	// Retried counts retries scheduled.
	Retried uint64
	// Dropped counts bodies refused because the queue was full.
	Dropped uint64
}

// Sender sends bodies to a webhook in the background.
type Sender struct {
	// url is fixed at New when empty (the Sender is off); else SetURL may
	// change it while requests are under way.
	url         atomic.Pointer[string]
	name        string
	userAgent   string
	client      *http.Client
	transport   *http.Transport // ours to close, nil for a caller's client
	log         *slog.Logger
	now         func() time.Time
	sign        func(h http.Header, label string, body []byte, now time.Time)
	size        int
	maxAttempts int
	backoff     time.Duration
	maxBackoff  time.Duration

	ctx       context.Context
	cancel    context.CancelFunc
	work      chan *job
	wg        sync.WaitGroup // workers and fired retry timers
	closeOnce sync.Once

	mu     sync.Mutex
	closed bool
	// pending counts accepted bodies not yet finished, wherever they are
	// (in work, in a worker, on a retry timer). It never exceeds size,
	// the capacity of work, so a send on work never blocks.
	pending     int
	waiting     map[*job]*time.Timer
	lastDropLog time.Time

	sent, failed, retried, dropped atomic.Uint64
}

// job is one body on its way.
type job struct {
	label    string
	body     []byte
	attempts int
}

// New returns a Sender posting to o.URL and starts its workers; the owner
// must call Close. With an empty URL it returns a Sender that accepts
// nothing and starts nothing. It fails on a URL that is not http(s) with a
// host.
func New(o Options) (*Sender, error) {
	if o.URL == "" {
		return &Sender{}, nil
	}
	if err := CheckURL(o.URL); err != nil {
		return nil, err
	}
	n := &Sender{
		name:        o.Name,
		userAgent:   o.UserAgent,
		client:      o.Client,
		log:         o.Logger,
		now:         o.Now,
		sign:        o.Sign,
		size:        positive(o.QueueSize, defaultQueueSize),
		maxAttempts: positive(o.MaxAttempts, defaultMaxAttempts),
		backoff:     positive(o.Backoff, defaultBackoff),
		maxBackoff:  positive(o.MaxBackoff, defaultMaxBackoff),
		waiting:     make(map[*job]*time.Timer),
	}
	if n.name == "" {
		n.name = "webhook"
	}
	if n.client == nil {
		n.transport = &http.Transport{
			Proxy:               http.ProxyFromEnvironment,
			ForceAttemptHTTP2:   true,
			MaxIdleConnsPerHost: workers,
			IdleConnTimeout:     90 * time.Second,
			TLSHandshakeTimeout: defaultTimeout,
		}
		n.client = &http.Client{Transport: n.transport, Timeout: defaultTimeout}
	}
	if n.log == nil {
		n.log = slog.Default()
	}
	if n.now == nil {
		n.now = time.Now
	}
	n.work = make(chan *job, n.size)
	n.url.Store(&o.URL)
	n.ctx, n.cancel = context.WithCancel(context.Background())
	n.wg.Add(workers)
	for range workers {
		go n.worker()
	}
	return n, nil
}

// CheckURL reports whether raw is a webhook URL: http or https, with a
// host. Its error never repeats raw, which may hold credentials.
func CheckURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil {
		return fmt.Errorf("webhook URL: %w", WithoutURL(err))
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("webhook URL: want http:// or https:// and a host, got scheme %q", u.Scheme)
	}
	return nil
}

// WithoutURL returns err without the URL a *url.Error repeats, which may
// hold a webhook's credentials: fit for logs.
func WithoutURL(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// Enabled reports whether a webhook is configured: when it is not,
// callers need not build what they would send.
func (n *Sender) Enabled() bool { return n.url.Load() != nil }

// SetURL points a Sender that was made with a URL at another one, for the
// requests made from now on, retries included; a Sender made without one
// stays off (its workers were never started).
func (n *Sender) SetURL(raw string) error {
	if !n.Enabled() {
		return errors.New("webhook URL: the webhook was off at start: a restart turns it on")
	}
	if err := CheckURL(raw); err != nil {
		return err
	}
	n.url.Store(&raw)
	return nil
}

// Send queues body for sending and returns at once, true when it was
// accepted; label names it in logs. It returns false, and sends nothing,
// when disabled, after Close, or when QueueSize bodies are unfinished
// (counted as dropped). It is safe for concurrent use.
func (n *Sender) Send(label string, body []byte) bool {
	if !n.Enabled() {
		return false
	}
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return false
	}
	if n.pending >= n.size {
		now := n.now()
		logIt := now.Sub(n.lastDropLog) >= dropLogEvery
		if logIt {
			n.lastDropLog = now
		}
		n.mu.Unlock()
		dropped := n.dropped.Add(1)
		if logIt {
			n.log.Warn(n.name+" queue full, requests dropped", "queue_size", n.size, "dropped_total", dropped)
		}
		return false
	}
	n.pending++
	n.work <- &job{label: label, body: body} // never blocks: see pending
	n.mu.Unlock()
	return true
}

// Stats returns the counters.
func (n *Sender) Stats() Stats {
	return Stats{Sent: n.sent.Load(), Failed: n.failed.Load(), Retried: n.retried.Load(), Dropped: n.dropped.Load()}
}

// Pending returns how many accepted bodies are not finished.
func (n *Sender) Pending() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.pending
}

// positive returns v, or def when v is zero or negative.
func positive[T int | time.Duration](v, def T) T {
	if v <= 0 {
		return def
	}
	return v
}

// Close stops the workers and retry timers, cancelling a request in
// progress, and waits for them. Unfinished requests are dropped and
// their number logged. Close is idempotent; Send returns false after it.
func (n *Sender) Close() {
	if !n.Enabled() {
		return
	}
	n.closeOnce.Do(func() {
		n.mu.Lock()
		n.closed = true
		for _, t := range n.waiting {
			if t.Stop() {
				n.wg.Done() // its callback will never run
			}
		}
		n.mu.Unlock()
		n.cancel()
		n.wg.Wait()
		if n.transport != nil {
			n.transport.CloseIdleConnections()
		}
		n.mu.Lock()
		left := n.pending
		n.mu.Unlock()
		if left > 0 {
			n.log.Info(n.name+" stopped, unsent requests dropped", "count", left)
		}
	})
}

func (n *Sender) worker() {
	defer n.wg.Done()
	for {
		select {
		case <-n.ctx.Done():
			return
		case j := <-n.work:
			n.attempt(j)
		}
	}
}

// attempt makes one try at j and decides what follows: done, retry later,
// or give up. A try cut short by Close leaves j pending for Close to count.
func (n *Sender) attempt(j *job) {
	if n.ctx.Err() != nil {
		return
	}
	j.attempts++
	retry, retryAfter, err := n.post(j.label, j.body)
	switch {
	case err == nil:
		n.finish(&n.sent)
	case n.ctx.Err() != nil:
		// Close cut the request short; j stays pending for Close to count.
	case retry && j.attempts < n.maxAttempts:
		d := n.retryDelay(j.attempts, retryAfter)
		n.log.Debug(n.name+" attempt failed, will retry", "about", j.label, "attempt", j.attempts, "retry_in", d, "error", err)
		n.later(j, d)
	default:
		n.finish(&n.failed)
		n.log.Warn(n.name+" not sent", "about", j.label, "attempts", j.attempts, "error", err)
	}
}

// finish releases the queue slot of a notification that is done, then
// counts it in outcome: whoever sees the count sees the slot free.
func (n *Sender) finish(outcome *atomic.Uint64) {
	n.mu.Lock()
	n.pending--
	n.mu.Unlock()
	outcome.Add(1)
}

// later puts j back on the work queue after d, on a timer rather than in a
// worker so that the workers keep serving other users meanwhile.
func (n *Sender) later(j *job, d time.Duration) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return // left pending for Close to count
	}
	n.retried.Add(1)
	n.wg.Add(1)
	// The callback takes n.mu, so it cannot run before j is in waiting.
	n.waiting[j] = time.AfterFunc(d, func() {
		defer n.wg.Done()
		n.mu.Lock()
		delete(n.waiting, j)
		n.mu.Unlock()
		n.work <- j // never blocks: see pending
	})
}

// post makes one request. It returns nil on a 2xx answer; otherwise the
// error, whether it is worth retrying (network errors, 408, 429, 5xx) and
// the answer's Retry-After header.
func (n *Sender) post(label string, body []byte) (retry bool, retryAfter string, err error) {
	req, err := http.NewRequestWithContext(n.ctx, http.MethodPost, *n.url.Load(), bytes.NewReader(body))
	if err != nil {
		return false, "", fmt.Errorf("build webhook request: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", n.userAgent)
	if n.sign != nil {
		n.sign(req.Header, label, body, n.now())
	}
	resp, err := n.client.Do(req)
	if err != nil {
		return true, "", fmt.Errorf("post to webhook: %w", WithoutURL(err))
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, io.LimitReader(resp.Body, maxDrain)); err != nil {
		// The status is all that counts; this only costs the connection.
		n.log.Debug("read webhook answer", "error", err)
	}
	code := resp.StatusCode
	switch {
	case code >= 200 && code < 300:
		return false, "", nil
	case code == http.StatusRequestTimeout || code == http.StatusTooManyRequests || code >= 500:
		return true, resp.Header.Get("Retry-After"), fmt.Errorf("webhook answered %s", resp.Status)
	default:
		return false, "", fmt.Errorf("webhook answered %s", resp.Status)
	}
}

// retryDelay is the wait after the attempts-th failed attempt: the
// webhook's Retry-After when it gave a valid one, else a uniform draw
// below Backoff doubled attempts-1 times; either capped at MaxBackoff.
func (n *Sender) retryDelay(attempts int, retryAfter string) time.Duration {
	if d, ok := parseRetryAfter(retryAfter, n.now()); ok {
		return min(d, n.maxBackoff)
	}
	ceiling := min(n.backoff, n.maxBackoff)
	for i := 1; i < attempts; i++ {
		if ceiling > n.maxBackoff/2 {
			ceiling = n.maxBackoff
			break
		}
		ceiling *= 2
	}
	return rand.N(ceiling)
}

// parseRetryAfter reads a Retry-After value, delay-seconds or an HTTP date
// (RFC 9110 section 10.2.3). A missing or malformed value reports false and
// the caller falls back to its own backoff.
func parseRetryAfter(v string, now time.Time) (time.Duration, bool) {
	if v == "" {
		return 0, false
	}
	if secs, err := strconv.ParseUint(v, 10, 32); err == nil {
		return time.Duration(secs) * time.Second, true
	}
	if t, err := http.ParseTime(v); err == nil {
		return max(t.Sub(now), 0), true
	}
	return 0, false
}
