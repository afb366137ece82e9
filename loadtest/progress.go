package loadtest

import (
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"
)

// Status is the live state of a run, reported about once a second.
type Status struct {
	// Scenario is the scenario running.
	Scenario string
	// Phase is what the run is doing: connect, send, grace...
	Phase string
	// Elapsed is the time since the run started.
	Elapsed time.Duration
	// Sent is the messages sent so far.
	Sent int64
	// Delivered is the messages delivered at least once so far.
	Delivered int64
	// Rate is first deliveries per second over the last interval.
	Rate float64
	// P99Ms is the send->deliver p99 so far.
	P99Ms float64
	// Errors is the errors so far.
	Errors int64
	// Connected is the live client connections.
	Connected int64
	// Run names the run (its run tag), for exporters.
	Run string
	// Point is the interval that just ended, as the report's series has it.
	Point Point
	// Counts is the accounting so far (lost and in flight are only known at the end).
	Counts Counts
}

// String renders the status as one line.
func (s Status) String() string {
	return fmt.Sprintf("%-7s %6.1fs sent=%d delivered=%d rate=%.0f/s p99=%.1fms conns=%d errors=%d",
		s.Phase, s.Elapsed.Seconds(), s.Sent, s.Delivered, s.Rate, s.P99Ms, s.Connected, s.Errors)
}

// Progress receives the live status of a run.
type Progress interface {
	// Update shows the latest status.
	Update(Status)
	// Done ends the display and returns the first error writing it.
	Done() error
}

// NewProgress returns a Progress writing to w: a progress bar over the
// expected run time when w is a terminal, plain lines otherwise (logs, CI).
func NewProgress(w io.Writer, terminal bool, expected time.Duration) Progress {
	if !terminal {
		return &lineProgress{w: w}
	}
	bar := progressbar.NewOptions64(expected.Milliseconds(),
		progressbar.OptionSetWriter(w),
		progressbar.OptionSetWidth(20),
		progressbar.OptionShowDescriptionAtLineEnd(),
		progressbar.OptionSetPredictTime(false),
		progressbar.OptionSetElapsedTime(false),
		progressbar.OptionClearOnFinish(),
	)
	return &barProgress{bar: bar, max: expected.Milliseconds()}
}

// lineProgress prints one line per update.
type lineProgress struct {
	mu  sync.Mutex
	w   io.Writer
	err error
}

// Update prints the status as a new line.
func (p *lineProgress) Update(s Status) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, err := fmt.Fprintln(p.w, s.String()); err != nil && p.err == nil {
		p.err = fmt.Errorf("progress: %w", err)
	}
}

// Done returns the first write error.
func (p *lineProgress) Done() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// barProgress redraws a progress bar in place.
type barProgress struct {
	mu  sync.Mutex
	bar *progressbar.ProgressBar
	max int64
	err error
}

// Update redraws the bar with the status as its description.
func (p *barProgress) Update(s Status) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.bar.Describe(s.String())
	// A run outlives its expected time during connect and grace; keep the
	// bar just short of full so that it does not finish early.
	if err := p.bar.Set64(min(s.Elapsed.Milliseconds(), p.max-1)); err != nil && p.err == nil {
		p.err = fmt.Errorf("progress: %w", err)
	}
}

// Done clears the bar and returns the first write error.
func (p *barProgress) Done() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.bar.Finish(); err != nil && p.err == nil {
		p.err = fmt.Errorf("progress: %w", err)
	}
	return p.err
}
