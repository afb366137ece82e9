// Package bots hands the messages of bot users to their webhooks
// (PROTOCOL.md section 7, "Bots"): a bot is a user ID whose queue a
// consumer on the server reads, POSTing each message, signed like events,
// and acknowledging it once the webhook answered 2xx. A bot answers with
// the server API's send call, so a bot is a webhook and that call.
//
// Delivery is at least once and in order, like a device's: a message is
// retried, with backoff, until the webhook takes it or it expires from
// the queue (queue.message_ttl), and the ones after it wait.
package bots

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
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/chatd/chatd/broker/protocol/topic"
	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/service/events"
	"github.com/chatd/chatd/broker/service/webhook"
)

// Device is the device under which a bot's webhook reads its queue. No
// MQTT client ID can name it (a device name has no '#'), so no phone can
// take its place.
const Device = "#webhook"

// Type is the "type" of every request to a bot's webhook.
const Type = "bot.message"

// Defaults for the zero values of Options.
const (
	DefaultPoll       = 200 * time.Millisecond
	DefaultBackoff    = time.Second
	DefaultMaxBackoff = time.Minute
	DefaultTimeout    = 10 * time.Second
	// batch is how many messages one read of a bot's queue fetches.
	batch = 64
	// maxDrain bounds how much of a webhook's answer is read.
	maxDrain = 64 << 10
)

// Bot is one bot user and its webhook.
type Bot struct {
	// User is the bot's user ID.
	User string
	// URL is the webhook its messages are POSTed to.
	URL string
}

// Parse reads bots from "user=URL" entries separated by commas or
// spaces, as the bots.webhooks setting holds them.
func Parse(s string) ([]Bot, error) {
	var out []Bot
	seen := map[string]bool{}
	for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' || r == '\n' || r == '\t' }) {
		user, url, ok := strings.Cut(f, "=")
		if !ok {
			return nil, fmt.Errorf("%q: want user=URL", f)
		}
		if !topic.ValidUser(user) {
			return nil, fmt.Errorf("%q: %q is not a user ID (1-64 of A-Z a-z 0-9 _ . -)", f, user)
		}
		if seen[user] {
			return nil, fmt.Errorf("bot %s named twice", user)
		}
		seen[user] = true
		if err := webhook.CheckURL(url); err != nil {
			return nil, fmt.Errorf("bot %s: %w", user, err)
		}
		out = append(out, Bot{User: user, URL: url})
	}
	return out, nil
}

// Queue is the part of the queue store a bot's consumer uses.
type Queue interface {
	// Attach registers the consumer as a device of the bot.
	Attach(user, device string, transient bool) (cursor uint64, subscribed bool, err error)
	// Read returns up to max messages of user after a sequence.
	Read(user string, after uint64, max int) ([]queue.Message, error)
	// Ack records that the consumer took everything up to cursor.
	Ack(user, device string, cursor uint64)
	// Detach records that the consumer stopped.
	Detach(user, device string)
}

// Lease decides which node of a cluster consumes a bot's queue.
type Lease interface {
	// Hold waits until this node holds the lease on name, or ctx ends.
	// The context it returns ends when the lease is lost or ctx ends;
	// release gives the lease up and waits for its renewals to stop.
	Hold(ctx context.Context, name string) (held context.Context, release func(), err error)
}

// Bell wakes the consumer of a bot's queue when a message is stored for
// the bot, so that an idle bot's webhook gets it at once rather than at
// its next poll. The message path rings it from its notify step, which
// runs for what this node stores and for what other nodes pass to it;
// polling stays for a notice between nodes that was lost.
type Bell struct {
	rings map[string]chan struct{}
}

// NewBell returns a Bell for list's bots; nil when there are none.
func NewBell(list []Bot) *Bell {
	if len(list) == 0 {
		return nil
	}
	b := &Bell{rings: make(map[string]chan struct{}, len(list))}
	for _, bot := range list {
		b.rings[bot.User] = make(chan struct{}, 1)
	}
	return b
}

// Stored rings user's bell when user is a bot; it never blocks, and rings
// that come while one is pending are one.
func (b *Bell) Stored(user string) {
	if b == nil {
		return
	}
	if c, ok := b.rings[user]; ok {
		select {
		case c <- struct{}{}:
		default:
		}
	}
}

