// Package serverapi serves the API of app backends (PROTOCOL.md section
// 7, "Server API"): calls made with an API key, never a user's token, to
// send messages as a sender the server names.
package serverapi

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/chatd/chatd/broker/msgpath"
	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/service/apikeys"
	"github.com/chatd/chatd/broker/service/bans"
	"github.com/chatd/chatd/broker/service/httpjson"
)

// Defaults of Handler.
const (
	// DefaultRate is the calls per second one key may make.
	DefaultRate = 100
	// DefaultBurst is the calls one key may make at once.
	DefaultBurst = 200
)

// Sender stores what a backend sends (msgpath.Path).
type Sender interface {
	// Send stores m for its recipients and calls done with the outcome.
	Send(m msgpath.Send, done func(id string, ts int64, results []msgpath.SendResult)) error
}

// Handler serves the server API.
type Handler struct {
	// Keys are the API keys.
	Keys apikeys.Store
	// Sender stores the messages sent.
	Sender Sender
	// Bans are the banned users.
	Bans *bans.Store
	// Conns finds and ends the devices' connections on every node.
	Conns Connections
	// Presence tells who is online.
	Presence Presence
	// Queues are the users' queues and devices.
	Queues Queues
	// Groups lists a user's groups, and erases a user from them.
	Groups Groups
	// Media holds the uploads, for erase and export.
	Media Media
	// Revocations keeps the revoked tokens.
	Revocations Revocations
	// Tokens checks the tokens a revocation names.
	Tokens Tokens
	// MaxTokenAge is how long a revocation of a user's tokens is kept.
	MaxTokenAge time.Duration
	// Info describes the node now.
	Info func() Info
	// Now is the clock of bans and last-seen times.
	Now func() time.Time
	// MaxMessageBytes caps a message object, as for a client's publish.
	MaxMessageBytes int
	// Rate and Burst limit each key's calls; zero means the defaults.
	Rate  float64
	Burst int
	// Log receives internal errors.
	Log *slog.Logger

	mu       sync.Mutex
	limiters map[string]*rate.Limiter
}

// Register adds the server API routes to mux.
func (h *Handler) Register(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/server/messages", h.send)
	h.registerModeration(mux)
	h.registerQuery(mux)
	h.registerErase(mux)
	h.registerRevocations(mux)
}

// SendRequest is the body of POST /v1/server/messages.
type SendRequest struct {
	// From names the sender; "" means "system".
	From string `json:"from"`
	// To lists the recipients (at most 1,000), unless Group is set.
	To []string `json:"to"`
	// Group sends to every member of the group instead.
	Group string `json:"group"`
	// Message is the message object; its id is the idempotency key.
	Message json.RawMessage `json:"message"`
}

// SendAnswer is the answer of POST /v1/server/messages.
type SendAnswer struct {
	// ID is the message's id.
	ID string `json:"id"`
	// TS is the server's time of the message, in Unix milliseconds.
	TS int64 `json:"ts"`
	// Results has one entry per recipient, in request order.
	Results []SendResult `json:"results"`
}

// SendResult is the outcome for one recipient.
type SendResult struct {
	// To is the recipient.
	To string `json:"to"`
	// Status is "stored", "duplicate" (sent before with this id) or "queue_full".
	Status string `json:"status"`
}

// DefaultFrom is the sender of a message sent without one.
const DefaultFrom = "system"

// maxRecipientBytes bounds a recipient's share of a request body.
const maxRecipientBytes = 80

