package peers

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"go.uber.org/goleak"

	"github.com/chatd/chatd/broker/cluster/natsnode"
	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/internal/testutil"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// recorder is a node's handlers, recording what they were told.
type recorder struct {
	mu     sync.Mutex
	events []string
	signal chan struct{}
	online []string
	// connected are the client IDs connected to the recorder's node.
	connected []string
}

func newRecorder(online ...string) *recorder {
	return &recorder{signal: make(chan struct{}, 64), online: online}
}

func (r *recorder) add(e string) {
	r.mu.Lock()
	r.events = append(r.events, e)
	r.mu.Unlock()
	r.signal <- struct{}{}
}

func (r *recorder) handlers() Handlers {
	return Handlers{
		Stored: func(user string, m queue.Message) {
			r.add("stored " + user + " " + string(m.Meta) + " " + string(m.Data) + " " + string(rune('0'+m.Seq)))
		},
		Typing: func(user, topic string, payload []byte) {
			r.add("typing " + user + " " + topic + " " + string(payload))
		},
		Presence: func(node, user string, online bool) {
			r.add("presence " + node + " " + user + " " + map[bool]string{true: "on", false: "off"}[online])
		},
		NodeGone:       func(node string) { r.add("gone " + node) },
		SessionStarted: func(clientID string) { r.add("session " + clientID) },
		OnlineUsers:    func() []string { return r.online },
		Missed:         func() { r.add("missed") },
		DeviceRemoved:  func(user, device string) { r.add("removed " + user + " " + device) },
		Erased:         func(user string) { r.add("erased " + user) },
		Connected: func(ids []string) []string {
			return slices.DeleteFunc(ids, func(id string) bool { return !slices.Contains(r.connected, id) })
		},
	}
}

// count reports how many events start with prefix.
func (r *recorder) count(prefix string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, e := range r.events {
		if strings.HasPrefix(e, prefix) {
			n++
		}
	}
	return n
}

// waitCount waits until n events start with prefix.
func (r *recorder) waitCount(t *testing.T, prefix string, n int) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for r.count(prefix) < n {
		select {
		case <-r.signal:
		case <-deadline:
			t.Fatalf("got %d events %q, want %d", r.count(prefix), prefix, n)
		}
	}
}

// waitFor waits until want has been recorded.
func (r *recorder) waitFor(t *testing.T, want string) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		r.mu.Lock()
		ok := slices.Contains(r.events, want)
		r.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-r.signal:
		case <-deadline:
			r.mu.Lock()
			defer r.mu.Unlock()
			t.Fatalf("never got %q; got %q", want, r.events)
		}
	}
}

