package mochi

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain checks that closed listeners and servers leave no goroutine behind.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
