package broker

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/chatd/chatd/broker/service/beforesend"
	"github.com/chatd/chatd/broker/service/events"
	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/testutil"
)

// TestBeforeSend: a moderation service is asked, signed, about every
// message; what it refuses is never stored and its sender is told why
// (code rejected); a service that cannot be reached lets messages go
// (fail open) or refuses them (fail closed), as configured.
func TestBeforeSend(t *testing.T) {
	svc := testutil.Webhook(t, func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if err := events.Verify(r.Header, []byte(eventsSecret), body, time.Now(), time.Minute); err != nil {
			t.Errorf("before-send request %s: %v", body, err)
		}
		var m beforesend.Message
		if err := json.Unmarshal(body, &m); err != nil || m.From != "alice" {
			t.Errorf("before-send request %s: %v", body, err)
		}
		spam := strings.Contains(string(m.Msg), "spam")
		_ = json.NewEncoder(w).Encode(beforesend.Answer{Allow: !spam, Reason: "no spam here"})
	})
	s := startServer(t, t.TempDir(), func(c *config.Config) {
		c.Events.BeforeSend, c.Events.Secret = svc.URL, eventsSecret
	})
	alice := mustDial(t, s, "alice", phoneOpt{})
	bob := mustDial(t, s, "bob", phoneOpt{})
	alice.send("bob", "m-1", "")
	alice.send("bob", "m-2", `,"text":"buy spam"`)
	alice.send("bob", "m-3", "")
	if st, g := httpJSON(t, s, http.MethodPost, "/v1/groups", "alice", map[string]any{"id": "g1", "members": []string{"bob"}}); st != http.StatusCreated {
		t.Fatalf("create group: %d %v", st, g)
	}
	alice.publish("group/g1", []byte(`{"id":"g-1","text":"spam for all"}`))
	alice.publish("group/g1", []byte(`{"id":"g-2"}`))
	got := bob.waitFor(3)
	if ids := bob.ids(); len(got) != 3 || ids[0] != "m-1" || ids[1] != "m-3" || ids[2] != "g-2" {
		t.Fatalf("bob got %v: want m-1, m-3, g-2", ids)
	}
	var errs []envelopeMsg
	testutil.Eventually(t, 10*time.Second, func() bool {
		errs = errs[:0]
		alice.mu.Lock()
		defer alice.mu.Unlock()
		for _, e := range alice.got { // delivered receipts come too
			if e.Kind == "error" {
				errs = append(errs, e)
			}
		}
		return len(errs) >= 2
	}, "alice's two errors")
	for i, ref := range []string{"m-2", "g-1"} {
		if e := errs[i]; e.Kind != "error" || e.Ref != ref || e.Code != "rejected" || e.Reason != "no spam here" {
			t.Errorf("alice's error %d: %+v, want %s rejected with the service's reason", i, e, ref)
		}
	}
	for _, c := range []struct {
		name     string
		failOpen bool
	}{{"fail open", true}, {"fail closed", false}} {
		t.Run(c.name, func(t *testing.T) {
			s := startServer(t, t.TempDir(), func(cfg *config.Config) {
				cfg.Events.BeforeSend, cfg.Events.Secret = "http://"+freeAddr(t)+"/down", eventsSecret
				cfg.Events.BeforeSendFailOpen = c.failOpen
			})
			alice := mustDial(t, s, "alice", phoneOpt{})
			bob := mustDial(t, s, "bob", phoneOpt{})
			alice.send("bob", "m-1", "")
			if c.failOpen {
				bob.waitFor(1)
				return
			}
			if e := alice.waitFor(1)[0]; e.Code != "rejected" || !strings.Contains(e.Reason, "could not be reached") {
				t.Errorf("alice got %+v: want rejected, service unreachable", e)
			}
			if n := bob.count(); n != 0 {
				t.Errorf("bob got %d messages", n)
			}
		})
	}
}
