package media

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain checks that no test leaves a goroutine behind (janitor, HTTP servers).
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
