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
	"encoding/json"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/chatd/chatd/broker/service/webhook"
)

// Defaults for the zero values of Options, and fixed tuning.
const (
	defaultInterval = 30 * time.Second
	// minPruneAt is the size below which the per-user map is never swept.
	minPruneAt = 1024

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
	// Client sends the requests; nil means a client of the webhook
	// package's own with a 10s timeout, whose idle connections Close closes.
	Client *http.Client
	// Logger receives failures (nil: slog.Default()).
	Logger *slog.Logger
	// Backoff and MaxBackoff shape the retry delays (webhook.Options).
	Backoff, MaxBackoff time.Duration
	// Now reads the clock for the per-user interval (nil: time.Now).
	Now func() time.Time
}

// Stats are a Notifier's counters since New: the webhook's, whose
// counts are of notifications, and the suppressed ones.
type Stats struct {
	webhook.Stats
	// Suppressed counts notifications refused because their user had one
	// accepted less than Interval before.
	Suppressed uint64
}

// Notifier sends notifications to a webhook in the background, at most
// one per user per Interval.
type Notifier struct {
	sender   *webhook.Sender
	log      *slog.Logger
	now      func() time.Time
	interval time.Duration

	mu sync.Mutex
	// last maps a user to when a notification for them was last accepted.
	// Entries older than interval are swept when the map reaches pruneAt,
	// which is then set to twice what is left.
	last    map[string]time.Time
	pruneAt int

	suppressed atomic.Uint64
}

// New returns a Notifier posting to o.URL and starts its workers; the owner
// must call Close. With an empty URL it returns a Notifier that accepts
// nothing and starts nothing. It fails on a URL that is not http(s) with a
// host.
func New(o Options) (*Notifier, error) {
	s, err := webhook.New(webhook.Options{
		URL: o.URL, Name: "push", UserAgent: userAgent,
		QueueSize: o.QueueSize, MaxAttempts: o.MaxAttempts, Client: o.Client, Logger: o.Logger,
		Backoff: o.Backoff, MaxBackoff: o.MaxBackoff, Now: o.Now,
	})
	if err != nil {
		return nil, err
	}
	n := &Notifier{sender: s, log: o.Logger, now: o.Now, interval: o.Interval,
		last: make(map[string]time.Time), pruneAt: minPruneAt}
	if n.interval <= 0 {
		n.interval = defaultInterval
	}
	if n.log == nil {
		n.log = slog.Default()
	}
	if n.now == nil {
		n.now = time.Now
	}
	return n, nil
}

// Enabled reports whether a webhook is configured: when it is not,
// callers need not gather what a notification would say.
func (n *Notifier) Enabled() bool { return n.sender.Enabled() }

// SetURL points the webhook at another URL (configuration reload); a
// Notifier made without one stays off.
func (n *Notifier) SetURL(raw string) error { return n.sender.SetURL(raw) }

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
	if !n.sender.Enabled() {
		return false
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	now := n.now()
	if t, ok := n.last[nf.User]; ok && now.Sub(t) < n.interval {
		n.suppressed.Add(1)
		return false
	}
	body, err := json.Marshal(nf)
	if err != nil {
		n.log.Error("encode push notification", "user", nf.User, "error", err)
		return false
	}
	if !n.sender.Send(nf.User, body) {
		return false
	}
	if len(n.last) >= n.pruneAt {
		n.prune(now)
	}
	n.last[nf.User] = now
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
	return Stats{Stats: n.sender.Stats(), Suppressed: n.suppressed.Load()}
}

// Close stops sending, dropping (and logging) what is unsent. Close is
// idempotent; Notify returns false after it.
func (n *Notifier) Close() { n.sender.Close() }
