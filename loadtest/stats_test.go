package loadtest

import (
	"fmt"
	"math"
	"testing"

	"github.com/eclipse/paho.mqtt.golang/packets"
)

// stream is a synthetic run: operations on a ledger between users a, b and
// c (indices 0, 1, 2), messages named by their send order.
type stream struct {
	ledger *Ledger
	plain  bool
	sent   []sentMsg
}

type sentMsg struct {
	seq      uint64
	from, to int
	n        uint64
	at       int64
	dev      int    // the sending device
	c        uint64 // the copy number, 0 with one device per user
}

var streamUsers = []string{"a", "b", "c"}

const streamTag = "tg"

func newStream(plain bool) *stream {
	return &stream{ledger: NewLedger(streamTag, streamUsers, plain), plain: plain}
}

// op is one step of a synthetic stream.
type op func(t *testing.T, s *stream)

func send(from, to int, n uint64) op {
	return func(t *testing.T, s *stream) {
		at := int64(1_000_000 * (len(s.sent) + 1))
		seq, err := s.ledger.NewMessage(from, to, at)
		if err != nil {
			t.Fatal(err)
		}
		s.sent = append(s.sent, sentMsg{seq: seq, from: from, to: to, n: n, at: at})
	}
}

func ack(i int) op {
	return func(t *testing.T, s *stream) { s.ledger.Acked(s.sent[i].seq, s.sent[i].at+500_000) }
}

func fail(i int) op {
	return func(t *testing.T, s *stream) { s.ledger.SendFailed(s.sent[i].seq) }
}

// deliver hands message i to its recipient, 2 ms after it was sent.
func deliver(i int) op { return deliverTo(i, -1, "") }

// deliverTo hands message i to receiver (-1: its recipient) with envelope
// sender from ("": the real sender).
func deliverTo(i, receiver int, from string) op {
	return func(t *testing.T, s *stream) {
		m := s.sent[i]
		if receiver < 0 {
			receiver = m.to
		}
		if from == "" {
			from = streamUsers[m.from]
		}
		obj := appendMessage(nil, message{Tag: streamTag, Seq: m.seq, SentAt: m.at, Sender: streamUsers[m.from], N: m.n}, 64)
		payload := obj
		if !s.plain {
			payload = []byte(fmt.Sprintf(`{"kind":"msg","from":%q,"to":%q,"ts":1,"msg":%s}`, from, streamUsers[m.to], obj))
		}
		s.ledger.Deliver(receiver, payload, m.at+2_000_000)
	}
}

// reconnect has paho reconnect the sender of the messages held, which wait
// for their PUBACK, while message publishing (-1: none) is being published.
func reconnect(publishing int, held ...int) op {
	return func(t *testing.T, s *stream) {
		c := &v3Transport{p: &phone{r: &run{ledger: s.ledger}}, store: newAckStore(streamTag, func(uint64) {})}
		c.store.Open()
		for _, i := range held {
			m := s.sent[i]
			p := packets.NewControlPacket(packets.Publish).(*packets.PublishPacket)
			p.Qos, p.MessageID = 1, uint16(i+1)
			p.Payload = appendMessage(nil, message{Tag: streamTag, Seq: m.seq, SentAt: m.at, Sender: streamUsers[m.from], N: m.n}, 64)
			c.store.Put(fmt.Sprintf("%s%d", outboundPrefix, p.MessageID), p)
		}
		if publishing >= 0 {
			m := s.sent[publishing]
			c.publishing.Store(&outgoing{to: m.to, n: m.n, c: m.c})
		}
		c.onReconnecting(nil, nil)
	}
}

func raw(receiver int, payload string) op {
	return func(t *testing.T, s *stream) { s.ledger.Deliver(receiver, []byte(payload), 1) }
}

