// Package events tells an app's backend what happens on the server, as
// signed JSON POSTs to its webhook (PROTOCOL.md section 8, "Events"):
// messages stored, delivered and read, users' devices connected and
// disconnected.
//
// Each event has a unique id, for the backend to drop the duplicates that
// retries make; each request is signed with HMAC-SHA256 over its
// timestamp and body (Verify checks it). Delivery is at least once while
// the queue has room, never at the message path's expense: what does not
// fit, or fails every attempt, is dropped and counted.
package events

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/chatd/chatd/broker/service/webhook"
)

// Event types.
const (
	// MessageStored: a message was stored for a recipient (one event per
	// recipient), data Stored.
	MessageStored = "message.stored"
	// MessageDelivered: every device of the recipient acknowledged a
	// message, which was deleted (one event per recipient), data
	// Delivered.
	MessageDelivered = "message.delivered"
	// MessageRead: a reader's read receipt was stored, data Read.
	MessageRead = "message.read"
	// UserConnected: a device of a user connected to a node, data Connection.
	UserConnected = "user.connected"
	// UserDisconnected: a device's connection ended, data Connection.
	UserDisconnected = "user.disconnected"
)

// Headers of every request.
const (
	// HeaderID is the event's id.
	HeaderID = "Chatd-Event-Id"
	// HeaderTimestamp is when the request was signed, Unix seconds.
	HeaderTimestamp = "Chatd-Timestamp"
	// HeaderSignature is "v1=" and the hex HMAC-SHA256, keyed with the
	// secret, of the timestamp, ".", and the body.
	HeaderSignature = "Chatd-Signature"
)

// Event is the body of one request.
type Event struct {
	// ID is unique per event; a retried event keeps it.
	ID string `json:"id"`
	// Type is one of the event types.
	Type string `json:"type"`
	// TS is when it happened, Unix milliseconds.
	TS int64 `json:"ts"`
	// Node is the cluster node it happened on; "" on one node.
	Node string `json:"node,omitempty"`
	// Data depends on Type.
	Data any `json:"data"`
}

// Stored is the data of MessageStored.
type Stored struct {
	// To is the recipient.
	To string `json:"to"`
	// From is the sender.
	From string `json:"from"`
	// Server marks a message the server API sent.
	Server bool `json:"server,omitempty"`
	// Group is the group of a group message.
	Group string `json:"group,omitempty"`
	// ID is the message's id.
	ID string `json:"id"`
	// Seq is its position in the recipient's queue.
	Seq uint64 `json:"seq"`
}

// Delivered is the data of MessageDelivered, the fields of Stored.
type Delivered Stored

// Read is the data of MessageRead.
type Read struct {
	// By is the reader.
	By string `json:"by"`
	// To is the sender of the messages read.
	To string `json:"to"`
	// IDs are the messages read.
	IDs []string `json:"ids"`
}

// Connection is the data of UserConnected and UserDisconnected.
type Connection struct {
	// User is the user.
	User string `json:"user"`
	// ClientID is the device's MQTT client ID.
	ClientID string `json:"client_id"`
}

// Options configures an Emitter.
type Options struct {
	// URL is the webhook; empty disables events.
	URL string
	// Secret keys the signatures; required with URL.
	Secret []byte
	// Node names this node in its events; "" on one node.
	Node string
	// QueueSize, MaxAttempts, Backoff, MaxBackoff and Client tune
	// delivery (webhook.Options); zero takes the defaults.
	QueueSize, MaxAttempts int
	Backoff, MaxBackoff    time.Duration
	Client                 *http.Client
	// Logger receives failures.
	Logger *slog.Logger
	// Now is the clock of events and signatures (nil: time.Now).
	Now func() time.Time
}

// Emitter sends events.
type Emitter struct {
	sender *webhook.Sender
	node   string
	now    func() time.Time
	log    *slog.Logger
}

// New returns an Emitter posting to o.URL; the owner must Close it. With
// an empty URL it emits nothing.
func New(o Options) (*Emitter, error) {
	if o.URL != "" && len(o.Secret) == 0 {
		return nil, errors.New("events: a webhook needs a secret to sign with")
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	secret := append([]byte(nil), o.Secret...)
	s, err := webhook.New(webhook.Options{
		URL: o.URL, Name: "events", UserAgent: "chatd-events/1",
		QueueSize: o.QueueSize, MaxAttempts: o.MaxAttempts, Backoff: o.Backoff, MaxBackoff: o.MaxBackoff,
		Client: o.Client, Logger: o.Logger, Now: o.Now,
		Sign: func(h http.Header, id string, body []byte, now time.Time) {
			h.Set(HeaderID, id)
			Sign(h, secret, body, now)
		},
	})
	if err != nil {
		return nil, fmt.Errorf("events.webhook: %w", err)
	}
	return &Emitter{sender: s, node: o.Node, now: o.Now, log: o.Logger}, nil
}

// Enabled reports whether a webhook is configured.
func (e *Emitter) Enabled() bool { return e != nil && e.sender.Enabled() }

// SetURL points the webhook at another URL (configuration reload); an
// Emitter made without one stays off.
func (e *Emitter) SetURL(raw string) error { return e.sender.SetURL(raw) }

// Emit queues an event of typ with data and returns at once. It never
// blocks: an event the queue has no room for is dropped and counted.
func (e *Emitter) Emit(typ string, data any) {
	if !e.Enabled() {
		return
	}
	var id [16]byte
	if _, err := rand.Read(id[:]); err != nil {
		e.log.Error("event id", "error", err)
		return
	}
	ev := Event{ID: hex.EncodeToString(id[:]), Type: typ, TS: e.now().UnixMilli(), Node: e.node, Data: data}
	body, err := json.Marshal(ev)
	if err != nil {
		e.log.Error("encode event", "type", typ, "error", err)
		return
	}
	e.sender.Send(ev.ID, body)
}

// Stats returns the delivery counters.
func (e *Emitter) Stats() webhook.Stats { return e.sender.Stats() }

// Pending returns how many emitted events are not finished (sent or
// given up).
func (e *Emitter) Pending() int { return e.sender.Pending() }

// Close stops sending, dropping (and logging) what is unsent.
func (e *Emitter) Close() { e.sender.Close() }

// Sign sets the signature headers of a request carrying body at now.
func Sign(h http.Header, secret, body []byte, now time.Time) {
	ts := strconv.FormatInt(now.Unix(), 10)
	h.Set(HeaderTimestamp, ts)
	h.Set(HeaderSignature, "v1="+mac(secret, ts, body))
}

// Verify checks a request's signature with secret, and that it was
// signed within tolerance of now (replays of old requests fail): what a
// backend does before it trusts an event.
func Verify(h http.Header, secret, body []byte, now time.Time, tolerance time.Duration) error {
	ts := h.Get(HeaderTimestamp)
	sec, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return fmt.Errorf("events: bad %s %q", HeaderTimestamp, ts)
	}
	if d := now.Sub(time.Unix(sec, 0)); d > tolerance || d < -tolerance {
		return fmt.Errorf("events: signed %v from now, beyond %v", d.Round(time.Second), tolerance)
	}
	sig, ok := strings.CutPrefix(h.Get(HeaderSignature), "v1=")
	if !ok || !hmac.Equal([]byte(sig), []byte(mac(secret, ts, body))) {
		return errors.New("events: bad signature")
	}
	return nil
}

func mac(secret []byte, ts string, body []byte) string {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(ts))
	m.Write([]byte("."))
	m.Write(body)
	return hex.EncodeToString(m.Sum(nil))
}
