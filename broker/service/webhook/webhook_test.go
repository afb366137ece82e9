package webhook

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/chatd/chatd/internal/testutil"
)

// TestMain checks that a closed Sender leaves no goroutine behind.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// newSender builds a Sender with test-sized delays and a logger writing
// to the test's output, closed when the test ends.
func newSender(t *testing.T, o Options) *Sender {
	t.Helper()
	if o.Backoff == 0 {
		o.Backoff = time.Millisecond
	}
	o.Logger = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	n, err := New(o)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(n.Close)
	return n
}

// waitStats waits until cond holds of n's stats, and fails with the last
// ones after 10 s.
func waitStats(t *testing.T, n *Sender, cond func(Stats) bool) {
	t.Helper()
	testutil.EventuallyNoError(t, 10*time.Second, func() error {
		if s := n.Stats(); !cond(s) {
			return fmt.Errorf("stats %+v", s)
		}
		return nil
	}, "sender stats")
}

// answer is one reply of a scripted webhook.
type answer struct {
	code       int
	retryAfter string
}

func TestRetries(t *testing.T) {
	tests := []struct {
		name        string
		maxAttempts int
		answers     []answer
		want        Stats
	}{
		{"500 then success", 5, []answer{{code: 500}, {code: 200}}, Stats{Sent: 1, Retried: 1}},
		{"503 twice then success", 5, []answer{{code: 503}, {code: 503}, {code: 204}}, Stats{Sent: 1, Retried: 2}},
		{"429 with Retry-After then success", 5, []answer{{429, "0"}, {code: 200}}, Stats{Sent: 1, Retried: 1}},
		{"408 then success", 5, []answer{{code: 408}, {code: 200}}, Stats{Sent: 1, Retried: 1}},
		{"400 is not retried", 5, []answer{{code: 400}}, Stats{Failed: 1}},
		{"404 is not retried", 5, []answer{{code: 404}}, Stats{Failed: 1}},
		{"gives up after MaxAttempts", 3, []answer{{code: 500}, {code: 502}, {code: 503}}, Stats{Failed: 1, Retried: 2}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var attempts atomic.Int32
			srv := testutil.Webhook(t, func(w http.ResponseWriter, r *http.Request) {
				i := int(attempts.Add(1)) - 1
				if i >= len(tt.answers) {
					t.Errorf("attempt %d, script has %d", i+1, len(tt.answers))
					return
				}
				if a := tt.answers[i]; a.retryAfter != "" {
					w.Header().Set("Retry-After", a.retryAfter)
				}
				w.WriteHeader(tt.answers[i].code)
			})
			n := newSender(t, Options{URL: srv.URL, MaxAttempts: tt.maxAttempts})
			if !n.Send("bob", []byte(`{"n":1}`)) {
				t.Fatal("Send refused the first body")
			}
			waitStats(t, n, func(s Stats) bool { return s.Sent+s.Failed == 1 })
			if got := n.Stats(); got != tt.want {
				t.Errorf("Stats() = %+v, want %+v", got, tt.want)
			}
			if got := int(attempts.Load()); got != len(tt.answers) {
				t.Errorf("webhook saw %d attempts, want %d", got, len(tt.answers))
			}
			if p := n.Pending(); p != 0 {
				t.Errorf("%d bodies still pending", p)
			}
		})
	}
}

func TestNetworkErrorIsRetried(t *testing.T) {
	var attempts atomic.Int32
	srv := testutil.Webhook(t, func(w http.ResponseWriter, r *http.Request) {
		if attempts.Add(1) == 1 {
			conn, _, err := http.NewResponseController(w).Hijack()
			if err != nil {
				t.Errorf("hijack: %v", err)
				return
			}
			if err := conn.Close(); err != nil {
				t.Errorf("close hijacked connection: %v", err)
			}
		}
	})
	n := newSender(t, Options{URL: srv.URL})
	n.Send("bob", []byte(`{"n":1}`))
	waitStats(t, n, func(s Stats) bool { return s.Sent+s.Failed == 1 })
	if got, want := n.Stats(), (Stats{Sent: 1, Retried: 1}); got != want {
		t.Errorf("Stats() = %+v, want %+v", got, want)
	}
	if got := attempts.Load(); got != 2 {
		t.Errorf("webhook saw %d attempts, want 2", got)
	}
}

