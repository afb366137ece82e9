package broker

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/testutil"
)

// event is any JSON object a client receives.
type event map[string]any

func (p *phone) events() []event {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]event, 0, len(p.raw))
	for _, b := range p.raw {
		var e event
		if err := json.Unmarshal(b, &e); err != nil {
			p.t.Errorf("event %q: %v", b, err)
		}
		out = append(out, e)
	}
	return out
}

func ids(e event) string {
	var out []string
	if v, ok := e["ids"].([]any); ok {
		for _, id := range v {
			out = append(out, fmt.Sprint(id))
		}
	}
	return strings.Join(out, ",")
}

func TestDeliveredAndReadReceipts(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	alice := mustDial(t, s, "alice", phoneOpt{})
	bob := mustDial(t, s, "bob", phoneOpt{})

	alice.send("bob", "m-1", "") // the PUBACK is the first tick
	bob.waitFor(1)
	alice.waitFor(1) // the second: bob's device acknowledged it
	got := alice.events()[0]
	if got["kind"] != "receipt" || got["status"] != "delivered" || got["by"] != "bob" || ids(got) != "m-1" || got["ts"] == nil {
		t.Fatalf("delivered receipt = %v", got)
	}

	bob.publish("receipt/alice", []byte(`{"status":"read","ids":["m-1"]}`))
	alice.waitFor(2)
	got = alice.events()[1]
	if got["kind"] != "receipt" || got["status"] != "read" || got["by"] != "bob" || ids(got) != "m-1" {
		t.Fatalf("read receipt = %v", got)
	}

	// Receipts never generate receipts: alice acknowledged two receipts,
	// and bob's queue got nothing for it.
	waitAcked(t, s, "alice", "")
	if h, _ := s.queue.Head("bob"); h != 1 {
		t.Fatalf("bob's queue head %d, want 1 (only alice's message)", h)
	}
	if n := bob.count(); n != 1 {
		t.Fatalf("bob received %d, want 1", n)
	}
}

func TestDeliveredReceiptsBatchAndMultiDeviceOnce(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	bob := dialManual(t, s, "bob/phone", "bob")
	laptop := mustDial(t, s, "bob", phoneOpt{clientID: "bob/laptop"})
	alice := mustDial(t, s, "alice", phoneOpt{})
	for i := range 3 {
		alice.send("bob", fmt.Sprintf("m-%d", i), "")
	}
	laptop.waitFor(3) // the laptop acks each at once: three receipts, or fewer batched
	msgs := bob.waitFor(t, 3)
	for _, m := range msgs {
		m.Ack()
	}
	waitAcked(t, s, "bob", "phone")
	// The phone's acks come after the laptop's: they must not repeat receipts.
	var all []string
	testutil.EventuallyNoError(t, 10*time.Second, func() error {
		all = all[:0]
		for _, e := range alice.events() {
			if e["status"] == "delivered" {
				all = append(all, strings.Split(ids(e), ",")...)
			}
		}
		if len(all) < 3 {
			return fmt.Errorf("delivered receipts for %v", all)
		}
		return nil
	}, "waiting for three delivered receipts")
	// Each device acks on its own connection, so which device's ack
	// reports a message first, and so the receipts' order, is not fixed.
	slices.Sort(all)
	if strings.Join(all, " ") != "m-0 m-1 m-2" {
		t.Fatalf("delivered receipts for %v, want each of m-0 m-1 m-2 once", all)
	}
	if h, _ := s.queue.Head("alice"); int(h) != len(alice.events()) {
		t.Fatalf("alice's queue has %d entries, she received %d", h, len(alice.events()))
	}
}

func TestTyping(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	bob := mustDial(t, s, "bob", phoneOpt{})
	alice := mustDial(t, s, "alice", phoneOpt{})
	if tk := alice.client.Publish("typing/bob", 0, false, []byte("{}")); !tk.WaitTimeout(10 * time.Second) {
		t.Fatal("typing publish")
	}
	bob.waitFor(1)
	e := bob.events()[0]
	if e["kind"] != "typing" || e["from"] != "alice" || e["ts"] == nil {
		t.Fatalf("typing event = %v", e)
	}
	// To an offline user it is dropped, never queued.
	alice.publish("typing/carol", []byte("{}")) // QoS 1: acknowledged in order
	if h, _ := s.queue.Head("carol"); h != 0 {
		t.Fatalf("typing was queued for offline carol (head %d)", h)
	}
	if h, _ := s.queue.Head("bob"); h != 0 {
		t.Fatalf("typing was queued for bob (head %d)", h)
	}
}

