package delivery

import (
	"fmt"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/chatd/chatd/broker/queue"
)

// fakeSource is an in-memory queue: a map of stored sequences.
type fakeSource struct {
	mu    sync.Mutex
	msgs  map[uint64][]byte
	head  uint64
	acked map[string]uint64
	reads int
}

func newSource() *fakeSource {
	return &fakeSource{msgs: map[uint64][]byte{}, acked: map[string]uint64{}}
}

func (s *fakeSource) store(seq uint64) queue.Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := queue.Message{Seq: seq, Data: []byte(fmt.Sprint(seq))}
	s.msgs[seq] = m.Data
	s.head = max(s.head, seq)
	return m
}

func (s *fakeSource) Read(user string, after uint64, n int) ([]queue.Message, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reads++
	var out []queue.Message
	for seq := after + 1; seq <= s.head && len(out) < n; seq++ {
		if d, ok := s.msgs[seq]; ok {
			out = append(out, queue.Message{Seq: seq, Data: d})
		}
	}
	return out, nil
}

func (s *fakeSource) Head(string) (uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.head, nil
}

func (s *fakeSource) Ack(user, device string, cursor uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.acked[device] = max(s.acked[device], cursor)
}

// fakeSink records the packets a device was sent.
type fakeSink struct {
	mu   sync.Mutex
	pids []uint16
	seqs []string
	sig  chan struct{}
}

func newSink() *fakeSink { return &fakeSink{sig: make(chan struct{}, 1)} }

func (s *fakeSink) Publish(pid uint16, topic string, payload []byte, dup bool) {
	s.mu.Lock()
	s.pids = append(s.pids, pid)
	s.seqs = append(s.seqs, string(payload))
	s.mu.Unlock()
}

func (s *fakeSink) PublishQoS0(topic string, payload []byte) {
	s.mu.Lock()
	s.pids = append(s.pids, 0)
	s.seqs = append(s.seqs, "qos0:"+string(payload))
	s.mu.Unlock()
}

func (s *fakeSink) Flush(bool) {
	select {
	case s.sig <- struct{}{}:
	default:
	}
}

// waitFor waits until the sink has n packets and returns their payloads.
func (s *fakeSink) waitFor(t *testing.T, n int) []string {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		s.mu.Lock()
		if len(s.seqs) >= n {
			out := append([]string(nil), s.seqs...)
			s.mu.Unlock()
			return out
		}
		s.mu.Unlock()
		select {
		case <-s.sig:
		case <-time.After(5 * time.Millisecond):
		case <-deadline:
			t.Fatalf("sink has %d packets, want %d", len(s.seqs), n)
		}
	}
}

func (s *fakeSink) pid(i int) uint16 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pids[i]
}

func seqs(from, to uint64, skip ...uint64) []string {
	skipped := map[uint64]bool{}
	for _, s := range skip {
		skipped[s] = true
	}
	var out []string
	for i := from; i <= to; i++ {
		if !skipped[i] {
			out = append(out, fmt.Sprint(i))
		}
	}
	return out
}

func newDelivery(src Source, readAhead int) *Delivery {
	return New(Options{Source: src, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), TailMessages: 8, ReadAhead: readAhead})
}

