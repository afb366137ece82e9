package loadtest

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
	"unsafe"
)

// newDeviceStream is a synthetic run between users a, b and c with
// devices devices each.
func newDeviceStream(devices int) *stream {
	return &stream{ledger: NewDeviceLedger(streamTag, streamUsers, devices, false)}
}

// sendDev sends a message from device dev of user from to user to,
// numbered n in its pair and c among the device's sends.
func sendDev(from, dev, to int, n, c uint64) op {
	return func(t *testing.T, s *stream) {
		at := int64(1_000_000 * (len(s.sent) + 1))
		seq, err := s.ledger.NewMessageFrom(from, dev, to, at)
		if err != nil {
			t.Fatal(err)
		}
		s.sent = append(s.sent, sentMsg{seq: seq, from: from, to: to, n: n, at: at, dev: dev, c: c})
	}
}

// object is the message object of message i as its sender wrote it.
func (s *stream) object(i int) []byte {
	m := s.sent[i]
	return appendMessage(nil, message{Tag: streamTag, Seq: m.seq, SentAt: m.at, Sender: streamUsers[m.from], N: m.n, C: m.c}, 64)
}

// deliverDev hands message i to device dev of its recipient, 2 ms after it
// was sent.
func deliverDev(i, dev int) op {
	return func(t *testing.T, s *stream) {
		m := s.sent[i]
		payload := fmt.Appendf(nil, `{"kind":"msg","from":%q,"to":%q,"ts":1,"msg":%s}`, streamUsers[m.from], streamUsers[m.to], s.object(i))
		s.ledger.DeliverTo(m.to, dev, payload, m.at+2_000_000)
	}
}

// copyTo hands the sent copy of message i to device dev of its sender,
// 3 ms after it was sent.
func copyTo(i, dev int) op { return copyAt(i, -1, dev, "") }

// copyAt hands the sent copy of message i, naming recipient to ("": the
// real one), to device dev of user receiver (-1: its sender).
func copyAt(i, receiver, dev int, to string) op {
	return func(t *testing.T, s *stream) {
		m := s.sent[i]
		if receiver < 0 {
			receiver = m.from
		}
		if to == "" {
			to = streamUsers[m.to]
		}
		payload := fmt.Appendf(nil, `{"kind":"sent","from":%q,"to":%q,"ts":1,"msg":%s}`, streamUsers[m.from], to, s.object(i))
		s.ledger.DeliverTo(receiver, dev, payload, m.at+3_000_000)
	}
}