func startNATS(t *testing.T) *natsnode.Node {
	t.Helper()
	n, err := natsnode.Start(context.Background(), natsnode.Config{Name: "t", Dir: t.TempDir(), Listen: "127.0.0.1:0", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Shutdown)
	return n
}

func startBus(t *testing.T, n *natsnode.Node, node string, r *recorder, beat time.Duration) *Bus {
	t.Helper()
	return startBusWith(t, n, node, r.handlers(), beat, 4*beat)
}

func startBusWith(t *testing.T, n *natsnode.Node, node string, h Handlers, beat, deadAfter time.Duration) *Bus {
	t.Helper()
	b, err := Start(Options{Conn: n.Conn(), Node: node, Prefix: "test", Heartbeat: beat, DeadAfter: deadAfter,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, h)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestNotices: each notice reaches the other node, and only presence
// comes back to its sender too.
func TestNotices(t *testing.T) {
	n := startNATS(t)
	ra, rb := newRecorder(), newRecorder("carol", "dave")
	a := startBus(t, n, "a", ra, time.Second)
	defer a.Close()
	bb := startBus(t, n, "b", rb, time.Second)
	defer bb.Close()

	a.Stored("bob", queue.Message{Seq: 7, Meta: []byte("meta"), Data: []byte(`{"kind":"msg"}`)})
	rb.waitFor(t, `stored bob meta {"kind":"msg"} 7`)
	a.Typing("bob", "inbox/bob", []byte("typing"))
	rb.waitFor(t, "typing bob inbox/bob typing")
	a.SessionStarted("bob/phone")
	rb.waitFor(t, "session bob/phone")
	a.DeviceRemoved("bob", "phone")
	rb.waitFor(t, "removed bob phone")
	a.Erased("bob")
	rb.waitFor(t, "erased bob")
	a.Presence("bob", true)
	rb.waitFor(t, "presence a bob on")
	ra.waitFor(t, "presence a bob on")
	if err := a.SyncPresence(500 * time.Millisecond); err != nil {
		t.Fatal(err)
	}
	ra.waitFor(t, "presence b carol on")
	ra.waitFor(t, "presence b dave on")

	ra.mu.Lock()
	defer ra.mu.Unlock()
	for _, e := range ra.events {
		if !strings.HasPrefix(e, "presence ") {
			t.Errorf("node a was told of its own notice: %q", e)
		}
	}
}

// TestConnected: a node asks its live peers which client IDs they have
// connected, and learns which peers did not answer in time.
func TestConnected(t *testing.T) {
	n := startNATS(t)
	a := startBus(t, n, "a", newRecorder(), 20*time.Millisecond)
	defer a.Close()
	rb := newRecorder()
	rb.connected = []string{"bob/phone", "carol"}
	b := startBus(t, n, "b", rb, 20*time.Millisecond)
	defer b.Close()
	heard := func(names ...string) func() bool {
		return func() bool {
			a.mu.Lock()
			defer a.mu.Unlock()
			for _, name := range names {
				if _, ok := a.peers[name]; !ok {
					return false
				}
			}
			return true
		}
	}
	testutil.Eventually(t, 10*time.Second, heard("b"), "a never heard b beat")
	if ps := a.Peers(); len(ps) != 1 || ps[0].Name != "b" || ps[0].HeardMs < 0 || ps[0].HeardMs > 10_000 {
		t.Fatalf("a's peers: %+v, want b, heard lately", ps)
	}
	got, err := a.Connected([]string{"bob/phone", "bob/laptop"}, 10*time.Second)
	if err != nil || len(got) != 1 || !got["bob/phone"] {
		t.Fatalf("connected: %v, %v; want bob/phone", got, err)
	}
	// A peer that cannot answer is named after the wait.
	c := startBusWith(t, n, "c", Handlers{NodeGone: func(string) {}, Presence: func(string, string, bool) {}}, 20*time.Millisecond, time.Minute)
	defer c.Close()
	testutil.Eventually(t, 10*time.Second, heard("b", "c"), "a never heard c beat")
	// c never answers, so the call takes the whole wait: long enough for b
	// to answer on a loaded machine.
	got, err = a.Connected([]string{"bob/phone"}, 3*time.Second)
	if !errors.Is(err, ErrSilent) || !strings.Contains(err.Error(), "c") || !got["bob/phone"] {
		t.Fatalf("with a silent peer: %v, %v; want bob/phone and ErrSilent naming c", got, err)
	}
}

// TestSilentNodeIsGone: a node that stops beating is reported gone.
func TestSilentNodeIsGone(t *testing.T) {
	n := startNATS(t)
	ra := newRecorder()
	a := startBus(t, n, "a", ra, 20*time.Millisecond)
	defer a.Close()
	b := startBus(t, n, "b", newRecorder(), 20*time.Millisecond)
	testutil.Eventually(t, 10*time.Second, func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		_, heard := a.peers["b"]
		return heard
	}, "a never heard b beat")
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	ra.waitFor(t, "gone b")
}

// TestMalformedNotices: truncated or garbage notices are dropped, never a panic.
func TestMalformedNotices(t *testing.T) {
	n := startNATS(t)
	r := newRecorder()
	b := startBus(t, n, "a", r, time.Second)
	defer b.Close()
	bad := [][]byte{nil, {0}, {0, 5, 'x'}, {0, 1, 'z'}, {0, 1, 'z', 0, 9}, {0, 1, 'z', 0, 2, 'u'}}
	for _, subj := range []string{subjStored, subjTyping, subjPresence, subjSession, subjHeartbeat, subjSync, subjRemoved, subjConnected} {
		for _, p := range bad {
			if err := n.Conn().Publish("test"+subj, p); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Good notices with bad numbers or counts are dropped too.
	good := map[string][]byte{
		subjStored:    append(binary.BigEndian.AppendUint64(frame(frame(frame(nil, "z"), "u"), "m"), 1), 'd'),
		subjHeartbeat: binary.BigEndian.AppendUint64(frame(nil, "z"), 1),
	}
	for _, h := range []struct{ subj, key, value string }{
		{subjStored, hdrNotice, "1"}, {subjStored, hdrNotice, "1.0"}, {subjStored, hdrNotice, "x.1"},
		{subjStored, hdrNotice, "1.-1"}, {subjStored, hdrNotice, "1.2.3"},
		{subjHeartbeat, hdrSent, "x"}, {subjHeartbeat, hdrSent, "-1"}, {subjHeartbeat, hdrSent, "18446744073709551616"},
	} {
		if err := n.Conn().PublishMsg(&nats.Msg{Subject: "test" + h.subj, Data: good[h.subj], Header: nats.Header{h.key: {h.value}}}); err != nil {
			t.Fatal(err)
		}
	}
	// A good notice after the bad ones still arrives: the bus survived them.
	if err := n.Conn().Publish("test"+subjSession, append(frame(nil, "z"), frame(nil, "ok")...)); err != nil {
		t.Fatal(err)
	}
	r.waitFor(t, "session ok")
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.events) != 1 {
		t.Fatalf("malformed notices reached the handlers: %q", r.events)
	}
	// Heartbeats have a goroutine of their own: one after the bad ones.
	if err := n.Conn().Publish("test"+subjHeartbeat, binary.BigEndian.AppendUint64(frame(nil, "sync"), 1)); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 10*time.Second, func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		_, ok := b.peers["sync"]
		return ok
	}, "never heard the sync heartbeat")
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.peers["z"]; ok {
		t.Error("a heartbeat with a bad count was taken")
	}
}

func TestFrames(t *testing.T) {
	for _, s := range []string{"", "a", "bob/phone", string(make([]byte, 300))} {
		got, rest, ok := unframe(append(frame(nil, s), 'x'))
		if !ok || got != s || string(rest) != "x" {
			t.Errorf("frame %q: got %q rest %q ok %v", s, got, rest, ok)
		}
	}
}

// step is a notice published by hand as a peer would: a stored notice
// numbered n (unnumbered, as an older node sends, if n is 0), or with
// beat a heartbeat saying n were sent (no count, as an older node, if old).
type step struct {
	beat, final, old bool
	boot, n          uint64
}

func storedStep(boot, n uint64) step { return step{boot: boot, n: n} }
func beatStep(boot, n uint64, final bool) step {
	return step{beat: true, boot: boot, n: n, final: final}
}
func publishStep(t *testing.T, n *natsnode.Node, i int, s step) {
	t.Helper()
	msg := &nats.Msg{Header: nats.Header{}}
	if s.beat {
		msg.Subject = "test" + subjHeartbeat
		msg.Data = binary.BigEndian.AppendUint64(frame(nil, "z"), s.boot)
		if !s.old {
			msg.Header.Set(hdrSent, strconv.FormatUint(s.n, 10))
		}
		if s.final {
			msg.Header.Set(hdrFinal, "1")
		}
	} else {
		msg.Subject = "test" + subjStored
		msg.Data = binary.BigEndian.AppendUint64(frame(frame(frame(nil, "z"), "u"), "m"), s.n)
		msg.Data = append(msg.Data, fmt.Sprintf("step%d", i)...)
		if s.n > 0 {
			msg.Header.Set(hdrNotice, fmt.Sprintf("%d.%d", s.boot, s.n))
		}
	}
	if err := n.Conn().PublishMsg(msg); err != nil {
		t.Fatal(err)
	}
}

// TestStoredNumbering: a peer's stored notices and heartbeats tell the
// node that notices were lost exactly when they were, once per loss;
// in order, from a restarted peer that closed, or unnumbered from an
// older node, they never do, and each notice is still handled.
func TestStoredNumbering(t *testing.T) {
	nn := startNATS(t)
	for _, tc := range []struct {
		name  string
		steps []step
		want  int
	}{
		{"in order", []step{storedStep(1, 1), storedStep(1, 2), beatStep(1, 2, false), storedStep(1, 3), beatStep(1, 3, false), beatStep(1, 3, false)}, 0},
		{"first notice of an unknown node", []step{storedStep(1, 57), storedStep(1, 58), beatStep(1, 58, false), beatStep(1, 58, false)}, 0},
		{"first heartbeat of an unknown node", []step{beatStep(1, 9, false), storedStep(1, 10), beatStep(1, 10, false), beatStep(1, 10, false)}, 0},
		{"gap", []step{storedStep(1, 1), storedStep(1, 3), storedStep(1, 4), beatStep(1, 4, false), beatStep(1, 4, false)}, 1},
		{"two gaps", []step{storedStep(1, 1), storedStep(1, 3), storedStep(1, 6)}, 2},
		{"heartbeats count notices never heard", []step{storedStep(1, 1), beatStep(1, 3, false), beatStep(1, 3, false), beatStep(1, 3, false)}, 1},
		{"restart after closing", []step{storedStep(1, 1), storedStep(1, 2), beatStep(1, 2, true), storedStep(2, 1), storedStep(2, 2)}, 0},
		{"restart after closing, heartbeat first", []step{storedStep(1, 1), beatStep(1, 1, true), beatStep(2, 0, false), storedStep(2, 1), beatStep(2, 1, false)}, 0},
		{"restart after closing with notices unheard", []step{storedStep(1, 1), beatStep(1, 2, true), storedStep(2, 1)}, 1},
		{"restart after a crash", []step{storedStep(1, 1), storedStep(1, 2), beatStep(1, 2, false), storedStep(2, 1)}, 1},
		{"restart whose first notices were lost", []step{storedStep(1, 1), beatStep(1, 1, true), storedStep(2, 3)}, 1},
		{"restart whose counted notices were lost", []step{storedStep(1, 1), beatStep(1, 1, true), beatStep(2, 2, false), beatStep(2, 2, false)}, 1},
		{"old format", []step{storedStep(0, 0), storedStep(0, 0), {beat: true, old: true, boot: 1}, storedStep(0, 0), {beat: true, old: true, boot: 1}}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRecorder()
			b := startBus(t, nn, "self", r, time.Minute)
			defer b.Close()
			for i, s := range tc.steps {
				publishStep(t, nn, i, s)
				// Notices and heartbeats have a goroutine each: wait
				// for each step to be handled to keep their order.
				if s.beat {
					testutil.Eventually(t, 10*time.Second, func() bool {
						b.mu.Lock()
						defer b.mu.Unlock()
						return b.peers["z"].boot == s.boot
					}, "never heard the heartbeat")
					// The sync beat's handler starts after z's ended.
					sync := uint64(i + 1)
					if err := nn.Conn().Publish("test"+subjHeartbeat, binary.BigEndian.AppendUint64(frame(nil, "sync"), sync)); err != nil {
						t.Fatal(err)
					}
					testutil.Eventually(t, 10*time.Second, func() bool {
						b.mu.Lock()
						defer b.mu.Unlock()
						return b.peers["sync"].boot == sync
					}, "never heard the sync heartbeat")
				} else {
					r.waitFor(t, fmt.Sprintf("stored u m step%d %c", i, rune('0'+s.n)))
				}
			}
			if got := r.count("missed"); got != tc.want {
				r.mu.Lock()
				defer r.mu.Unlock()
				t.Fatalf("Missed called %d times, want %d; events %q", got, tc.want, r.events)
			}
		})
	}
}