func TestDelivery(t *testing.T) {
	cases := []struct {
		name      string
		stored    uint64   // messages 1..stored exist before the device starts
		gone      []uint64 // of those, expired or never stored
		cursor    uint64
		window    int
		readAhead int
		live      uint64 // messages stored after the start, fed from memory
		want      []string
	}{
		{"backlog in order", 20, nil, 0, 64, 4, 0, seqs(1, 20)},
		{"backlog after cursor", 20, nil, 12, 64, 4, 0, seqs(13, 20)},
		{"gaps from expiry are skipped", 20, []uint64{3, 4, 5, 17}, 0, 64, 4, 0, seqs(1, 20, 3, 4, 5, 17)},
		{"everything expired at the end", 10, []uint64{8, 9, 10}, 0, 64, 3, 5, seqs(1, 15, 8, 9, 10)},
		{"backlog then live", 10, nil, 0, 64, 4, 10, seqs(1, 20)},
		{"window smaller than read-ahead", 30, []uint64{7}, 0, 3, 16, 5, seqs(1, 35, 7)},
		{"live only", 0, nil, 0, 4, 4, 12, seqs(1, 12)},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			src := newSource()
			for seq := uint64(1); seq <= c.stored; seq++ {
				src.store(seq)
			}
			for _, g := range c.gone {
				delete(src.msgs, g)
			}
			d := newDelivery(src, c.readAhead)
			defer d.Close()
			sink := newSink()
			dev, err := d.Start("bob", "phone", c.cursor, c.window, sink)
			if err != nil {
				t.Fatal(err)
			}
			for seq := c.stored + 1; seq <= c.stored+c.live; seq++ {
				d.Stored("bob", src.store(seq))
			}
			// Acknowledge everything as it arrives, as a phone would.
			for i := 0; i < len(c.want); i++ {
				sink.waitFor(t, i+1)
				d.Acked(dev, sink.pid(i))
			}
			got := sink.waitFor(t, len(c.want))
			if fmt.Sprint(got) != fmt.Sprint(c.want) {
				t.Fatalf("delivered %v\nwant      %v", got, c.want)
			}
			if n, next, _ := d.Window("bob", "phone"); n != 0 || next != src.head+1 {
				t.Fatalf("after all acks: %d in flight, next %d; want 0, %d", n, next, src.head+1)
			}
			if src.acked["phone"] != src.head {
				t.Fatalf("cursor reported %d, want %d", src.acked["phone"], src.head)
			}
		})
	}
}

func TestWindowAndOutOfOrderAcks(t *testing.T) {
	src := newSource()
	for seq := uint64(1); seq <= 10; seq++ {
		src.store(seq)
	}
	d := newDelivery(src, 16)
	defer d.Close()
	sink := newSink()
	dev, err := d.Start("bob", "phone", 0, 3, sink)
	if err != nil {
		t.Fatal(err)
	}
	sink.waitFor(t, 3)
	if n, next, _ := d.Window("bob", "phone"); n != 3 || next != 4 {
		t.Fatalf("window: %d in flight, next %d", n, next)
	}
	// An ack of the second message frees a slot but cannot move the cursor.
	d.Acked(dev, sink.pid(1))
	got := sink.waitFor(t, 4)
	if got[3] != "4" || src.acked["phone"] != 0 {
		t.Fatalf("after an out-of-order ack: sent %v, cursor %d", got, src.acked["phone"])
	}
	d.Acked(dev, sink.pid(0))
	if src.acked["phone"] != 2 {
		t.Fatalf("cursor %d after acking 1 and 2, want 2", src.acked["phone"])
	}
	// An unknown packet id and a repeated ack change nothing.
	d.Acked(dev, 9999)
	d.Acked(dev, sink.pid(0))
	if n, _, _ := d.Window("bob", "phone"); n != 3 {
		t.Fatalf("%d in flight, want 3", n)
	}
}

func TestTakeoverResendsUnacknowledged(t *testing.T) {
	src := newSource()
	for seq := uint64(1); seq <= 5; seq++ {
		src.store(seq)
	}
	d := newDelivery(src, 16)
	defer d.Close()
	old := newSink()
	oldDev, err := d.Start("bob", "phone", 0, 64, old)
	if err != nil {
		t.Fatal(err)
	}
	old.waitFor(t, 5)
	d.Acked(oldDev, old.pid(0))
	d.Acked(oldDev, old.pid(1))

	// The same device connects again before the old connection is gone.
	fresh := newSink()
	if _, err := d.Start("bob", "phone", src.acked["phone"], 64, fresh); err != nil {
		t.Fatal(err)
	}
	d.Stop(oldDev) // the old connection's disconnect arrives late
	d.Stored("bob", src.store(6))
	got := fresh.waitFor(t, 4)
	if fmt.Sprint(got) != fmt.Sprint(seqs(3, 6)) {
		t.Fatalf("new connection got %v, want %v", got, seqs(3, 6))
	}
	if _, _, ok := d.Window("bob", "phone"); !ok {
		t.Fatal("the late Stop of the old connection stopped the new one")
	}
}
