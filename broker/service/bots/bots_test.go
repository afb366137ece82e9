package bots_test

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/chatd/chatd/broker/protocol/envelope"
	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/queue/badgerq"
	"github.com/chatd/chatd/broker/service/bots"
	"github.com/chatd/chatd/broker/service/events"
	"github.com/chatd/chatd/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var secret = []byte(strings.Repeat("s", 32))

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// openStore opens a Badger store in dir on clock now.
func openStore(t *testing.T, dir string, now func() time.Time) *badgerq.Store {
	t.Helper()
	q := queue.DefaultSettings()
	q.MessageTTL = time.Hour
	s, err := badgerq.Open(badgerq.Options{Dir: dir, Settings: q, Sync: badgerq.SyncNone, MinFreeBytes: 1, Now: now, Logger: quiet()})
	if err != nil {
		t.Fatalf("open queue: %v", err)
	}
	return s
}

// send stores a message from alice with id to user and waits until it is.
func send(t *testing.T, s queue.Store, user, id string) {
	t.Helper()
	done := make(chan queue.Status, 1)
	s.Append(&queue.Request{
		To: user, Sender: "alice", ID: id, Meta: envelope.Meta("alice", "", id),
		Data: fmt.Appendf(nil, `{"from":"alice","id":%q}`, id),
		Done: func(st queue.Status, _ queue.Message, _ error) { done <- st },
	})
	if st := <-done; st != queue.Stored {
		t.Fatalf("append %s: %v", id, st)
	}
}

// sink is a bot webhook that records the ids of the messages it took, in
// order, and fails the requests fail says to fail.
type sink struct {
	t    *testing.T
	mu   sync.Mutex
	took []string
	// tries counts requests per message id.
	tries map[string]int
	fail  func(id string, try int) bool
	URL   string
}

func newSink(t *testing.T, fail func(id string, try int) bool) *sink {
	k := &sink{t: t, tries: map[string]int{}, fail: fail}
	srv := testutil.Webhook(t, func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			t.Errorf("read request: %v", err)
			return
		}
		if err := events.Verify(r.Header, secret, body, time.Now(), time.Minute); err != nil {
			t.Errorf("request %s: %v", body, err)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		var req bots.Request
		var msg struct{ ID string }
		if err := json.Unmarshal(body, &req); err != nil || json.Unmarshal(req.Message, &msg) != nil {
			t.Errorf("request %s: %v", body, err)
			return
		}
		if req.Type != bots.Type || req.ID != r.Header.Get(events.HeaderID) {
			t.Errorf("request %s: type %q, id header %q", body, req.Type, r.Header.Get(events.HeaderID))
		}
		k.mu.Lock()
		defer k.mu.Unlock()
		k.tries[msg.ID]++
		if k.fail != nil && k.fail(msg.ID, k.tries[msg.ID]) {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		k.took = append(k.took, msg.ID)
	})
	k.URL = srv.URL
	return k
}

func (k *sink) taken() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]string(nil), k.took...)
}

// wantTaken waits until the sink took exactly want, in order.
func (k *sink) wantTaken(want ...string) {
	k.t.Helper()
	testutil.Eventually(k.t, 10*time.Second, func() bool { return len(k.taken()) >= len(want) }, "webhook took %d of %d", len(k.taken()), len(want))
	if got := k.taken(); strings.Join(got, ",") != strings.Join(want, ",") {
		k.t.Fatalf("webhook took %v, want %v", got, want)
	}
}

// receipts records what the runner reports delivered.
type receipts struct {
	mu  sync.Mutex
	ids []string
}

func (r *receipts) delivered(user string, metas [][]byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, m := range metas {
		_, _, id, _ := envelope.ParseMeta(m)
		r.ids = append(r.ids, user+":"+id)
	}
}

func (r *receipts) list() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.ids...)
}

func start(t *testing.T, s queue.Store, rc *receipts, list ...bots.Bot) *bots.Runner {
	t.Helper()
	r, err := bots.Start(bots.Options{
		Bots: list, Queue: s, Secret: secret, Delivered: rc.delivered,
		Poll: 5 * time.Millisecond, Backoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond, Logger: quiet(),
	})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestInOrderThroughFailures: a webhook that fails at random (seeded)
// still gets every message once it answers 2xx, in order, and the queue
// empties as it takes them.
func TestInOrderThroughFailures(t *testing.T) {
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(uint64(seed), 0))
	var rmu sync.Mutex
	k := newSink(t, func(string, int) bool {
		rmu.Lock()
		defer rmu.Unlock()
		return rng.IntN(3) == 0
	})
	s := openStore(t, t.TempDir(), time.Now)
	defer s.Close()
	rc := &receipts{}
	r := start(t, s, rc, bots.Bot{User: "echo", URL: k.URL})
	defer r.Close()
	var want, wantReceipts []string
	for i := range 40 {
		id := fmt.Sprintf("m%02d", i)
		send(t, s, "echo", id)
		want, wantReceipts = append(want, id), append(wantReceipts, "echo:"+id)
	}
	k.wantTaken(want...)
	testutil.Eventually(t, 10*time.Second, func() bool { return len(rc.list()) == len(want) }, "receipts")
	if got := rc.list(); strings.Join(got, ",") != strings.Join(wantReceipts, ",") {
		t.Fatalf("delivered %v, want %v", got, wantReceipts)
	}
	testutil.Eventually(t, 10*time.Second, func() bool {
		d, err := s.Depth("echo")
		return err == nil && d == 0
	}, "the bot's queue empties")
	if st := r.Stats(); st.Sent != 40 {
		t.Fatalf("stats %+v, want 40 sent", st)
	}
}

