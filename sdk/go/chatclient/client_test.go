package chatclient_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/chatd/chatd/broker"
	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/testutil"
	"github.com/chatd/chatd/sdk/go/chatclient"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var secret = []byte(strings.Repeat("k", 32))

// server is a real chatd on a fixed loopback address, so that a restart
// comes back where the clients reconnect.
type server struct {
	t    *testing.T
	dir  string
	addr string
	s    *broker.Server
}

func startServer(t *testing.T) *server {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	sv := &server{t: t, dir: t.TempDir(), addr: addr}
	sv.start()
	t.Cleanup(sv.stop)
	return sv
}

func (sv *server) start() {
	cfg := config.Default()
	cfg.DataDir, cfg.Listen, cfg.HTTP = sv.dir, sv.addr, ""
	cfg.Queue.MinFreeBytes = 1 << 20
	cfg.Auth.Leeway = 0
	s, err := broker.New(broker.Options{Config: cfg, Secret: secret, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		sv.t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		sv.t.Fatal(err)
	}
	sv.s = s
}

func (sv *server) stop() {
	if sv.s == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := sv.s.Close(ctx); err != nil {
		sv.t.Error(err)
	}
	sv.s = nil
}

// tokens mints tokens of ttl for user, counting the calls.
func tokens(user string, ttl time.Duration, calls *atomic.Int64) func(context.Context) (string, error) {
	return func(context.Context) (string, error) {
		if calls != nil {
			calls.Add(1)
		}
		return token.Mint(secret, user, ttl)
	}
}

func dial(t *testing.T, sv *server, user, device string, outbox chatclient.Outbox) *chatclient.Client {
	t.Helper()
	c, err := chatclient.Dial(chatclient.Options{
		Server: "mqtt://" + sv.addr, User: user, Device: device,
		Token: tokens(user, time.Hour, nil), Outbox: outbox, Reconnect: 100 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { closeClient(t, c) })
	return c
}

var closed = map[*chatclient.Client]bool{}

func closeClient(t *testing.T, c *chatclient.Client) {
	if closed[c] {
		return
	}
	closed[c] = true
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Close(ctx); err != nil {
		t.Error(err)
	}
}

// next returns the next event of the type wanted, skipping others.
func next[E chatclient.Event](t *testing.T, c *chatclient.Client) E {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		select {
		case ev, ok := <-c.Events():
			if !ok {
				t.Fatal("events closed")
			}
			if e, ok := ev.(E); ok {
				return e
			}
		case <-deadline:
			var zero E
			t.Fatalf("no %T in 20 s", zero)
		}
	}
}

// TestSendReceiveRead: alice sends bob a message, which bob receives
// with its id; alice is told it was stored, and read once bob marks it.
func TestSendReceiveRead(t *testing.T) {
	sv := startServer(t)
	alice := dial(t, sv, "alice", "phone", nil)
	bob := dial(t, sv, "bob", "phone", nil)
	id, err := alice.Send("bob", map[string]string{"text": "hi bob"})
	if err != nil || id == "" {
		t.Fatalf("send: %q, %v", id, err)
	}
	if st := next[chatclient.Stored](t, alice); st.ID != id {
		t.Fatalf("stored %q, want %q", st.ID, id)
	}
	m := next[chatclient.Message](t, bob)
	var body struct{ Text string }
	if m.Kind != "msg" || m.From != "alice" || m.ID != id || json.Unmarshal(m.Msg, &body) != nil || body.Text != "hi bob" {
		t.Fatalf("bob got %+v", m)
	}
	if err := bob.MarkRead("alice", id); err != nil {
		t.Fatal(err)
	}
	for {
		r := next[chatclient.Receipt](t, alice)
		if r.Status == "read" {
			if r.By != "bob" || len(r.IDs) != 1 || r.IDs[0] != id {
				t.Fatalf("read receipt %+v", r)
			}
			break
		}
	}
}

// TestOutboxSurvivesRestarts: alice sends while the server is down, and
// her app stops before it is back; started again, her client sends what
// waited in its file outbox, and bob gets each message once.
func TestOutboxSurvivesRestarts(t *testing.T) {
	sv := startServer(t)
	bob := dial(t, sv, "bob", "phone", nil)
	outDir := t.TempDir()
	ob, err := chatclient.NewFileOutbox(outDir)
	if err != nil {
		t.Fatal(err)
	}
	alice := dial(t, sv, "alice", "phone", ob)
	first, err := alice.Send("bob", map[string]string{"id": "m-1", "text": "before"})
	if err != nil {
		t.Fatal(err)
	}
	if st := next[chatclient.Stored](t, alice); st.ID != first {
		t.Fatalf("stored %+v", st)
	}
	sv.stop()
	for i := range 3 {
		if _, err := alice.Send("bob", map[string]string{"id": "w-" + string(rune('0'+i)), "text": "while down"}); err != nil {
			t.Fatal(err)
		}
	}
	if n, err := alice.Pending(); err != nil || n != 3 {
		t.Fatalf("pending %d, %v; want 3", n, err)
	}
	closeClient(t, alice)

	sv.start()
	ob2, err := chatclient.NewFileOutbox(outDir)
	if err != nil {
		t.Fatal(err)
	}
	alice = dial(t, sv, "alice", "phone", ob2)
	var got []string
	for len(got) < 4 {
		m := next[chatclient.Message](t, bob)
		got = append(got, m.ID)
	}
	if strings.Join(got, ",") != "m-1,w-0,w-1,w-2" {
		t.Fatalf("bob got %v, want m-1 then w-0..w-2 once each, in order", got)
	}
	testutil.Eventually(t, 10*time.Second, func() bool {
		n, err := alice.Pending()
		return err == nil && n == 0
	}, "the outbox empties")
}

// TestTokenRenewedOnExpiry: the server ends a session whose token
// expired; the client connects again with a fresh one and goes on.
func TestTokenRenewedOnExpiry(t *testing.T) {
	sv := startServer(t)
	bob := dial(t, sv, "bob", "phone", nil)
	var calls atomic.Int64
	alice, err := chatclient.Dial(chatclient.Options{
		Server: "mqtt://" + sv.addr, User: "alice", Device: "phone",
		Token: tokens("alice", 2*time.Second, &calls), Reconnect: 100 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { closeClient(t, alice) })
	testutil.Eventually(t, 20*time.Second, func() bool { return calls.Load() >= 2 }, "a new token asked for after the first expired")
	id, err := alice.Send("bob", map[string]string{"text": "after a new token"})
	if err != nil {
		t.Fatal(err)
	}
	if m := next[chatclient.Message](t, bob); m.ID != id {
		t.Fatalf("bob got %+v", m)
	}
}

// TestPresenceAndTyping: alice watches bob, sees him come online, is told
// his typing once however often he types, and sees him leave.
func TestPresenceAndTyping(t *testing.T) {
	sv := startServer(t)
	alice := dial(t, sv, "alice", "phone", nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := alice.AwaitConnection(ctx); err != nil {
		t.Fatal(err)
	}
	if err := alice.WatchPresence("bob"); err != nil {
		t.Fatal(err)
	}
	bob := dial(t, sv, "bob", "phone", nil)
	if err := bob.AwaitConnection(ctx); err != nil {
		t.Fatal(err)
	}
	for p := next[chatclient.Presence](t, alice); !p.Online; p = next[chatclient.Presence](t, alice) {
	}
	for range 3 {
		if err := bob.Typing("alice"); err != nil {
			t.Fatal(err)
		}
	}
	if ty := next[chatclient.Typing](t, alice); ty.From != "bob" {
		t.Errorf("typing from %q, want bob", ty.From)
	}
	closeClient(t, bob)
	// Throttled: no second typing signal comes before bob's leaving.
	deadline := time.After(20 * time.Second)
	for {
		select {
		case ev := <-alice.Events():
			switch e := ev.(type) {
			case chatclient.Typing:
				t.Errorf("a second typing signal within %v", chatclient.TypingEvery)
			case chatclient.Presence:
				if e.User != "bob" || e.Online || time.Since(e.LastSeen).Abs() > time.Minute {
					t.Fatalf("after bob left: %+v, want bob offline, last seen just now", e)
				}
				return
			}
		case <-deadline:
			t.Fatal("bob's leaving not told in 20 s")
		}
	}
}

// TestUnreadComesAgain: a delivery is acknowledged only once the program
// has read it from Events, so what a program never read before it closed
// comes again to its next run.
func TestUnreadComesAgain(t *testing.T) {
	sv := startServer(t)
	alice := dial(t, sv, "alice", "phone", nil)
	// bob's phone is known to the server, and away while alice writes.
	bob := dial(t, sv, "bob", "phone", nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := bob.AwaitConnection(ctx); err != nil {
		t.Fatal(err)
	}
	closeClient(t, bob)
	const n = 5
	for i := range n {
		if _, err := alice.Send("bob", map[string]string{"id": fmt.Sprintf("m-%d", i)}); err != nil {
			t.Fatal(err)
		}
	}
	for range n {
		next[chatclient.Stored](t, alice)
	}
	// All five come at once when bob connects; he reads one.
	bob = dial(t, sv, "bob", "phone", nil)
	if m := next[chatclient.Message](t, bob); m.ID != "m-0" {
		t.Fatalf("first message %s, want m-0", m.ID)
	}
	// The others are on their way or queued inside the client, unread.
	closeClient(t, bob)
	bob = dial(t, sv, "bob", "phone", nil)
	got := map[string]bool{}
	for len(got) < n-1 {
		m := next[chatclient.Message](t, bob)
		if m.ID != "m-0" {
			got[m.ID] = true
		}
	}
	for i := 1; i < n; i++ {
		if !got[fmt.Sprintf("m-%d", i)] {
			t.Errorf("m-%d never came again", i)
		}
	}
}
