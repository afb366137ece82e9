package push

import (
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/chatd/chatd/internal/testutil"
)

// TestMain checks that a closed Notifier leaves no goroutine behind.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// fakeClock is a settable clock for Options.Now.
type fakeClock struct{ ns atomic.Int64 }

func newFakeClock() *fakeClock {
	c := &fakeClock{}
	c.ns.Store(time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC).UnixNano())
	return c
}

func (c *fakeClock) Now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *fakeClock) Advance(d time.Duration) { c.ns.Add(int64(d)) }

// webhook starts a test server running h, closed when the test ends.
func webhook(t *testing.T, h http.HandlerFunc) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv
}

// blockingWebhook starts a test server whose handler reports each request
// on arrived and then blocks until open is called. Open is also called when
// the test ends, before the server is closed, since closing the server
// waits for its handlers.
func blockingWebhook(t *testing.T) (srv *httptest.Server, arrived <-chan struct{}, open func()) {
	t.Helper()
	gate := make(chan struct{})
	arrivals := make(chan struct{}, 16)
	srv = webhook(t, func(w http.ResponseWriter, r *http.Request) {
		arrivals <- struct{}{}
		<-gate
	})
	var once sync.Once
	open = func() { once.Do(func() { close(gate) }) }
	t.Cleanup(open)
	return srv, arrivals, open
}

// newNotifier builds a Notifier with test-sized delays and a logger writing
// to the test's output, closed when the test ends.
func newNotifier(t *testing.T, o Options) *Notifier {
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
func waitStats(t *testing.T, n *Notifier, cond func(Stats) bool) {
	t.Helper()
	testutil.EventuallyNoError(t, 10*time.Second, func() error {
		if s := n.Stats(); !cond(s) {
			return fmt.Errorf("stats %+v", s)
		}
		return nil
	}, "notifier stats")
}

func pending(n *Notifier) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.pending
}

type request struct {
	method, contentType, userAgent, body string
}

func TestRequestShape(t *testing.T) {
	tests := []struct {
		name string
		nf   Notification
		want string
	}{
		{
			name: "group message",
			nf:   Notification{User: "bob", From: "alice", Kind: "msg", Group: "g1", Queued: 3},
			want: `{"user":"bob","from":"alice","kind":"msg","group":"g1","queued":3}`,
		},
		{
			name: "direct message omits group",
			nf:   Notification{User: "bob", From: "alice", Kind: "msg", Queued: 1},
			want: `{"user":"bob","from":"alice","kind":"msg","queued":1}`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := make(chan request, 1)
			srv := webhook(t, func(w http.ResponseWriter, r *http.Request) {
				body, err := io.ReadAll(r.Body)
				if err != nil {
					t.Errorf("read body: %v", err)
				}
				got <- request{r.Method, r.Header.Get("Content-Type"), r.Header.Get("User-Agent"), string(body)}
			})
			n := newNotifier(t, Options{URL: srv.URL})
			if !n.Notify(tt.nf) {
				t.Fatal("Notify refused the first notification")
			}
			want := request{http.MethodPost, "application/json", "chatd-push/1", tt.want}
			if r := <-got; r != want {
				t.Errorf("request\n got %+v\nwant %+v", r, want)
			}
		})
	}
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
			srv := webhook(t, func(w http.ResponseWriter, r *http.Request) {
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
			n := newNotifier(t, Options{URL: srv.URL, MaxAttempts: tt.maxAttempts})
			if !n.Notify(Notification{User: "bob", From: "alice", Kind: "msg", Queued: 1}) {
				t.Fatal("Notify refused the first notification")
			}
			waitStats(t, n, func(s Stats) bool { return s.Sent+s.Failed == 1 })
			if got := n.Stats(); got != tt.want {
				t.Errorf("Stats() = %+v, want %+v", got, tt.want)
			}
			if got := int(attempts.Load()); got != len(tt.answers) {
				t.Errorf("webhook saw %d attempts, want %d", got, len(tt.answers))
			}
			if p := pending(n); p != 0 {
				t.Errorf("%d notifications still pending", p)
			}
		})
	}
}

