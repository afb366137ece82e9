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

// TestDeliveredEvent: a message is delivered, for the events webhook,
// once every device of its recipient acknowledged it, and not before:
// bob's laptop is offline while his phone takes m-1; the delivered
// event comes when the laptop connects and takes it too, on one node
// and in a cluster.
func TestDeliveredEvent(t *testing.T) {
	for _, cluster := range []bool{false, true} {
		t.Run(map[bool]string{false: "node", true: "cluster"}[cluster], func(t *testing.T) {
			sink := newEventSink(t)
			var s, other *Server
			if cluster {
				nodes := startTestClusterWith(t, 3, sink.configure)
				s, other = nodes[0], nodes[1]
			} else {
				s = startServer(t, t.TempDir(), sink.configure)
				other = s
			}
			laptop := mustDial(t, s, "bob", phoneOpt{clientID: "bob/laptop"})
			laptop.client.Disconnect(100)
			phone := mustDial(t, s, "bob", phoneOpt{clientID: "bob/phone"})
			alice := mustDial(t, s, "alice", phoneOpt{})
			alice.send("bob", "m-1", "")
			phone.waitFor(1)
			sink.waitFor(events.MessageStored, map[string]any{"to": "bob", "id": "m-1"})
			// carol's message, taken by her one device after bob's phone
			// took m-1, is delivered by a flush that also saw the phone's
			// acknowledgement: m-1 stays, for the laptop.
			carol := mustDial(t, s, "carol", phoneOpt{})
			alice.send("carol", "c-1", "")
			carol.waitFor(1)
			sink.waitFor(events.MessageDelivered, map[string]any{"to": "carol", "id": "c-1"})
			if n := sink.count(events.MessageDelivered, map[string]any{"id": "m-1"}); n != 0 {
				t.Fatalf("a delivered event before the laptop took m-1")
			}
			laptop = mustDial(t, other, "bob", phoneOpt{clientID: "bob/laptop"})
			laptop.waitFor(1)
			ev := sink.waitFor(events.MessageDelivered, map[string]any{"to": "bob", "from": "alice", "id": "m-1"})
			var d events.Delivered
			if err := json.Unmarshal(ev.Data, &d); err != nil || d.Seq == 0 {
				t.Fatalf("delivered event %s: %v", ev.Data, err)
			}
			// Receipts are no messages: alice's delivered receipts, taken
			// by her device, make no event.
			testutil.Eventually(t, 10*time.Second, func() bool { return s.events.Pending() == 0 && other.events.Pending() == 0 }, "events sent")
			if n := sink.count(events.MessageDelivered, nil); n != 2 {
				t.Fatalf("%d delivered events, want c-1's and m-1's alone", n)
			}
		})
	}
}
