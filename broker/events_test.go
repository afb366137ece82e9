package broker

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chatd/chatd/broker/service/apikeys"
	"github.com/chatd/chatd/broker/service/events"
	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/testutil"
)

// eventsSecret signs the test servers' events.
const eventsSecret = "events-secret-0123456789abcdef-32bytes"

// receivedEvent is one event as a backend decodes it.
type receivedEvent struct {
	ID   string          `json:"id"`
	Type string          `json:"type"`
	Node string          `json:"node"`
	Data json.RawMessage `json:"data"`
}

// eventSink is an app backend's events webhook: it checks each request's
// signature, as a backend must, and keeps the events.
type eventSink struct {
	t   *testing.T
	URL string

	mu     sync.Mutex
	events []receivedEvent
}

func newEventSink(t *testing.T) *eventSink {
	k := &eventSink{t: t}
	srv := testutil.Webhook(t, func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			t.Errorf("read event: %v", err)
			return
		}
		if err := events.Verify(r.Header, []byte(eventsSecret), body, time.Now(), time.Minute); err != nil {
			t.Errorf("event %s: %v", body, err)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		var ev receivedEvent
		if err := json.Unmarshal(body, &ev); err != nil || ev.ID != r.Header.Get(events.HeaderID) {
			t.Errorf("event %s: %v, id header %q", body, err, r.Header.Get(events.HeaderID))
		}
		k.mu.Lock()
		k.events = append(k.events, ev)
		k.mu.Unlock()
	})
	k.URL = srv.URL
	return k
}

// configure points c's events at the sink.
func (k *eventSink) configure(c *config.Config) {
	c.Events.Webhook, c.Events.Secret = k.URL, eventsSecret
}

// waitFor waits until an event of typ whose data has want's fields (as
// JSON) arrived, and returns it.
func (k *eventSink) waitFor(typ string, want map[string]any) receivedEvent {
	k.t.Helper()
	var found receivedEvent
	testutil.Eventually(k.t, 10*time.Second, func() bool {
		k.mu.Lock()
		defer k.mu.Unlock()
		for _, ev := range k.events {
			if ev.Type == typ && matches(ev.Data, want) {
				found = ev
				return true
			}
		}
		return false
	}, "event %s %v", typ, want)
	return found
}

// count returns how many events of typ with want's fields arrived.
func (k *eventSink) count(typ string, want map[string]any) int {
	k.mu.Lock()
	defer k.mu.Unlock()
	n := 0
	for _, ev := range k.events {
		if ev.Type == typ && matches(ev.Data, want) {
			n++
		}
	}
	return n
}

func matches(data json.RawMessage, want map[string]any) bool {
	var got map[string]any
	if json.Unmarshal(data, &got) != nil {
		return false
	}
	for k, v := range want {
		b1, _ := json.Marshal(got[k])
		b2, _ := json.Marshal(v)
		if string(b1) != string(b2) {
			return false
		}
	}
	return true
}

// TestEvents: a backend's events webhook is told, signed, of devices
// connecting and leaving, messages stored (a user's and the server API's)
// and read, once each; /metrics counts what was sent.
func TestEvents(t *testing.T) {
	sink := newEventSink(t)
	s := startServer(t, t.TempDir(), sink.configure)
	alice := mustDial(t, s, "alice", phoneOpt{clientID: "alice/phone"})
	bob := mustDial(t, s, "bob", phoneOpt{clientID: "bob/phone"})
	sink.waitFor(events.UserConnected, map[string]any{"user": "alice", "client_id": "alice/phone"})
	alice.send("bob", "m-1", "")
	bob.waitFor(1)
	stored := sink.waitFor(events.MessageStored, map[string]any{"to": "bob", "from": "alice", "id": "m-1"})
	if stored.Node != "" || len(stored.ID) != 32 {
		t.Errorf("stored event %+v: want no node, a 32-hex id", stored)
	}
	bob.publish("receipt/alice", []byte(`{"status":"read","ids":["m-1"]}`))
	sink.waitFor(events.MessageRead, map[string]any{"by": "bob", "to": "alice", "ids": []string{"m-1"}})
	key := makeKey(t, s, apikeys.ScopeSend)
	if st, ans := serverCall(t, s, http.MethodPost, "/v1/server/messages", key, `{"to":["bob"],"message":{"id":"otp-1"}}`); st != http.StatusOK {
		t.Fatalf("send: %d %v", st, ans)
	}
	sink.waitFor(events.MessageStored, map[string]any{"to": "bob", "from": "system", "server": true, "id": "otp-1"})
	bob.client.Disconnect(50)
	sink.waitFor(events.UserDisconnected, map[string]any{"user": "bob", "client_id": "bob/phone"})
	// Receipts and resends are no messages: m-1 was stored once, read once.
	alice.send("bob", "m-1", "") // a resend: a duplicate
	// Every event emitted by now is finished: counted below if it was sent.
	testutil.Eventually(t, 10*time.Second, func() bool { return s.events.Pending() == 0 }, "events sent")
	if n := sink.count(events.MessageStored, map[string]any{"id": "m-1"}); n != 1 {
		t.Errorf("%d stored events of m-1, want 1", n)
	}
	if n := sink.count(events.MessageRead, map[string]any{"by": "bob"}); n != 1 {
		t.Errorf("%d read events, want 1", n)
	}
	_, metrics := scrape(t, s, "/metrics")
	if !strings.Contains(metrics, `chatd_webhook_sent_total{webhook="events"}`) {
		t.Errorf("metrics lack the events webhook's sent count:\n%s", metrics)
	}
}