// TestLedgerDevices checks the accounting of users with several devices:
// each message is owed once to every device of its recipient, in order
// per sending device, and its sent copy once to every other device of its
// sender, in the order that device sent them.
func TestLedgerDevices(t *testing.T) {
	tests := []struct {
		name    string
		devices int
		ops     []op
		want    Counts
	}{
		{
			name:    "every device gets the message, every other device of the sender its copy",
			devices: 2,
			ops:     []op{sendDev(0, 0, 1, 1, 1), ack(0), deliverDev(0, 0), deliverDev(0, 1), copyTo(0, 1)},
			want:    Counts{Sent: 1, Acked: 1, Delivered: 2, Unique: 2, CopiesExpected: 1, CopiesReceived: 1},
		},
		{
			name:    "three devices: two copies owed",
			devices: 3,
			ops: []op{sendDev(0, 1, 1, 1, 1), ack(0), deliverDev(0, 0), deliverDev(0, 1), deliverDev(0, 2),
				copyTo(0, 0), copyTo(0, 2)},
			want: Counts{Sent: 1, Acked: 1, Delivered: 3, Unique: 3, CopiesExpected: 2, CopiesReceived: 2},
		},
		{
			name:    "a device that never gets the message is a loss, as is a copy never received",
			devices: 2,
			ops:     []op{sendDev(0, 0, 1, 1, 1), ack(0), deliverDev(0, 0)},
			want:    Counts{Sent: 1, Acked: 1, Delivered: 1, Unique: 1, Lost: 1, CopiesExpected: 1, CopiesLost: 1},
		},
		{
			name:    "a message redelivered to one device is a duplicate",
			devices: 2,
			ops:     []op{sendDev(0, 0, 1, 1, 1), ack(0), deliverDev(0, 0), deliverDev(0, 1), deliverDev(0, 1), copyTo(0, 1)},
			want:    Counts{Sent: 1, Acked: 1, Delivered: 3, Unique: 2, Duplicates: 1, CopiesExpected: 1, CopiesReceived: 1},
		},
		{
			name:    "a copy received twice is a duplicate",
			devices: 2,
			ops:     []op{sendDev(0, 0, 1, 1, 1), ack(0), deliverDev(0, 0), deliverDev(0, 1), copyTo(0, 1), copyTo(0, 1)},
			want:    Counts{Sent: 1, Acked: 1, Delivered: 2, Unique: 2, CopiesExpected: 1, CopiesReceived: 1, CopyDuplicates: 1},
		},
		{
			name:    "copies out of their device's send order, to different recipients",
			devices: 2,
			ops: []op{sendDev(0, 0, 1, 1, 1), sendDev(0, 0, 2, 1, 2), ack(0), ack(1),
				deliverDev(0, 0), deliverDev(0, 1), deliverDev(1, 0), deliverDev(1, 1), copyTo(1, 1), copyTo(0, 1)},
			want: Counts{Sent: 2, Acked: 2, Delivered: 4, Unique: 4, CopiesExpected: 2, CopiesReceived: 2, CopyOrderViolations: 1},
		},
		{
			name:    "redelivering an earlier copy is a duplicate, not disorder",
			devices: 2,
			ops: []op{sendDev(0, 0, 1, 1, 1), sendDev(0, 0, 2, 1, 2), ack(0), ack(1),
				deliverDev(0, 0), deliverDev(0, 1), deliverDev(1, 0), deliverDev(1, 1), copyTo(0, 1), copyTo(1, 1), copyTo(0, 1)},
			want: Counts{Sent: 2, Acked: 2, Delivered: 4, Unique: 4, CopiesExpected: 2, CopiesReceived: 2, CopyDuplicates: 1},
		},
		{
			name:    "copies of two sending devices are ordered independently",
			devices: 3,
			ops: []op{sendDev(0, 0, 1, 1, 1), sendDev(0, 1, 1, 1, 1), ack(0), ack(1),
				deliverDev(1, 0), deliverDev(0, 0), deliverDev(0, 1), deliverDev(1, 1), deliverDev(0, 2), deliverDev(1, 2),
				copyTo(1, 2), copyTo(0, 2), copyTo(0, 1), copyTo(1, 0)},
			want: Counts{Sent: 2, Acked: 2, Delivered: 6, Unique: 6, CopiesExpected: 4, CopiesReceived: 4},
		},
		{
			name:    "each receiving device keeps its own order",
			devices: 2,
			ops: []op{sendDev(0, 0, 1, 1, 1), sendDev(0, 0, 1, 2, 2), ack(0), ack(1),
				deliverDev(0, 0), deliverDev(1, 0), deliverDev(1, 1), deliverDev(0, 1), copyTo(0, 1), copyTo(1, 1)},
			want: Counts{Sent: 2, Acked: 2, Delivered: 4, Unique: 4, OrderViolations: 1, CopiesExpected: 2, CopiesReceived: 2},
		},
		{
			name:    "a copy at the device that sent the message is misrouted and not received",
			devices: 2,
			ops:     []op{sendDev(0, 0, 1, 1, 1), ack(0), deliverDev(0, 0), deliverDev(0, 1), copyTo(0, 0)},
			want:    Counts{Sent: 1, Acked: 1, Delivered: 2, Unique: 2, CopiesExpected: 1, CopiesLost: 1, CopiesMisrouted: 1},
		},
		{
			name:    "a copy at another user, or naming another recipient, is misrouted",
			devices: 2,
			ops: []op{sendDev(0, 0, 1, 1, 1), ack(0), deliverDev(0, 0), deliverDev(0, 1), copyAt(0, 1, 1, ""),
				copyAt(0, -1, 1, "c"), copyTo(0, 1)},
			want: Counts{Sent: 1, Acked: 1, Delivered: 2, Unique: 2, CopiesExpected: 1, CopiesReceived: 1, CopiesMisrouted: 2},
		},
		{
			// The publish of message 1 (to c) is caught by a reconnection
			// while message 0 (to b) waits for its PUBACK: the broker may
			// take 1 first, and store its copy first.
			name:    "a publish caught by a reconnection may overtake its device's unacknowledged copies",
			devices: 2,
			ops: []op{sendDev(0, 0, 1, 1, 1), sendDev(0, 0, 2, 1, 2), reconnect(1, 0, 1), ack(1), ack(0),
				deliverDev(0, 0), deliverDev(0, 1), deliverDev(1, 0), deliverDev(1, 1), copyTo(1, 1), copyTo(0, 1)},
			want: Counts{Sent: 2, Acked: 2, Delivered: 4, Unique: 4, CopiesExpected: 2, CopiesReceived: 2},
		},
		{
			name:    "a reconnection between publishes lets no copy overtake",
			devices: 2,
			ops: []op{sendDev(0, 0, 1, 1, 1), sendDev(0, 0, 2, 1, 2), reconnect(-1, 0, 1), ack(1), ack(0),
				deliverDev(0, 0), deliverDev(0, 1), deliverDev(1, 0), deliverDev(1, 1), copyTo(1, 1), copyTo(0, 1)},
			want: Counts{Sent: 2, Acked: 2, Delivered: 4, Unique: 4, CopiesExpected: 2, CopiesReceived: 2, CopyOrderViolations: 1},
		},
		{
			name:    "a copy shows the message was stored, though neither PUBACKed nor delivered",
			devices: 2,
			ops:     []op{sendDev(0, 1, 1, 1, 1), copyTo(0, 0)},
			want:    Counts{Sent: 1, Lost: 2, CopiesExpected: 1, CopiesReceived: 1},
		},
		{
			name:    "a refused message owes no copy",
			devices: 2,
			ops: []op{sendDev(0, 0, 1, 1, 1), ack(0),
				raw(0, `{"kind":"error","ref":"tg-0","code":"queue_full","reason":"x"}`)},
			want: Counts{Sent: 1, Acked: 1, Refused: 1, ErrorEvents: 1},
		},
		{
			name:    "a message in flight owes nothing yet",
			devices: 3,
			ops:     []op{sendDev(0, 2, 1, 1, 1)},
			want:    Counts{Sent: 1, InFlight: 1},
		},
		{
			name:    "copies of other runs are foreign",
			devices: 2,
			ops:     []op{raw(0, `{"kind":"sent","from":"a","to":"b","ts":1,"msg":{"id":"other-1","t":1,"s":"a","n":1,"c":1}}`)},
			want:    Counts{Foreign: 1},
		},
		{
			name:    "one device per user: no copies owed",
			devices: 1,
			ops:     []op{sendDev(0, 0, 1, 1, 0), ack(0), deliverDev(0, 0)},
			want:    Counts{Sent: 1, Acked: 1, Delivered: 1, Unique: 1},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newDeviceStream(tt.devices)
			for _, o := range tt.ops {
				o(t, s)
			}
			got, _ := s.ledger.Final(10)
			if got != tt.want {
				t.Errorf("counts\n got %+v\nwant %+v", got, tt.want)
			}
			d := int64(tt.devices)
			stored := got.Sent - got.SendFailed - got.Refused - got.InFlight
			if got.Unique+got.Lost != stored*d {
				t.Errorf("unbalanced: unique %d + lost %d != %d stored messages x %d devices", got.Unique, got.Lost, stored, d)
			}
			if got.CopiesReceived+got.CopiesLost != got.CopiesExpected {
				t.Errorf("unbalanced: copies received %d + lost %d != expected %d", got.CopiesReceived, got.CopiesLost, got.CopiesExpected)
			}
			running := s.ledger.Snapshot()
			if running.Unique != got.Unique || running.CopiesReceived != got.CopiesReceived {
				t.Errorf("running unique %d, copies %d; final scan %d, %d", running.Unique, running.CopiesReceived, got.Unique, got.CopiesReceived)
			}
			// What the run waits for at its end: every delivery and copy
			// still owed, those of the messages in flight included.
			if want := got.Lost + got.CopiesLost + got.InFlight*(2*d-1); s.ledger.Outstanding() != want {
				t.Errorf("outstanding %d, want %d", s.ledger.Outstanding(), want)
			}
		})
	}
}