func TestNetworkErrorIsRetried(t *testing.T) {
	var attempts atomic.Int32
	srv := webhook(t, func(w http.ResponseWriter, r *http.Request) {
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
	n := newNotifier(t, Options{URL: srv.URL})
	n.Notify(Notification{User: "bob", From: "alice", Kind: "msg", Queued: 1})
	waitStats(t, n, func(s Stats) bool { return s.Sent+s.Failed == 1 })
	if got, want := n.Stats(), (Stats{Sent: 1, Retried: 1}); got != want {
		t.Errorf("Stats() = %+v, want %+v", got, want)
	}
	if got := attempts.Load(); got != 2 {
		t.Errorf("webhook saw %d attempts, want 2", got)
	}
}

func TestOnePerIntervalPerUser(t *testing.T) {
	srv := webhook(t, func(w http.ResponseWriter, r *http.Request) {})
	clock := newFakeClock()
	n := newNotifier(t, Options{URL: srv.URL, Interval: time.Minute, Now: clock.Now})
	note := func(user string) Notification {
		return Notification{User: user, From: "alice", Kind: "msg", Queued: 1}
	}
	steps := []struct {
		advance time.Duration
		user    string
		want    bool
	}{
		{0, "bob", true},
		{0, "bob", false},
		{0, "carol", true},
		{time.Minute - time.Nanosecond, "bob", false},
		{time.Nanosecond, "bob", true},
		{0, "bob", false},
		{0, "carol", true},
	}
	for i, s := range steps {
		clock.Advance(s.advance)
		if got := n.Notify(note(s.user)); got != s.want {
			t.Errorf("step %d: Notify(%s) = %v, want %v", i, s.user, got, s.want)
		}
	}
	waitStats(t, n, func(s Stats) bool { return s.Sent == 4 })
	if got, want := n.Stats(), (Stats{Sent: 4, Suppressed: 3}); got != want {
		t.Errorf("Stats() = %+v, want %+v", got, want)
	}
}

func TestPruneKeepsOnlyLiveUsers(t *testing.T) {
	srv := webhook(t, func(w http.ResponseWriter, r *http.Request) {})
	clock := newFakeClock()
	n := newNotifier(t, Options{URL: srv.URL, Interval: time.Minute, Now: clock.Now})
	n.mu.Lock()
	for i := range minPruneAt / 2 {
		n.last[fmt.Sprintf("old%d", i)] = clock.Now().Add(-time.Minute)
		n.last[fmt.Sprintf("live%d", i)] = clock.Now()
	}
	n.mu.Unlock()

	if !n.Notify(Notification{User: "new", Kind: "msg"}) {
		t.Fatal("Notify refused a new user")
	}
	n.mu.Lock()
	size, pruneAt := len(n.last), n.pruneAt
	n.mu.Unlock()
	if want := minPruneAt/2 + 1; size != want {
		t.Errorf("after a sweep the map holds %d users, want %d", size, want)
	}
	if pruneAt != minPruneAt {
		t.Errorf("next sweep at %d, want %d", pruneAt, minPruneAt)
	}
	if n.Notify(Notification{User: "live0", Kind: "msg"}) {
		t.Error("a user inside the interval was forgotten by the sweep")
	}
	if !n.Notify(Notification{User: "old0", Kind: "msg"}) {
		t.Error("a user past the interval was refused")
	}
	waitStats(t, n, func(s Stats) bool { return s.Sent == 2 })
}

func TestQueueFullDropsWithoutBlocking(t *testing.T) {
	srv, _, open := blockingWebhook(t)
	n := newNotifier(t, Options{URL: srv.URL, QueueSize: 2})
	note := func(user string) Notification {
		return Notification{User: user, From: "alice", Kind: "msg", Queued: 1}
	}
	for _, u := range []string{"u1", "u2"} {
		if !n.Notify(note(u)) {
			t.Fatalf("Notify(%s) refused below QueueSize", u)
		}
	}
	if n.Notify(note("u3")) {
		t.Fatal("Notify(u3) accepted beyond QueueSize")
	}
	if got := n.Stats().Dropped; got != 1 {
		t.Errorf("Dropped = %d, want 1", got)
	}

	open()
	waitStats(t, n, func(s Stats) bool { return s.Sent == 2 })
	if !n.Notify(note("u3")) {
		t.Error("a dropped notification used up its user's interval")
	}
	waitStats(t, n, func(s Stats) bool { return s.Sent == 3 })
	if got, want := n.Stats(), (Stats{Sent: 3, Dropped: 1}); got != want {
		t.Errorf("Stats() = %+v, want %+v", got, want)
	}
}

func TestCloseDuringRequest(t *testing.T) {
	srv, arrived, _ := blockingWebhook(t) // blocks until the test ends
	n := newNotifier(t, Options{URL: srv.URL})
	n.Notify(Notification{User: "bob", From: "alice", Kind: "msg", Queued: 1})
	n.Notify(Notification{User: "carol", From: "alice", Kind: "msg", Queued: 1})
	<-arrived
	n.Close()
	n.Close()
	if got := n.Stats(); got != (Stats{}) {
		t.Errorf("Stats() = %+v, want zero", got)
	}
	if p := pending(n); p != 2 {
		t.Errorf("%d notifications counted as dropped by Close, want 2", p)
	}
	if n.Notify(Notification{User: "dave", Kind: "msg"}) {
		t.Error("Notify accepted after Close")
	}
}

func TestCloseDuringBackoff(t *testing.T) {
	srv := webhook(t, func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
	})
	n := newNotifier(t, Options{URL: srv.URL, Backoff: time.Hour, MaxBackoff: time.Hour})
	n.Notify(Notification{User: "bob", From: "alice", Kind: "msg", Queued: 1})
	waitStats(t, n, func(s Stats) bool { return s.Retried >= 1 })
	n.Close()
	if s := n.Stats(); s.Sent != 0 || s.Failed != 0 {
		t.Errorf("Stats() = %+v, want nothing sent or failed", s)
	}
	if p := pending(n); p != 1 {
		t.Errorf("%d notifications counted as dropped by Close, want 1", p)
	}
}

func TestDisabledWithoutURL(t *testing.T) {
	n, err := New(Options{})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if n.Notify(Notification{User: "bob", Kind: "msg"}) {
		t.Error("Notify accepted with no webhook")
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
	on := newNotifier(t, Options{URL: "http://127.0.0.1:1/hook"})
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
	clock := newFakeClock()
	n := newNotifier(t, Options{URL: "http://127.0.0.1:1/", Backoff: 100 * time.Millisecond, MaxBackoff: 10 * time.Second, Now: clock.Now})
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