func TestLedgerAccounting(t *testing.T) {
	tests := []struct {
		name  string
		plain bool
		ops   []op
		want  Counts
	}{
		{
			name: "every message acked and delivered once",
			ops:  []op{send(0, 1, 1), send(0, 1, 2), send(1, 0, 1), ack(0), ack(1), ack(2), deliver(0), deliver(1), deliver(2)},
			want: Counts{Sent: 3, Acked: 3, Delivered: 3, Unique: 3},
		},
		{
			name: "a redelivery is a duplicate",
			ops:  []op{send(0, 1, 1), ack(0), deliver(0), deliver(0), deliver(0)},
			want: Counts{Sent: 1, Acked: 1, Delivered: 3, Unique: 1, Duplicates: 2},
		},
		{
			name: "acked but never delivered is lost",
			ops:  []op{send(0, 1, 1), send(0, 1, 2), ack(0), ack(1), deliver(1)},
			want: Counts{Sent: 2, Acked: 2, Delivered: 1, Unique: 1, Lost: 1},
		},
		{
			name: "neither acked nor delivered is in flight",
			ops:  []op{send(0, 1, 1)},
			want: Counts{Sent: 1, InFlight: 1},
		},
		{
			name: "delivered before its PUBACK arrived is delivered",
			ops:  []op{send(0, 1, 1), deliver(0)},
			want: Counts{Sent: 1, Delivered: 1, Unique: 1},
		},
		{
			name: "a second PUBACK counts once",
			ops:  []op{send(0, 1, 1), ack(0), ack(0), deliver(0)},
			want: Counts{Sent: 1, Acked: 1, Delivered: 1, Unique: 1},
		},
		{
			name: "a pair delivered backwards violates order",
			ops:  []op{send(0, 1, 1), send(0, 1, 2), ack(0), ack(1), deliver(1), deliver(0)},
			want: Counts{Sent: 2, Acked: 2, Delivered: 2, Unique: 2, OrderViolations: 1},
		},
		{
			name: "redelivering an earlier message is a duplicate, not disorder",
			ops:  []op{send(0, 1, 1), send(0, 1, 2), deliver(0), deliver(1), deliver(0)},
			want: Counts{Sent: 2, Delivered: 3, Unique: 2, Duplicates: 1},
		},
		{
			name: "pairs are ordered independently",
			ops:  []op{send(0, 1, 5), send(2, 1, 1), send(0, 2, 1), deliver(0), deliver(1), deliver(2)},
			want: Counts{Sent: 3, Delivered: 3, Unique: 3},
		},
		{
			name: "a gap in a pair's numbers is not disorder",
			ops:  []op{send(0, 1, 1), send(0, 1, 3), deliver(0), deliver(1)},
			want: Counts{Sent: 2, Delivered: 2, Unique: 2},
		},
		{
			// paho sends a publish caught by a reconnection before it
			// resends the stored ones (a->b 3 before 1 and 2), so the broker
			// may accept it first; here it also gets the stored copy of 3.
			name: "a publish caught by a reconnection may overtake its pair's unacknowledged messages",
			ops: []op{send(0, 1, 1), send(0, 1, 2), send(0, 2, 1), send(0, 1, 3), reconnect(3, 0, 1, 2, 3),
				ack(3), ack(0), ack(1), ack(2), deliver(3), deliver(0), deliver(1), deliver(3), deliver(2)},
			want: Counts{Sent: 4, Acked: 4, Delivered: 5, Unique: 4, Duplicates: 1},
		},
		{
			name: "messages a publish caught by a reconnection may overtake keep their own order",
			ops: []op{send(0, 1, 1), send(0, 1, 2), send(0, 1, 3), reconnect(2, 0, 1, 2),
				deliver(2), deliver(1), deliver(0)},
			want: Counts{Sent: 3, Delivered: 3, Unique: 3, OrderViolations: 1},
		},
		{
			name: "a message acknowledged before the reconnection is not overtaken",
			ops: []op{send(0, 1, 1), ack(0), send(0, 1, 2), send(0, 1, 3), reconnect(2, 1, 2),
				deliver(2), deliver(1), deliver(0)},
			want: Counts{Sent: 3, Acked: 1, Delivered: 3, Unique: 3, OrderViolations: 1},
		},
		{
			name: "messages sent after the resends are not overtaken",
			ops: []op{send(0, 1, 1), send(0, 1, 2), send(0, 1, 3), reconnect(2, 0, 1), send(0, 1, 4),
				deliver(3), deliver(2), deliver(0), deliver(1)},
			want: Counts{Sent: 4, Delivered: 4, Unique: 4, OrderViolations: 3},
		},
		{
			name: "a reconnection between publishes overtakes nothing",
			ops:  []op{send(0, 1, 1), send(0, 1, 2), reconnect(-1, 0, 1), deliver(1), deliver(0)},
			want: Counts{Sent: 2, Delivered: 2, Unique: 2, OrderViolations: 1},
		},
		{
			name: "a publish caught by a reconnection overtakes only its own pair",
			ops: []op{send(0, 2, 1), send(0, 1, 1), reconnect(1, 0, 1), send(0, 2, 2),
				deliver(2), deliver(0), deliver(1)},
			want: Counts{Sent: 3, Delivered: 3, Unique: 3, OrderViolations: 1},
		},
		{
			name: "delivered to the wrong user",
			ops:  []op{send(0, 1, 1), deliverTo(0, 2, "")},
			want: Counts{Sent: 1, Delivered: 1, Unique: 1, Misrouted: 1},
		},
		{
			name: "attributed to the wrong sender",
			ops:  []op{send(0, 1, 1), deliverTo(0, -1, "c")},
			want: Counts{Sent: 1, Delivered: 1, Unique: 1, Misrouted: 1},
		},
		{
			name: "an envelope addressed to someone else",
			ops:  []op{send(0, 1, 1), raw(1, `{"kind":"msg","from":"a","to":"c","ts":1,"msg":{"id":"tg-0","t":1,"s":"a","n":1}}`)},
			want: Counts{Sent: 1, Delivered: 1, Unique: 1, Misrouted: 1},
		},
		{
			name: "refused with an error event is not lost",
			ops:  []op{send(0, 1, 1), ack(0), raw(0, `{"kind":"error","ref":"tg-0","code":"queue_full","reason":"x"}`)},
			want: Counts{Sent: 1, Acked: 1, Refused: 1, ErrorEvents: 1},
		},
		{
			name: "a failed publish is neither lost nor in flight",
			ops:  []op{send(0, 1, 1), fail(0)},
			want: Counts{Sent: 1, SendFailed: 1},
		},
		{
			name: "a publish reported failed after its PUBACK stays acked",
			ops:  []op{send(0, 1, 1), ack(0), fail(0), deliver(0)},
			want: Counts{Sent: 1, Acked: 1, Delivered: 1, Unique: 1},
		},
		{
			name: "messages of other runs are foreign",
			ops: []op{raw(1, `{"kind":"msg","from":"a","to":"b","ts":1,"msg":{"id":"other-1","t":1,"s":"a","n":1}}`),
				raw(1, `{"kind":"msg","from":"a","to":"b","ts":1,"msg":{"id":"tg-99","t":1,"s":"a","n":1}}`)},
			want: Counts{Foreign: 2},
		},
		{
			name: "receipts, typing and garbage",
			ops: []op{send(0, 1, 1), deliver(0),
				raw(0, `{"kind":"receipt","status":"delivered","by":"b","ids":["tg-0"],"ts":1}`),
				raw(1, `{"kind":"typing","from":"a","ts":1}`),
				raw(1, `not json`)},
			want: Counts{Sent: 1, Delivered: 1, Unique: 1, Receipts: 1, Other: 1, Malformed: 1},
		},
		{
			name:  "plain payloads",
			plain: true,
			ops:   []op{send(0, 1, 1), send(0, 1, 2), ack(0), ack(1), deliver(1), deliver(0), deliver(0)},
			want:  Counts{Sent: 2, Acked: 2, Delivered: 3, Unique: 2, Duplicates: 1, OrderViolations: 1},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newStream(tt.plain)
			for _, o := range tt.ops {
				o(t, s)
			}
			got, _ := s.ledger.Final(10)
			if got != tt.want {
				t.Errorf("counts\n got %+v\nwant %+v", got, tt.want)
			}
			if sum := got.SendFailed + got.Unique + got.Refused + got.Lost + got.InFlight; sum != got.Sent {
				t.Errorf("unbalanced: failed+unique+refused+lost+in flight = %d, sent %d", sum, got.Sent)
			}
			if running := s.ledger.Snapshot(); running.Unique != got.Unique {
				t.Errorf("running unique %d, final scan %d", running.Unique, got.Unique)
			}
		})
	}
}

