package presence

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/chatd/chatd/broker/protocol/topic"
)

// published is one presence message as a subscriber decodes it.
type published struct {
	User     string `json:"user"`
	Online   bool   `json:"online"`
	TS       int64  `json:"ts"`
	LastSeen int64  `json:"last_seen"`
}

// at is when the state began, online or not.
func (p published) at() int64 { return p.TS + p.LastSeen }

// recorder keeps what a Tracker publishes, per user, in order.
type recorder struct {
	mu  sync.Mutex
	got map[string][]published
}

func (r *recorder) publish(topicName string, payload []byte, retain bool, qos byte) error {
	var p published
	if err := json.Unmarshal(payload, &p); err != nil {
		return fmt.Errorf("payload %q: %w", payload, err)
	}
	if retain || qos != 0 || topicName != topic.PresencePrefix+p.User {
		return fmt.Errorf("publish to %s retain %v qos %d", topicName, retain, qos)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.got[p.User] = append(r.got[p.User], p)
	return nil
}

func (r *recorder) of(user string) []published {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]published(nil), r.got[user]...)
}

// newTracker returns a Tracker on a real Badger database whose clock
// ticks one millisecond on every reading, so that every transition has a
// time of its own and their order shows.
func newTracker(t *testing.T) (*Tracker, *recorder, *badger.DB) {
	t.Helper()
	return newTrackerRelay(t, nil)
}

// newTrackerRelay is newTracker in a cluster whose presence goes to relay
// (nil: a single node).
func newTrackerRelay(t *testing.T, relay Relay) (*Tracker, *recorder, *badger.DB) {
	t.Helper()
	db, err := badger.Open(badger.DefaultOptions(t.TempDir()).WithLogger(nil).WithSyncWrites(true))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := db.Close(); err != nil {
			t.Error(err)
		}
	})
	rec := &recorder{got: make(map[string][]published)}
	tr := New(db, rec.publish, relay, slog.New(slog.NewTextHandler(io.Discard, nil)))
	var clock atomic.Int64
	clock.Store(time.Now().UnixMilli())
	tr.now = func() time.Time { return time.UnixMilli(clock.Add(1)) }
	return tr, rec, db
}

// stored reads user's presence record.
func stored(t *testing.T, db *badger.DB, user string) (online bool, ts int64) {
	t.Helper()
	err := db.View(func(txn *badger.Txn) error {
		item, err := txn.Get(append([]byte{keyTag}, user...))
		if err != nil {
			return err
		}
		v, err := item.ValueCopy(nil)
		if err != nil {
			return err
		}
		var ok bool
		if online, ts, ok = decode(v); !ok {
			return fmt.Errorf("corrupt record %x", v)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("presence of %s: %v", user, err)
	}
	return online, ts
}

// within fails the test unless f returns within d.
func within(t *testing.T, d time.Duration, what string, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s: blocked for %v", what, d)
	}
}

// TestSlowDiskDelaysOnlyItsUser stalls the store of one user's transition:
// other users' connections, and that user's own later ones, go on.
func TestSlowDiskDelaysOnlyItsUser(t *testing.T) {
	tr, rec, db := newTracker(t)
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	save := tr.save
	tr.save = func(user string, online bool, ts int64) error {
		if user == "slow" {
			once.Do(func() {
				close(entered)
				<-release
			})
		}
		return save(user, online, ts)
	}
	slowDone := make(chan struct{})
	go func() {
		defer close(slowDone)
		tr.Connected("slow")
	}()
	<-entered
	within(t, 5*time.Second, "another user connecting", func() { tr.Connected("fast") })
	if got := rec.of("fast"); len(got) != 1 || !got[0].Online {
		t.Fatalf("fast published %+v", got)
	}
	if online, _ := stored(t, db, "fast"); !online {
		t.Fatal("fast stored offline")
	}
	within(t, 5*time.Second, "the slow user disconnecting", func() { tr.Disconnected("slow") })
	within(t, 5*time.Second, "another user disconnecting", func() { tr.Disconnected("fast") })
	if tr.Online("slow") || tr.Online("fast") {
		t.Fatal("online after the last disconnect")
	}
	close(release)
	<-slowDone
	// The stalled connect is stored and published first, then the
	// disconnect that came meanwhile.
	got := rec.of("slow")
	if len(got) != 2 || !got[0].Online || got[1].Online || got[1].at() <= got[0].at() {
		t.Fatalf("slow published %+v, want online then offline", got)
	}
	if online, ts := stored(t, db, "slow"); online || ts != got[1].at() {
		t.Fatalf("slow stored online=%v at %d, want offline at %d", online, ts, got[1].at())
	}
}

// TestTransitionsOfOneUserStayInOrder connects and disconnects one user
// from many goroutines at once, over a disk of random speed: the states
// stored and published only ever move forward, and the last is the newest.
func TestTransitionsOfOneUserStayInOrder(t *testing.T) {
	tr, rec, db := newTracker(t)
	var busy, overlaps atomic.Int32
	var mu sync.Mutex
	var saved []int64
	save := tr.save
	tr.save = func(user string, online bool, ts int64) error {
		if busy.Add(1) > 1 {
			overlaps.Add(1)
		}
		defer busy.Add(-1)
		time.Sleep(time.Duration(ts%3) * time.Millisecond)
		mu.Lock()
		saved = append(saved, ts)
		mu.Unlock()
		return save(user, online, ts)
	}
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for range 50 {
				tr.Connected("u")
				tr.Disconnected("u")
			}
		})
	}
	wg.Wait()
	if n := overlaps.Load(); n > 0 {
		t.Errorf("one user's state stored by %d goroutines at once", n)
	}
	got := rec.of("u")
	if len(got) == 0 || got[len(got)-1].Online {
		t.Fatalf("last published %+v, want offline", got)
	}
	for i := 1; i < len(got); i++ {
		if got[i].at() <= got[i-1].at() {
			t.Fatalf("published %+v after %+v", got[i], got[i-1])
		}
	}
	for i := 1; i < len(saved); i++ {
		if saved[i] <= saved[i-1] {
			t.Fatalf("stored the state of %d after that of %d", saved[i], saved[i-1])
		}
	}
	if online, ts := stored(t, db, "u"); online || ts != got[len(got)-1].at() {
		t.Fatalf("stored online=%v at %d, want offline at %d", online, ts, got[len(got)-1].at())
	}
	if len(tr.unsaved) != 0 || len(tr.saving) != 0 {
		t.Fatalf("left behind: unsaved %v saving %v", tr.unsaved, tr.saving)
	}
}