// TestMissedMayBeNil: a gap with no Missed handler is no panic.
func TestMissedMayBeNil(t *testing.T) {
	nn := startNATS(t)
	r := newRecorder()
	h := r.handlers()
	h.Missed = nil
	b := startBusWith(t, nn, "self", h, time.Minute, time.Minute)
	defer b.Close()
	for i, s := range []step{storedStep(1, 1), storedStep(1, 3)} {
		publishStep(t, nn, i, s)
	}
	r.waitFor(t, "stored u m step1 3")
}

// heartbeats waits until node's peer has beaten twice more, so that the
// heartbeat after this moment has been handled in full.
func heartbeats(t *testing.T, b *Bus, node string) {
	t.Helper()
	for range 2 {
		b.mu.Lock()
		since := b.peers[node].seen
		b.mu.Unlock()
		testutil.Eventually(t, 10*time.Second, func() bool {
			b.mu.Lock()
			defer b.mu.Unlock()
			return b.peers[node].seen.After(since)
		}, "never heard %s beat", node)
	}
}

// TestBusesNeverMissInOrder: stored notices sent by real buses from many
// goroutines at once, and by a peer that restarts, reach the other node
// without it ever taking them for lost.
func TestBusesNeverMissInOrder(t *testing.T) {
	nn := startNATS(t)
	ra, rb := newRecorder(), newRecorder()
	// Long DeadAfter: a node reaped on a busy machine would be a loss.
	a := startBusWith(t, nn, "a", ra.handlers(), 20*time.Millisecond, time.Minute)
	b := startBusWith(t, nn, "b", rb.handlers(), 20*time.Millisecond, time.Minute)
	defer b.Close()

	const senders, each = 8, 25
	var wg sync.WaitGroup
	for i := range senders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range each {
				a.Stored("bob", queue.Message{Seq: uint64(i*each + j), Data: []byte("x")})
			}
		}()
	}
	wg.Wait()
	rb.waitCount(t, "stored ", senders*each)
	heartbeats(t, b, "a")

	// a restarts: its new incarnation numbers from 1 again.
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	a = startBusWith(t, nn, "a", ra.handlers(), 20*time.Millisecond, time.Minute)
	defer a.Close()
	for i := range 3 {
		a.Stored("bob", queue.Message{Seq: uint64(i), Data: []byte("y")})
	}
	rb.waitCount(t, "stored ", senders*each+3)
	heartbeats(t, b, "a")
	if got := rb.count("missed"); got != 0 {
		t.Fatalf("Missed called %d times for notices all heard", got)
	}
	if got := ra.count("missed"); got != 0 {
		t.Fatalf("Missed called %d times on the sender", got)
	}
}

