// Package push wakes the phones of users who have messages waiting and no
// device online (PROTOCOL.md section 8): it POSTs a small JSON notification
// to a webhook, the app's own bridge to APNs/FCM.
//
// A notification names who wrote and how much is waiting, never what was
// written. The package never blocks the message path and never affects the
// message, which stays queued whatever happens here: a notification that
// cannot be sent is logged, counted and forgotten.
package push

import (
	"bytes"
	"context"
	"encoding/json"
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
	defaultInterval    = 30 * time.Second
	defaultQueueSize   = 10000
	defaultMaxAttempts = 5
	defaultBackoff     = 500 * time.Millisecond
	defaultMaxBackoff  = 30 * time.Second
	defaultTimeout     = 10 * time.Second

	// workers is how many requests are in flight at most. Retries wait on
	// timers, not in a worker, so a slow or failing notification never
	// holds up the others for longer than one request.
	workers = 4
	// minPruneAt is the size below which the per-user map is never swept.
	minPruneAt = 1024
	// maxDrain is how much of an answer body is read so that the
	// connection can be reused; a longer answer costs a new connection.
	maxDrain = 64 << 10
	// dropLogEvery spaces out the warnings about a full queue, which would
	// otherwise be written once per message on the message path.
	dropLogEvery = time.Minute

	userAgent = "chatd-push/1"
)

// Notification is what is POSTed to the webhook, field for field.
type Notification struct {
	// User is the recipient whose phone should wake up.
	User string `json:"user"`
	// From is the sender of the message that was queued.
	From string `json:"from"`
	// Kind is the envelope kind of that message, e.g. "msg".
	Kind string `json:"kind"`
	// Group is the group the message was sent to; empty (and omitted from
	// the JSON) for a direct message.
	Group string `json:"group,omitempty"`
	// Queued is how many messages are waiting for User.
	Queued uint64 `json:"queued"`
}

// Options configures a Notifier. Zero or negative numbers take the
// defaults named on each field.
type Options struct {
	// URL is the webhook (http or https); empty disables push.
	URL string
	// Interval is the least time between two notifications accepted for
	// one user, counted from acceptance by Notify (default 30s).
	Interval time.Duration
	// QueueSize bounds the notifications accepted and not yet finished:
	// waiting, being sent or waiting to be retried (default 10000).
	QueueSize int
	// MaxAttempts is how often one notification is tried (default 5).
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
	// Now reads the clock for the per-user interval (nil: time.Now).
	Now func() time.Time
}

// Stats are a Notifier's counters since New.
type Stats struct {
	// Sent counts notifications the webhook answered with a 2xx.
	Sent uint64
	// Failed counts notifications given up: a non-retryable answer, or
	// MaxAttempts attempts without success.
	Failed uint64
	// Retried counts retries scheduled.
	Retried uint64
	// Dropped counts notifications refused because the queue was full.
	Dropped uint64
	// Suppressed counts notifications refused because their user had one
	// accepted less than Interval before.
	Suppressed uint64
}

// Notifier sends notifications to a webhook in the background.
type Notifier struct {
	url         string
	client      *http.Client
	transport   *http.Transport // ours to close, nil for a caller's client
	log         *slog.Logger
	now         func() time.Time
	interval    time.Duration
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
	// pending counts accepted notifications not yet finished, wherever
	// they are (in work, in a worker, on a retry timer). It never exceeds
	// size, the capacity of work, so a send on work never blocks.
	pending int
	// last maps a user to when a notification for them was last accepted.
	// Entries older than interval are swept when the map reaches pruneAt,
	// which is then set to twice what is left.
	last        map[string]time.Time
	pruneAt     int
	waiting     map[*job]*time.Timer
	lastDropLog time.Time

	sent, failed, retried, dropped, suppressed atomic.Uint64
}

// job is one notification on its way.
type job struct {
	nf       Notification
	body     []byte
	attempts int
}