func TestLedgerDeviceLostSamples(t *testing.T) {
	s := newDeviceStream(2)
	for _, o := range []op{sendDev(0, 1, 1, 1, 1), ack(0), deliverDev(0, 0)} {
		o(t, s)
	}
	_, samples := s.ledger.Final(10)
	if want := []string{"tg-0 a/d1->b/d1", "tg-0 copy a/d1->a/d0"}; !slices.Equal(samples, want) {
		t.Errorf("samples = %q, want %q", samples, want)
	}
}

func TestLedgerCopyLatency(t *testing.T) {
	s := newDeviceStream(2)
	for _, o := range []op{sendDev(0, 0, 1, 1, 1), ack(0), copyTo(0, 1), copyTo(0, 1)} {
		o(t, s)
	}
	h := s.ledger.CopyHistogram()
	if h.TotalCount() != 1 || h.Max() < 3000 || h.Min() > 3000 {
		t.Errorf("copy histogram: count %d, min %d, max %d; want one sample of 3000 µs", h.TotalCount(), h.Min(), h.Max())
	}
	if deliver, _, _ := s.ledger.Histograms(); deliver.TotalCount() != 0 {
		t.Errorf("a copy counted as a delivery: %d samples", deliver.TotalCount())
	}
}

func TestNewMessageFromBadDevice(t *testing.T) {
	l := NewDeviceLedger(streamTag, streamUsers, 2, false)
	if _, err := l.NewMessageFrom(0, 2, 1, 1); err == nil {
		t.Error("device 2 of 2 accepted")
	}
}