func TestLedgerLostSamples(t *testing.T) {
	s := newStream(false)
	for _, o := range []op{send(0, 1, 1), send(2, 0, 1), ack(0), ack(1)} {
		o(t, s)
	}
	_, samples := s.ledger.Final(1)
	if len(samples) != 1 || samples[0] != "tg-0 a->b" {
		t.Errorf("samples = %q, want [tg-0 a->b]", samples)
	}
}

func TestLedgerLatencies(t *testing.T) {
	s := newStream(false)
	for _, o := range []op{send(0, 1, 1), ack(0), deliver(0), deliver(0),
		raw(0, `{"kind":"receipt","status":"delivered","by":"b","ids":["tg-0"],"ts":1}`)} {
		o(t, s)
	}
	deliverH, ackH, receiptH := s.ledger.Histograms()
	if deliverH.TotalCount() != 1 || deliverH.Max() < 2000 || deliverH.Min() > 2000 {
		t.Errorf("deliver histogram: count %d, min %d, max %d; want one sample of 2000 µs",
			deliverH.TotalCount(), deliverH.Min(), deliverH.Max())
	}
	if ackH.TotalCount() != 1 || ackH.Max() < 500 || ackH.Min() > 500 {
		t.Errorf("ack histogram: count %d, min %d, max %d; want one sample of 500 µs",
			ackH.TotalCount(), ackH.Min(), ackH.Max())
	}
	if receiptH.TotalCount() != 1 {
		t.Errorf("receipt histogram: count %d, want 1", receiptH.TotalCount())
	}
	if iv := s.ledger.TakeInterval(); iv.TotalCount() != 1 {
		t.Errorf("interval count %d, want 1", iv.TotalCount())
	}
	if iv := s.ledger.TakeInterval(); iv.TotalCount() != 0 {
		t.Errorf("interval not reset: count %d", iv.TotalCount())
	}
}