// presenceWatcher records presence events of every user.
type presenceWatcher struct {
	mu     sync.Mutex
	events []event
	signal chan struct{}
	client paho.Client
}

func watchPresence(t *testing.T, s *Server, user string) *presenceWatcher {
	t.Helper()
	w := &presenceWatcher{signal: make(chan struct{}, 1)}
	opts := paho.NewClientOptions().AddBroker("tcp://" + s.MQTTAddr()).
		SetClientID(user).SetUsername(user).SetPassword(mint(t, user)).SetCleanSession(true).
		SetAutoReconnect(false)
	w.client = paho.NewClient(opts)
	if tk := w.client.Connect(); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("connect: %v", tk.Error())
	}
	t.Cleanup(func() { w.client.Disconnect(50) })
	tk := w.client.Subscribe("presence/+", 1, func(_ paho.Client, m paho.Message) {
		var e event
		if err := json.Unmarshal(m.Payload(), &e); err != nil {
			t.Errorf("presence %q: %v", m.Payload(), err)
		}
		w.mu.Lock()
		w.events = append(w.events, e)
		w.mu.Unlock()
		select {
		case w.signal <- struct{}{}:
		default:
		}
	})
	if !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("subscribe presence: %v", tk.Error())
	}
	return w
}

// waitUser waits until user has gone through n presence states and returns
// them. A retained state can arrive twice when it is published while the
// subscription is made (live and as the retained copy): repeats of the same
// state are folded.
func (w *presenceWatcher) waitUser(t *testing.T, user string, n int) []event {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		var got []event
		w.mu.Lock()
		for _, e := range w.events {
			if e["user"] == user && (len(got) == 0 || got[len(got)-1]["online"] != e["online"]) {
				got = append(got, e)
			}
		}
		w.mu.Unlock()
		if len(got) >= n {
			return got
		}
		select {
		case <-w.signal:
		case <-time.After(20 * time.Millisecond):
		case <-deadline:
			t.Fatalf("%d presence events of %s, want %d: %v", len(got), user, n, got)
		}
	}
}

func TestPresence(t *testing.T) {
	dir := t.TempDir()
	s := startServer(t, dir, nil)
	w := watchPresence(t, s, "carol")

	phone := mustDial(t, s, "bob", phoneOpt{clientID: "bob/phone"})
	if e := w.waitUser(t, "bob", 1)[0]; e["online"] != true || e["ts"] == nil {
		t.Fatalf("first device: %v", e)
	}
	laptop := mustDial(t, s, "bob", phoneOpt{clientID: "bob/laptop"})
	// Takeover of the phone's session: a new connection before the old one leaves.
	phone2 := mustDial(t, s, "bob", phoneOpt{clientID: "bob/phone"})
	laptop.client.Disconnect(100)
	phone2.client.Disconnect(100)
	got := w.waitUser(t, "bob", 2)
	if got[1]["online"] != false || got[1]["last_seen"] == nil {
		t.Fatalf("last device leaving: %v", got[1])
	}
	_ = phone
	// A late subscriber sees the retained state.
	late := watchPresence(t, s, "dave")
	if e := late.waitUser(t, "bob", 1)[0]; e["online"] != false {
		t.Fatalf("retained presence: %v", e)
	}
	if n := len(w.waitUser(t, "bob", 2)); n != 2 {
		t.Fatalf("takeover and second device made %d presence events, want 2", n)
	}
}