// ring returns the channel user's bell rings on; nil, which never
// delivers, for a nil Bell or a user that is no bot.
func (b *Bell) ring(user string) <-chan struct{} {
	if b == nil {
		return nil
	}
	return b.rings[user]
}

// Options configures a Runner.
type Options struct {
	// Bots are the bot users and their webhooks.
	Bots []Bot
	// Queue is the store the bots' queues are in.
	Queue Queue
	// Secret signs every request (events.Sign).
	Secret []byte
	// Delivered, if set, is told of the messages a webhook took, by their
	// Meta, for their senders' delivered receipts; it may wait.
	Delivered func(user string, metas [][]byte)
	// Node names this node in the requests, in a cluster.
	Node string
	// Lease, if set, lets one node of a cluster consume each bot's queue;
	// nil consumes here.
	Lease Lease
	// Bell, if set, wakes an idle bot's consumer when a message is
	// stored for the bot; Poll stays the longest wait.
	Bell *Bell
	// Poll is how often an idle bot's queue is read again.
	Poll time.Duration
	// Backoff is the longest first wait after a failed attempt; each
	// failure in a row doubles it up to MaxBackoff.
	Backoff, MaxBackoff time.Duration
	// Timeout bounds one request.
	Timeout time.Duration
	// Client makes the requests; nil builds one with Timeout.
	Client *http.Client
	// Now is the clock of the signatures; nil means time.Now.
	Now func() time.Time
	// Logger receives failures, never message contents.
	Logger *slog.Logger
}

// Runner runs one consumer per bot until Close.
type Runner struct {
	o      Options
	cancel context.CancelFunc
	wg     sync.WaitGroup
	sent   atomic.Uint64
	failed atomic.Uint64
}

// Request is the body POSTed to a bot's webhook for each message.
type Request struct {
	// ID is the same for every attempt at one message.
	ID string `json:"id"`
	// Type is always Type.
	Type string `json:"type"`
	// Bot is the bot user the message was sent to.
	Bot string `json:"bot"`
	// Seq is the message's position in the bot's queue.
	Seq uint64 `json:"seq"`
	// Message is the envelope, as a device of the bot would receive it.
	Message json.RawMessage `json:"message"`
	// Node is the cluster node that sent the request.
	Node string `json:"node,omitempty"`
}

// Start starts a consumer for each bot; the owner must Close the Runner.
func Start(o Options) (*Runner, error) {
	if o.Queue == nil {
		return nil, errors.New("bots: no queue")
	}
	if len(o.Bots) > 0 && len(o.Secret) == 0 {
		return nil, errors.New("bots: no secret to sign requests with")
	}
	o.Poll = positive(o.Poll, DefaultPoll)
	o.Backoff = positive(o.Backoff, DefaultBackoff)
	o.MaxBackoff = positive(o.MaxBackoff, DefaultMaxBackoff)
	o.Timeout = positive(o.Timeout, DefaultTimeout)
	if o.Client == nil {
		o.Client = &http.Client{Timeout: o.Timeout}
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &Runner{o: o, cancel: cancel}
	for _, b := range o.Bots {
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			r.serve(ctx, b)
		}()
	}
	return r, nil
}

// Close stops the consumers, cancelling requests in flight (their
// messages are posted again by the next consumer), and waits for them.
func (r *Runner) Close() {
	r.cancel()
	r.wg.Wait()
}

// Stats returns the counters: Sent counts messages a webhook took,
// Retried failed attempts.
func (r *Runner) Stats() webhook.Stats {
	return webhook.Stats{Sent: r.sent.Load(), Retried: r.failed.Load()}
}

// serve consumes b's queue while this node holds its lease, until ctx ends.
func (r *Runner) serve(ctx context.Context, b Bot) {
	log := r.o.Logger.With("bot", b.User)
	for ctx.Err() == nil {
		held, release := ctx, func() {}
		if r.o.Lease != nil {
			var err error
			held, release, err = r.o.Lease.Hold(ctx, "bot."+b.User)
			if err != nil {
				if ctx.Err() == nil {
					log.Error("bot lease", "error", err)
					r.wait(ctx, r.o.Backoff)
				}
				continue
			}
			log.Info("consuming the bot's queue on this node")
		}
		err := r.consume(held, b, log)
		release()
		if err != nil && ctx.Err() == nil {
			log.Error("bot queue", "error", err)
			r.wait(ctx, r.o.Backoff)
		}
	}
}

