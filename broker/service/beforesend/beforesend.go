// Package beforesend asks an app's moderation service about each message
// before it is stored (PROTOCOL.md section 8, "Events"): a signed POST
// that answers whether the message may go. It runs on the sender's own
// connection goroutine, so a slow service slows that sender alone, for at
// most the timeout; what a service that does not answer means is the
// operator's choice (fail open or closed).
package beforesend

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/chatd/chatd/broker/service/events"
	"github.com/chatd/chatd/broker/service/webhook"
)

// DefaultTimeout bounds one check when Options.Timeout is zero.
const DefaultTimeout = 2 * time.Second

// maxAnswer bounds the answer read from the service.
const maxAnswer = 64 << 10

// failLogEvery spaces out the warnings about a failing service, which
// would otherwise be written once per message.
const failLogEvery = 10 * time.Second

// Message is what the service is asked about: the body of the POST.
type Message struct {
	// From is the sender.
	From string `json:"from"`
	// To is the recipient of a direct message.
	To string `json:"to,omitempty"`
	// Group is the group of a group message.
	Group string `json:"group,omitempty"`
	// Msg is the message object as the sender published it.
	Msg json.RawMessage `json:"msg"`
}

// Answer is what the service answers, with a 2xx status.
type Answer struct {
	// Allow lets the message be stored.
	Allow bool `json:"allow"`
	// Reason is told to the sender of a refused message.
	Reason string `json:"reason"`
}

// Options configures a Checker.
type Options struct {
	// URL is the service.
	URL string
	// Secret signs each request as events are signed.
	Secret []byte
	// Timeout bounds one check; 0 means DefaultTimeout.
	Timeout time.Duration
	// FailOpen lets a message go when the service does not answer in
	// time, answers an error status or an answer that does not decode;
	// otherwise such a message is refused.
	FailOpen bool
	// Client sends the requests; nil makes one.
	Client *http.Client
	// Logger receives the service's failures.
	Logger *slog.Logger
	// Now is the clock of signatures (nil: time.Now).
	Now func() time.Time
}

// Checker asks the service.
type Checker struct {
	o Options

	mu       sync.Mutex
	lastLog  time.Time
	failures int // since the last warning
}

// New returns a Checker for o.URL, which must be http(s) with a host.
func New(o Options) (*Checker, error) {
	if err := webhook.CheckURL(o.URL); err != nil {
		return nil, err
	}
	if len(o.Secret) == 0 {
		return nil, errors.New("before-send: a secret to sign with is required")
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	if o.Client == nil {
		o.Client = &http.Client{Timeout: o.Timeout}
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &Checker{o: o}, nil
}

// Check asks whether m may be stored, and why not.
func (c *Checker) Check(m Message) (allow bool, reason string) {
	a, err := c.ask(m)
	if err != nil {
		c.failed(err)
		if c.o.FailOpen {
			return true, ""
		}
		return false, "the moderation service could not be reached; try again later"
	}
	if !a.Allow && a.Reason == "" {
		a.Reason = "refused by moderation"
	}
	return a.Allow, a.Reason
}

// failed counts a failed question and logs a warning at most once per
// failLogEvery, with how many failed since the last one.
func (c *Checker) failed(err error) {
	c.mu.Lock()
	c.failures++
	now := c.o.Now()
	if now.Sub(c.lastLog) < failLogEvery {
		c.mu.Unlock()
		return
	}
	n := c.failures
	c.failures, c.lastLog = 0, now
	c.mu.Unlock()
	c.o.Logger.Warn("before-send service failing", "failures", n, "fail_open", c.o.FailOpen, "error", err)
}

func (c *Checker) ask(m Message) (Answer, error) {
	body, err := json.Marshal(m)
	if err != nil {
		return Answer{}, fmt.Errorf("encode: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.o.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.o.URL, bytes.NewReader(body))
	if err != nil {
		return Answer{}, fmt.Errorf("request: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "chatd-before-send/1")
	events.Sign(req.Header, c.o.Secret, body, c.o.Now())
	resp, err := c.o.Client.Do(req)
	if err != nil {
		return Answer{}, webhook.WithoutURL(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return Answer{}, fmt.Errorf("answered %s", resp.Status)
	}
	var a Answer
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxAnswer)).Decode(&a); err != nil {
		return Answer{}, fmt.Errorf("answer: %w", err)
	}
	return a, nil
}
