package delivery

import (
	"fmt"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/internal/testutil"
)

// fakeSource is an in-memory queue: a map of stored sequences.
type fakeSource struct {
	mu    sync.Mutex
	msgs  map[uint64][]byte
	metas map[uint64][]byte
	head  uint64
	acked map[string]uint64
	reads int
}

func newSource() *fakeSource {
	return &fakeSource{msgs: map[uint64][]byte{}, metas: map[uint64][]byte{}, acked: map[string]uint64{}}
}

func (s *fakeSource) store(seq uint64) queue.Message { return s.storeMeta(seq, nil) }

// storeMeta stores seq with its meta in one step, as a real queue does: a
// concurrent Read must never see the message without it.
func (s *fakeSource) storeMeta(seq uint64, meta []byte) queue.Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := queue.Message{Seq: seq, Meta: meta, Data: []byte(fmt.Sprint(seq))}
	s.msgs[seq] = m.Data
	if meta != nil {
		s.metas[seq] = meta
	}
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
			out = append(out, queue.Message{Seq: seq, Meta: s.metas[seq], Data: d})
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

// cursor returns the cursor device reported last; verify reports it from
// its own goroutine.
func (s *fakeSource) cursor(device string) uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.acked[device]
}

// waitCursor waits until device's reported cursor is want.
func (s *fakeSource) waitCursor(t *testing.T, device string, want uint64) {
	t.Helper()
	testutil.EventuallyNoError(t, 10*time.Second, func() error {
		if got := s.cursor(device); got != want {
			return fmt.Errorf("cursor %d, want %d", got, want)
		}
		return nil
	}, "cursor of %s", device)
}

func payloads(seqs []uint64) []string {
	var out []string
	for _, s := range seqs {
		out = append(out, fmt.Sprint(s))
	}
	return out
}

// every returns the sequences from, from+step, ... up to to.
func every(from, to, step uint64) []uint64 {
	var out []uint64
	for s := from; s <= to; s += step {
		out = append(out, s)
	}
	return out
}

// message is what a notification of seq carries.
func message(seq uint64) queue.Message {
	return queue.Message{Seq: seq, Data: []byte(fmt.Sprint(seq))}
}

// TestSparseSequences feeds a user whose sequences have gaps, as in a
// JetStream stream shared with other users, and whose notifications may
// come out of order or not at all.
func TestSparseSequences(t *testing.T) {
	cases := []struct {
		name      string
		stored    []uint64 // in the queue before the device starts
		cursor    uint64
		window    int
		readAhead int
		live      []uint64 // committed after the start, in this order
		notify    []uint64 // Stored calls after every live commit; nil: each as it commits
		want      []uint64 // in the order sent
	}{
		{"live across gaps", nil, 0, 64, 4, []uint64{3, 7, 8, 20, 21, 40}, nil, []uint64{3, 7, 8, 20, 21, 40}},
		{"backlog across gaps", []uint64{3, 7, 8, 20, 21, 40}, 0, 64, 2, nil, nil, []uint64{3, 7, 8, 20, 21, 40}},
		{"backlog then live", []uint64{3, 7, 8}, 0, 64, 2, []uint64{12, 30, 31}, nil, []uint64{3, 7, 8, 12, 30, 31}},
		{"cursor in a gap", []uint64{3, 7, 8, 20, 21}, 5, 64, 4, []uint64{33}, nil, []uint64{7, 8, 20, 21, 33}},
		{"cursor in the gap after the last", []uint64{3, 7, 8}, 10, 64, 4, []uint64{33, 34}, nil, []uint64{33, 34}},
		{"window smaller than the backlog", every(2, 30, 2), 0, 3, 16, []uint64{41, 45, 49}, nil, append(every(2, 30, 2), 41, 45, 49)},
		{"live beyond the tail", nil, 0, 2, 4, every(5, 100, 5), nil, every(5, 100, 5)},
		{"notified out of order", nil, 0, 64, 4, []uint64{3, 5, 7, 8}, []uint64{3, 7, 8, 5}, []uint64{3, 7, 8, 5}},
		{"notified late, before the device got there", nil, 0, 1, 4, []uint64{3, 5, 7, 8}, []uint64{3, 7, 8, 5}, []uint64{3, 5, 7, 8}},
		{"never notified", nil, 0, 64, 4, []uint64{3, 5, 7, 8, 9}, []uint64{3, 7, 8}, []uint64{3, 7, 8, 5, 9}},
		{"notified twice", nil, 0, 64, 4, []uint64{3, 7, 8}, []uint64{3, 7, 3, 8, 7}, []uint64{3, 7, 8}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			src := newSource()
			for _, seq := range c.stored {
				src.store(seq)
			}
			d := newDelivery(src, c.readAhead)
			defer d.Close()
			sink := newSink()
			dev, err := d.Start("bob", "phone", c.cursor, c.window, sink)
			if err != nil {
				t.Fatal(err)
			}
			for _, seq := range c.live {
				m := src.store(seq)
				if c.notify == nil {
					d.Stored("bob", m)
				}
			}
			for _, seq := range c.notify {
				d.Stored("bob", message(seq))
			}
			// Acknowledge everything as it arrives; the cursor must never
			// pass a message not yet acknowledged.
			for i := range c.want {
				sink.waitFor(t, i+1)
				d.Acked(dev, sink.pid(i))
				for _, seq := range c.want[i+1:] {
					if cur := src.cursor("phone"); cur >= seq {
						t.Fatalf("cursor %d reached %d, not yet acknowledged", cur, seq)
					}
				}
			}
			src.waitCursor(t, "phone", src.head)
			got := sink.waitFor(t, len(c.want))
			if fmt.Sprint(got) != fmt.Sprint(payloads(c.want)) {
				t.Fatalf("delivered %v\nwant      %v", got, c.want)
			}
			if n, next, _ := d.Window("bob", "phone"); n != 0 || next != src.head+1 {
				t.Fatalf("after all acks: %d in flight, next %d; want 0, %d", n, next, src.head+1)
			}
		})
	}
}

