package jsqueue

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chatd/chatd/internal/testutil"

	"go.uber.org/goleak"

	"github.com/chatd/chatd/broker/cluster/natsnode"
	"github.com/chatd/chatd/broker/queue"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// harness is one embedded single-node NATS and a Store on it, R1.
type harness struct {
	t      *testing.T
	dir    string
	node   *natsnode.Node
	s      *Store
	mu     sync.Mutex
	stored []string // "user:seq" in OnStored order
}

func newHarness(t *testing.T, mutate func(*queue.Settings)) *harness {
	before := goleak.IgnoreCurrent()
	h := &harness{t: t, dir: t.TempDir()}
	h.startNode()
	h.open(mutate)
	t.Cleanup(func() {
		h.close()
		h.node.Shutdown()
		goleak.VerifyNone(t, before)
	})
	return h
}

func (h *harness) startNode() {
	n, err := natsnode.Start(context.Background(), natsnode.Config{Name: "solo", Dir: h.dir, Listen: "127.0.0.1:0", Logger: quiet()})
	if err != nil {
		h.t.Fatal(err)
	}
	h.node = n
}

func testQueue(mutate func(*queue.Settings)) queue.Settings {
	q := queue.DefaultSettings()
	q.AckFlushInterval = 2 * time.Millisecond
	if mutate != nil {
		mutate(&q)
	}
	return q
}

func (h *harness) open(mutate func(*queue.Settings)) {
	s, err := Open(context.Background(), Options{
		Conn: h.node.Conn(), Settings: testQueue(mutate), Replicas: 1, Shards: 2, Logger: quiet(),
	})
	if err != nil {
		h.t.Fatal(err)
	}
	h.s = s
}

func (h *harness) close() {
	if h.s != nil {
		if err := h.s.Close(); err != nil {
			h.t.Error(err)
		}
		h.s = nil
	}
}

// restart closes the store, restarts the NATS server on the same
// directory and opens the store again.
func (h *harness) restart(mutate func(*queue.Settings)) {
	h.close()
	h.node.Shutdown()
	h.startNode()
	h.open(mutate)
}

// appendMsg stores one message and waits for its outcome.
func appendMsg(t *testing.T, s *Store, r *queue.Request) (queue.Status, queue.Message) {
	t.Helper()
	type res struct {
		st  queue.Status
		m   queue.Message
		err error
	}
	ch := make(chan res, 1)
	r.Done = func(st queue.Status, m queue.Message, err error) { ch <- res{st, m, err} }
	s.Append(r)
	got := <-ch
	if got.st == queue.Failed {
		t.Fatalf("append: %v", got.err)
	}
	return got.st, got.m
}

// append stores one message and waits for its outcome; OnStored records
// each stored copy in h.stored.
func (h *harness) append(to, sender, id, data string) (queue.Status, queue.Message) {
	h.t.Helper()
	return appendMsg(h.t, h.s, &queue.Request{To: to, Sender: sender, ID: id, Data: []byte(data), OnStored: h.onStored})
}

// read returns user's messages after a cursor as "data" strings.
func (h *harness) read(user string, after uint64) []string {
	h.t.Helper()
	return readData(h.t, h.s, user, after)
}

func readData(t *testing.T, s *Store, user string, after uint64) []string {
	t.Helper()
	msgs, err := s.Read(user, after, 10000)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]string, len(msgs))
	for i, m := range msgs {
		if i > 0 && m.Seq <= msgs[i-1].Seq {
			t.Fatalf("read out of order: %d after %d", m.Seq, msgs[i-1].Seq)
		}
		out[i] = string(m.Data)
	}
	return out
}

// flushed waits until the lazy ack flush has brought user's depth to depth.
func (h *harness) flushed(user string, depth uint64) {
	h.t.Helper()
	testutil.EventuallyNoError(h.t, 10*time.Second, func() error {
		d, err := h.s.Depth(user)
		if err == nil && d != depth {
			err = fmt.Errorf("depth %d", d)
		}
		return err
	}, "depth of %s never reached %d", user, depth)
}

func eq(t *testing.T, what string, got, want []string) {
	t.Helper()
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("%s = %v, want %v", what, got, want)
	}
}

