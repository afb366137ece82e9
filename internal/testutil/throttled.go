package testutil

import (
	"io"
	"time"
)

// Throttled is a slow but steady reader: it reads at most Size bytes per
// call, each after Pause. Write-timeout tests read with it to show that
// a client taking its time is served.
type Throttled struct {
	R     io.Reader
	Size  int
	Pause time.Duration
}

// Read reads up to Size bytes into p after Pause.
func (t Throttled) Read(p []byte) (int, error) {
	time.Sleep(t.Pause)
	return t.R.Read(p[:min(len(p), t.Size)])
}