// TestSparseLiveFromMemory: messages notified in order go to a device that
// keeps up from the tail, gaps or not, without reading the queue.
func TestSparseLiveFromMemory(t *testing.T) {
	src := newSource()
	d := newDelivery(src, 4)
	defer d.Close()
	sink := newSink()
	if _, err := d.Start("bob", "phone", 0, 64, sink); err != nil {
		t.Fatal(err)
	}
	live := []uint64{3, 7, 8, 20, 41}
	for i, seq := range live {
		d.Stored("bob", src.store(seq))
		sink.mu.Lock()
		n := len(sink.seqs)
		sink.mu.Unlock()
		if n != i+1 {
			t.Fatalf("after Stored(%d) the device has %d messages, want %d", seq, n, i+1)
		}
	}
	if src.reads != 0 {
		t.Fatalf("%d reads of the queue, want none", src.reads)
	}
	if got := sink.waitFor(t, len(live)); fmt.Sprint(got) != fmt.Sprint(payloads(live)) {
		t.Fatalf("delivered %v, want %v", got, live)
	}
}

// TestSparseWindowAndAcks: the window counts messages, not sequences, and
// the cursor moves to the sequence of the last message acknowledged in
// order.
func TestSparseWindowAndAcks(t *testing.T) {
	src := newSource()
	for _, seq := range []uint64{4, 9, 10, 15, 30, 31, 50} {
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
	if n, next, _ := d.Window("bob", "phone"); n != 3 || next != 11 {
		t.Fatalf("window: %d in flight, next %d; want 3, 11", n, next)
	}
	// An ack of the second message frees a slot but cannot move the cursor.
	d.Acked(dev, sink.pid(1))
	if got := sink.waitFor(t, 4); got[3] != "15" || src.cursor("phone") != 0 {
		t.Fatalf("after an out-of-order ack: sent %v, cursor %d", got, src.cursor("phone"))
	}
	d.Acked(dev, sink.pid(0))
	if c := src.cursor("phone"); c != 9 {
		t.Fatalf("cursor %d after acking 4 and 9, want 9", c)
	}
	d.Acked(dev, sink.pid(2))
	if c := src.cursor("phone"); c != 10 {
		t.Fatalf("cursor %d after acking 10, want 10", c)
	}
	// Live messages past a gap: the cursor follows once the gap is known
	// to hold nothing of this user.
	d.Stored("bob", src.store(77))
	for i := 3; i < 8; i++ {
		sink.waitFor(t, i+1)
		d.Acked(dev, sink.pid(i))
	}
	src.waitCursor(t, "phone", 77)
	if got := sink.waitFor(t, 8); fmt.Sprint(got) != fmt.Sprint(payloads([]uint64{4, 9, 10, 15, 30, 31, 50, 77})) {
		t.Fatalf("delivered %v", got)
	}
}

// TestSparseReconnect: a device that reconnects gets what follows its
// cursor, which is the sequence of a message it acknowledged.
func TestSparseReconnect(t *testing.T) {
	src := newSource()
	d := newDelivery(src, 4)
	defer d.Close()
	sink := newSink()
	dev, err := d.Start("bob", "phone", 0, 64, sink)
	if err != nil {
		t.Fatal(err)
	}
	for _, seq := range []uint64{3, 7, 8} {
		d.Stored("bob", src.store(seq))
	}
	sink.waitFor(t, 3)
	d.Acked(dev, sink.pid(0))
	d.Acked(dev, sink.pid(1))
	src.waitCursor(t, "phone", 7)
	d.Stop(dev)

	// Stored while the device is offline: nobody to feed.
	for _, seq := range []uint64{12, 25} {
		if d.Stored("bob", src.store(seq)) {
			t.Fatalf("Stored(%d) reports bob online", seq)
		}
	}
	again := newSink()
	dev, err = d.Start("bob", "phone", src.cursor("phone"), 64, again)
	if err != nil {
		t.Fatal(err)
	}
	d.Stored("bob", src.store(40))
	want := payloads([]uint64{8, 12, 25, 40})
	for i := range want {
		again.waitFor(t, i+1)
		d.Acked(dev, again.pid(i))
	}
	if got := again.waitFor(t, len(want)); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("after reconnecting at 7: %v, want %v", got, want)
	}
	src.waitCursor(t, "phone", 40)
}

