package broker

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chatd/chatd/broker/service/apikeys"
	"github.com/chatd/chatd/broker/service/events"
	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/testutil"
)

// makeKey stores a key with scopes in s's key store, as `chatd apikey
// create` does, and returns it.
func makeKey(t *testing.T, s *Server, scopes ...string) string {
	t.Helper()
	k, key, err := apikeys.New("test", scopes, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if err := s.keys.Put(k); err != nil {
		t.Fatal(err)
	}
	return key
}

// serverCall makes a server API call with bearer (raw, "" for none) and
// returns the status and the JSON body.
func serverCall(t *testing.T, s *Server, method, path, bearer, body string) (int, map[string]any) {
	t.Helper()
	st, b := bearerCall(t, s, method, path, bearer, body)
	var out map[string]any
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatalf("%s %s: %d %q: %v", method, path, st, b, err)
	}
	return st, out
}

// results returns the per-recipient statuses of a send answer.
func results(t *testing.T, ans map[string]any) map[string]string {
	t.Helper()
	out := map[string]string{}
	rs, _ := ans["results"].([]any)
	for _, r := range rs {
		m, _ := r.(map[string]any)
		to, _ := m["to"].(string)
		st, _ := m["status"].(string)
		out[to] = st
	}
	return out
}

// TestServerAPISend sends a system message to two users over the server
// API: it is stored before the answer, reaches the online phone marked
// as the server's, a retry with the same id is a duplicate, and no
// delivered receipt is queued for the sender, who has no inbox.
func TestServerAPISend(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	key := makeKey(t, s, apikeys.ScopeSend)
	bob := mustDial(t, s, "bob", phoneOpt{})
	body := `{"to":["bob","carol","bob"],"message":{"id":"otp-1","text":"Your code is 123456"}}`
	st, ans := serverCall(t, s, http.MethodPost, "/v1/server/messages", key, body)
	if st != http.StatusOK || ans["id"] != "otp-1" {
		t.Fatalf("send: %d %v", st, ans)
	}
	if r := results(t, ans); len(r) != 2 || r["bob"] != "stored" || r["carol"] != "stored" {
		t.Fatalf("results %v: want bob and carol stored, once each", r)
	}
	e := bob.waitFor(1)[0]
	if e.Kind != "msg" || e.From != "system" || !e.Server || e.To != "bob" || innerID(t, e) != "otp-1" {
		t.Fatalf("bob got %+v: want otp-1 from the server's system sender", e)
	}
	if d, err := s.queue.Depth("carol"); err != nil || d != 1 {
		t.Fatalf("carol's queue: %d, %v: want the message waiting", d, err)
	}
	st, ans = serverCall(t, s, http.MethodPost, "/v1/server/messages", key, body)
	if r := results(t, ans); st != http.StatusOK || r["bob"] != "duplicate" || r["carol"] != "duplicate" {
		t.Fatalf("retry: %d %v: want duplicates", st, ans)
	}
	// A bot answering: from names it, and a group reaches every member.
	st, _ = httpJSON(t, s, http.MethodPost, "/v1/groups", "alice", map[string]any{"id": "g1", "members": []string{"bob"}})
	if st != http.StatusCreated && st != http.StatusOK {
		t.Fatalf("create group: %d", st)
	}
	st, ans = serverCall(t, s, http.MethodPost, "/v1/server/messages", key, `{"from":"weatherbot","group":"g1","message":{"id":"w-1","text":"sunny"}}`)
	if r := results(t, ans); st != http.StatusOK || len(r) != 2 || r["alice"] != "stored" || r["bob"] != "stored" {
		t.Fatalf("group send: %d %v", st, ans)
	}
	e = bob.waitFor(2)[1]
	if e.From != "weatherbot" || !e.Server || innerID(t, e) != "w-1" {
		t.Fatalf("bob got %+v: want w-1 from weatherbot", e)
	}
	// bob acknowledged both. A barrier: alice's message to bob, whose
	// delivered receipt reaches alice only after the receipts of bob's
	// earlier acknowledgements were queued, if any were.
	alice := mustDial(t, s, "alice", phoneOpt{clientID: "alice/phone"})
	alice.send("bob", "ctl-1", "")
	bob.waitFor(3)
	// alice, a member of g1, has w-1 first.
	if r := alice.waitFor(2)[1]; r.Kind != "receipt" {
		t.Fatalf("alice got %+v: want the delivered receipt of ctl-1", r)
	}
	for _, u := range []string{"@system", "system", "weatherbot", "@weatherbot"} {
		if d, err := s.queue.Depth(u); err != nil || d != 0 {
			t.Fatalf("queue of %q: %d, %v: want no receipt for a server sender", u, d, err)
		}
	}
}

