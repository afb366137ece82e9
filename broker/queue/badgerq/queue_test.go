package badgerq

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/internal/testutil"

	"go.uber.org/goleak"
)

type harness struct {
	t      *testing.T
	dir    string
	s      *Store
	mu     sync.Mutex
	stored []string // "user:seq" in OnStored order
	// ahead moves the store's clock forward of the wall clock, for TTLs.
	ahead atomic.Int64
	// badgerLeaks is set by tests that make badger.Open fail, which leaks
	// Badger's goroutines upstream.
	badgerLeaks bool
}

func newHarness(t *testing.T, mutate func(*queue.Settings)) *harness {
	h := &harness{t: t, dir: t.TempDir()}
	before := goleak.IgnoreCurrent()
	h.open(mutate)
	t.Cleanup(func() {
		h.close()
		if !h.badgerLeaks {
			goleak.VerifyNone(t, before)
		}
	})
	return h
}

// testOptions are the options of config.Default's queue section.
func testOptions(dir string) Options {
	return Options{
		Dir: dir, Settings: queue.DefaultSettings(), Sync: SyncBatch, SyncInterval: 100 * time.Millisecond, MinFreeBytes: 256 << 20,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
}

func (h *harness) open(mutate func(*queue.Settings)) {
	o := testOptions(h.dir)
	o.Settings.AckFlushInterval = time.Millisecond
	o.Now = func() time.Time { return time.Now().Add(time.Duration(h.ahead.Load())) }
	if mutate != nil {
		mutate(&o.Settings)
	}
	s, err := Open(o)
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

func (h *harness) reopen(mutate func(*queue.Settings)) {
	h.close()
	h.open(mutate)
}

// append stores one message and waits for its outcome.
func (h *harness) append(to, sender, id, data string) (queue.Status, queue.Message) {
	h.t.Helper()
	type res struct {
		st  queue.Status
		m   queue.Message
		err error
	}
	ch := make(chan res, 1)
	h.appendReq(&queue.Request{To: to, Sender: sender, ID: id, Data: []byte(data), Done: func(st queue.Status, m queue.Message, err error) {
		ch <- res{st, m, err}
	}})
	r := <-ch
	if r.st == queue.Failed {
		h.t.Fatalf("append: %v", r.err)
	}
	return r.st, r.m
}

func (h *harness) read(user string, after uint64) []string {
	h.t.Helper()
	msgs, err := h.s.Read(user, after, 1000)
	if err != nil {
		h.t.Fatal(err)
	}
	out := make([]string, len(msgs))
	for i, m := range msgs {
		out[i] = fmt.Sprintf("%d=%s", m.Seq, m.Data)
	}
	return out
}

// flushed waits until the lazy ack flush has deleted everything up to seq.
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

func TestAppendAssignsSequencesPerUser(t *testing.T) {
	h := newHarness(t, nil)
	for i, c := range []struct{ to, data string }{{"bob", "a"}, {"carol", "b"}, {"bob", "c"}} {
		st, _ := h.append(c.to, "alice", fmt.Sprint(i), c.data)
		if st != queue.Stored {
			t.Fatalf("append %d: %v", i, st)
		}
	}
	eq(t, "bob", h.read("bob", 0), []string{"1=a", "2=c"})
	eq(t, "carol", h.read("carol", 0), []string{"1=b"})
	eq(t, "after 1", h.read("bob", 1), []string{"2=c"})
	h.mu.Lock()
	defer h.mu.Unlock()
	eq(t, "stored callbacks", h.stored, []string{"bob:1", "carol:1", "bob:2"})
}

func TestDedup(t *testing.T) {
	cases := []struct {
		name        string
		sender, id  string
		want        queue.Status
		wantStored  int
		description string
	}{
		{"first", "alice", "m1", queue.Stored, 1, ""},
		{"same sender same id", "alice", "m1", queue.Duplicate, 1, ""},
		{"other sender same id", "mallory", "m1", queue.Stored, 2, ""},
		{"no id: server event", "alice", "", queue.Stored, 3, ""},
		{"no id again", "alice", "", queue.Stored, 4, ""},
	}
	h := newHarness(t, nil)
	for _, c := range cases {
		st, _ := h.append("bob", c.sender, c.id, c.name)
		if st != c.want {
			t.Fatalf("%s: status %v, want %v", c.name, st, c.want)
		}
		if n := len(h.read("bob", 0)); n != c.wantStored {
			t.Fatalf("%s: %d stored, want %d", c.name, n, c.wantStored)
		}
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
	for i := range 3 {
		if st, _ := h.append("bob", "alice", fmt.Sprint(i), "x"); st != queue.Stored {
			t.Fatalf("append %d: %v", i, st)
		}
	}
	if st, _ := h.append("bob", "alice", "over", "x"); st != queue.Full {
		t.Fatalf("append over cap: %v, want queue.Full", st)
	}
	// An acknowledged message stops counting at once, before its deletion.
	h.s.Ack("bob", "phone", 1)
	if st, _ := h.append("bob", "alice", "after-ack", "x"); st != queue.Stored {
		t.Fatalf("append after ack: %v, want queue.Stored", st)
	}
}

func TestDeletedOnlyWhenEveryDeviceAcked(t *testing.T) {
	h := newHarness(t, nil)
	for _, d := range []string{"phone", "laptop"} {
		if c, _, err := h.s.Attach("bob", d, false); err != nil || c != 0 {
			t.Fatalf("attach %s: cursor %d, %v", d, c, err)
		}
	}
	for i := range 4 {
		h.append("bob", "alice", fmt.Sprint(i), fmt.Sprint(i))
	}
	h.s.Ack("bob", "phone", 4)
	h.s.Ack("bob", "laptop", 2)
	h.flushed("bob", 2)
	eq(t, "left", h.read("bob", 0), []string{"3=2", "4=3"})
	h.s.Ack("bob", "laptop", 4)
	h.flushed("bob", 0)
	eq(t, "left", h.read("bob", 0), []string{})
}

func TestFirstDeviceGetsBacklogLaterDevicesDoNot(t *testing.T) {
	h := newHarness(t, nil)
	h.append("bob", "alice", "1", "queued")
	if c, _, _ := h.s.Attach("bob", "phone", false); c != 0 {
		t.Fatalf("first device cursor %d, want 0 (gets everything)", c)
	}
	if c, _, _ := h.s.Attach("bob", "laptop", false); c != 1 {
		t.Fatalf("second device cursor %d, want 1 (from now on)", c)
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
	h.append("bob", "alice", "1", "x")
	h.s.Ack("bob", "phone", 1)
	h.s.Detach("bob", "web")
	// With the transient device gone, the phone's ack alone deletes it.
	h.flushed("bob", 0)
}

func TestRestartKeepsMessagesCursorsAndSequences(t *testing.T) {
	h := newHarness(t, nil)
	if _, _, err := h.s.Attach("bob", "phone", false); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		h.append("bob", "alice", fmt.Sprint(i), fmt.Sprint(i))
	}
	h.s.Ack("bob", "phone", 5)
	h.s.SetSubscribed("bob", "phone", true)
	h.flushed("bob", 0)
	h.append("bob", "alice", "5", "5")
	h.reopen(nil)

	if c, sub, err := h.s.Attach("bob", "phone", false); err != nil || c != 5 || !sub {
		t.Fatalf("after restart cursor %d, subscribed %v, %v; want 5, true", c, sub, err)
	}
	eq(t, "after restart", h.read("bob", 5), []string{"6=5"})
	// Sequences continue: an emptied queue never reuses an acknowledged one.
	st, m := h.append("bob", "alice", "6", "6")
	if st != queue.Stored || m.Seq != 7 {
		t.Fatalf("append after restart: %v seq %d, want seq 7", st, m.Seq)
	}
	// The dedup window survives the restart.
	if st, _ := h.append("bob", "alice", "0", "again"); st != queue.Duplicate {
		t.Fatalf("resend after restart: %v, want queue.Duplicate", st)
	}
}

func TestForgetsDevicesAfterDeviceTTL(t *testing.T) {
	h := newHarness(t, nil)
	if _, _, err := h.s.Attach("bob", "old-phone", false); err != nil {
		t.Fatal(err)
	}
	h.s.Detach("bob", "old-phone")
	h.append("bob", "alice", "1", "x")
	h.reopen(func(q *queue.Settings) { q.DeviceTTL = time.Nanosecond })
	// Last-seen times have one-second resolution: move the clock past it.
	h.ahead.Add(int64(1100 * time.Millisecond))
	// The forgotten device no longer counts: a new device is the first again.
	if c, _, _ := h.s.Attach("bob", "new-phone", false); c != 0 {
		t.Fatalf("new device cursor %d, want 0", c)
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

func BenchmarkAppendAck(b *testing.B) {
	for _, mode := range []struct {
		name string
		sync Sync
	}{{"none", SyncNone}, {"batch", SyncBatch}, {"always", SyncAlways}} {
		b.Run(mode.name, func(b *testing.B) {
			o := testOptions(b.TempDir())
			o.Sync = mode.sync
			s, err := Open(o)
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			const users = 200
			for u := range users {
				if _, _, err := s.Attach(fmt.Sprint("u", u), "", false); err != nil {
					b.Fatal(err)
				}
			}
			payload := make([]byte, 200)
			var wg sync.WaitGroup
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				wg.Add(1)
				to := fmt.Sprint("u", i%users)
				s.Append(&queue.Request{To: to, Sender: "sender", ID: fmt.Sprint(i), Data: payload,
					Done: func(st queue.Status, m queue.Message, err error) {
						if st == queue.Stored {
							s.Ack(to, "", m.Seq)
						}
						wg.Done()
					}})
			}
			wg.Wait()
		})
	}
}

func TestOpenSurvivesEmptyMemtableLeftByCrash(t *testing.T) {
	h := newHarness(t, nil)
	h.badgerLeaks = true
	h.append("bob", "alice", "1", "kept")
	h.close()
	// What a crash between creating a memtable file and writing it leaves.
	if err := os.WriteFile(filepath.Join(h.dir, "00099.mem"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	h.open(nil)
	eq(t, "after reopen", h.read("bob", 0), []string{"1=kept"})
}

// diskUsage is the space dir's files take on disk (sparse, preallocated
// Badger files count only for what is written).
func diskUsage(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	err := filepath.Walk(dir, func(_ string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if st, ok := info.Sys().(*syscall.Stat_t); ok && !info.IsDir() {
			n += st.Blocks * 512
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestDrainingGivesDiskSpaceBack(t *testing.T) {
	const n = 50000
	h := newHarness(t, nil)
	if _, _, err := h.s.Attach("bob", "phone", false); err != nil {
		t.Fatal(err)
	}
	payload := make([]byte, 1000)
	var wg sync.WaitGroup
	for i := range n {
		if _, err := rand.Read(payload); err != nil { // incompressible, like ciphertext
			t.Fatal(err)
		}
		wg.Add(1)
		h.appendReq(&queue.Request{To: "bob", Sender: "alice", ID: fmt.Sprint(i), Data: bytes.Clone(payload),
			Done: func(queue.Status, queue.Message, error) { wg.Done() }})
	}
	wg.Wait()
	full := diskUsage(t, h.dir)
	h.s.Ack("bob", "phone", n)
	h.flushed("bob", 0)
	// Compaction drops deleted messages as the LSM tree is rewritten: in a
	// running server as traffic goes on, and at the latest on a clean close.
	h.reopen(nil)
	after := diskUsage(t, h.dir)
	t.Logf("%d messages of 1000 bytes: %d bytes on disk queued, %d after draining", n, full, after)
	if after > full/10 {
		t.Fatalf("after draining %d bytes remain of %d", after, full)
	}
	eq(t, "left", h.read("bob", 0), []string{})
}

func TestFanoutStoresOneCopyPerRecipientUnderOneDedupKey(t *testing.T) {
	h := newHarness(t, func(q *queue.Settings) { q.MaxQueueMessages = 1 })
	h.append("full", "x", "pre", "fills the queue of full")
	req := func() (queue.Status, queue.Message) {
		ch := make(chan queue.Status, 1)
		var msg queue.Message
		h.appendReq(&queue.Request{Sender: "alice", ID: "g-1", Meta: []byte("meta"),
			Fanout: []queue.Fanout{{To: "bob", Data: []byte("to bob")}, {To: "carol", Data: []byte("to carol")}, {To: "full", Data: []byte("to full")}},
			Done:   func(st queue.Status, m queue.Message, _ error) { msg = m; ch <- st }})
		return <-ch, msg
	}
	if st, _ := req(); st != queue.Stored {
		t.Fatalf("fan-out: %v", st)
	}
	eq(t, "bob", h.read("bob", 0), []string{"1=to bob"})
	eq(t, "carol", h.read("carol", 0), []string{"1=to carol"})
	eq(t, "full", h.read("full", 0), []string{"1=fills the queue of full"})
	if st, _ := req(); st != queue.Duplicate {
		t.Fatalf("resent fan-out: %v, want queue.Duplicate", st)
	}
	msgs, err := h.s.Read("bob", 0, 10)
	if err != nil || string(msgs[0].Meta) != "meta" {
		t.Fatalf("meta read back: %q, %v", msgs[0].Meta, err)
	}
}

func TestLargeFanoutSpansTransactions(t *testing.T) {
	h := newHarness(t, nil)
	data := bytes.Repeat([]byte("x"), 32<<10)
	var fan []queue.Fanout
	for i := range 1024 {
		fan = append(fan, queue.Fanout{To: fmt.Sprint("m", i), Data: data})
	}
	ch := make(chan queue.Status, 1)
	h.appendReq(&queue.Request{Sender: "alice", ID: "big", Fanout: fan, Done: func(st queue.Status, _ queue.Message, err error) {
		if err != nil {
			t.Error(err)
		}
		ch <- st
	}})
	if st := <-ch; st != queue.Stored {
		t.Fatalf("32 MiB fan-out: %v", st)
	}
	for _, u := range []string{"m0", "m511", "m1023"} {
		if msgs, err := h.s.Read(u, 0, 2); err != nil || len(msgs) != 1 || len(msgs[0].Data) != len(data) {
			t.Fatalf("%s: %d messages, %v", u, len(msgs), err)
		}
	}
}

func TestUnseenDevicesAreForgottenWhileRunning(t *testing.T) {
	h := newHarness(t, nil)
	for _, d := range []string{"phone", "lost-phone"} {
		if _, _, err := h.s.Attach("bob", d, false); err != nil {
			t.Fatal(err)
		}
	}
	h.s.Detach("bob", "lost-phone")
	h.append("bob", "alice", "1", "x")
	h.s.Ack("bob", "phone", 1)
	// The lost phone holds the message back until it is forgotten; the
	// phone, connected all along, is never forgotten however old its
	// last-seen time.
	h.s.reg.Sweep(time.Now().Add(h.s.opts.Settings.DeviceTTL + time.Minute))
	h.flushed("bob", 0)
	if c, _, _ := h.s.Attach("bob", "lost-phone", false); c != 1 {
		t.Fatalf("the forgotten phone came back with cursor %d, want 1 (a new device)", c)
	}
	if c, _, _ := h.s.Attach("bob", "phone", false); c != 1 {
		t.Fatalf("the connected phone has cursor %d, want 1", c)
	}
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

// TestZeroSettingsMeanDefaults: a store opened with no Settings runs on
// the defaults (it once started its upkeep ticker at 0 and panicked).
func TestZeroSettingsMeanDefaults(t *testing.T) {
	s, err := Open(Options{Dir: t.TempDir(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan queue.Status, 1)
	s.Append(&queue.Request{To: "bob", Data: []byte("x"), Done: func(st queue.Status, _ queue.Message, _ error) { done <- st }})
	if st := <-done; st != queue.Stored {
		t.Fatalf("append: %v", st)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestBadgerLoggerLevels: Badger's warnings reach the log at warn, but
// for its block-cache statistics, which a queue's read-once messages set
// off every minute under load; its info lines go to debug.
func TestBadgerLoggerLevels(t *testing.T) {
	for _, tt := range []struct {
		name string
		log  func(b badgerLogger)
		want string
	}{
		{"warning", func(b badgerLogger) { b.Warningf("Value log GC failed: %v", "disk") }, "level=WARN msg=\"badger: Value log GC failed: disk\""},
		{"cache too small", func(b badgerLogger) { b.Warningf("%s might be too small. Metrics: %s\n", "Block cache", "hit: 1") }, "level=DEBUG msg=\"badger: Block cache might be too small."},
		{"cache life expectancy", func(b badgerLogger) { b.Warningf("Cache life expectancy (in seconds): %+v\n", 2) }, "level=DEBUG msg=\"badger: Cache life expectancy"},
		{"info", func(b badgerLogger) { b.Infof("Replaying file id: %d", 1) }, "level=DEBUG msg=\"badger: Replaying file id: 1\""},
		{"error", func(b badgerLogger) { b.Errorf("cannot open %s", "x") }, "level=ERROR msg=\"badger: cannot open x\""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var buf testutil.SyncBuffer
			tt.log(badgerLogger{slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))})
			if got := buf.String(); !strings.Contains(got, tt.want) {
				t.Fatalf("logged %q, want %q in it", got, tt.want)
			}
		})
	}
}

// copyDir copies the regular files of src into dst, as a crash would leave
// them: Badger's memtable logs are mapped files whose writes the copy sees.
// Value logs, sparse files of 2 GiB that hold only values of 1 MiB or
// more, are left out.
func copyDir(t *testing.T, src, dst string) {
	t.Helper()
	entries, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !e.Type().IsRegular() || strings.HasSuffix(e.Name(), ".vlog") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// TestOpenReplaysBiggerMemtableLogs: a queue that crashed with a memtable
// log written with bigger memtables than this version's (16 MiB, the
// size of earlier versions) opens, replaying it, instead of stopping the
// process because the log does not fit in a smaller memtable.
func TestOpenReplaysBiggerMemtableLogs(t *testing.T) {
	src := t.TempDir()
	db, err := badger.Open(badger.DefaultOptions(src).WithLogger(nil).WithMemTableSize(16 << 20))
	if err != nil {
		t.Fatal(err)
	}
	value := make([]byte, 1000)
	const n = 13000 // about 13 MB: more than a memtable of memTableSize holds
	for i := 0; i < n; i += 500 {
		err := db.Update(func(txn *badger.Txn) error {
			for k := i; k < i+500 && k < n; k++ {
				if err := txn.Set(fmt.Appendf(nil, "zz-test-%06d", k), value); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	crashed := t.TempDir()
	copyDir(t, src, crashed) // while db is open: its memtable is only in its log
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if got, err := memTableFor(crashed); err != nil || got <= memTableSize {
		t.Fatalf("memTableFor = %d, %v; want more than %d for a 16 MiB memtable's log", got, err, memTableSize)
	}
	s, err := Open(testOptions(crashed))
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	}()
	err = s.DB().View(func(txn *badger.Txn) error {
		_, err := txn.Get(fmt.Appendf(nil, "zz-test-%06d", n-1))
		return err
	})
	if err != nil {
		t.Fatalf("the last entry of the replayed log: %v", err)
	}
	if got, err := memTableFor(t.TempDir()); err != nil || got != memTableSize {
		t.Fatalf("memTableFor of an empty directory = %d, %v; want %d", got, err, memTableSize)
	}
}
