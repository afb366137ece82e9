package broker

import (
	"fmt"
	"strings"
	"testing"
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
