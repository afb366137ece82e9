package testutil

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// fakeTB records a Fatalf and stops its goroutine, as testing.T does.
type fakeTB struct {
	testing.TB
	fatal string
}

func (f *fakeTB) Helper() {}

func (f *fakeTB) Fatalf(format string, args ...any) {
	f.fatal = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// onFake runs f with a fakeTB on a goroutine of its own, so that Fatalf
// may end it, and returns what Fatalf said, if anything.
func onFake(f func(tb testing.TB)) string {
	tb := &fakeTB{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		f(tb)
	}()
	<-done
	return tb.fatal
}

// trueAfter returns a condition false for its first n calls and the
// number of calls so far.
func trueAfter(n int64) (func() bool, *atomic.Int64) {
	var calls atomic.Int64
	return func() bool { return calls.Add(1) > n }, &calls
}

func TestPoll(t *testing.T) {
	boom := errors.New("boom")
	for _, tt := range []struct {
		name      string
		deadline  time.Duration
		failFirst int64 // try fails this many times, then succeeds
		wantErr   bool
		minCalls  int64
	}{
		{"true at once", time.Second, 0, false, 1},
		{"true on the fifth try", 10 * time.Second, 4, false, 5},
		{"never true", 50 * time.Millisecond, 1 << 40, true, 2},
		{"zero deadline still tries once", 0, 0, false, 1},
		{"zero deadline, false", 0, 1, true, 1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var calls atomic.Int64
			start := time.Now()
			err := Poll(tt.deadline, func() error {
				if calls.Add(1) <= tt.failFirst {
					return fmt.Errorf("try %d: %w", calls.Load(), boom)
				}
				return nil
			})
			took := time.Since(start)
			if (err != nil) != tt.wantErr {
				t.Fatalf("Poll = %v, want error %v", err, tt.wantErr)
			}
			if err != nil && !errors.Is(err, boom) {
				t.Errorf("Poll = %v, does not wrap the last error", err)
			}
			if n := calls.Load(); n < tt.minCalls {
				t.Errorf("try called %d times, want at least %d", n, tt.minCalls)
			}
			if tt.wantErr && took < tt.deadline {
				t.Errorf("gave up after %v, before the deadline %v", took, tt.deadline)
			}
			// Generous: the bound is the deadline plus one pause, but CI
			// machines stall.
			if took > tt.deadline+2*time.Second {
				t.Errorf("Poll took %v with a deadline of %v", took, tt.deadline)
			}
		})
	}
}

func TestPollChecksAtTheDeadline(t *testing.T) {
	// A condition that becomes true while the last pause is slept must
	// still be seen: Poll tries once more when the deadline has passed.
	const deadline = 30 * time.Millisecond
	start := time.Now()
	err := Poll(deadline, func() error {
		if time.Since(start) >= deadline {
			return nil
		}
		return errors.New("not yet")
	})
	if err != nil {
		t.Fatalf("Poll = %v, want the try at the deadline to succeed", err)
	}
}

func TestEventually(t *testing.T) {
	cond, calls := trueAfter(3)
	if msg := onFake(func(tb testing.TB) {
		Eventually(tb, 10*time.Second, cond, "never")
	}); msg != "" {
		t.Fatalf("Eventually failed: %q", msg)
	}
	if n := calls.Load(); n != 4 {
		t.Errorf("condition called %d times, want 4 (true on the fourth)", n)
	}

	msg := onFake(func(tb testing.TB) {
		Eventually(tb, 20*time.Millisecond, func() bool { return false }, "bob has %d messages", 3)
	})
	if !strings.Contains(msg, "bob has 3 messages") || !strings.Contains(msg, "20ms") {
		t.Errorf("failure message %q, want the formatted what and the deadline", msg)
	}
}

func TestEventuallyNoError(t *testing.T) {
	var calls atomic.Int64
	if msg := onFake(func(tb testing.TB) {
		EventuallyNoError(tb, 10*time.Second, func() error {
			if calls.Add(1) < 3 {
				return errors.New("not yet")
			}
			return nil
		}, "never")
	}); msg != "" {
		t.Fatalf("EventuallyNoError failed: %q", msg)
	}

	msg := onFake(func(tb testing.TB) {
		EventuallyNoError(tb, 20*time.Millisecond, func() error { return errors.New("leader not elected") }, "read %s", "x")
	})
	if !strings.Contains(msg, "read x") || !strings.Contains(msg, "leader not elected") {
		t.Errorf("failure message %q, want the formatted what and the last error", msg)
	}
}

// TestPollFromAnotherGoroutine is the use Poll is for: a goroutine the
// test started waits for a condition and reports back.
func TestPollFromAnotherGoroutine(t *testing.T) {
	var ready atomic.Bool
	errc := make(chan error, 1)
	go func() {
		errc <- Poll(10*time.Second, func() error {
			if !ready.Load() {
				return errors.New("not ready")
			}
			return nil
		})
	}()
	ready.Store(true)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}
