package jsqueue

import (
	"testing"
	"time"
)

// TestOrder: copies to a user are published at once while the ones before
// them are answered in time; once one is unanswered for suspectAfter,
// later copies are held and published one at a time, each once every
// copy before it is answered, until none is held. Other users are not
// held.
func TestOrder(t *testing.T) {
	t0 := time.Unix(1_000_000, 0)
	o := order{users: make(map[string]*userOrder)}
	p := func(user string) *pub { return &pub{user: user} }
	admit := func(c *pub, at time.Duration, want bool) {
		t.Helper()
		if got := o.admit(c, t0.Add(at)); got != want {
			t.Fatalf("admit %s at %v: %v, want %v", c.user, at, got, want)
		}
	}
	done := func(c *pub, at time.Duration, want *pub) {
		t.Helper()
		if got := o.done(c, t0.Add(at)); got != want {
			t.Fatalf("done at %v released %p, want %p", at, got, want)
		}
	}
	a1, a2, a3, a4, a5, b1 := p("a"), p("a"), p("a"), p("a"), p("a"), p("b")
	// Healthy: pipelined.
	admit(a1, 0, true)
	admit(a2, time.Millisecond, true)
	done(a1, 10*time.Millisecond, nil)
	// a2 is stuck past suspectAfter: a3 and a4 are held, b is not.
	admit(a3, suspectAfter+2*time.Millisecond, false)
	admit(a4, suspectAfter+3*time.Millisecond, false)
	admit(b1, suspectAfter+3*time.Millisecond, true)
	if !a3.held || !a4.held || b1.held {
		t.Fatal("held flags wrong")
	}
	// a2 answered at last: a3 goes, alone; a5 queues behind a4.
	done(a2, 3*time.Second, a3)
	admit(a5, 3*time.Second, false)
	done(a3, 3*time.Second+10*time.Millisecond, a4)
	done(a4, 3*time.Second+20*time.Millisecond, a5)
	done(a5, 3*time.Second+30*time.Millisecond, nil)
	if _, ok := o.users["a"]; ok {
		t.Fatal("a is still tracked with nothing in flight")
	}
	done(b1, 4*time.Second, nil)
	if len(o.users) != 0 {
		t.Fatalf("users left: %v", o.users)
	}
}