func TestPercentilesOf(t *testing.T) {
	h := newHist()
	for ms := int64(1); ms <= 1000; ms++ {
		recordMicros(h, ms*1_000_000) // 1..1000 ms, in nanoseconds
	}
	got := PercentilesOf(h)
	tests := []struct {
		name      string
		got, want float64
	}{
		{"p50", got.P50, 500},
		{"p90", got.P90, 900},
		{"p99", got.P99, 990},
		{"p99.9", got.P999, 999},
		{"max", got.Max, 1000},
		{"mean", got.Mean, 500.5},
	}
	for _, tt := range tests {
		// Three significant digits: HDR may report a value up to 0.1% off.
		if math.Abs(tt.got-tt.want) > tt.want/1000+0.001 {
			t.Errorf("%s = %.3f ms, want %.3f", tt.name, tt.got, tt.want)
		}
	}
	if got.Count != 1000 {
		t.Errorf("count = %d, want 1000", got.Count)
	}
	if empty := PercentilesOf(newHist()); empty != (Percentiles{}) {
		t.Errorf("empty histogram: %+v", empty)
	}
}

func TestLogBins(t *testing.T) {
	h := newHist()
	values := map[int64]int64{150: 3, 1_500: 5, 25_000: 2} // µs
	for us, n := range values {
		for range n {
			recordMicros(h, us*1000)
		}
	}
	bins := LogBins(h)
	var total int64
	for i, b := range bins {
		total += b.Count
		if b.ToMs <= b.FromMs || (i > 0 && b.FromMs != bins[i-1].ToMs) {
			t.Errorf("bin %d [%g, %g) does not continue the previous one", i, b.FromMs, b.ToMs)
		}
	}
	if total != 10 {
		t.Errorf("bins hold %d samples, want 10", total)
	}
	if bins[0].FromMs != 0.1 || bins[len(bins)-1].ToMs != 50 {
		t.Errorf("bins span [%g, %g) ms, want [0.1, 50)", bins[0].FromMs, bins[len(bins)-1].ToMs)
	}
	if LogBins(newHist()) != nil {
		t.Error("bins of an empty histogram")
	}
}

// BenchmarkLedgerDeliver measures the hot path of every received message:
// parsing its envelope and recording it.
func BenchmarkLedgerDeliver(b *testing.B) {
	users := []string{"alice", "bob"}
	l := NewLedger("bench", users, false)
	const n = 1 << 16
	payloads := make([][]byte, n)
	for i := range payloads {
		seq, err := l.NewMessage(0, 1, 1)
		if err != nil {
			b.Fatal(err)
		}
		obj := appendMessage(nil, message{Tag: "bench", Seq: seq, SentAt: 1, Sender: "alice", N: uint64(i + 1)}, 256)
		payloads[i] = fmt.Appendf(nil, `{"kind":"msg","from":"alice","to":"bob","ts":1,"msg":%s}`, obj)
	}
	b.ReportAllocs()
	b.SetBytes(int64(len(payloads[0])))
	i := 0
	for b.Loop() {
		l.Deliver(1, payloads[i%n], 2_000_000)
		i++
	}
}

// BenchmarkLedgerDeliverParallel is the same path with every core receiving.
func BenchmarkLedgerDeliverParallel(b *testing.B) {
	const receivers = 64
	users := make([]string, receivers+1)
	for i := range users {
		users[i] = fmt.Sprintf("u%d", i)
	}
	l := NewLedger("bench", users, false)
	const n = 1 << 16
	payloads := make([][]byte, n)
	for i := range payloads {
		to := 1 + i%receivers
		seq, err := l.NewMessage(0, to, 1)
		if err != nil {
			b.Fatal(err)
		}
		obj := appendMessage(nil, message{Tag: "bench", Seq: seq, SentAt: 1, Sender: "u0", N: uint64(i + 1)}, 256)
		payloads[i] = fmt.Appendf(nil, `{"kind":"msg","from":"u0","to":%q,"ts":1,"msg":%s}`, users[to], obj)
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			l.Deliver(1+i%receivers, payloads[i%n], 2_000_000)
			i++
		}
	})
}