func TestPresenceKeepaliveTimeout(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	w := watchPresence(t, s, "carol")
	// A raw client that connects with a 1 s keepalive and then goes silent,
	// as a phone that lost its network does.
	conn, err := net.Dial("tcp", s.MQTTAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Write(connectPacket("bob", mint(t, "bob"), 1, "", "")); err != nil {
		t.Fatal(err)
	}
	if e := w.waitUser(t, "bob", 1)[0]; e["online"] != true {
		t.Fatalf("connect: %v", e)
	}
	if e := w.waitUser(t, "bob", 2)[1]; e["online"] != false {
		t.Fatalf("after keepalive timeout: %v", e)
	}
}

func TestPresenceSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	s := startServer(t, dir, nil)
	w := watchPresence(t, s, "carol")
	alice := mustDial(t, s, "alice", phoneOpt{})
	alice.client.Disconnect(100)
	aliceSeen := w.waitUser(t, "alice", 2)[1]["last_seen"]
	mustDial(t, s, "bob", phoneOpt{}) // online when the server stops
	w.waitUser(t, "bob", 1)
	// On a clean stop bob is last seen at the stop; after a crash, at the restart.
	before := time.Now().UnixMilli()
	stopServer(t, s)

	s = startServer(t, dir, nil)
	w = watchPresence(t, s, "dave")
	a := w.waitUser(t, "alice", 1)[0]
	if a["online"] != false || a["last_seen"] != aliceSeen {
		t.Fatalf("alice after restart: %v, want offline last seen %v", a, aliceSeen)
	}
	b := w.waitUser(t, "bob", 1)[0]
	if seen, _ := b["last_seen"].(float64); b["online"] != false || int64(seen) < before {
		t.Fatalf("bob after restart: %v, want offline since the stop (>= %d)", b, before)
	}
}

func httpJSON(t *testing.T, s *Server, method, path, user string, body any) (int, map[string]any) {
	t.Helper()
	var rd bytes.Buffer
	if body != nil {
		if err := json.NewEncoder(&rd).Encode(body); err != nil {
			t.Fatal(err)
		}
	}
	req, err := http.NewRequest(method, "http://"+s.HTTPAddr()+path, &rd)
	if err != nil {
		t.Fatal(err)
	}
	if user != "" {
		req.Header.Set("Authorization", "Bearer "+mint(t, user))
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	return resp.StatusCode, out
}

func TestGroupAPI(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *config.Config) { c.Groups.MaxMembers = 4 })
	cases := []struct {
		name, method, path, user string
		body                     any
		status                   int
		code                     string
	}{
		{"no token", "POST", "/v1/groups", "", map[string]any{"id": "g1"}, 401, "not_authorized"},
		{"create", "POST", "/v1/groups", "alice", map[string]any{"id": "g1", "members": []string{"bob", "carol"}}, 201, ""},
		{"create again", "POST", "/v1/groups", "bob", map[string]any{"id": "g1"}, 409, "group_exists"},
		{"bad id", "POST", "/v1/groups", "alice", map[string]any{"id": "g 1"}, 400, "bad_request"},
		{"too many", "POST", "/v1/groups", "alice", map[string]any{"id": "g2", "members": []string{"a", "b", "c", "d"}}, 422, "too_many_members"},
		{"member reads", "GET", "/v1/groups/g1", "bob", nil, 200, ""},
		{"non-member reads", "GET", "/v1/groups/g1", "dave", nil, 404, "unknown_group"},
		{"unknown", "GET", "/v1/groups/nope", "alice", nil, 404, "unknown_group"},
		{"non-admin adds", "PUT", "/v1/groups/g1/members/dave", "bob", nil, 403, "not_authorized"},
		{"admin adds", "PUT", "/v1/groups/g1/members/dave", "alice", nil, 200, ""},
		{"over the cap", "PUT", "/v1/groups/g1/members/erin", "alice", nil, 422, "too_many_members"},
		{"non-admin removes another", "DELETE", "/v1/groups/g1/members/carol", "bob", nil, 403, "not_authorized"},
		{"member removes itself", "DELETE", "/v1/groups/g1/members/bob", "bob", nil, 200, ""},
		{"admin removes", "DELETE", "/v1/groups/g1/members/dave", "alice", nil, 200, ""},
	}
	for _, c := range cases {
		status, body := httpJSON(t, s, c.method, c.path, c.user, c.body)
		if status != c.status || (c.code != "" && body["error"] != c.code) {
			t.Errorf("%s: %d %v, want %d %s", c.name, status, body, c.status, c.code)
		}
	}
	_, g := httpJSON(t, s, "GET", "/v1/groups/g1", "alice", nil)
	if fmt.Sprint(g["members"]) != "[alice carol]" || fmt.Sprint(g["admins"]) != "[alice]" {
		t.Fatalf("group after the edits: %v", g)
	}
}