func TestAppendOrdersAndReadsPerUser(t *testing.T) {
	h := newHarness(t, nil)
	var seqs []uint64
	for i, c := range []struct{ to, data string }{{"bob", "a"}, {"carol", "b"}, {"bob", "c"}, {"bob.with*odd>chars", "d"}} {
		st, m := h.append(c.to, "alice", fmt.Sprint(i), c.data)
		if st != queue.Stored || m.Seq == 0 || string(m.Data) != c.data {
			t.Fatalf("append %d: %v %+v", i, st, m)
		}
		seqs = append(seqs, m.Seq)
	}
	if seqs[2] <= seqs[0] {
		t.Fatalf("bob's sequences %d then %d do not grow", seqs[0], seqs[2])
	}
	eq(t, "bob", h.read("bob", 0), []string{"a", "c"})
	eq(t, "carol", h.read("carol", 0), []string{"b"})
	eq(t, "odd user", h.read("bob.with*odd>chars", 0), []string{"d"})
	eq(t, "bob after his first", h.read("bob", seqs[0]), []string{"c"})
	eq(t, "bob after his last", h.read("bob", seqs[2]), []string{})
	if head, err := h.s.Head("bob"); err != nil || head != seqs[2] {
		t.Fatalf("head of bob %d, %v; want %d", head, err, seqs[2])
	}
	if d, err := h.s.Depth("bob"); err != nil || d != 2 {
		t.Fatalf("depth of bob %d, %v; want 2", d, err)
	}
	if streams, _ := h.s.DiskSize(); streams == 0 {
		t.Fatal("DiskSize: no bytes in the streams")
	}
	if free := h.s.FreeBytes(); free != -1 {
		t.Fatalf("FreeBytes %d, want -1 (no account limit)", free)
	}
	msgs, err := h.s.Read("bob", 0, 1)
	if err != nil || len(msgs) != 1 || msgs[0].Seq != seqs[0] {
		t.Fatalf("read max 1: %+v, %v", msgs, err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	eq(t, "stored callbacks", h.stored, []string{
		fmt.Sprint("bob:", seqs[0]), fmt.Sprint("carol:", seqs[1]), fmt.Sprint("bob:", seqs[2]), fmt.Sprint("bob.with*odd>chars:", seqs[3]),
	})
}

func TestDedup(t *testing.T) {
	cases := []struct {
		name       string
		to         string
		sender, id string
		want       queue.Status
		wantStored int
	}{
		{"first", "bob", "alice", "m1", queue.Stored, 1},
		{"same sender same id", "bob", "alice", "m1", queue.Duplicate, 1},
		{"other sender same id", "bob", "mallory", "m1", queue.Stored, 2},
		{"no id: server event", "bob", "alice", "", queue.Stored, 3},
		{"no id again", "bob", "alice", "", queue.Stored, 4},
		// The dedup key includes the recipient (a stream's window cannot see
		// another shard's): the same id to someone else is stored.
		{"same id other recipient", "carol", "alice", "m1", queue.Stored, 4},
	}
	h := newHarness(t, nil)
	for _, c := range cases {
		st, _ := h.append(c.to, c.sender, c.id, c.name)
		if st != c.want {
			t.Fatalf("%s: status %v, want %v", c.name, st, c.want)
		}
		if n := len(h.read("bob", 0)); n != c.wantStored {
			t.Fatalf("%s: %d stored for bob, want %d", c.name, n, c.wantStored)
		}
	}
	if st := h.s.Stats(); st.Duplicates != 1 || st.Stored != 5 {
		t.Fatalf("stats %+v", st)
	}
}

func TestDedupInOneBatch(t *testing.T) {
	h := newHarness(t, nil)
	var wg sync.WaitGroup
	statuses := make([]queue.Status, 2)
	for i := range 2 {
		wg.Add(1)
		h.appendReq(&queue.Request{To: "bob", Sender: "alice", ID: "same", Data: []byte("x"), Done: func(st queue.Status, _ queue.Message, _ error) {
			statuses[i] = st
			wg.Done()
		}})
	}
	wg.Wait()
	if statuses[0] != queue.Stored || statuses[1] != queue.Duplicate {
		t.Fatalf("statuses %v", statuses)
	}
}

func TestCap(t *testing.T) {
	h := newHarness(t, func(q *queue.Settings) { q.MaxQueueMessages = 3 })
	if _, _, err := h.s.Attach("bob", "phone", false); err != nil {
		t.Fatal(err)
	}
	var first queue.Message
	for i := range 3 {
		st, m := h.append("bob", "alice", fmt.Sprint(i), "x")
		if st != queue.Stored {
			t.Fatalf("append %d: %v", i, st)
		}
		if i == 0 {
			first = m
		}
	}
	if st, _ := h.append("bob", "alice", "over", "x"); st != queue.Full {
		t.Fatalf("append over cap: %v, want Full", st)
	}
	// Another user's queue is not affected.
	if st, _ := h.append("carol", "alice", "other", "x"); st != queue.Stored {
		t.Fatalf("append to carol: %v", st)
	}
	// An acknowledged message stops counting once it is purged.
	h.s.Ack("bob", "phone", first.Seq)
	h.flushed("bob", 2)
	if st, _ := h.append("bob", "alice", "after-ack", "x"); st != queue.Stored {
		t.Fatalf("append after ack: %v, want Stored", st)
	}
	if st := h.s.Stats(); st.Full != 1 {
		t.Fatalf("stats %+v, want 1 full", st)
	}
}

func TestDeletedOnlyWhenEveryDeviceAcked(t *testing.T) {
	h := newHarness(t, nil)
	for _, d := range []string{"phone", "laptop"} {
		if c, _, err := h.s.Attach("bob", d, false); err != nil || c != 0 {
			t.Fatalf("attach %s: cursor %d, %v", d, c, err)
		}
	}
	var seqs []uint64
	for i := range 4 {
		_, m := h.append("bob", "alice", fmt.Sprint(i), fmt.Sprint(i))
		seqs = append(seqs, m.Seq)
	}
	h.s.Ack("bob", "phone", seqs[3])
	h.s.Ack("bob", "laptop", seqs[1])
	h.flushed("bob", 2)
	eq(t, "left", h.read("bob", 0), []string{"2", "3"})
	h.s.Ack("bob", "laptop", seqs[3])
	h.flushed("bob", 0)
	eq(t, "left", h.read("bob", 0), []string{})
	// The stream may show the purge before its answer reaches the counter.
	testutil.Eventually(t, 10*time.Second, func() bool { return h.s.Stats().Deleted == 4 }, "want 4 deleted")
	if n := h.s.Undelivered(); n != 0 {
		t.Fatalf("undelivered %d after every device acked", n)
	}
}

func TestFirstDeviceGetsBacklogLaterDevicesDoNot(t *testing.T) {
	h := newHarness(t, nil)
	_, m := h.append("bob", "alice", "1", "queued")
	if c, _, _ := h.s.Attach("bob", "phone", false); c != m.Seq-1 {
		t.Fatalf("first device cursor %d, want %d (gets everything)", c, m.Seq-1)
	}
	if c, _, _ := h.s.Attach("bob", "laptop", false); c != m.Seq {
		t.Fatalf("second device cursor %d, want %d (from now on)", c, m.Seq)
	}
	if ok, err := h.s.MayAttach("bob", "tablet"); err != nil || !ok {
		t.Fatalf("may attach a third: %v, %v", ok, err)
	}
}

func TestMaxDevices(t *testing.T) {
	h := newHarness(t, func(q *queue.Settings) { q.MaxDevices = 1 })
	if _, _, err := h.s.Attach("bob", "phone", false); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		device string
		want   bool
	}{{"phone", true}, {"laptop", false}} {
		if ok, err := h.s.MayAttach("bob", c.device); err != nil || ok != c.want {
			t.Fatalf("may attach %s: %v, %v; want %v", c.device, ok, err, c.want)
		}
	}
}

func TestTransientDeviceIsForgotten(t *testing.T) {
	h := newHarness(t, nil)
	if _, _, err := h.s.Attach("bob", "phone", false); err != nil {
		t.Fatal(err)
	}
	if _, _, err := h.s.Attach("bob", "web", true); err != nil {
		t.Fatal(err)
	}
	_, m := h.append("bob", "alice", "1", "x")
	h.s.Ack("bob", "phone", m.Seq)
	h.s.Detach("bob", "web")
	// With the transient device gone, the phone's ack alone deletes it.
	h.flushed("bob", 0)
	if _, err := h.s.Cursor("bob", "web"); err == nil {
		t.Fatal("the transient device is still known")
	}
}

func TestRestartKeepsMessagesCursorsAndDedup(t *testing.T) {
	h := newHarness(t, nil)
	if _, _, err := h.s.Attach("bob", "phone", false); err != nil {
		t.Fatal(err)
	}
	var last queue.Message
	for i := range 5 {
		_, last = h.append("bob", "alice", fmt.Sprint(i), fmt.Sprint(i))
	}
	h.s.Ack("bob", "phone", last.Seq)
	h.s.SetSubscribed("bob", "phone", true)
	h.flushed("bob", 0)
	_, kept := h.append("bob", "alice", "5", "5")
	unacked := []string{"5"}

	for _, how := range []string{"store reopened", "server restarted"} {
		if how == "store reopened" {
			h.close()
			h.open(nil)
		} else {
			h.restart(nil)
		}
		if c, sub, err := h.s.Attach("bob", "phone", false); err != nil || c != last.Seq || !sub {
			t.Fatalf("%s: cursor %d, subscribed %v, %v; want %d, true", how, c, sub, err, last.Seq)
		}
		if got, err := h.s.Cursor("bob", "phone"); err != nil || got != last.Seq {
			t.Fatalf("%s: Cursor %d, %v", how, got, err)
		}
		eq(t, how, h.read("bob", last.Seq), unacked)
		// Sequences continue: an emptied queue never reuses an acknowledged one.
		st, m := h.append("bob", "alice", how, "new")
		if st != queue.Stored || m.Seq <= kept.Seq {
			t.Fatalf("%s: append %v seq %d, want more than %d", how, st, m.Seq, kept.Seq)
		}
		kept = m
		unacked = append(unacked, "new")
		h.s.Detach("bob", "phone")
		// The dedup window survives for what the stream still holds. (The
		// IDs of purged messages are forgotten when the server restarts:
		// JetStream rebuilds its window from the stored messages.)
		if st, _ := h.append("bob", "alice", "5", "again"); st != queue.Duplicate {
			t.Fatalf("%s: resend: %v, want Duplicate", how, st)
		}
	}
}

func TestMessageTTL(t *testing.T) {
	h := newHarness(t, func(q *queue.Settings) {
		q.MessageTTL = 500 * time.Millisecond
		q.DedupWindow = 100 * time.Millisecond
	})
	h.append("bob", "alice", "1", "old")
	h.flushed("bob", 0) // expired by the stream's max age
	h.append("bob", "alice", "2", "new")
	eq(t, "after expiry", h.read("bob", 0), []string{"new"})
}

func TestForgetsDevicesUnseenForDeviceTTL(t *testing.T) {
	h := newHarness(t, nil)
	for _, d := range []string{"phone", "lost-phone"} {
		if _, _, err := h.s.Attach("bob", d, false); err != nil {
			t.Fatal(err)
		}
	}
	h.s.Detach("bob", "lost-phone")
	_, m := h.append("bob", "alice", "1", "x")
	h.s.Ack("bob", "phone", m.Seq)
	// The lost phone holds the message back until it is forgotten; the
	// phone, connected all along, is never forgotten.
	h.s.reg.Sweep(time.Now().Add(h.s.opts.Settings.DeviceTTL + time.Minute))
	h.flushed("bob", 0)
	if c, _, _ := h.s.Attach("bob", "lost-phone", false); c != m.Seq {
		t.Fatalf("the forgotten phone came back with cursor %d, want %d (a new device)", c, m.Seq)
	}
	if c, _, _ := h.s.Attach("bob", "phone", false); c != m.Seq {
		t.Fatalf("the connected phone has cursor %d, want %d", c, m.Seq)
	}
}

func TestFanoutStoresOneCopyPerRecipient(t *testing.T) {
	h := newHarness(t, func(q *queue.Settings) { q.MaxQueueMessages = 1 })
	h.append("full", "x", "pre", "fills the queue of full")
	req := func() (queue.Status, queue.Message) {
		return appendMsg(t, h.s, &queue.Request{Sender: "alice", ID: "g-1", Meta: []byte("meta"),
			Fanout: []queue.Fanout{{To: "bob", Data: []byte("to bob")}, {To: "carol", Data: []byte("to carol")}, {To: "full", Data: []byte("to full")}}})
	}
	if st, _ := req(); st != queue.Stored {
		t.Fatalf("fan-out: %v", st)
	}
	eq(t, "bob", h.read("bob", 0), []string{"to bob"})
	eq(t, "carol", h.read("carol", 0), []string{"to carol"})
	eq(t, "full", h.read("full", 0), []string{"fills the queue of full"})
	if st, _ := req(); st != queue.Duplicate {
		t.Fatalf("resent fan-out: %v, want Duplicate", st)
	}
	msgs, err := h.s.Read("bob", 0, 10)
	if err != nil || string(msgs[0].Meta) != "meta" {
		t.Fatalf("meta read back: %q, %v", msgs[0].Meta, err)
	}
}

func TestBarrierKeepsOrder(t *testing.T) {
	h := newHarness(t, nil)
	var mu sync.Mutex
	var order []string
	var wg sync.WaitGroup
	for i, to := range []string{"bob", "", "bob"} {
		wg.Add(1)
		h.appendReq(&queue.Request{To: to, Data: []byte("x"), Done: func(st queue.Status, _ queue.Message, _ error) {
			mu.Lock()
			order = append(order, fmt.Sprintf("%d:%v", i, st))
			mu.Unlock()
			wg.Done()
		}})
	}
	wg.Wait()
	eq(t, "order", order, []string{"0:stored", "1:passed", "2:stored"})
}

func TestManyInFlightCompleteInOrder(t *testing.T) {
	const n = 5000
	h := newHarness(t, nil)
	var mu sync.Mutex
	var done []int
	last := make(map[string]uint64)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		to := fmt.Sprint("u", i%7)
		h.appendReq(&queue.Request{To: to, Sender: "s", ID: fmt.Sprint(i), Data: []byte(fmt.Sprint(i)),
			Done: func(st queue.Status, m queue.Message, err error) {
				mu.Lock()
				defer mu.Unlock()
				defer wg.Done()
				if st != queue.Stored || m.Seq <= last[to] {
					t.Errorf("request %d: %v seq %d after %d, %v", i, st, m.Seq, last[to], err)
				}
				last[to] = m.Seq
				done = append(done, i)
			}})
	}
	wg.Wait()
	for i, d := range done {
		if d != i {
			t.Fatalf("Done %d called in place %d", d, i)
		}
	}
	if got := len(h.read("u3", 0)); got != n/7 {
		t.Fatalf("u3 has %d messages, want %d", got, n/7)
	}
}

