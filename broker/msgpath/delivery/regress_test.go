package delivery

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/internal/testutil"
)

// usersSource is an in-memory queue of several users, dense sequences.
type usersSource struct {
	mu    sync.Mutex
	msgs  map[string][][]byte // user -> Data of seq i+1
	acked map[string]uint64   // user/device -> cursor
	reads int
}

func newUsersSource() *usersSource {
	return &usersSource{msgs: map[string][][]byte{}, acked: map[string]uint64{}}
}

// store commits a message of size bytes for user; its Data starts with
// its sequence.
func (s *usersSource) store(user string, size int) queue.Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	seq := uint64(len(s.msgs[user]) + 1)
	data := fmt.Appendf(nil, "%d:", seq)
	data = append(data, bytes.Repeat([]byte("x"), max(0, size-len(data)))...)
	s.msgs[user] = append(s.msgs[user], data)
	return queue.Message{Seq: seq, Data: data}
}

func (s *usersSource) Read(user string, after uint64, n int) ([]queue.Message, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reads++
	var out []queue.Message
	for seq := after + 1; seq <= uint64(len(s.msgs[user])) && len(out) < n; seq++ {
		out = append(out, queue.Message{Seq: seq, Data: s.msgs[user][seq-1]})
	}
	return out, nil
}

func (s *usersSource) Head(user string) (uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return uint64(len(s.msgs[user])), nil
}

func (s *usersSource) Ack(user, device string, cursor uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.acked[user+"/"+device] = max(s.acked[user+"/"+device], cursor)
}

func (s *usersSource) readCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.reads
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// TestTailBytesBudget: devices of many users that never acknowledge keep
// their users' tails from being trimmed by acknowledgements; the tails
// stay within TailBytes together, and once the devices acknowledge they
// get every message, the dropped ones read from the Source.
func TestTailBytesBudget(t *testing.T) {
	const (
		users  = 20
		each   = 100
		size   = 16 << 10
		budget = 1 << 20 // a twentieth of what is stored
		window = 4
	)
	src := newUsersSource()
	d := New(Options{Source: src, Logger: quiet(), TailMessages: 1024, ReadAhead: 32, TailBytes: budget})
	defer d.Close()
	devs := make([]*Device, users)
	sinks := make([]*fakeSink, users)
	for u := range users {
		sinks[u] = newSink()
		var err error
		if devs[u], err = d.Start(fmt.Sprint("user", u), "phone", 0, window, sinks[u]); err != nil {
			t.Fatal(err)
		}
	}
	var most int64
	for i := range each {
		for u := range users {
			user := fmt.Sprint("user", u)
			if !d.Stored(user, src.store(user, size)) {
				t.Fatalf("%s is not online", user)
			}
			held := d.TailBytes()
			if held > budget {
				t.Fatalf("after message %d of %s the tails hold %d bytes, over the budget of %d", i+1, user, held, budget)
			}
			most = max(most, held)
		}
	}
	if most < budget/2 {
		t.Fatalf("the tails never held more than %d bytes: the test did not fill them", most)
	}
	for u := range users {
		if n, _, _ := d.Window(fmt.Sprint("user", u), "phone"); n != window {
			t.Fatalf("user%d has %d in flight, want a full window of %d", u, n, window)
		}
	}

	readsBefore := src.readCount()
	for u := range users {
		// Acknowledge everything as it arrives, as a phone would.
		for i := range each {
			sinks[u].waitFor(t, i+1)
			d.Acked(devs[u], sinks[u].pid(i))
		}
		got := sinks[u].waitFor(t, each)
		for i, payload := range got {
			if want := fmt.Sprintf("%d:", i+1); len(payload) != size || payload[:len(want)] != want {
				t.Fatalf("user%d message %d: %.10q of %d bytes", u, i, payload, len(payload))
			}
		}
		if len(got) != each {
			t.Fatalf("user%d got %d messages, want %d", u, len(got), each)
		}
	}
	if src.readCount() == readsBefore {
		t.Fatal("no message was read back from the Source: nothing was dropped from the tails")
	}
	for u := range users {
		d.Stop(devs[u])
	}
	if held := d.TailBytes(); held != 0 {
		t.Fatalf("with every device gone the tails hold %d bytes", held)
	}
}

// flakySource fails its first failures Reads, or every Read while
// failures is negative.
type flakySource struct {
	*fakeSource
	failures atomic.Int64
	calls    atomic.Int64
}

