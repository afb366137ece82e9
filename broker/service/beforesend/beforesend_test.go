package beforesend_test

import (
	"log/slog"
	"net/http"
	"strings"
	"testing"

	"github.com/chatd/chatd/broker/service/beforesend"
	"github.com/chatd/chatd/internal/testutil"
)

// TestAnswers: what each answer of the service means, fail open and
// closed, and that a failing service is logged once per interval.
func TestAnswers(t *testing.T) {
	for _, c := range []struct {
		name     string
		status   int
		body     string
		failOpen bool
		allow    bool
		reason   string
	}{
		{"allowed", 200, `{"allow":true}`, false, true, ""},
		{"refused with a reason", 200, `{"allow":false,"reason":"no"}`, true, false, "no"},
		{"refused without one", 200, `{"allow":false}`, true, false, "refused by moderation"},
		{"500, fail open", 500, ``, true, true, ""},
		{"500, fail closed", 500, ``, false, false, "could not be reached"},
		{"not JSON, fail closed", 200, `allow`, false, false, "could not be reached"},
	} {
		t.Run(c.name, func(t *testing.T) {
			srv := testutil.Webhook(t, func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(c.status)
				_, _ = w.Write([]byte(c.body))
			})
			var logs testutil.SyncBuffer
			clock := testutil.NewClock()
			ch, err := beforesend.New(beforesend.Options{URL: srv.URL, Secret: []byte("s"), FailOpen: c.failOpen,
				Logger: slog.New(slog.NewTextHandler(&logs, nil)), Now: clock.Now})
			if err != nil {
				t.Fatal(err)
			}
			for range 3 {
				allow, reason := ch.Check(beforesend.Message{From: "alice", To: "bob", Msg: []byte(`{"id":"m"}`)})
				if allow != c.allow || !strings.Contains(reason, c.reason) || (c.reason == "" && reason != "") {
					t.Fatalf("Check = %v %q, want %v %q", allow, reason, c.allow, c.reason)
				}
			}
			if failing := c.status != 200 || c.body == "allow"; failing != (strings.Count(logs.String(), "before-send service failing") == 1) {
				t.Errorf("logs:\n%s\nwant one warning for three failures", logs.String())
			}
		})
	}
	if _, err := beforesend.New(beforesend.Options{URL: "ftp://x", Secret: []byte("s")}); err == nil {
		t.Error("an ftp URL was accepted")
	}
}