func TestQueueFullDropsWithoutBlocking(t *testing.T) {
	srv, _, open := testutil.BlockingWebhook(t)
	n := newSender(t, Options{URL: srv.URL, QueueSize: 2})
	note := func(user string) []byte { return []byte(`{"user":"` + user + `"}`) }
	for _, u := range []string{"u1", "u2"} {
		if !n.Send(u, note(u)) {
			t.Fatalf("Send(%s) refused below QueueSize", u)
		}
	}
	if n.Send("u3", note("u3")) {
		t.Fatal("Send(u3) accepted beyond QueueSize")
	}
	if got := n.Stats().Dropped; got != 1 {
		t.Errorf("Dropped = %d, want 1", got)
	}

	open()
	waitStats(t, n, func(s Stats) bool { return s.Sent == 2 })
	if !n.Send("u3", note("u3")) {
		t.Error("refused once the queue had room")
	}
	waitStats(t, n, func(s Stats) bool { return s.Sent == 3 })
	if got, want := n.Stats(), (Stats{Sent: 3, Dropped: 1}); got != want {
		t.Errorf("Stats() = %+v, want %+v", got, want)
	}
}

func TestCloseDuringRequest(t *testing.T) {
	srv, arrived, _ := testutil.BlockingWebhook(t) // blocks until the test ends
	n := newSender(t, Options{URL: srv.URL})
	n.Send("bob", []byte(`{"n":1}`))
	n.Send("carol", []byte(`{"n":2}`))
	<-arrived
	n.Close()
	n.Close()
	if got := n.Stats(); got != (Stats{}) {
		t.Errorf("Stats() = %+v, want zero", got)
	}
	if p := n.Pending(); p != 2 {
		t.Errorf("%d bodies counted as dropped by Close, want 2", p)
	}
	if n.Send("dave", []byte(`{}`)) {
		t.Error("Send accepted after Close")
	}
}

func TestCloseDuringBackoff(t *testing.T) {
	srv := testutil.Webhook(t, func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
	})
	n := newSender(t, Options{URL: srv.URL, Backoff: time.Hour, MaxBackoff: time.Hour})
	n.Send("bob", []byte(`{"n":1}`))
	waitStats(t, n, func(s Stats) bool { return s.Retried >= 1 })
	n.Close()
	if s := n.Stats(); s.Sent != 0 || s.Failed != 0 {
		t.Errorf("Stats() = %+v, want nothing sent or failed", s)
	}
	if p := n.Pending(); p != 1 {
		t.Errorf("%d bodies counted as dropped by Close, want 1", p)
	}
}

func TestDisabledWithoutURL(t *testing.T) {
	n, err := New(Options{})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if n.Send("bob", []byte(`{}`)) {
		t.Error("Send accepted with no webhook")
	}
	n.Close()
	if got := n.Stats(); got != (Stats{}) {
		t.Errorf("Stats() = %+v, want zero", got)
	}
}

// TestEnabled: Enabled follows the webhook URL, and stays true after Close
// (it reports the configuration, which Close does not change).
func TestEnabled(t *testing.T) {
	off, err := New(Options{})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if off.Enabled() {
		t.Error("Enabled() with no webhook")
	}
	on := newSender(t, Options{URL: "http://127.0.0.1:1/hook"})
	if !on.Enabled() {
		t.Error("!Enabled() with a webhook")
	}
	on.Close()
	if !on.Enabled() {
		t.Error("!Enabled() after Close")
	}
}

func TestNewRejectsBadURL(t *testing.T) {
	for _, u := range []string{"ftp://example.com/hook", "http://", "example.com/hook", "http://exa mple.com/", "://x"} {
		if n, err := New(Options{URL: u}); err == nil {
			n.Close()
			t.Errorf("New(%q) accepted", u)
		}
	}
}