var errFlaky = errors.New("no leader")

func (s *flakySource) Read(user string, after uint64, n int) ([]queue.Message, error) {
	s.calls.Add(1)
	if left := s.failures.Load(); left < 0 || left > 0 && s.failures.CompareAndSwap(left, left-1) {
		return nil, errFlaky
	}
	return s.fakeSource.Read(user, after, n)
}

// waitCalls waits until src has had at least n Reads.
func (s *flakySource) waitCalls(t *testing.T, n int64) {
	t.Helper()
	testutil.EventuallyNoError(t, 10*time.Second, func() error {
		if got := s.calls.Load(); got < n {
			return fmt.Errorf("%d reads, want %d", got, n)
		}
		return nil
	}, "waiting for reads")
}

// TestFailedReadsAreRetried: a device whose reads fail gets everything
// once they work again, with no new message or reconnect to start a read.
func TestFailedReadsAreRetried(t *testing.T) {
	cases := []struct {
		name     string
		stored   []uint64 // in the queue before the device starts
		live     []uint64 // committed after
		notify   []uint64 // Stored calls for the live ones
		failures int64
	}{
		{"backlog", every(1, 20, 1), nil, nil, 4},
		{"sparse backlog", every(3, 60, 3), nil, nil, 4},
		{"lost notifications", nil, []uint64{3, 5, 7, 8, 9}, []uint64{3, 7, 8}, 3},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			src := &flakySource{fakeSource: newSource()}
			for _, seq := range c.stored {
				src.store(seq)
			}
			d := newDelivery(src, 4)
			defer d.Close()
			src.failures.Store(c.failures)
			sink := newSink()
			dev, err := d.Start("bob", "phone", 0, 64, sink)
			if err != nil {
				t.Fatal(err)
			}
			for _, seq := range c.live {
				src.store(seq)
			}
			for _, seq := range c.notify {
				d.Stored("bob", message(seq))
			}
			want := append(append([]uint64(nil), c.stored...), c.live...)
			for i := range want {
				sink.waitFor(t, i+1)
				d.Acked(dev, sink.pid(i))
			}
			src.waitCursor(t, "phone", src.head)
			if left := src.failures.Load(); left != 0 {
				t.Fatalf("%d failures left: the reads were never tried", left)
			}
			got := sink.waitFor(t, len(want))
			if len(got) != len(want) {
				t.Fatalf("delivered %v, want %d messages", got, len(want))
			}
		})
	}
}

// TestRetriesEndOnStopAndClose: a read that keeps failing is retried
// until its device is stopped or delivery closed, and no longer, however
// long the wait before the next retry.
func TestRetriesEndOnStopAndClose(t *testing.T) {
	for _, end := range []string{"stop", "close"} {
		t.Run(end, func(t *testing.T) {
			src := &flakySource{fakeSource: newSource()}
			src.store(1)
			src.failures.Store(-1)
			d := newDelivery(src, 4)
			d.retryFirst, d.retryMax = time.Hour, time.Hour
			defer d.Close()
			dev, err := d.Start("bob", "phone", 0, 64, newSink())
			if err != nil {
				t.Fatal(err)
			}
			src.waitCalls(t, 1) // now waiting half an hour or more
			ended := make(chan struct{})
			go func() {
				if end == "stop" {
					d.Stop(dev)
					// Not the test's goroutine: Poll, not Eventually.
					err := testutil.Poll(5*time.Second, func() error {
						dev.f.mu.Lock()
						defer dev.f.mu.Unlock()
						if dev.reading {
							return errors.New("still reading")
						}
						return nil
					})
					if err != nil {
						t.Errorf("the read still waits to be retried after Stop: %v", err)
					}
				}
				d.Close() // waits for every read goroutine
				close(ended)
			}()
			select {
			case <-ended:
			case <-time.After(10 * time.Second):
				t.Fatalf("a read still waits to be retried after %s", end)
			}
			if n := src.calls.Load(); n != 1 {
				t.Fatalf("%d reads, want the one that failed", n)
			}
		})
	}
}

// strictSource fails the test when called after it is marked closed, or
// is told to hold a Read until released.
type strictSource struct {
	*fakeSource
	t      *testing.T
	closed atomic.Bool
	// hold, when set, makes the next Read signal held and wait for release.
	hold    atomic.Bool
	held    chan struct{}
	release chan struct{}
}