// TestWaitsForItsWebhook: messages to a bot whose webhook is down wait
// in its queue, across a restart of the server (the store reopened),
// and reach the webhook once it is back; a second bot is not held up.
func TestWaitsForItsWebhook(t *testing.T) {
	var mu sync.Mutex
	down := true
	k := newSink(t, func(string, int) bool {
		mu.Lock()
		defer mu.Unlock()
		return down
	})
	other := newSink(t, nil)
	dir := filepath.Join(t.TempDir(), "q")
	s := openStore(t, dir, time.Now)
	rc := &receipts{}
	r := start(t, s, rc, bots.Bot{User: "echo", URL: k.URL}, bots.Bot{User: "news", URL: other.URL})
	send(t, s, "echo", "a")
	send(t, s, "echo", "b")
	send(t, s, "news", "n")
	other.wantTaken("n")
	testutil.Eventually(t, 10*time.Second, func() bool { return r.Stats().Retried >= 2 }, "retries")
	r.Close()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if got := k.taken(); len(got) != 0 {
		t.Fatalf("a webhook that is down took %v", got)
	}

	s = openStore(t, dir, time.Now)
	defer s.Close()
	r = start(t, s, rc, bots.Bot{User: "echo", URL: k.URL}, bots.Bot{User: "news", URL: other.URL})
	defer r.Close()
	mu.Lock()
	down = false
	mu.Unlock()
	k.wantTaken("a", "b")
	// news's message was taken before the restart and is not sent again.
	other.wantTaken("n")
}

// TestExpiredMessageSkipped: a message its webhook refuses until it
// expires (queue.message_ttl) is given up, and the next one goes.
func TestExpiredMessageSkipped(t *testing.T) {
	// Badger hides expired messages by the wall clock too: the test's
	// clock starts now.
	clock := testutil.NewClock()
	clock.Advance(time.Since(clock.Now()))
	k := newSink(t, func(id string, _ int) bool { return id == "old" })
	s := openStore(t, t.TempDir(), clock.Now)
	defer s.Close()
	r := start(t, s, &receipts{}, bots.Bot{User: "echo", URL: k.URL})
	defer r.Close()
	send(t, s, "echo", "old")
	testutil.Eventually(t, 10*time.Second, func() bool { return r.Stats().Retried >= 3 }, "retries of the refused message")
	clock.Advance(2 * time.Hour)
	send(t, s, "echo", "new")
	k.wantTaken("new")
}

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    []bots.Bot
		wantErr string
	}{
		{in: "", want: nil},
		{in: "echo=http://127.0.0.1:9000/echo", want: []bots.Bot{{"echo", "http://127.0.0.1:9000/echo"}}},
		{in: "a=https://x.example/a, b=https://x.example/b", want: []bots.Bot{{"a", "https://x.example/a"}, {"b", "https://x.example/b"}}},
		{in: "echo", wantErr: "want user=URL"},
		{in: "bad/user=http://x.example", wantErr: "not a user ID"},
		{in: "a=http://x.example,a=http://y.example", wantErr: "named twice"},
		{in: "a=ftp://x.example", wantErr: "bot a"},
	} {
		got, err := bots.Parse(tc.in)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("Parse(%q) = %v, want error with %q", tc.in, err, tc.wantErr)
			}
			continue
		}
		if err != nil || fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("Parse(%q) = %v, %v, want %v", tc.in, got, err, tc.want)
		}
	}
}

// TestBellWakesIdleConsumer: with a poll of an hour, a message stored for
// an idle bot reaches its webhook once its bell rings, and the bell of a
// user that is no bot, or of no Bell at all, does nothing.
func TestBellWakesIdleConsumer(t *testing.T) {
	k := newSink(t, nil)
	s := openStore(t, t.TempDir(), time.Now)
	defer s.Close()
	list := []bots.Bot{{User: "echo", URL: k.URL}}
	bell := bots.NewBell(list)
	r, err := bots.Start(bots.Options{
		Bots: list, Queue: s, Secret: secret, Bell: bell,
		Poll: time.Hour, Backoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond, Logger: quiet(),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	// The consumer's first read may come before or after m1 is stored;
	// once it found the queue empty it idles for an hour unless rung.
	var want []string
	for i := 1; i <= 4; i++ {
		id := fmt.Sprintf("m%d", i)
		send(t, s, "echo", id)
		bell.Stored("bob") // no bot: nothing
		bell.Stored("echo")
		bell.Stored("echo") // a second ring while one is pending is the same
		want = append(want, id)
		k.wantTaken(want...)
	}
	var none *bots.Bell
	none.Stored("echo") // a nil Bell, as without bots: nothing, no panic
	if bots.NewBell(nil) != nil {
		t.Error("NewBell of no bots is not nil")
	}
}
