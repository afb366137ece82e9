package delivery

import (
	"testing"

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
