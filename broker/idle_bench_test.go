package broker

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"runtime"
	"runtime/metrics"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/chatd/chatd/internal/testutil"
)

// idlePhone is one raw MQTT 3.1.1 connection held open by the idle
// benchmark: authenticated, persistent, subscribed to its inbox.
type idlePhone struct {
	conn net.Conn
	r    *bufio.Reader
}

// dialIdle connects user over raw MQTT, subscribes it to its inbox and
// leaves it idle; subscribe false stops after the CONNACK.
func dialIdle(tb testing.TB, addr, user, tok string, subscribe bool) *idlePhone {
	tb.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		tb.Fatalf("dial: %v", err)
	}
	p := &idlePhone{conn: conn, r: bufio.NewReaderSize(conn, 64)}
	p.send(tb, packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{
			ProtocolName: []byte("MQTT"), Keepalive: 300, ClientIdentifier: user + "/phone",
			UsernameFlag: true, Username: []byte(user), PasswordFlag: true, Password: []byte(tok),
		},
	})
	if ack := p.expect(tb, packets.Connack); len(ack) != 2 || ack[1] != 0 {
		tb.Fatalf("CONNACK of %s: % x", user, ack)
	}
	if subscribe {
		p.send(tb, packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1},
			PacketID:    1,
			Filters:     packets.Subscriptions{{Filter: "inbox/" + user, Qos: 1}},
		})
		if ack := p.expect(tb, packets.Suback); len(ack) != 3 || ack[2] != 1 {
			tb.Fatalf("SUBACK of %s: % x", user, ack)
		}
	}
	return p
}

func (p *idlePhone) send(tb testing.TB, pk packets.Packet) {
	tb.Helper()
	pk.ProtocolVersion = 4
	b, err := testutil.Encode(pk)
	if err != nil {
		tb.Fatal(err)
	}
	if _, err := p.conn.Write(b); err != nil {
		tb.Fatalf("write: %v", err)
	}
}

// expect reads one packet, fails unless it has type want, and returns
// its body.
func (p *idlePhone) expect(tb testing.TB, want byte) []byte {
	tb.Helper()
	if err := p.conn.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		tb.Fatal(err)
	}
	b, err := p.r.ReadByte()
	if err != nil {
		tb.Fatalf("read packet type %d: %v", want, err)
	}
	n, _, err := packets.DecodeLength(p.r)
	if err != nil {
		tb.Fatalf("read length: %v", err)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(p.r, body); err != nil {
		tb.Fatalf("read body: %v", err)
	}
	if b>>4 != want {
		tb.Fatalf("got packet type %d, want %d", b>>4, want)
	}
	return body
}

// memSample is the runtime's stack and live heap bytes after a GC.
type memSample struct{ stacks, heap, goroutines float64 }

func sampleMem() memSample {
	runtime.GC()
	s := []metrics.Sample{
		{Name: "/memory/classes/heap/stacks:bytes"},
		{Name: "/gc/heap/live:bytes"},
		{Name: "/sched/goroutines:goroutines"},
	}
	metrics.Read(s)
	return memSample{float64(s[0].Value.Uint64()), float64(s[1].Value.Uint64()), float64(s[2].Value.Uint64())}
}

// BenchmarkIdleConnection measures what one idle phone costs the server
// in goroutine stacks and live heap: 1,000 phones connect, subscribe to
// their inbox and stay; the figures are per phone, after a GC, and the
// stacks again after four; and the heap each keeps once disconnected.
func BenchmarkIdleConnection(b *testing.B) {
	for _, stage := range []struct {
		name      string
		subscribe bool
	}{{"connected", false}, {"subscribed", true}} {
		b.Run(stage.name, func(b *testing.B) {
			const phones = 1000
			s := startServer(b, b.TempDir(), nil)
			toks := make([]string, phones)
			for i := range toks {
				toks[i] = mint(b, fmt.Sprintf("idle%d", i))
			}
			b.ResetTimer()
			for range b.N {
				before := sampleMem()
				held := make([]*idlePhone, phones)
				for i := range held {
					held[i] = dialIdle(b, s.MQTTAddr(), fmt.Sprintf("idle%d", i), toks[i], stage.subscribe)
				}
				after := sampleMem()
				b.ReportMetric((after.stacks-before.stacks)/phones, "stack-B/phone")
				// The runtime halves a goroutine's stack at a GC when it
				// uses under a quarter of it: what an idle phone's stacks
				// settle to on a server that goes on collecting.
				for range 3 {
					runtime.GC()
				}
				b.ReportMetric((sampleMem().stacks-before.stacks)/phones, "settled-stack-B/phone")
				b.ReportMetric((after.heap-before.heap)/phones, "heap-B/phone")
				b.ReportMetric((after.goroutines-before.goroutines)/phones, "goroutines/phone")
				b.StopTimer()
				for _, p := range held {
					_ = p.conn.Close()
				}
				testutil.Eventually(b, 10*time.Second, func() bool { return sampleMem().goroutines <= before.goroutines }, "phones disconnected")
				// What a phone gone offline still costs: its device in the
				// queue and the session the node keeps for it.
				b.ReportMetric((sampleMem().heap-before.heap)/phones, "closed-heap-B/phone")
				b.StartTimer()
			}
		})
	}
}
