package broker

import (
	"bytes"
	"encoding/json"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/chatd/chatd/broker/service/apikeys"
	"github.com/chatd/chatd/broker/service/serverapi"
	"github.com/chatd/chatd/internal/testutil"
)

// upload stores a file for user over the media API and returns its id.
func upload(t *testing.T, s *Server, user string, body []byte) string {
	t.Helper()
	h := http.Header{}
	h.Set("Authorization", "Bearer "+mint(t, user))
	h.Set("Content-Type", "image/jpeg")
	resp, b := httpCall(t, nil, s, http.MethodPost, "/v1/media", h, bytes.NewReader(body))
	var up struct{ ID string }
	if resp.StatusCode != http.StatusCreated || json.Unmarshal(b, &up) != nil {
		t.Fatalf("upload: %d %s", resp.StatusCode, b)
	}
	return up.ID
}

// export fetches what the server stores about user.
func export(t *testing.T, s *Server, key, user string) serverapi.Export {
	t.Helper()
	st, b := bearerCall(t, s, http.MethodGet, "/v1/server/users/"+user+"/export", key, "")
	var ex serverapi.Export
	if st != http.StatusOK {
		t.Fatalf("export %s: %d %s", user, st, b)
	}
	if err := json.Unmarshal(b, &ex); err != nil {
		t.Fatalf("export %s: %v: %s", user, err, b)
	}
	return ex
}

// eraseUser erases user and returns the answer.
func eraseUser(t *testing.T, s *Server, key, user string) serverapi.ErasedAnswer {
	t.Helper()
	st, b := bearerCall(t, s, http.MethodDelete, "/v1/server/users/"+user, key, "")
	var ans serverapi.ErasedAnswer
	if st != http.StatusOK || json.Unmarshal(b, &ans) != nil {
		t.Fatalf("erase %s: %d %s", user, st, b)
	}
	slices.Sort(ans.Devices)
	return ans
}