// TestLateMessageTwoDevices: a message heard of after later ones goes, out
// of order, to a device already past it, and in order to a device that
// had not got there yet; neither cursor passes it before its ack.
func TestLateMessageTwoDevices(t *testing.T) {
	src := newSource()
	d := newDelivery(src, 16)
	defer d.Close()
	fast, slow := newSink(), newSink()
	fastDev, err := d.Start("bob", "phone", 0, 64, fast)
	if err != nil {
		t.Fatal(err)
	}
	slowDev, err := d.Start("bob", "tablet", 0, 1, slow)
	if err != nil {
		t.Fatal(err)
	}
	for _, seq := range []uint64{3, 5, 7, 8} {
		src.store(seq)
	}
	for _, seq := range []uint64{3, 7, 8} {
		d.Stored("bob", message(seq))
	}
	fast.waitFor(t, 3)
	for i := range 3 {
		d.Acked(fastDev, fast.pid(i))
	}
	d.Stored("bob", message(5))
	if got := fast.waitFor(t, 4); fmt.Sprint(got) != fmt.Sprint(payloads([]uint64{3, 7, 8, 5})) {
		t.Fatalf("phone got %v", got)
	}
	if c := src.cursor("phone"); c >= 5 {
		t.Fatalf("phone's cursor %d passed 5 before its ack", c)
	}
	d.Acked(fastDev, fast.pid(3))
	src.waitCursor(t, "phone", 8)

	for i := range 4 {
		slow.waitFor(t, i+1)
		d.Acked(slowDev, slow.pid(i))
	}
	if got := slow.waitFor(t, 4); fmt.Sprint(got) != fmt.Sprint(payloads([]uint64{3, 5, 7, 8})) {
		t.Fatalf("tablet got %v", got)
	}
	src.waitCursor(t, "tablet", 8)
}

// TestVerifyPaced: with VerifyEvery, the acknowledgements that wait at
// gaps of a sparse queue share one read per VerifyEvery, and a device
// whose in-flight list fills up has its read at once.
func TestVerifyPaced(t *testing.T) {
	src := newSource()
	d := New(Options{Source: src, Logger: slog.New(slog.DiscardHandler), TailMessages: 8, ReadAhead: 16, VerifyEvery: time.Hour})
	defer d.Close()
	sink := newSink()
	dev, err := d.Start("bob", "phone", 0, 4, sink)
	if err != nil {
		t.Fatal(err)
	}
	reads := func() int {
		src.mu.Lock()
		defer src.mu.Unlock()
		return src.reads
	}
	// The first verify reads at once.
	d.Stored("bob", src.store(3))
	sink.waitFor(t, 1)
	before := reads()
	d.Acked(dev, sink.pid(0))
	src.waitCursor(t, "phone", 3)
	if n := reads() - before; n != 1 {
		t.Fatalf("%d reads for the first verify, want 1", n)
	}
	// The next acknowledgements wait for the paced read: the cursor stays.
	for i, seq := range []uint64{7, 8, 20} {
		d.Stored("bob", src.store(seq))
		sink.waitFor(t, i+2)
		d.Acked(dev, sink.pid(i+1))
	}
	if n, c := reads()-before, src.cursor("phone"); n != 1 || c != 3 {
		t.Fatalf("after 3 more acknowledgements: %d reads, cursor %d; want 1 read, cursor 3", n, c)
	}
	// A fourth fills the in-flight list (window 4): the paced read, an
	// hour away, happens now, and the cursor moves on.
	d.Stored("bob", src.store(41))
	sink.waitFor(t, 5)
	d.Acked(dev, sink.pid(4))
	src.waitCursor(t, "phone", 41)
}
