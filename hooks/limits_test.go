package hooks

import "testing"

// TestReserveAndRelease: seats are refused at the cap except to a
// takeover, and a user's state goes once its seats are all given back.
func TestReserveAndRelease(t *testing.T) {
	u := &Users{MaxConnections: 2, PublishRate: 10, PublishBytesRate: 1 << 20}
	steps := []struct {
		takeover bool
		ok       bool
		before   int
	}{
		{false, true, 0},
		{false, true, 1},
		{false, false, 2},
		{true, true, 2},
		{false, false, 3},
	}
	for i, s := range steps {
		if n, ok := u.reserve("bob", s.takeover); ok != s.ok || n != s.before {
			t.Fatalf("step %d: reserve = %d, %v; want %d, %v", i, n, ok, s.before, s.ok)
		}
	}
	for range 3 {
		u.release("bob")
	}
	if n := u.Connections("bob"); n != 0 {
		t.Fatalf("%d seats left after releasing all", n)
	}
	if n := u.size(); n != 0 {
		t.Fatalf("%d users kept with no seat, no session and full budgets", n)
	}
}
