package delivery

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chatd/chatd/broker/queue"
)

// gatedSource is a fakeSource whose reads wait for gate to close.
type gatedSource struct {
	*fakeSource
	gate chan struct{}
}

func (s gatedSource) Read(user string, after uint64, n int) ([]queue.Message, error) {
	<-s.gate
	return s.fakeSource.Read(user, after, n)
}

// TestAcksBeyondAGapReachTheSourceAfterStop: a device acknowledges the
// last messages of a queue with gaps (JetStream) and disconnects while
// the read that lets its cursor pass the gap is in flight. Its cursor
// must still reach the Source, or the messages stay stored, acknowledged,
// until it connects again (the model-based test found them left behind).
func TestAcksBeyondAGapReachTheSourceAfterStop(t *testing.T) {
	src := gatedSource{newSource(), make(chan struct{})}
	d := newDelivery(src, 4)
	defer d.Close()
	sink := newSink()
	dev, err := d.Start("bob", "phone", 0, 64, sink)
	if err != nil {
		t.Fatal(err)
	}
	d.Stored("bob", src.store(3))
	d.Stored("bob", src.store(7))
	sink.waitFor(t, 2)
	d.Acked(dev, sink.pid(0))
	d.Acked(dev, sink.pid(1))
	if c := src.cursor("phone"); c != 0 {
		t.Fatalf("cursor %d passed the unverified gap before 3", c)
	}
	d.Stop(dev)
	close(src.gate)
	src.waitCursor(t, "phone", 7)
}

// countingSource is a fakeSource that records the most reads in flight.
type countingSource struct {
	*fakeSource
	gate       chan struct{}
	holding    atomic.Bool // reads wait for gate while set
	mu         sync.Mutex
	now, most  int
	readsStart chan struct{}
}

func (s *countingSource) Read(user string, after uint64, n int) ([]queue.Message, error) {
	s.mu.Lock()
	s.now++
	s.most = max(s.most, s.now)
	s.mu.Unlock()
	select {
	case s.readsStart <- struct{}{}:
	default:
	}
	if s.holding.Load() {
		<-s.gate
	}
	s.mu.Lock()
	s.now--
	s.mu.Unlock()
	return s.fakeSource.Read(user, after, n)
}

// TestResyncReadsAreBounded: a Resync of many fed users (the peers bus
// saw lost notices) reads their queues at most maxVerifyReads at a time,
// and still finds the message whose notice was lost for each of them.
func TestResyncReadsAreBounded(t *testing.T) {
	src := &countingSource{fakeSource: newSource(), gate: make(chan struct{}), readsStart: make(chan struct{}, 1)}
	d := newDelivery(src, 4)
	defer d.Close()
	const users = 3 * maxVerifyReads
	sinks := make([]*fakeSink, users)
	for i := range users {
		sinks[i] = newSink()
		if _, err := d.Start(fmt.Sprint("u", i), "phone", 0, 8, sinks[i]); err != nil {
			t.Fatal(err)
		}
	}
	src.holding.Store(true) // Resync's reads wait for the gate
	src.store(1)            // committed, its notice lost: only a read finds it
	d.Resync()
	deadline := time.After(10 * time.Second)
	for {
		src.mu.Lock()
		now := src.now
		src.mu.Unlock()
		if now == maxVerifyReads {
			break
		}
		select {
		case <-src.readsStart:
		case <-time.After(time.Millisecond):
		case <-deadline:
			t.Fatalf("%d reads in flight, want %d", now, maxVerifyReads)
		}
	}
	close(src.gate)
	for i := range users {
		sinks[i].waitFor(t, 1)
	}
	if src.most > maxVerifyReads {
		t.Fatalf("%d verify reads at once, want at most %d", src.most, maxVerifyReads)
	}
}