// TestEraseAndExport: a user's export holds its presence, devices,
// groups, uploads, ban and queue; erasing it closes its connection and
// forgets all of it (the groups it made are deleted, the others left),
// across a restart, while the message it sent stays its recipient's; it
// comes back as a new user.
func TestEraseAndExport(t *testing.T) {
	dir := t.TempDir()
	s := startServer(t, dir, nil)
	key := makeKey(t, s, apikeys.ScopeErase)
	reader := makeKey(t, s, apikeys.ScopeRead)
	if st, _ := bearerCall(t, s, http.MethodDelete, "/v1/server/users/bob", reader, ""); st != http.StatusForbidden {
		t.Fatalf("erase with a read key: %d, want 403", st)
	}

	laptop := mustDial(t, s, "bob", phoneOpt{clientID: "bob/laptop"})
	laptop.client.Disconnect(100)
	phone := mustDial(t, s, "bob", phoneOpt{clientID: "bob/phone", manualAck: true})
	alice := mustDial(t, s, "alice", phoneOpt{})
	alice.send("bob", "m-1", `,"text":"hi bob"`)
	phone.waitFor(1) // held unacknowledged: it stays queued
	phone.send("alice", "b-1", `,"text":"hi alice"`)
	alice.waitFor(1)
	if st, _ := httpJSON(t, s, http.MethodPost, "/v1/groups", "bob", map[string]any{"id": "bobs", "members": []string{"alice"}}); st != http.StatusCreated {
		t.Fatalf("create bobs: %d", st)
	}
	if st, _ := httpJSON(t, s, http.MethodPost, "/v1/groups", "alice", map[string]any{"id": "alices", "members": []string{"bob"}}); st != http.StatusCreated {
		t.Fatalf("create alices: %d", st)
	}
	photo := upload(t, s, "bob", []byte("bob's photo"))
	upload(t, s, "alice", []byte("alice's photo"))
	mod := makeKey(t, s, apikeys.ScopeModerate)
	if st, b := bearerCall(t, s, http.MethodPut, "/v1/server/bans/bob", mod, `{"reason":"spam","duration_s":3600}`); st != http.StatusOK {
		t.Fatalf("ban: %d %s", st, b)
	}
	waitClosed(t, phone)
	if st, _ := bearerCall(t, s, http.MethodDelete, "/v1/server/bans/bob", mod, ""); st != http.StatusNoContent {
		t.Fatalf("unban: %d", st)
	}
	phone = mustDial(t, s, "bob", phoneOpt{clientID: "bob/phone", manualAck: true})
	phone.waitFor(1)

	ex := export(t, s, key, "bob")
	if !ex.Online || len(ex.Devices) != 2 || len(ex.Media) != 1 || ex.Media[0].ID != photo || ex.Ban != nil {
		t.Fatalf("export: %+v", ex)
	}
	roles := map[string]serverapi.GroupRole{}
	for _, g := range ex.Groups {
		roles[g.ID] = g
	}
	if len(roles) != 2 || !roles["bobs"].Admin || !roles["bobs"].Creator || roles["alices"].Admin {
		t.Fatalf("export's groups: %+v", ex.Groups)
	}
	var texts []string
	for _, q := range ex.Queue {
		var e struct {
			Kind string
			Msg  struct{ Text string }
		}
		if err := json.Unmarshal(q.Envelope, &e); err != nil {
			t.Fatal(err)
		}
		texts = append(texts, e.Kind+":"+e.Msg.Text)
	}
	if !slices.Contains(texts, "msg:hi bob") {
		t.Fatalf("export's queue %v: want alice's message", texts)
	}

	ans := eraseUser(t, s, key, "bob")
	want := serverapi.ErasedAnswer{User: "bob", Devices: []string{"bob/laptop", "bob/phone"},
		GroupsLeft: []string{"alices"}, GroupsDeleted: []string{"bobs"}, MediaDeleted: 1}
	if !equalJSON(t, ans, want) {
		t.Fatalf("erase answered %+v, want %+v", ans, want)
	}
	waitClosed(t, phone)
	check := func(s *Server) {
		t.Helper()
		ex := export(t, s, key, "bob")
		if ex.Online || ex.LastSeen != 0 || len(ex.Devices) != 0 || len(ex.Groups) != 0 || len(ex.Media) != 0 || len(ex.Queue) != 0 {
			t.Fatalf("after the erase: %+v", ex)
		}
		if st, _ := httpDo(t, s, http.MethodGet, "/v1/media/"+photo, "alice"); st != http.StatusNotFound {
			t.Fatalf("bob's photo after the erase: %d", st)
		}
		if st, _ := httpDo(t, s, http.MethodGet, "/v1/groups/bobs", "alice"); st != http.StatusNotFound {
			t.Fatalf("the group bob made, after the erase: %d", st)
		}
		if ex := export(t, s, key, "alice"); len(ex.Queue) != 0 || len(ex.Media) != 1 {
			t.Fatalf("alice after bob's erase: %+v", ex)
		}
	}
	// The erase reaches what the closing connections would have stored.
	testutil.Eventually(t, 10*time.Second, func() bool {
		_, seen, err := s.presence.State("bob")
		return err == nil && seen == 0
	}, "bob's last seen stays forgotten")
	check(s)
	alice.client.Disconnect(100)
	stopServer(t, s)

	s = startServer(t, dir, nil)
	check(s)
	alice = mustDial(t, s, "alice", phoneOpt{})
	alice.send("bob", "m-2", `,"text":"still there?"`)
	back := mustDial(t, s, "bob", phoneOpt{clientID: "bob/new"})
	got := back.waitFor(1)
	if innerID(t, got[0]) != "m-2" {
		t.Fatalf("bob, back, got %+v first: want m-2 alone", got)
	}
}

// equalJSON compares a and b as their JSON.
func equalJSON(t *testing.T, a, b any) bool {
	t.Helper()
	ja, err := json.Marshal(a)
	if err != nil {
		t.Fatal(err)
	}
	jb, err := json.Marshal(b)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.Equal(ja, jb)
}

// TestClusterErase: an erase on one node ends the user's connection on
// another and forgets it everywhere.
func TestClusterErase(t *testing.T) {
	nodes := startTestCluster(t, 3)
	key := makeKey(t, nodes[0], apikeys.ScopeErase)
	phone := mustDial(t, nodes[1], "bob", phoneOpt{clientID: "bob/phone", manualAck: true})
	alice := mustDial(t, nodes[2], "alice", phoneOpt{})
	alice.send("bob", "m-1", `,"text":"hi"`)
	phone.waitFor(1)
	ans := eraseUser(t, nodes[0], key, "bob")
	if !slices.Equal(ans.Devices, []string{"bob/phone"}) {
		t.Fatalf("erase answered %+v", ans)
	}
	waitClosed(t, phone)
	for _, n := range nodes {
		testutil.Eventually(t, 10*time.Second, func() bool {
			_, seen, err := n.presence.State("bob")
			return err == nil && seen == 0
		}, "bob's last seen forgotten on %s", n.cfg.Cluster.Node)
	}
	if ex := export(t, nodes[2], key, "bob"); len(ex.Devices) != 0 || len(ex.Queue) != 0 {
		t.Fatalf("after the erase, node 3 exports %+v", ex)
	}
}
