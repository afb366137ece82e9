package events_test

import (
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/chatd/chatd/broker/service/events"
	"github.com/chatd/chatd/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var secret = []byte("0123456789abcdef0123456789abcdef")

// TestEmitSigned: an event reaches the webhook with its id, type, node
// and data, signed so that Verify accepts it, and Verify refuses a
// tampered body, a wrong secret and a stale timestamp.
func TestEmitSigned(t *testing.T) {
	clock := testutil.NewClock()
	type got struct {
		h    http.Header
		body []byte
	}
	reqs := make(chan got, 1)
	srv := testutil.Webhook(t, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		reqs <- got{r.Header.Clone(), b}
	})
	e, err := events.New(events.Options{URL: srv.URL, Secret: secret, Node: "n1", Now: clock.Now,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	e.Emit(events.MessageRead, events.Read{By: "bob", To: "alice", IDs: []string{"m-1"}})
	r := <-reqs
	var ev struct {
		ID, Type, Node string
		TS             int64
		Data           events.Read
	}
	if err := json.Unmarshal(r.body, &ev); err != nil {
		t.Fatal(err)
	}
	if len(ev.ID) != 32 || ev.Type != "message.read" || ev.Node != "n1" || ev.TS != clock.Now().UnixMilli() ||
		ev.Data.By != "bob" || ev.Data.To != "alice" || len(ev.Data.IDs) != 1 || r.h.Get(events.HeaderID) != ev.ID {
		t.Fatalf("event %s, id header %q", r.body, r.h.Get(events.HeaderID))
	}
	if err := events.Verify(r.h, secret, r.body, clock.Now(), 5*time.Minute); err != nil {
		t.Fatalf("Verify: %v", err)
	}
	for _, c := range []struct {
		name   string
		secret []byte
		body   []byte
		at     time.Time
		want   string
	}{
		{"tampered body", secret, []byte(strings.Replace(string(r.body), "bob", "eve", 1)), clock.Now(), "bad signature"},
		{"wrong secret", []byte("another secret, also 32 bytes..."), r.body, clock.Now(), "bad signature"},
		{"stale", secret, r.body, clock.Now().Add(10 * time.Minute), "beyond"},
	} {
		if err := events.Verify(r.h, c.secret, c.body, c.at, 5*time.Minute); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: Verify = %v, want %q", c.name, err, c.want)
		}
	}
	if s := e.Stats(); s.Sent != 1 {
		testutil.Eventually(t, 5*time.Second, func() bool { return e.Stats().Sent == 1 }, "event counted as sent")
	}
}

// TestDisabledAndMisconfigured: no URL emits nothing; a URL without a
// secret is refused.
func TestDisabledAndMisconfigured(t *testing.T) {
	e, err := events.New(events.Options{})
	if err != nil {
		t.Fatal(err)
	}
	e.Emit(events.UserConnected, events.Connection{User: "bob"})
	if e.Enabled() || e.Stats().Sent+e.Stats().Dropped != 0 {
		t.Error("a disabled emitter emitted")
	}
	e.Close()
	if _, err := events.New(events.Options{URL: "http://127.0.0.1:1/"}); err == nil {
		t.Error("a webhook without a secret was accepted")
	}
}
