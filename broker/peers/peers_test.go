package peers

import (
	"context"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/chatd/chatd/broker/natsnode"
	"github.com/chatd/chatd/broker/queue"
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
	b, err := Start(Options{Conn: n.Conn(), Node: node, Prefix: "test", Heartbeat: beat, DeadAfter: 4 * beat,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, r.handlers())
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

// TestSilentNodeIsGone: a node that stops beating is reported gone.
func TestSilentNodeIsGone(t *testing.T) {
	n := startNATS(t)
	ra := newRecorder()
	a := startBus(t, n, "a", ra, 20*time.Millisecond)
	defer a.Close()
	b := startBus(t, n, "b", newRecorder(), 20*time.Millisecond)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		a.mu.Lock()
		_, heard := a.peers["b"]
		a.mu.Unlock()
		if heard {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a never heard b beat")
		}
	}
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
	for _, subj := range []string{subjStored, subjTyping, subjPresence, subjSession, subjHeartbeat, subjSync} {
		for _, p := range bad {
			if err := n.Conn().Publish("test"+subj, p); err != nil {
				t.Fatal(err)
			}
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
}

func TestFrames(t *testing.T) {
	for _, s := range []string{"", "a", "bob/phone", string(make([]byte, 300))} {
		got, rest, ok := unframe(append(frame(nil, s), 'x'))
		if !ok || got != s || string(rest) != "x" {
			t.Errorf("frame %q: got %q rest %q ok %v", s, got, rest, ok)
		}
	}
}
