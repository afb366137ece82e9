package push

import (
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/chatd/chatd/broker/service/webhook"
	"github.com/chatd/chatd/internal/testutil"
)

// TestMain checks that a closed Notifier leaves no goroutine behind.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
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
			srv := testutil.Webhook(t, func(w http.ResponseWriter, r *http.Request) {
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

func TestOnePerIntervalPerUser(t *testing.T) {
	srv := testutil.Webhook(t, func(w http.ResponseWriter, r *http.Request) {})
	clock := testutil.NewClock()
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
	if got, want := n.Stats(), (Stats{Stats: webhook.Stats{Sent: 4}, Suppressed: 3}); got != want {
		t.Errorf("Stats() = %+v, want %+v", got, want)
	}
}

func TestPruneKeepsOnlyLiveUsers(t *testing.T) {
	srv := testutil.Webhook(t, func(w http.ResponseWriter, r *http.Request) {})
	clock := testutil.NewClock()
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
	srv, _, open := testutil.BlockingWebhook(t)
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
	if got, want := n.Stats(), (Stats{Stats: webhook.Stats{Sent: 3, Dropped: 1}}); got != want {
		t.Errorf("Stats() = %+v, want %+v", got, want)
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