// TestReconnectIsMissed: notices sent while the bus's connection was down
// are gone, so a reconnect is a loss.
func TestReconnectIsMissed(t *testing.T) {
	nn := startNATS(t)
	r := newRecorder()
	b := startBusWith(t, nn, "b", r.handlers(), 20*time.Millisecond, time.Minute)
	defer b.Close()
	if err := nn.Conn().ForceReconnect(); err != nil {
		t.Fatal(err)
	}
	r.waitFor(t, "missed")
	// Still listening after it.
	publishStep(t, nn, 0, storedStep(1, 1))
	r.waitFor(t, "stored u m step0 1")
}

// TestDroppedIsMissed: notices dropped because this node handled them too
// slowly are a loss.
func TestDroppedIsMissed(t *testing.T) {
	nn := startNATS(t)
	release := make(chan struct{})
	missed := make(chan struct{}, 1)
	b := startBusWith(t, nn, "b", Handlers{
		Stored: func(string, queue.Message) { <-release },
		Missed: func() {
			select {
			case missed <- struct{}{}:
			default:
			}
		},
	}, 20*time.Millisecond, time.Minute)
	defer b.Close()
	defer close(release) // before Close, which waits for the handler
	if err := b.stored.SetPendingLimits(1, -1); err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		publishStep(t, nn, i, storedStep(0, 0))
	}
	select {
	case <-missed:
	case <-time.After(10 * time.Second):
		t.Fatal("dropped notices never reported")
	}
}