// consume attaches the webhook device and feeds b's messages to its
// webhook until ctx ends.
func (r *Runner) consume(ctx context.Context, b Bot, log *slog.Logger) error {
	cursor, _, err := r.o.Queue.Attach(b.User, Device, false)
	if err != nil {
		return fmt.Errorf("register the webhook device of bot %s: %w", b.User, err)
	}
	defer r.o.Queue.Detach(b.User, Device)
	failures := 0
	for ctx.Err() == nil {
		// Each round reads again from the cursor: a message that expired
		// while its webhook failed is gone from the read, and so skipped.
		msgs, err := r.o.Queue.Read(b.User, cursor, batch)
		if err != nil {
			return fmt.Errorf("read the queue of bot %s: %w", b.User, err)
		}
		if len(msgs) == 0 {
			r.idle(ctx, b.User)
			continue
		}
		var metas [][]byte
		for _, m := range msgs {
			if err := r.post(ctx, b, m); err != nil {
				if ctx.Err() != nil {
					break
				}
				failures++
				r.failed.Add(1)
				d := r.backoff(failures)
				log.Warn("bot webhook failed; retrying", "seq", m.Seq, "attempt", failures, "retry_in", d.Round(time.Millisecond), "error", err)
				r.wait(ctx, d)
				break
			}
			failures = 0
			r.sent.Add(1)
			cursor = m.Seq
			r.o.Queue.Ack(b.User, Device, cursor)
			if len(m.Meta) > 0 {
				metas = append(metas, m.Meta)
			}
		}
		if len(metas) > 0 && r.o.Delivered != nil {
			r.o.Delivered(b.User, metas)
		}
	}
	return nil
}

// post makes one request for m; nil means the webhook answered 2xx.
func (r *Runner) post(ctx context.Context, b Bot, m queue.Message) error {
	id := b.User + "." + strconv.FormatUint(m.Seq, 10)
	body, err := json.Marshal(Request{ID: id, Type: Type, Bot: b.User, Seq: m.Seq, Message: json.RawMessage(m.Data), Node: r.o.Node})
	if err != nil {
		return fmt.Errorf("encode request: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, b.URL, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("build request: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "chatd-bots")
	req.Header.Set(events.HeaderID, id)
	events.Sign(req.Header, r.o.Secret, body, r.o.Now())
	resp, err := r.o.Client.Do(req)
	if err != nil {
		return fmt.Errorf("post: %w", webhook.WithoutURL(err))
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, io.LimitReader(resp.Body, maxDrain)); err != nil {
		// The status is all that counts; this only costs the connection.
		r.o.Logger.Debug("read bot webhook answer", "bot", b.User, "error", err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("webhook answered %s", resp.Status)
	}
	return nil
}

// backoff is the wait after the n-th failure in a row: a uniform draw
// below Backoff doubled n-1 times, capped at MaxBackoff.
func (r *Runner) backoff(n int) time.Duration {
	ceiling := r.o.Backoff
	for i := 1; i < n && ceiling < r.o.MaxBackoff; i++ {
		ceiling *= 2
	}
	ceiling = min(ceiling, r.o.MaxBackoff)
	// Jitter spreads the retries of many bots after a shared outage.
	return ceiling/2 + rand.N(ceiling/2+1)
}

// wait sleeps d or until ctx ends.
// idle waits for user's bell, at most Poll. A ring that came since the
// last read is pending in the bell's buffer, so none is missed.
func (r *Runner) idle(ctx context.Context, user string) {
	t := time.NewTimer(r.o.Poll)
	defer t.Stop()
	select {
	case <-t.C:
	case <-r.o.Bell.ring(user):
	case <-ctx.Done():
	}
}

func (r *Runner) wait(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

func positive(v, def time.Duration) time.Duration {
	if v <= 0 {
		return def
	}
	return v
}
