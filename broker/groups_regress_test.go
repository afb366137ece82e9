package broker

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/chatd/chatd/broker/service/groups"
	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/testutil"
)

// TestGroupNonMemberLearnsNothing checks that a user outside a group gets
// the same answer as for a group that does not exist, whatever it asks,
// and changes nothing: the group's members and admins are for its members.
func TestGroupNonMemberLearnsNothing(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	if st, body := httpJSON(t, s, "POST", "/v1/groups", "alice", map[string]any{"id": "g1", "members": []string{"bob"}}); st != 201 {
		t.Fatalf("create: %d %v", st, body)
	}
	requests := []struct{ method, path string }{
		{"GET", "/v1/groups/%s"},
		{"PUT", "/v1/groups/%s/members/dave"},
		{"PUT", "/v1/groups/%s/members/bob"},
		{"DELETE", "/v1/groups/%s/members/dave"},
		{"DELETE", "/v1/groups/%s/members/bob"},
		{"DELETE", "/v1/groups/%s/members/alice"},
	}
	for _, r := range requests {
		st, got := httpJSON(t, s, r.method, fmt.Sprintf(r.path, "g1"), "dave", nil)
		mst, missing := httpJSON(t, s, r.method, fmt.Sprintf(r.path, "nope"), "dave", nil)
		reason, _ := missing["reason"].(string)
		missing["reason"] = strings.ReplaceAll(reason, "nope", "g1")
		if st != 404 || got["error"] != "unknown_group" || mst != st || fmt.Sprint(got) != fmt.Sprint(missing) {
			t.Errorf("%s %s by a non-member: %d %v; for a missing group: %d %v", r.method, r.path, st, got, mst, missing)
		}
	}
	// A member who is not an admin knows the group exists: told no.
	if st, body := httpJSON(t, s, "PUT", "/v1/groups/g1/members/dave", "bob", nil); st != 403 || body["error"] != "not_authorized" {
		t.Errorf("non-admin member adds: %d %v", st, body)
	}
	if st, body := httpJSON(t, s, "GET", "/v1/groups/g1", "bob", nil); st != 200 || fmt.Sprint(body["members"]) != "[alice bob]" {
		t.Errorf("member reads: %d %v", st, body)
	}
	st, g := httpJSON(t, s, "GET", "/v1/groups/g1", "alice", nil)
	if st != 200 || fmt.Sprint(g["members"]) != "[alice bob]" || fmt.Sprint(g["admins"]) != "[alice]" {
		t.Fatalf("group after the non-member's requests: %d %v", st, g)
	}
}

// httpDo sends a request without a body as user and returns the status
// and the body, which may be empty.
func httpDo(t *testing.T, s *Server, method, path, user string) (int, string) {
	t.Helper()
	st, b := bearerCall(t, s, method, path, mint(t, user), "")
	return st, string(b)
}