// TestSendsBeforeStart: the server builds a bus before the parts that
// send through it and starts it later. A bus not started yet sends its
// notices (a node takes no connections before Start, but its store may
// already hold messages), and Close before Start has nothing to stop.
func TestSendsBeforeStart(t *testing.T) {
	n := startNATS(t)
	rb := newRecorder()
	b := startBus(t, n, "b", rb, time.Second)
	defer b.Close()
	a := New(Options{Conn: n.Conn(), Node: "a", Prefix: "test", Heartbeat: time.Second, DeadAfter: 4 * time.Second,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	a.Stored("bob", queue.Message{Seq: 1, Meta: []byte("m"), Data: []byte("d")})
	rb.waitFor(t, "stored bob m d 1")
	a.Typing("bob", "inbox/bob", []byte("t"))
	rb.waitFor(t, "typing bob inbox/bob t")
	if err := a.Close(); err != nil {
		t.Fatalf("Close before Start: %v", err)
	}

	c := New(Options{Conn: n.Conn(), Node: "c", Prefix: "test", Heartbeat: time.Second, DeadAfter: 4 * time.Second,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	rc := newRecorder()
	if err := c.Start(rc.handlers()); err != nil {
		t.Fatal(err)
	}
	b.Stored("carol", queue.Message{Seq: 2, Meta: []byte("m"), Data: []byte("d")})
	rc.waitFor(t, "stored carol m d 2")
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}