// TestServerAPIRefuses checks each refusal of the send call: its status
// and stable error code, and that nothing was stored.
func TestServerAPIRefuses(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *config.Config) { c.Limits.MaxMessageBytes = 1024 })
	send := makeKey(t, s, apikeys.ScopeSend)
	read := makeKey(t, s, apikeys.ScopeRead)
	revoked := makeKey(t, s, apikeys.ScopeSend)
	keys, err := s.keys.List()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if strings.Contains(revoked, k.ID) {
			if err := s.keys.Delete(k.ID); err != nil {
				t.Fatal(err)
			}
		}
	}
	many := make([]string, 1001)
	for i := range many {
		many[i] = "u" + strings.Repeat("x", i%5)
	}
	manyJSON, _ := json.Marshal(map[string]any{"to": many, "message": map[string]string{"id": "m"}})
	ok := `{"to":["bob"],"message":{"id":"m-1"}}`
	for _, c := range []struct {
		name, bearer, body string
		status             int
		code               string
	}{
		{"no key", "", ok, 401, "not_authorized"},
		{"user token", mint(t, "alice"), ok, 401, "not_authorized"},
		{"revoked key", revoked, ok, 401, "not_authorized"},
		{"wrong secret", send[:len(send)-2] + "xx", ok, 401, "not_authorized"},
		{"no send scope", read, ok, 403, "forbidden"},
		{"not JSON", send, `{"to":`, 400, "bad_payload"},
		{"unknown field", send, `{"to":["bob"],"msg":{"id":"m"}}`, 400, "bad_payload"},
		{"no id", send, `{"to":["bob"],"message":{"text":"hi"}}`, 400, "bad_payload"},
		{"no recipient", send, `{"message":{"id":"m"}}`, 400, "bad_payload"},
		{"bad recipient", send, `{"to":["bob/phone"],"message":{"id":"m"}}`, 400, "bad_payload"},
		{"bad sender", send, `{"from":"@root","to":["bob"],"message":{"id":"m"}}`, 400, "bad_payload"},
		{"both", send, `{"to":["bob"],"group":"g","message":{"id":"m"}}`, 400, "bad_payload"},
		{"unknown group", send, `{"group":"nope","message":{"id":"m"}}`, 404, "unknown_group"},
		{"too many", send, string(manyJSON), 400, "bad_payload"},
		{"too large", send, `{"to":["bob"],"message":{"id":"m","pad":"` + strings.Repeat("x", 2000) + `"}}`, 413, "too_large"},
	} {
		t.Run(c.name, func(t *testing.T) {
			st, ans := serverCall(t, s, http.MethodPost, "/v1/server/messages", c.bearer, c.body)
			if st != c.status || ans["error"] != c.code || ans["reason"] == "" {
				t.Errorf("%d %v: want %d %s with a reason", st, ans, c.status, c.code)
			}
		})
	}
	if d, err := s.queue.Depth("bob"); err != nil || d != 0 {
		t.Errorf("bob's queue: %d, %v: want nothing stored", d, err)
	}
	// A key is no MQTT password.
	if _, err := dial(t, s, "bob", phoneOpt{password: send}); err == nil {
		t.Error("an API key connected over MQTT")
	}
	// The key file is in the data dir, without secrets.
	b, err := os.ReadFile(filepath.Join(s.cfg.DataDir, apikeys.FileName))
	if err != nil || bytes.Contains(b, []byte(send[len(send)-20:])) {
		t.Errorf("keys file: %v; it must not hold a key's secret", err)
	}
}