func TestRetryDelay(t *testing.T) {
	clock := testutil.NewClock()
	n := newSender(t, Options{URL: "http://127.0.0.1:1/", Backoff: 100 * time.Millisecond, MaxBackoff: 10 * time.Second, Now: clock.Now})
	exact := []struct {
		retryAfter string
		want       time.Duration
	}{
		{"0", 0},
		{"2", 2 * time.Second},
		{"120", 10 * time.Second},
		{clock.Now().Add(3 * time.Second).Format(http.TimeFormat), 3 * time.Second},
		{clock.Now().Add(-time.Hour).Format(http.TimeFormat), 0},
	}
	for _, tt := range exact {
		if got := n.retryDelay(1, tt.retryAfter); got != tt.want {
			t.Errorf("retryDelay(1, %q) = %v, want %v", tt.retryAfter, got, tt.want)
		}
	}
	jittered := []struct {
		attempts   int
		retryAfter string
		ceiling    time.Duration
	}{
		{1, "", 100 * time.Millisecond},
		{2, "", 200 * time.Millisecond},
		{4, "", 800 * time.Millisecond},
		{8, "", 10 * time.Second},
		{1000, "", 10 * time.Second},
		{1, "soon", 100 * time.Millisecond},
		{1, "-1", 100 * time.Millisecond},
	}
	for _, tt := range jittered {
		for range 100 {
			if got := n.retryDelay(tt.attempts, tt.retryAfter); got < 0 || got >= tt.ceiling {
				t.Errorf("retryDelay(%d, %q) = %v, want in [0, %v)", tt.attempts, tt.retryAfter, got, tt.ceiling)
			}
		}
	}
}

// TestSignEachAttempt: Sign adds its headers to every attempt, each made
// at that attempt's time, beside the content type and user agent.
func TestSignEachAttempt(t *testing.T) {
	clock := testutil.NewClock()
	type seen struct{ ts, sig, agent, body string }
	got := make(chan seen, 2)
	var attempts atomic.Int32
	srv := testutil.Webhook(t, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got <- seen{r.Header.Get("X-Ts"), r.Header.Get("X-Sig"), r.Header.Get("User-Agent"), string(b)}
		if attempts.Add(1) == 1 {
			clock.Advance(time.Minute)
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	})
	key := []byte("k")
	n := newSender(t, Options{URL: srv.URL, UserAgent: "chatd-test/1", Now: clock.Now,
		Sign: func(h http.Header, _ string, body []byte, now time.Time) {
			ts := strconv.FormatInt(now.Unix(), 10)
			m := hmac.New(sha256.New, key)
			m.Write([]byte(ts + "." + string(body)))
			h.Set("X-Ts", ts)
			h.Set("X-Sig", hex.EncodeToString(m.Sum(nil)))
		}})
	if !n.Send("e1", []byte(`{"id":"e1"}`)) {
		t.Fatal("Send refused")
	}
	first, second := <-got, <-got
	for _, s := range []seen{first, second} {
		m := hmac.New(sha256.New, key)
		m.Write([]byte(s.ts + "." + s.body))
		if s.sig != hex.EncodeToString(m.Sum(nil)) || s.agent != "chatd-test/1" || s.body != `{"id":"e1"}` {
			t.Errorf("attempt %+v: bad signature, agent or body", s)
		}
	}
	if first.ts == second.ts {
		t.Errorf("both attempts signed at %s: want the retry's own time", first.ts)
	}
}

// TestSetURL: bodies sent after SetURL go to the new URL; a bad URL, or a
// Sender made without one, is refused and changes nothing.
func TestSetURL(t *testing.T) {
	var hits [2]atomic.Int64
	var urls [2]string
	for i := range urls {
		urls[i] = testutil.Webhook(t, func(w http.ResponseWriter, r *http.Request) { hits[i].Add(1) }).URL
	}
	n := newSender(t, Options{URL: urls[0]})
	if !n.Send("a", []byte(`{}`)) {
		t.Fatal("Send refused")
	}
	waitStats(t, n, func(s Stats) bool { return s.Sent == 1 })
	if err := n.SetURL("ftp://example.com/"); err == nil {
		t.Error("SetURL took an ftp URL")
	}
	if err := n.SetURL(urls[1]); err != nil {
		t.Fatal(err)
	}
	if !n.Send("b", []byte(`{}`)) {
		t.Fatal("Send refused")
	}
	waitStats(t, n, func(s Stats) bool { return s.Sent == 2 })
	if hits[0].Load() != 1 || hits[1].Load() != 1 {
		t.Errorf("hits %d and %d, want one each", hits[0].Load(), hits[1].Load())
	}
	off, err := New(Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := off.SetURL(urls[0]); err == nil || off.Enabled() {
		t.Error("SetURL turned on a Sender made without a URL")
	}
}
