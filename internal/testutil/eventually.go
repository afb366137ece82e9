// Package testutil holds helpers shared by the tests of several packages.
package testutil

import (
	"errors"
	"fmt"
	"testing"
	"time"
)

// Backoff bounds: the first retry comes soon, so a condition that holds
// almost at once costs little, and the wait between tries stops growing
// at maxPause, so one that holds late is seen soon after.
const (
	firstPause = time.Millisecond
	maxPause   = 20 * time.Millisecond
)

// errNotYet is what Eventually's condition reports while it is false.
var errNotYet = errors.New("condition still false")

// Poll calls try until it returns nil and returns nil then; once deadline
// has passed without success it returns try's last error. try is called
// at least once, and once more at the deadline. Poll does not touch a
// testing.TB, so a goroutine other than the test's may call it.
func Poll(deadline time.Duration, try func() error) error {
	end := time.Now().Add(deadline)
	pause := firstPause
	for {
		err := try()
		if err == nil {
			return nil
		}
		left := time.Until(end)
		if left <= 0 {
			return fmt.Errorf("still failing after %v: %w", deadline, err)
		}
		time.Sleep(min(pause, left))
		pause = min(2*pause, maxPause)
	}
}

// Eventually fails t with the message what, formatted with args, unless
// cond returns true within deadline. Call it from the test's goroutine.
func Eventually(t testing.TB, deadline time.Duration, cond func() bool, what string, args ...any) {
	t.Helper()
	err := Poll(deadline, func() error {
		if cond() {
			return nil
		}
		return errNotYet
	})
	if err != nil {
		t.Fatalf("%s: not true after %v", fmt.Sprintf(what, args...), deadline)
	}
}

// EventuallyNoError fails t with the message what, formatted with args,
// and try's last error, unless try returns nil within deadline. Call it
// from the test's goroutine.
func EventuallyNoError(t testing.TB, deadline time.Duration, try func() error, what string, args ...any) {
	t.Helper()
	if err := Poll(deadline, try); err != nil {
		t.Fatalf("%s: %v", fmt.Sprintf(what, args...), err)
	}
}