func (s *strictSource) check(call string) {
	if s.closed.Load() {
		s.t.Errorf("%s after Close", call)
	}
}

func (s *strictSource) Read(user string, after uint64, n int) ([]queue.Message, error) {
	s.check("Read")
	if s.hold.CompareAndSwap(true, false) {
		s.held <- struct{}{}
		<-s.release
	}
	return s.fakeSource.Read(user, after, n)
}

func (s *strictSource) Head(user string) (uint64, error) {
	s.check("Head")
	return s.fakeSource.Head(user)
}

func (s *strictSource) Ack(user, device string, cursor uint64) {
	s.check("Ack")
	s.fakeSource.Ack(user, device, cursor)
}

// TestNoSourceCallAfterClose: Close waits for a Read in flight, and after
// it nothing calls the Source, whatever the server's connections still do
// when its shutdown timed out.
func TestNoSourceCallAfterClose(t *testing.T) {
	src := &strictSource{fakeSource: newSource(), t: t, held: make(chan struct{}), release: make(chan struct{})}
	for seq := uint64(1); seq <= 10; seq++ {
		src.store(seq)
	}
	d := newDelivery(src, 2)
	sink := newSink()
	src.hold.Store(true)
	dev, err := d.Start("bob", "phone", 0, 3, sink)
	if err != nil {
		t.Fatal(err)
	}
	<-src.held // the first read is in flight
	closed := make(chan struct{})
	go func() {
		d.Close()
		src.closed.Store(true)
		close(closed)
	}()
	select {
	case <-closed:
		t.Fatal("Close returned with a Read in flight")
	case <-time.After(50 * time.Millisecond):
	}
	close(src.release)
	<-closed
	got := sink.waitFor(t, 2) // what the read in flight brought
	if len(got) != 2 {
		t.Fatalf("sent %v", got)
	}

	d.Acked(dev, sink.pid(0))
	d.Acked(dev, sink.pid(1))
	if d.Stored("bob", src.store(11)) {
		t.Fatal("Stored after Close reports bob online")
	}
	d.Ephemeral("bob", "inbox/bob", []byte("typing"))
	if _, err := d.Start("bob", "tablet", 0, 3, newSink()); !errors.Is(err, ErrClosed) {
		t.Fatalf("Start of a second device after Close: %v, want ErrClosed", err)
	}
	if _, err := d.Start("carol", "phone", 0, 3, newSink()); !errors.Is(err, ErrClosed) {
		t.Fatalf("Start of a new user after Close: %v, want ErrClosed", err)
	}
	d.Stop(dev)
	d.Close() // a second Close is harmless
	if got := sink.waitFor(t, 2); len(got) != 2 {
		t.Fatalf("sent %v after Close", got)
	}
	if c := src.cursor("phone"); c != 0 {
		t.Fatalf("cursor %d reported after Close", c)
	}
}

// TestReadAheadBytesBounded: a device that never acknowledges, with a
// backlog of big messages, holds about readBytes of them read ahead, not
// ReadAhead messages; once it acknowledges it gets them all, in order.
func TestReadAheadBytesBounded(t *testing.T) {
	const (
		n      = 300
		size   = 64 << 10
		window = 4
	)
	src := newUsersSource()
	for range n {
		src.store("bob", size)
	}
	d := New(Options{Source: src, Logger: quiet(), ReadAhead: 1024})
	defer d.Close()
	sink := newSink()
	dev, err := d.Start("bob", "phone", 0, window, sink)
	if err != nil {
		t.Fatal(err)
	}
	sink.waitFor(t, window)
	// Every read it will make while its window is full is made: the first,
	// and the one ahead of it while the first runs low.
	var held int64
	testutil.Eventually(t, 10*time.Second, func() bool {
		dev.f.mu.Lock()
		defer dev.f.mu.Unlock()
		held = 0
		for _, m := range dev.prefetch {
			held += msgBytes(m)
		}
		return !dev.reading
	}, "the device's read never ended")
	if held > readBytes+size {
		t.Fatalf("a device that does not acknowledge holds %d bytes read ahead, over %d", held, readBytes+size)
	}
	for i := range n {
		sink.waitFor(t, i+1)
		d.Acked(dev, sink.pid(i))
	}
	for i, payload := range sink.waitFor(t, n) {
		if want := fmt.Sprintf("%d:", i+1); payload[:len(want)] != want {
			t.Fatalf("message %d is %.10q", i, payload)
		}
	}
}