// TestClusterServerAPI sends over one node's server API to a user
// connected to another, with a key made on a third: keys are shared, and
// a key revoked on one node is refused on every node at once.
func TestClusterServerAPI(t *testing.T) {
	sink := newEventSink(t)
	nodes := startTestClusterWith(t, 3, sink.configure)
	key := makeKey(t, nodes[0], apikeys.ScopeSend)
	bob := mustDial(t, nodes[2], "bob", phoneOpt{})
	if ev := sink.waitFor(events.UserConnected, map[string]any{"user": "bob"}); ev.Node != "n3" {
		t.Errorf("bob's connect event from node %q, want n3", ev.Node)
	}
	st, ans := serverCall(t, nodes[1], http.MethodPost, "/v1/server/messages", key, `{"to":["bob","carol"],"message":{"id":"otp-1","text":"123456"}}`)
	if r := results(t, ans); st != http.StatusOK || r["bob"] != "stored" || r["carol"] != "stored" {
		t.Fatalf("send on node 2: %d %v", st, ans)
	}
	if e := bob.waitFor(1)[0]; e.From != "system" || !e.Server || innerID(t, e) != "otp-1" {
		t.Fatalf("bob on node 3 got %+v", e)
	}
	// One stored event per recipient, from the node that stored it.
	for _, u := range []string{"bob", "carol"} {
		if ev := sink.waitFor(events.MessageStored, map[string]any{"to": u, "id": "otp-1"}); ev.Node != "n2" {
			t.Errorf("stored event of otp-1 to %s from node %q, want n2", u, ev.Node)
		}
	}
	st, ans = serverCall(t, nodes[2], http.MethodPost, "/v1/server/messages", key, `{"to":["bob","carol"],"message":{"id":"otp-1","text":"123456"}}`)
	if r := results(t, ans); st != http.StatusOK || r["bob"] != "duplicate" || r["carol"] != "duplicate" {
		t.Fatalf("retry on node 3: %d %v: want duplicates", st, ans)
	}
	// Presence is the cluster's: bob, on node 3, is online for node 1.
	read := makeKey(t, nodes[0], apikeys.ScopeRead)
	testutil.EventuallyNoError(t, 10*time.Second, func() error {
		st, ans := serverCall(t, nodes[0], http.MethodGet, "/v1/server/users/bob", read, "")
		devs, _ := ans["devices"].([]any)
		if st == http.StatusOK && ans["online"] == true && len(devs) == 1 && devs[0].(map[string]any)["online"] == true {
			return nil
		}
		return fmt.Errorf("%d %v", st, ans)
	}, "bob as node 1 sees him")
	if st, ans := serverCall(t, nodes[1], http.MethodGet, "/v1/server/info", read, ""); st != http.StatusOK || ans["cluster"] != true || ans["node"] != "n2" {
		t.Errorf("info of node 2: %d %v", st, ans)
	}

	// Moderation holds on every node: bob, on node 3, is banned on node
	// 1, disconnected, and refused on node 2; unbanned on node 2, he
	// connects to node 3 again.
	mod := makeKey(t, nodes[1], apikeys.ScopeModerate)
	if st, ans := serverCall(t, nodes[0], http.MethodPut, "/v1/server/bans/bob", mod, `{"reason":"spam"}`); st != http.StatusOK {
		t.Fatalf("ban on node 1: %d %v", st, ans)
	}
	waitClosed(t, bob)
	for _, n := range nodes[1:] {
		testutil.Eventually(t, 10*time.Second, func() bool {
			p, err := dial(t, n, "bob", phoneOpt{clientID: "bob/phone"})
			if err == nil {
				p.client.Disconnect(0)
			}
			return err != nil
		}, "banned bob refused on %s", n.cfg.Cluster.Node)
	}
	if st, body := serverCallNoBody(t, nodes[1], http.MethodDelete, "/v1/server/bans/bob", mod, ""); st != http.StatusNoContent {
		t.Fatalf("unban on node 2: %d %s", st, body)
	}
	testutil.EventuallyNoError(t, 10*time.Second, func() error {
		p, err := dial(t, nodes[2], "bob", phoneOpt{clientID: "bob/phone"})
		if err == nil {
			p.client.Disconnect(0)
		}
		return err
	}, "unbanned bob connects to node 3")

	for _, n := range nodes {
		testutil.Eventually(t, 10*time.Second, func() bool { return n.events.Pending() == 0 }, "events sent")
	}
	if c := sink.count(events.MessageStored, map[string]any{"id": "otp-1"}); c != 2 {
		t.Errorf("%d stored events of otp-1, want 2: once per recipient, in the whole cluster", c)
	}
	keys, err := nodes[1].keys.List()
	if err != nil || len(keys) != 3 {
		t.Fatalf("keys on node 2: %v, %v", keys, err)
	}
	for _, k := range keys {
		if strings.Contains(key, k.ID) {
			if err := nodes[1].keys.Delete(k.ID); err != nil {
				t.Fatal(err)
			}
		}
	}
	for i, n := range nodes {
		if st, ans := serverCall(t, n, http.MethodPost, "/v1/server/messages", key, `{"to":["bob"],"message":{"id":"otp-2"}}`); st != http.StatusUnauthorized {
			t.Errorf("node %d after revoke: %d %v", i+1, st, ans)
		}
	}
}