// TestClusterTransitionsFlushOutsideTheLock covers Remote, which a
// cluster's presence goes through: a stalled store of one user's does
// not hold up another's.
func TestClusterTransitionsFlushOutsideTheLock(t *testing.T) {
	tr, rec, _ := newTrackerRelay(t, func(string, bool) {})
	entered, release := make(chan struct{}), make(chan struct{})
	save := tr.save
	tr.save = func(user string, online bool, ts int64) error {
		if user == "slow" {
			close(entered)
			<-release
		}
		return save(user, online, ts)
	}
	slowDone := make(chan struct{})
	go func() {
		defer close(slowDone)
		tr.Remote("n1", "slow", true)
	}()
	<-entered
	within(t, 5*time.Second, "another user's remote change", func() { tr.Remote("n2", "fast", true) })
	within(t, 5*time.Second, "a node going", func() { tr.NodeGone("n2") })
	if got := rec.of("fast"); len(got) != 2 || !got[0].Online || got[1].Online {
		t.Fatalf("fast published %+v", got)
	}
	close(release)
	<-slowDone
	if got := rec.of("slow"); len(got) != 1 || !got[0].Online || !tr.Online("slow") {
		t.Fatalf("slow published %+v", got)
	}
}

// TestStoreErrorIsLoggedAndPublished keeps publishing a transition whose
// store failed: subscribers still learn of it.
func TestStoreErrorIsLoggedAndPublished(t *testing.T) {
	tr, rec, _ := newTracker(t)
	var logs strings.Builder
	var logMu sync.Mutex
	tr.log = slog.New(slog.NewTextHandler(writerFunc(func(p []byte) (int, error) {
		logMu.Lock()
		defer logMu.Unlock()
		return logs.Write(p)
	}), nil))
	tr.save = func(string, bool, int64) error { return errors.New("disk on fire") }
	tr.Connected("u")
	if got := rec.of("u"); len(got) != 1 || !got[0].Online {
		t.Fatalf("published %+v", got)
	}
	logMu.Lock()
	defer logMu.Unlock()
	if !strings.Contains(logs.String(), "disk on fire") {
		t.Fatalf("store error not logged: %q", logs.String())
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// TestErase: an erased user's state is gone; its connections closing
// after the erase publish offline but store nothing; once it connects
// again it is a new user, stored as usual; other users are untouched.
func TestErase(t *testing.T) {
	tr, rec, _ := newTracker(t)
	tr.Connected("alice")
	tr.Connected("alice")
	tr.Connected("bob")
	tr.Disconnected("bob")
	if err := tr.Erase("alice"); err != nil {
		t.Fatal(err)
	}
	tr.Disconnected("alice")
	tr.Disconnected("alice")
	if online, seen, err := tr.State("alice"); err != nil || online || seen != 0 {
		t.Fatalf("alice after the erase: online %v, last seen %d, %v; want never seen", online, seen, err)
	}
	if got := rec.of("alice"); len(got) != 2 || got[1].Online {
		t.Fatalf("alice's published states %+v: want online, then offline", got)
	}
	if _, seen, err := tr.State("bob"); err != nil || seen == 0 {
		t.Fatalf("bob: last seen %d, %v", seen, err)
	}
	tr.Connected("alice")
	tr.Disconnected("alice")
	if _, seen, err := tr.State("alice"); err != nil || seen == 0 {
		t.Fatalf("alice, back after the erase: last seen %d, %v; want stored", seen, err)
	}
}