// TestRunChatDevices runs the chat scenario on a real chatd with one, two
// and three devices per user: every message reaches every device of its
// recipient once, every sent copy every other device of its sender once,
// in order, and with one device no copy is owed.
func TestRunChatDevices(t *testing.T) {
	tests := []struct{ devices int }{{1}, {2}, {3}}
	broker := startChatd(t)
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%d devices", tt.devices), func(t *testing.T) {
			cfg := testConfig(ScenarioChat, broker)
			cfg.Users = 4
			cfg.Devices = tt.devices
			cfg.Duration = time.Second
			cfg.Rate = 300
			// Each run's users are new to the server: its devices are
			// all the devices they have.
			cfg.UserPrefix = fmt.Sprintf("dev%d", tt.devices)
			t.Logf("seed %d", cfg.Seed)
			rep := runOK(t, cfg)
			assertBalanced(t, rep)
			c := rep.Counts
			d := int64(tt.devices)
			if c.Sent == 0 || c.Acked != c.Sent || c.InFlight != 0 || c.Unique != c.Sent*d || c.Lost != 0 {
				t.Errorf("counts %+v: want every message PUBACKed and delivered to each of %d devices", c, d)
			}
			if want := c.Sent * (d - 1); c.CopiesExpected != want || c.CopiesReceived != want {
				t.Errorf("copies expected %d, received %d; want %d (%d messages, %d other devices each)",
					c.CopiesExpected, c.CopiesReceived, want, c.Sent, d-1)
			}
			if tt.devices > 1 && c.CopiesReceived == 0 {
				t.Error("no sent copy received")
			}
			if c.CopyOrderViolations != 0 || c.CopiesMisrouted != 0 || c.OrderViolations != 0 || c.Misrouted != 0 {
				t.Errorf("counts %+v: want no disorder and nothing misrouted", c)
			}
			if rep.Copy.Count != c.CopiesReceived || rep.Deliver.Count != c.Unique {
				t.Errorf("latency samples: copy %d, deliver %d; counts %+v", rep.Copy.Count, rep.Deliver.Count, c)
			}
			if rep.Connections.Clients != cfg.Users*tt.devices {
				t.Errorf("%d clients connected, want %d users x %d devices", rep.Connections.Clients, cfg.Users, tt.devices)
			}
			if rep.Settings.Devices != tt.devices || rep.Settings.Seed != cfg.Seed {
				t.Errorf("settings %+v: want %d devices, seed %d", rep.Settings, tt.devices, cfg.Seed)
			}

			var table bytes.Buffer
			if err := rep.WriteTable(&table); err != nil {
				t.Fatal(err)
			}
			if got := strings.Contains(table.String(), "sent copies"); got != (tt.devices > 1) ||
				!strings.Contains(table.String(), fmt.Sprintf("seed %d", cfg.Seed)) {
				t.Errorf("table (copies shown: %v, want %v; and the seed):\n%s", got, tt.devices > 1, table.String())
			}
			if tt.devices == 2 {
				t.Logf("summary:\n%s", table.String())
			}
			path := filepath.Join(t.TempDir(), "r.html")
			if err := rep.WriteHTML(path); err != nil {
				t.Fatal(err)
			}
			page, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if got := bytes.Contains(page, []byte("sent copies")); got != (tt.devices > 1) {
				t.Errorf("HTML report shows the copies: %v, want %v", got, tt.devices > 1)
			}
		})
	}
}

// TestRecordSize guards the ledger's memory: a message's record stays 32
// bytes whatever the number of devices.
func TestRecordSize(t *testing.T) {
	if n := unsafe.Sizeof(record{}); n != 32 {
		t.Errorf("a message record takes %d bytes, want 32", n)
	}
}