func TestGroupMessages(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	if st, body := httpJSON(t, s, "POST", "/v1/groups", "alice", map[string]any{"id": "g1", "members": []string{"bob", "carol"}}); st != 201 {
		t.Fatalf("create: %d %v", st, body)
	}
	alice := mustDial(t, s, "alice", phoneOpt{})
	bob := mustDial(t, s, "bob", phoneOpt{})
	carol := mustDial(t, s, "carol", phoneOpt{})
	dave := mustDial(t, s, "dave", phoneOpt{})

	alice.publish("group/g1", []byte(`{"id":"gm-1","text":"hi all"}`))
	for _, p := range []*phone{bob, carol} {
		e := p.waitFor(1)[0]
		if e.Kind != "msg" || e.From != "alice" || e.To != p.user || string(e.Msg) != `{"id":"gm-1","text":"hi all"}` {
			t.Fatalf("%s got %+v", p.user, e)
		}
		if p.events()[0]["group"] != "g1" {
			t.Fatalf("%s: envelope without group: %v", p.user, p.events()[0])
		}
	}
	dave.publish("group/g1", []byte(`{"id":"x"}`))
	dave.publish("group/nope", []byte(`{"id":"y"}`))
	evs := dave.waitFor(2)
	if evs[0].Code != "not_authorized" || evs[1].Code != "unknown_group" {
		t.Fatalf("dave's errors: %+v", evs)
	}
	// A member removed gets nothing more.
	httpJSON(t, s, "DELETE", "/v1/groups/g1/members/carol", "alice", nil)
	alice.publish("group/g1", []byte(`{"id":"gm-2"}`))
	if id := innerID(t, bob.waitFor(2)[1]); id != "gm-2" {
		t.Fatalf("bob got %s", id)
	}
	if h, _ := s.queue.Head("carol"); h != 1 {
		t.Fatalf("removed member's queue head %d, want 1", h)
	}
	// Delivered receipts from bob (two) and carol (one) reach alice.
	var receipts []string
	testutil.EventuallyNoError(t, 10*time.Second, func() error {
		receipts = receipts[:0]
		for _, e := range alice.events() {
			if e["status"] == "delivered" {
				receipts = append(receipts, fmt.Sprint(e["by"], ":", ids(e)))
			}
		}
		if len(receipts) < 3 {
			return fmt.Errorf("alice got delivered receipts %v, want bob's two and carol's one", receipts)
		}
		return nil
	}, "waiting for the receipts")
}

func TestGroupFanOutToHundredMembers(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	var members []string
	for i := range 100 {
		members = append(members, fmt.Sprintf("m%03d", i))
	}
	if st, body := httpJSON(t, s, "POST", "/v1/groups", "alice", map[string]any{"id": "big", "members": members}); st != 201 {
		t.Fatalf("create: %d %v", st, body)
	}
	alice := mustDial(t, s, "alice", phoneOpt{noSub: true})
	alice.publish("group/big", []byte(`{"id":"hello"}`))
	for _, m := range members {
		if h, _ := s.queue.Head(m); h != 1 {
			t.Fatalf("%s: queue head %d, want 1", m, h)
		}
	}
	for _, m := range []string{"m000", "m050", "m099"} {
		p := mustDial(t, s, m, phoneOpt{})
		if id := innerID(t, p.waitFor(1)[0]); id != "hello" {
			t.Fatalf("%s got %s", m, id)
		}
	}
}

func TestDeliveredReceiptsCanBeTurnedOff(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *config.Config) { c.Receipts.Delivered = false })
	alice := mustDial(t, s, "alice", phoneOpt{})
	bob := mustDial(t, s, "bob", phoneOpt{})
	alice.send("bob", "m-1", "")
	bob.waitFor(1)
	waitAcked(t, s, "bob", "")
	if h, _ := s.queue.Head("alice"); h != 0 {
		t.Fatalf("alice's queue head %d with receipts.delivered off", h)
	}
	// Read receipts are the reader's own messages and still pass.
	bob.publish("receipt/alice", []byte(`{"status":"read","ids":["m-1"]}`))
	if e := alice.waitFor(1)[0]; e.Kind != "receipt" {
		t.Fatalf("alice got %+v", e)
	}
}