// New returns a Notifier posting to o.URL and starts its workers; the owner
// must call Close. With an empty URL it returns a Notifier that accepts
// nothing and starts nothing. It fails on a URL that is not http(s) with a
// host.
func New(o Options) (*Notifier, error) {
	if o.URL == "" {
		return &Notifier{}, nil
	}
	u, err := url.Parse(o.URL)
	if err != nil {
		// url.Error repeats the URL, which may hold the bridge's
		// credentials; the cause is enough to fix it.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return nil, fmt.Errorf("webhook URL: %w", err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("webhook URL: want http:// or https:// and a host, got scheme %q", u.Scheme)
	}
	n := &Notifier{
		url:         o.URL,
		client:      o.Client,
		log:         o.Logger,
		now:         o.Now,
		interval:    positive(o.Interval, defaultInterval),
		size:        positive(o.QueueSize, defaultQueueSize),
		maxAttempts: positive(o.MaxAttempts, defaultMaxAttempts),
		backoff:     positive(o.Backoff, defaultBackoff),
		maxBackoff:  positive(o.MaxBackoff, defaultMaxBackoff),
		last:        make(map[string]time.Time),
		pruneAt:     minPruneAt,
		waiting:     make(map[*job]*time.Timer),
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
	n.ctx, n.cancel = context.WithCancel(context.Background())
	n.wg.Add(workers)
	for range workers {
		go n.worker()
	}
	return n, nil
}

// positive returns v, or def when v is zero or negative.
func positive[T int | time.Duration](v, def T) T {
	if v <= 0 {
		return def
	}
	return v
}

// Enabled reports whether a webhook is configured: when it is not,
// callers need not gather what a notification would say.
func (n *Notifier) Enabled() bool { return n.url != "" }

// Notify queues nf for sending and returns at once, true when it was
// accepted. It returns false, and sends nothing, when push is disabled,
// after Close, when a notification for nf.User was accepted less than
// Interval ago (counted as suppressed), or when QueueSize notifications are
// unfinished (counted as dropped; the user may be notified again at once).
// It is safe for concurrent use.
//
// The interval counts from acceptance, not from a successful send, so a
// failing webhook is not hammered once per message; a suppressed
// notification is not sent later, the next message after the interval
// sends one. Remembering users costs one map entry per user accepted within
// the last Interval, at most about twice that between sweeps (which never
// run below 1024 entries); that number is bounded by QueueSize plus what the webhook
// completes in one Interval.
func (n *Notifier) Notify(nf Notification) bool {
	if n.url == "" {
		return false
	}
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return false
	}
	now := n.now()
	if t, ok := n.last[nf.User]; ok && now.Sub(t) < n.interval {
		n.mu.Unlock()
		n.suppressed.Add(1)
		return false
	}
	if n.pending >= n.size {
		logIt := now.Sub(n.lastDropLog) >= dropLogEvery
		if logIt {
			n.lastDropLog = now
		}
		n.mu.Unlock()
		dropped := n.dropped.Add(1)
		if logIt {
			n.log.Warn("push queue full, notifications dropped", "queue_size", n.size, "dropped_total", dropped)
		}
		return false
	}
	if len(n.last) >= n.pruneAt {
		n.prune(now)
	}
	n.last[nf.User] = now
	n.pending++
	n.work <- &job{nf: nf} // never blocks: see pending
	n.mu.Unlock()
	return true
}

// prune forgets the users whose interval is over, so that the map holds at
// most about twice the users notified within one interval (and at least
// minPruneAt before a sweep). It copies into a new map because a Go map
// never gives back the memory of deleted entries. n.mu must be held.
func (n *Notifier) prune(now time.Time) {
	live := make(map[string]time.Time, len(n.last)/2)
	for u, t := range n.last {
		if now.Sub(t) < n.interval {
			live[u] = t
		}
	}
	n.last = live
	n.pruneAt = max(2*len(live), minPruneAt)
}

// Stats returns the counters.
func (n *Notifier) Stats() Stats {
	return Stats{
		Sent:       n.sent.Load(),
		Failed:     n.failed.Load(),
		Retried:    n.retried.Load(),
		Dropped:    n.dropped.Load(),
		Suppressed: n.suppressed.Load(),
	}
}

// Close stops the workers and retry timers, cancelling a request in
// progress, and waits for them. Unfinished notifications are dropped and
// their number logged. Close is idempotent; Notify returns false after it.
func (n *Notifier) Close() {
	if n.url == "" {
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
			n.log.Info("push stopped, unsent notifications dropped", "count", left)
		}
	})
}

func (n *Notifier) worker() {
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
func (n *Notifier) attempt(j *job) {
	if n.ctx.Err() != nil {
		return
	}
	if j.body == nil {
		body, err := json.Marshal(j.nf)
		if err != nil {
			n.finish(&n.failed)
			n.log.Error("encode push notification", "user", j.nf.User, "error", err)
			return
		}
		j.body = body
	}
	j.attempts++
	retry, retryAfter, err := n.post(j.body)
	switch {
	case err == nil:
		n.finish(&n.sent)
	case n.ctx.Err() != nil:
		// Close cut the request short; j stays pending for Close to count.
	case retry && j.attempts < n.maxAttempts:
		d := n.retryDelay(j.attempts, retryAfter)
		n.log.Debug("push attempt failed, will retry", "user", j.nf.User, "attempt", j.attempts, "retry_in", d, "error", err)
		n.later(j, d)
	default:
		n.finish(&n.failed)
		n.log.Warn("push notification not sent", "user", j.nf.User, "attempts", j.attempts, "error", err)
	}
}

// finish releases the queue slot of a notification that is done, then
// counts it in outcome: whoever sees the count sees the slot free.
func (n *Notifier) finish(outcome *atomic.Uint64) {
	n.mu.Lock()
	n.pending--
	n.mu.Unlock()
	outcome.Add(1)
}

// later puts j back on the work queue after d, on a timer rather than in a
// worker so that the workers keep serving other users meanwhile.
func (n *Notifier) later(j *job, d time.Duration) {
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
func (n *Notifier) post(body []byte) (retry bool, retryAfter string, err error) {
	req, err := http.NewRequestWithContext(n.ctx, http.MethodPost, n.url, bytes.NewReader(body))
	if err != nil {
		return false, "", fmt.Errorf("build webhook request: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", userAgent)
	resp, err := n.client.Do(req)
	if err != nil {
		// Keep the URL, which may hold credentials, out of the logs.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return true, "", fmt.Errorf("post to webhook: %w", err)
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
func (n *Notifier) retryDelay(attempts int, retryAfter string) time.Duration {
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