func TestOpenRefusesAnotherShardCount(t *testing.T) {
	h := newHarness(t, nil)
	_, err := Open(context.Background(), Options{Conn: h.node.Conn(), Settings: testQueue(nil), Replicas: 1, Shards: 3, Logger: quiet()})
	if err == nil || !strings.Contains(err.Error(), "shard count cannot change") {
		t.Fatalf("open with 3 shards over 2: %v", err)
	}
}

func TestAppendAfterCloseFails(t *testing.T) {
	h := newHarness(t, nil)
	s := h.s
	h.close()
	var st queue.Status = -1
	s.Append(&queue.Request{To: "bob", Data: []byte("late"), Done: func(s queue.Status, _ queue.Message, _ error) { st = s }})
	if st != queue.Failed {
		t.Fatalf("append after close: %v, want Failed", st)
	}
	if s.TryAppend(&queue.Request{To: "bob"}) {
		t.Fatal("TryAppend after close accepted")
	}
}

func TestOutOfStorageIsNoSpace(t *testing.T) {
	before := goleak.IgnoreCurrent()
	defer goleak.VerifyNone(t, before)
	n, err := natsnode.Start(context.Background(), natsnode.Config{Name: "small", Dir: t.TempDir(), Listen: "127.0.0.1:0", MaxStore: 1 << 20, Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Shutdown()
	s, err := Open(context.Background(), Options{Conn: n.Conn(), Settings: testQueue(nil), Replicas: 1, Shards: 1, Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	data := make([]byte, 32<<10)
	for i := range 64 {
		ch := make(chan error, 1)
		s.Append(&queue.Request{To: "bob", Sender: "alice", ID: fmt.Sprint(i), Data: data, Done: func(st queue.Status, _ queue.Message, err error) {
			if st != queue.Stored && err == nil {
				err = fmt.Errorf("status %v", st)
			}
			ch <- err
		}})
		if err := <-ch; err != nil {
			if !errors.Is(err, queue.ErrNoSpace) || !s.LowDisk() {
				t.Fatalf("message %d: %v (low disk %v), want queue.ErrNoSpace", i, err, s.LowDisk())
			}
			t.Logf("refused after %d messages: %v", i, err)
			return
		}
	}
	t.Fatal("2 MiB stored in a 1 MiB JetStream")
}

// appendReq appends r with OnStored recording each stored copy in h.stored.
func (h *harness) appendReq(r *queue.Request) {
	r.OnStored = h.onStored
	h.s.Append(r)
}

func (h *harness) onStored(user string, m queue.Message) {
	h.mu.Lock()
	h.stored = append(h.stored, fmt.Sprintf("%s:%d", user, m.Seq))
	h.mu.Unlock()
}