// TestGroupDelete deletes a group over the API: only its admins may, it
// is unknown afterwards, publishes to it are refused, and its name is free.
func TestGroupDelete(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	if st, body := httpJSON(t, s, "POST", "/v1/groups", "alice", map[string]any{"id": "g1", "members": []string{"bob"}}); st != 201 {
		t.Fatalf("create: %d %v", st, body)
	}
	alice := mustDial(t, s, "alice", phoneOpt{})
	bob := mustDial(t, s, "bob", phoneOpt{})
	alice.publish("group/g1", []byte(`{"id":"before"}`))
	if id := innerID(t, bob.waitFor(1)[0]); id != "before" {
		t.Fatalf("bob got %s", id)
	}

	st, got := httpJSON(t, s, "DELETE", "/v1/groups/g1", "dave", nil)
	_, missing := httpJSON(t, s, "DELETE", "/v1/groups/nope", "dave", nil)
	missing["reason"] = strings.ReplaceAll(fmt.Sprint(missing["reason"]), "nope", "g1")
	if st != 404 || got["error"] != "unknown_group" || fmt.Sprint(got) != fmt.Sprint(missing) {
		t.Errorf("non-member deletes: %d %v; a missing group: %v", st, got, missing)
	}
	if st, body := httpJSON(t, s, "DELETE", "/v1/groups/g1", "bob", nil); st != 403 || body["error"] != "not_authorized" {
		t.Errorf("member deletes: %d %v", st, body)
	}
	if st, body := httpDo(t, s, "DELETE", "/v1/groups/g1", "alice"); st != 204 || body != "" {
		t.Fatalf("admin deletes: %d %q", st, body)
	}
	for _, user := range []string{"alice", "bob"} {
		if st, body := httpJSON(t, s, "GET", "/v1/groups/g1", user, nil); st != 404 || body["error"] != "unknown_group" {
			t.Errorf("%s reads the deleted group: %d %v", user, st, body)
		}
	}
	if st, body := httpJSON(t, s, "DELETE", "/v1/groups/g1", "alice", nil); st != 404 || body["error"] != "unknown_group" {
		t.Errorf("deleting again: %d %v", st, body)
	}

	alice.publish("group/g1", []byte(`{"id":"after"}`))
	testutil.EventuallyNoError(t, 10*time.Second, func() error {
		evs := alice.events()
		for _, e := range evs {
			if e["kind"] == "error" && e["ref"] == "after" && e["code"] == "unknown_group" {
				return nil
			}
		}
		return fmt.Errorf("alice's events: %v", evs)
	}, "no unknown_group for the publish to a deleted group")
	if h, _ := s.queue.Head("bob"); h != 1 {
		t.Fatalf("bob's queue head %d after a publish to the deleted group, want 1", h)
	}
	if st, body := httpJSON(t, s, "POST", "/v1/groups", "bob", map[string]any{"id": "g1"}); st != 201 || body["creator"] != "bob" {
		t.Fatalf("create the deleted group's name again: %d %v", st, body)
	}
}

// TestGroupCreationCap makes groups up to the per-user cap: one more is
// refused, also after a restart, until one of them is deleted.
func TestGroupCreationCap(t *testing.T) {
	dir := t.TempDir()
	const limit = 5
	small := func(c *config.Config) { c.Groups.MaxPerUser = limit }
	s := startServer(t, dir, small)
	create := func(s *Server, user, gid string) (int, map[string]any) {
		return httpJSON(t, s, "POST", "/v1/groups", user, map[string]any{"id": gid})
	}
	for i := range limit {
		if st, body := create(s, "alice", fmt.Sprintf("a%04d", i)); st != 201 {
			t.Fatalf("group %d: %d %v", i, st, body)
		}
	}
	if st, body := create(s, "alice", "one-more"); st != 422 || body["error"] != "too_many_groups" {
		t.Fatalf("group past the cap: %d %v", st, body)
	}
	if st, body := create(s, "bob", "b0"); st != 201 {
		t.Fatalf("another user's group: %d %v", st, body)
	}
	stopServer(t, s)

	s = startServer(t, dir, small)
	if st, body := create(s, "alice", "one-more"); st != 422 || body["error"] != "too_many_groups" {
		t.Fatalf("group past the cap after a restart: %d %v", st, body)
	}
	if st, body := httpDo(t, s, "DELETE", "/v1/groups/a0000", "alice"); st != 204 {
		t.Fatalf("delete: %d %s", st, body)
	}
	if st, body := create(s, "alice", "one-more"); st != 201 {
		t.Fatalf("group in the slot a deletion freed: %d %v", st, body)
	}
	if st, body := create(s, "alice", "two-more"); st != 422 || body["error"] != "too_many_groups" {
		t.Fatalf("group past the cap again: %d %v", st, body)
	}
}

// TestGroupDefaultsMatchConfig keeps the groups package's defaults, which
// apply until the server passes its own, in step with the configuration's.
func TestGroupDefaultsMatchConfig(t *testing.T) {
	d := config.Default().Groups
	if d.MaxPerUser != groups.DefaultMaxPerUser || d.CacheMembers != groups.DefaultCacheMembers {
		t.Fatalf("config groups %+v, package defaults %d per user and %d cached members", d, groups.DefaultMaxPerUser, groups.DefaultCacheMembers)
	}
}