// waitClosed polls until p's connection is closed.
func waitClosed(t *testing.T, p *phone) {
	t.Helper()
	testutil.Eventually(t, 10*time.Second, func() bool { return !p.client.IsConnectionOpen() }, "%s disconnected", p.user)
}

// TestServerAPIModerate disconnects a device (MQTT 5: DISCONNECT 0x98),
// bans a user, whose devices are disconnected and whose connects are
// refused across a restart, lifts the ban, and lets a timed ban run out.
func TestServerAPIModerate(t *testing.T) {
	dir := t.TempDir()
	var clk testClock
	s := startServerAt(t, dir, clk.Now, nil)
	mod := makeKey(t, s, apikeys.ScopeModerate)
	sendOnly := makeKey(t, s, apikeys.ScopeSend)
	if st, ans := serverCall(t, s, http.MethodPost, "/v1/server/disconnect", sendOnly, `{"user":"bob"}`); st != http.StatusForbidden {
		t.Fatalf("disconnect with a send key: %d %v", st, ans)
	}
	got, disc := make(chan string, 4), make(chan byte, 1)
	dialV5Watched(t, s, "bob", "bob/laptop", got, disc)
	phone := mustDial(t, s, "bob", phoneOpt{clientID: "bob/phone"})
	if st, _ := serverCallNoBody(t, s, http.MethodPost, "/v1/server/disconnect", mod, `{"client_id":"bob/laptop"}`); st != http.StatusNoContent {
		t.Fatalf("disconnect the laptop: %d", st)
	}
	select {
	case code := <-disc:
		if code != 0x98 {
			t.Errorf("laptop's DISCONNECT reason 0x%x, want 0x98", code)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("laptop not disconnected")
	}
	if !phone.client.IsConnectionOpen() {
		t.Fatal("the phone was disconnected with the laptop")
	}

	st, ans := serverCall(t, s, http.MethodPut, "/v1/server/bans/bob", mod, `{"reason":"spam"}`)
	if st != http.StatusOK || ans["user"] != "bob" || ans["reason"] != "spam" || ans["until"] != 0.0 {
		t.Fatalf("ban: %d %v", st, ans)
	}
	waitClosed(t, phone)
	if _, err := dial(t, s, "bob", phoneOpt{clientID: "bob/phone"}); err == nil {
		t.Fatal("banned bob connected")
	}
	stopServer(t, s)
	s = startServerAt(t, dir, clk.Now, nil)
	if _, err := dial(t, s, "bob", phoneOpt{clientID: "bob/phone"}); err == nil {
		t.Fatal("banned bob connected after a restart")
	}
	if st, ans := serverCall(t, s, http.MethodGet, "/v1/server/bans", mod, ""); st != http.StatusOK || len(ans["bans"].([]any)) != 1 {
		t.Fatalf("list: %d %v", st, ans)
	}
	if st, _ := serverCallNoBody(t, s, http.MethodDelete, "/v1/server/bans/bob", mod, ""); st != http.StatusNoContent {
		t.Fatalf("unban: %d", st)
	}
	mustDial(t, s, "bob", phoneOpt{clientID: "bob/phone"})
	if st, ans := serverCall(t, s, http.MethodDelete, "/v1/server/bans/bob", mod, ""); st != http.StatusNotFound || ans["error"] != "unknown_ban" {
		t.Fatalf("second unban: %d %v", st, ans)
	}

	// A timed ban ends by itself.
	if st, ans := serverCall(t, s, http.MethodPut, "/v1/server/bans/carol", mod, `{"duration_s":3600}`); st != http.StatusOK {
		t.Fatalf("timed ban: %d %v", st, ans)
	}
	if _, err := dial(t, s, "carol", phoneOpt{}); err == nil {
		t.Fatal("banned carol connected")
	}
	clk.Advance(time.Hour)
	mustDial(t, s, "carol", phoneOpt{})

	for _, c := range []struct{ method, path, body string }{
		{http.MethodPost, "/v1/server/disconnect", `{}`},
		{http.MethodPost, "/v1/server/disconnect", `{"client_id":"bob//x"}`},
		{http.MethodPost, "/v1/server/disconnect", `{"user":"bob","client_id":"bob"}`},
		{http.MethodPut, "/v1/server/bans/bo%20b", `{}`},
		{http.MethodPut, "/v1/server/bans/bob", `{"duration_s":-1}`},
		{http.MethodPut, "/v1/server/bans/bob", `{"until":5}`},
	} {
		if st, ans := serverCall(t, s, c.method, c.path, mod, c.body); st != http.StatusBadRequest || ans["error"] != "bad_payload" {
			t.Errorf("%s %s %s: %d %v, want 400 bad_payload", c.method, c.path, c.body, st, ans)
		}
	}
}

// serverCallNoBody is serverCall for an answer that may have no body.
func serverCallNoBody(t *testing.T, s *Server, method, path, bearer, body string) (int, string) {
	t.Helper()
	st, b := bearerCall(t, s, method, path, bearer, body)
	return st, string(b)
}

// TestServerAPISendQueueFull: a recipient whose queue is full is named
// queue_full in its result, the others are stored; when all are full the
// call stores nothing and a retry with the same id, once there is room,
// is stored, not a duplicate.
func TestServerAPISendQueueFull(t *testing.T) {
	s := startServer(t, t.TempDir(), errorTestConfig)
	fillQueue(t, s) // user "full" is at its cap
	key := makeKey(t, s, apikeys.ScopeSend)
	st, ans := serverCall(t, s, http.MethodPost, "/v1/server/messages", key, `{"to":["bob","full"],"message":{"id":"n-1"}}`)
	if r := results(t, ans); st != http.StatusOK || r["bob"] != "stored" || r["full"] != "queue_full" {
		t.Fatalf("send: %d %v: want bob stored, full queue_full", st, ans)
	}
	st, ans = serverCall(t, s, http.MethodPost, "/v1/server/messages", key, `{"to":["full"],"message":{"id":"n-2"}}`)
	if r := results(t, ans); st != http.StatusOK || r["full"] != "queue_full" {
		t.Fatalf("send to the full queue alone: %d %v", st, ans)
	}
	if d, err := s.queue.Depth("full"); err != nil || d != 2 {
		t.Fatalf("full's queue: %d, %v: want the 2 fillers only", d, err)
	}
	// Room again: full's phone takes its two messages.
	full := mustDial(t, s, "full", phoneOpt{})
	full.waitFor(2)
	testutil.Eventually(t, 10*time.Second, func() bool {
		d, err := s.queue.Depth("full")
		return err == nil && d == 0
	}, "full's queue emptied")
	st, ans = serverCall(t, s, http.MethodPost, "/v1/server/messages", key, `{"to":["full"],"message":{"id":"n-2"}}`)
	if r := results(t, ans); st != http.StatusOK || r["full"] != "stored" {
		t.Fatalf("retry once there is room: %d %v: want stored", st, ans)
	}
}

// TestServerAPIQuery asks for presence, a user's devices and queue, and
// the node's info, with a key of the read scope.
func TestServerAPIQuery(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	read := makeKey(t, s, apikeys.ScopeRead)
	send := makeKey(t, s, apikeys.ScopeSend)
	alice := mustDial(t, s, "alice", phoneOpt{clientID: "alice/phone"})
	for _, id := range []string{"q-1", "q-2"} {
		alice.send("carol", id, "")
	}
	if st, ans := serverCall(t, s, http.MethodPost, "/v1/server/presence", send, `{"users":["alice"]}`); st != http.StatusForbidden {
		t.Fatalf("presence with a send key: %d %v", st, ans)
	}
	st, ans := serverCall(t, s, http.MethodPost, "/v1/server/presence", read, `{"users":["alice","bob"]}`)
	users, _ := ans["users"].([]any)
	if st != http.StatusOK || len(users) != 2 {
		t.Fatalf("presence: %d %v", st, ans)
	}
	a, b := users[0].(map[string]any), users[1].(map[string]any)
	if a["user"] != "alice" || a["online"] != true || b["user"] != "bob" || b["online"] != false || b["last_seen"] != 0.0 {
		t.Errorf("presence %v: want alice online, bob never seen", users)
	}
	if st, g := httpJSON(t, s, http.MethodPost, "/v1/groups", "alice", map[string]any{"id": "family", "members": []string{"bob"}}); st != http.StatusCreated {
		t.Fatalf("create group: %d %v", st, g)
	}
	st, ans = serverCall(t, s, http.MethodGet, "/v1/server/users/alice", read, "")
	devs, _ := ans["devices"].([]any)
	groups, _ := ans["groups"].([]any)
	if st != http.StatusOK || ans["online"] != true || len(devs) != 1 || devs[0].(map[string]any)["client_id"] != "alice/phone" ||
		len(groups) != 1 || groups[0] != "family" {
		t.Fatalf("alice: %d %v", st, ans)
	}
	// Both publishes were PUBACKed, so stored: carol's queue holds them.
	st, ans = serverCall(t, s, http.MethodGet, "/v1/server/users/carol", read, "")
	if st != http.StatusOK || ans["queued"] != 2.0 {
		t.Fatalf("carol: %d %v: want 2 queued", st, ans)
	}
	if d, _ := ans["devices"].([]any); ans["online"] != false || len(d) != 0 {
		t.Errorf("carol %v: want offline, no devices", ans)
	}
	alice.client.Disconnect(50)
	testutil.EventuallyNoError(t, 10*time.Second, func() error {
		_, ans := serverCall(t, s, http.MethodPost, "/v1/server/presence", read, `{"users":["alice"]}`)
		u := ans["users"].([]any)[0].(map[string]any)
		if u["online"] == false && u["last_seen"].(float64) > 0 {
			return nil
		}
		return fmt.Errorf("%v", u)
	}, "alice offline, last seen")
	st, ans = serverCall(t, s, http.MethodGet, "/v1/server/info", read, "")
	if st != http.StatusOK || ans["cluster"] != false || ans["version"] == "" || ans["started"].(float64) <= 0 {
		t.Errorf("info: %d %v", st, ans)
	}
	for _, c := range []struct{ method, path, body string }{
		{http.MethodPost, "/v1/server/presence", `{"users":[]}`},
		{http.MethodPost, "/v1/server/presence", `{"users":["a/b"]}`},
		{http.MethodGet, "/v1/server/users/a%2Fb", ""},
	} {
		if st, ans := serverCall(t, s, c.method, c.path, read, c.body); st != http.StatusBadRequest || ans["error"] != "bad_payload" {
			t.Errorf("%s %s %s: %d %v, want 400 bad_payload", c.method, c.path, c.body, st, ans)
		}
	}
}
