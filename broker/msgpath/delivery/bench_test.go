package delivery

import (
	"fmt"
	"io"
	"log/slog"
	"sort"
	"sync/atomic"
	"testing"

	"github.com/chatd/chatd/broker/queue"
)

// benchSource serves a prepared run of messages, of which the first
// committed are stored; unlike fakeSource it costs next to nothing.
type benchSource struct {
	msgs      []queue.Message
	committed atomic.Int64
}

func (s *benchSource) Read(user string, after uint64, n int) ([]queue.Message, error) {
	stored := s.msgs[:s.committed.Load()]
	i := sort.Search(len(stored), func(i int) bool { return stored[i].Seq > after })
	return append([]queue.Message(nil), stored[i:min(len(stored), i+n)]...), nil
}

func (s *benchSource) Head(string) (uint64, error) {
	if n := s.committed.Load(); n > 0 {
		return s.msgs[n-1].Seq, nil
	}
	return 0, nil
}

func (s *benchSource) Ack(user, device string, cursor uint64) {}

// ackSink acknowledges every PUBLISH from its own goroutine, as a phone
// that keeps up would; its channel holds a window, so Publish never waits.
type ackSink struct {
	pids chan uint16
}

func (s *ackSink) Publish(pid uint16, topic string, payload []byte, dup bool) { s.pids <- pid }
func (s *ackSink) PublishQoS0(topic string, payload []byte)                   {}
func (s *ackSink) Flush(bool)                                                 {}

// benchMessages returns n messages whose sequences start at 1 and go up
// by step: 1 is a dense queue, more is a user sharing a JetStream stream.
func benchMessages(n, step int) []queue.Message {
	msgs := make([]queue.Message, n)
	for i := range msgs {
		seq := uint64(1 + i*step)
		msgs[i] = queue.Message{Seq: seq, Data: fmt.Append(nil, seq)}
	}
	return msgs
}

// runDevice starts a device that acknowledges what it is sent, calls
// store with a channel that receives once per acknowledgement, and waits
// for every message to be acknowledged.
func runDevice(b *testing.B, src *benchSource, d *Delivery, store func(acked <-chan struct{})) {
	const window = 64
	sink := &ackSink{pids: make(chan uint16, window)}
	dev, err := d.Start("bob", "phone", 0, window, sink)
	if err != nil {
		b.Fatal(err)
	}
	acked := make(chan struct{}, len(src.msgs))
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range src.msgs {
			d.Acked(dev, <-sink.pids)
			acked <- struct{}{}
		}
	}()
	store(acked)
	<-done
	b.StopTimer()
	d.Stop(dev)
	d.Close()
}

// commit stores src's message i and tells d.
func commit(src *benchSource, d *Delivery, i int) {
	src.committed.Store(int64(i + 1))
	d.Stored("bob", src.msgs[i])
}

// BenchmarkLive measures a device that keeps up with a stream of messages:
// each is committed, sent from the tail and acknowledged, many in flight.
// Reported per message.
func BenchmarkLive(b *testing.B) {
	for _, step := range []int{1, 5} {
		b.Run(fmt.Sprintf("step=%d", step), func(b *testing.B) {
			src := &benchSource{msgs: benchMessages(b.N, step)}
			d := New(Options{Source: src, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			b.ResetTimer()
			runDevice(b, src, d, func(<-chan struct{}) {
				for i := range src.msgs {
					commit(src, d, i)
				}
			})
		})
	}
}

// BenchmarkPingPong measures a chat's pace: each message is committed only
// once the previous one is acknowledged. Reported per message.
func BenchmarkPingPong(b *testing.B) {
	for _, step := range []int{1, 5} {
		b.Run(fmt.Sprintf("step=%d", step), func(b *testing.B) {
			src := &benchSource{msgs: benchMessages(b.N, step)}
			d := New(Options{Source: src, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			b.ResetTimer()
			runDevice(b, src, d, func(acked <-chan struct{}) {
				for i := range src.msgs {
					commit(src, d, i)
					<-acked
				}
			})
		})
	}
}

// BenchmarkBacklog measures a device draining a queue stored while it was
// offline: from disk reads only. Reported per message.
func BenchmarkBacklog(b *testing.B) {
	for _, step := range []int{1, 5} {
		b.Run(fmt.Sprintf("step=%d", step), func(b *testing.B) {
			src := &benchSource{msgs: benchMessages(b.N, step)}
			src.committed.Store(int64(b.N))
			d := New(Options{Source: src, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			b.ResetTimer()
			runDevice(b, src, d, func(<-chan struct{}) {})
		})
	}
}