func (h *Handler) send(w http.ResponseWriter, r *http.Request) {
	if _, ok := h.auth(w, r, apikeys.ScopeSend); !ok {
		return
	}
	var req SendRequest
	if !decodeBody(w, r, &req, int64(h.MaxMessageBytes+msgpath.MaxSendRecipients*maxRecipientBytes+4096)) {
		return
	}
	if req.From == "" {
		req.From = DefaultFrom
	}
	type outcome struct {
		id      string
		ts      int64
		results []msgpath.SendResult
	}
	done := make(chan outcome, 1)
	err := h.Sender.Send(msgpath.Send{From: req.From, To: req.To, Group: req.Group, Message: req.Message},
		func(id string, ts int64, results []msgpath.SendResult) { done <- outcome{id, ts, results} })
	var refused *msgpath.SendError
	switch {
	case errors.As(err, &refused):
		status := http.StatusBadRequest
		switch refused.Code {
		case msgpath.CodeUnknownGroup:
			status = http.StatusNotFound
		case msgpath.CodeTooLarge:
			status = http.StatusRequestEntityTooLarge
		}
		httpjson.Fail(w, status, refused.Code, refused.Reason)
		return
	case err != nil:
		h.Log.Error("server API send", "error", err)
		httpjson.Fail(w, http.StatusServiceUnavailable, "not_stored", "not stored; send again with the same id")
		return
	}
	// Like a PUBACK, the answer waits for the store: it always answers,
	// within the store's own retry bound, so the call is not cut short
	// when the caller goes away.
	o := <-done
	ans := SendAnswer{ID: o.id, TS: o.ts, Results: make([]SendResult, len(o.results))}
	for i, res := range o.results {
		if res.Status == queue.Failed {
			h.Log.Error("server API send not stored", "id", o.id, "to", res.To, "error", res.Err)
			httpjson.Fail(w, http.StatusServiceUnavailable, "not_stored", "not stored; send again with the same id")
			return
		}
		ans.Results[i] = SendResult{To: res.To, Status: statusName(res.Status)}
	}
	httpjson.Write(w, http.StatusOK, ans)
}

func statusName(st queue.Status) string {
	switch st {
	case queue.Stored:
		return "stored"
	case queue.Duplicate:
		return "duplicate"
	case queue.Full:
		return msgpath.CodeQueueFull
	}
	return fmt.Sprintf("status_%d", st)
}

// auth returns the API key of r if it holds scope. Otherwise it answers:
// 401 without a valid key (a user's token included), 403 without the
// scope, 429 over the key's rate.
func (h *Handler) auth(w http.ResponseWriter, r *http.Request, scope string) (apikeys.Key, bool) {
	bearer, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok || bearer == "" {
		httpjson.Fail(w, http.StatusUnauthorized, msgpath.CodeNotAuthorized, "an API key is required: Authorization: Bearer chatd_...")
		return apikeys.Key{}, false
	}
	if !apikeys.IsKey(bearer) {
		httpjson.Fail(w, http.StatusUnauthorized, msgpath.CodeNotAuthorized, "the server API takes an API key, not a user's access token")
		return apikeys.Key{}, false
	}
	k, err := apikeys.Check(h.Keys, bearer)
	if err != nil {
		httpjson.Fail(w, http.StatusUnauthorized, msgpath.CodeNotAuthorized, err.Error())
		return apikeys.Key{}, false
	}
	if !k.Allows(scope) {
		httpjson.Fail(w, http.StatusForbidden, "forbidden", fmt.Sprintf("API key %s lacks the %s scope", k.Name, scope))
		return apikeys.Key{}, false
	}
	if !h.limiter(k.ID).Allow() {
		httpjson.Fail(w, http.StatusTooManyRequests, msgpath.CodeRateLimited, "API key rate limit: slow down")
		return apikeys.Key{}, false
	}
	return k, true
}

// limiter returns the rate limiter of key id; there is one per key that
// was ever valid, so their number is bounded by the keys made.
func (h *Handler) limiter(id string) *rate.Limiter {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.limiters == nil {
		h.limiters = make(map[string]*rate.Limiter)
	}
	l, ok := h.limiters[id]
	if !ok {
		r, b := h.Rate, h.Burst
		if r == 0 {
			r = DefaultRate
		}
		if b == 0 {
			b = DefaultBurst
		}
		l = rate.NewLimiter(rate.Limit(r), b)
		h.limiters[id] = l
	}
	return l
}
