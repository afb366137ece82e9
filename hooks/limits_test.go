package hooks

import (
	"fmt"
	"testing"
	"time"
)

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

// TestSpentBudgetOutlivesLeave: a user whose budget is spent keeps it
// through giving its seat back, leaving, the sweep and joining again; once
// refilled, its state goes with its last departure.
func TestSpentBudgetOutlivesLeave(t *testing.T) {
	// A burst of one publish, refilled in 10 s: spent for the whole test.
	u := &Users{MaxConnections: 4, PublishRate: 0.1, PublishBytesRate: 1 << 20}
	if _, ok := u.reserve("bob", false); !ok {
		t.Fatal("reserve refused")
	}
	st := u.join("bob")
	if ok, _ := st.Spend(1, 1); !ok {
		t.Fatal("first publish refused")
	}
	u.release("bob")
	u.leave("bob")
	// Departures of others make the sweep run.
	for i := range sweepEvery {
		name := fmt.Sprintf("u%d", i)
		u.join(name)
		u.leave(name)
	}
	again := u.join("bob")
	if again != st {
		t.Fatal("a user who left with its budget spent came back with a fresh one")
	}
	if ok, _ := again.Spend(1, 1); ok {
		t.Fatal("publish past the burst accepted after leaving and joining again")
	}
	u.leave("bob")
	if n := u.size(); n != 1 {
		t.Fatalf("%d users kept, want only bob, whose budget is spent", n)
	}

	// A budget that refills in a millisecond is gone once refilled.
	fast := &Users{MaxConnections: 4, PublishRate: 1000, PublishBytesRate: 1 << 20}
	st = fast.join("bob")
	if ok, _ := st.Spend(1, 1); !ok {
		t.Fatal("first publish refused")
	}
	time.Sleep(10 * time.Millisecond)
	fast.leave("bob")
	if n := fast.size(); n != 0 {
		t.Fatalf("%d users kept after their budgets refilled", n)
	}
}
