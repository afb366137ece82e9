package queuetest

import (
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/chatd/chatd/broker/queue"
)

// fixture is one store of an example, with its clock.
type fixture struct {
	t     *testing.T
	b     Backend
	clock *Clock
	s     Store
	n     int
}

func newFixture(t *testing.T, b Backend) *fixture {
	f := &fixture{t: t, b: b, clock: NewClock(time.Now().Truncate(time.Second))}
	f.s = b.Open(t, "ex-"+t.Name(), testQueue(), f.clock.Now, nil)
	t.Cleanup(func() {
		if err := f.s.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return f
}

// result is the outcome of one append.
type result struct {
	st   queue.Status
	msg  queue.Message
	full []string
}

// append stores a message from sender with id to the users in to (a
// group message when there are several) and waits for the outcome.
func (f *fixture) append(sender, id string, to ...string) result {
	f.t.Helper()
	f.n++
	req := &queue.Request{Sender: sender, ID: id}
	if len(to) == 1 {
		req.To, req.Data = to[0], fmt.Appendf(nil, "%s:%d", id, f.n)
	} else {
		for _, u := range to {
			req.Fanout = append(req.Fanout, queue.Fanout{To: u, Data: fmt.Appendf(nil, "%s:%d", id, f.n)})
		}
	}
	var res result
	req.OnFull = func(users []string) { res.full = slices.Clone(users) }
	done := make(chan struct{})
	req.Done = func(st queue.Status, m queue.Message, err error) {
		if err != nil {
			f.t.Errorf("append %s: %v", id, err)
		}
		res.st, res.msg = st, m
		close(done)
	}
	f.s.Append(req)
	<-done
	return res
}

func (f *fixture) attach(user, device string, transient bool) uint64 {
	f.t.Helper()
	c, _, err := f.s.Attach(user, device, transient)
	if err != nil {
		f.t.Fatalf("attach %s/%s: %v", user, device, err)
	}
	return c
}

// count returns how many messages of user the store holds after cursor.
func (f *fixture) count(user string, after uint64) int {
	f.t.Helper()
	ms, err := f.s.Read(user, after, 1000)
	if err != nil {
		f.t.Fatalf("read %s: %v", user, err)
	}
	return len(ms)
}

func (f *fixture) flush() {
	f.t.Helper()
	if err := f.s.Flush(); err != nil {
		f.t.Fatalf("flush: %v", err)
	}
}

// runExamples runs the regression cases of the contract, each a sequence
// of events that once broke a promise of docs/PROTOCOL.md.
func runExamples(t *testing.T, b Backend) {
	t.Run("FirstPersistentDeviceBesideTransientGetsBacklog", func(t *testing.T) {
		// A probe: 3 messages for jack, who has no device; jack/cli
		// connects with a clean session, then jack/phone with a
		// persistent one. The phone got nothing and the backlog was
		// deleted when the cli left.
		f := newFixture(t, b)
		for i := range 3 {
			f.append("alice", fmt.Sprint("m", i), "jack")
		}
		f.attach("jack", "cli", true)
		cursor := f.attach("jack", "phone", false)
		if n := f.count("jack", cursor); n != 3 {
			t.Fatalf("the first persistent device starts with %d of the 3 queued messages", n)
		}
		f.s.Detach("jack", "cli")
		f.flush()
		if n := f.count("jack", 0); n != 3 {
			t.Fatalf("%d of 3 messages left after the transient device left; none was acknowledged", n)
		}
	})
	t.Run("RemovedDeviceHoldsNothingBackAndComesBackNew", func(t *testing.T) {
		// A lost phone, offline with two unacknowledged messages, is
		// removed: the laptop's acknowledgements now delete them, and the
		// phone, connecting again, starts at the head like a new device.
		f := newFixture(t, b)
		f.attach("jack", "phone", false)
		f.s.Detach("jack", "phone")
		f.attach("jack", "laptop", false)
		f.append("alice", "m1", "jack")
		r := f.append("alice", "m2", "jack")
		f.s.Ack("jack", "laptop", r.msg.Seq)
		f.flush()
		if n := f.count("jack", 0); n != 2 {
			t.Fatalf("%d messages left before the removal, want the 2 the phone lacks", n)
		}
		for _, c := range []struct {
			after uint64
			want  uint64
		}{{0, 2}, {r.msg.Seq - 1, 1}, {r.msg.Seq, 0}} {
			if n, err := f.s.Waiting("jack", c.after); err != nil || n != c.want {
				t.Fatalf("Waiting(jack, %d) = %d, %v; want %d", c.after, n, err, c.want)
			}
		}
		if err := f.s.Remove("jack", "phone"); err != nil {
			t.Fatalf("remove: %v", err)
		}
		if n := f.count("jack", 0); n != 0 {
			t.Fatalf("%d messages left after the removal; the laptop acknowledged both", n)
		}
		ds, err := f.s.Devices("jack")
		if err != nil || len(ds) != 1 || ds[0].Name != "laptop" || !ds[0].Connected || ds[0].Cursor != r.msg.Seq {
			t.Fatalf("devices after the removal: %+v, %v; want the connected laptop at %d", ds, err, r.msg.Seq)
		}
		if err := f.s.Remove("jack", "phone"); !errors.Is(err, queue.ErrUnknownDevice) {
			t.Fatalf("second removal: %v, want ErrUnknownDevice", err)
		}
		f.append("alice", "m3", "jack")
		cursor := f.attach("jack", "phone", false)
		if n := f.count("jack", cursor); n != 0 {
			t.Fatalf("the removed phone, back, starts with %d old messages, want none", n)
		}
	})
	t.Run("BareDeviceRemovedAlone", func(t *testing.T) {
		// The bare {user} client ID is the device named "": removing it
		// removes it alone.
		f := newFixture(t, b)
		f.attach("jack", "", false)
		f.attach("jack", "phone", false)
		if err := f.s.Remove("jack", ""); err != nil {
			t.Fatalf("remove the bare device: %v", err)
		}
		if ds, err := f.s.Devices("jack"); err != nil || len(ds) != 1 || ds[0].Name != "phone" {
			t.Fatalf("devices after removing the bare one: %+v, %v; want the phone", ds, err)
		}
	})
	t.Run("ErasedUserStartsOver", func(t *testing.T) {
		// jack's account is erased with his phone connected, his laptop
		// offline and two messages waiting: nothing of his is left, the
		// message he sent jill stays hers, and he is new afterwards: his
		// first device gets what arrived since, and nothing from before.
		f := newFixture(t, b)
		f.attach("jack", "phone", false)
		f.attach("jack", "laptop", false)
		f.s.Detach("jack", "laptop")
		f.append("alice", "m1", "jack")
		f.append("alice", "m2", "jack")
		f.append("jack", "j1", "jill")
		names, err := f.s.Erase("jack")
		slices.Sort(names)
		if err != nil || !slices.Equal(names, []string{"laptop", "phone"}) {
			t.Fatalf("Erase = %v, %v; want laptop and phone forgotten", names, err)
		}
		if n := f.count("jack", 0); n != 0 {
			t.Fatalf("%d messages left after the erase", n)
		}
		if ds, err := f.s.Devices("jack"); err != nil || len(ds) != 0 {
			t.Fatalf("devices after the erase: %+v, %v", ds, err)
		}
		if n := f.count("jill", 0); n != 1 {
			t.Fatalf("jill has %d messages, want jack's one", n)
		}
		// The phone's connection is closed after the erase.
		f.s.Detach("jack", "phone")
		f.flush()
		if names, err := f.s.Erase("jack"); err != nil || len(names) != 0 {
			t.Fatalf("second Erase = %v, %v; want nothing to forget", names, err)
		}
		f.append("alice", "m3", "jack")
		cursor := f.attach("jack", "tablet", false)
		if n := f.count("jack", cursor); n != 1 {
			t.Fatalf("jack's first device after the erase gets %d messages, want m3 alone", n)
		}
	})
	t.Run("TransientDeviceAloneReleasesNothing", func(t *testing.T) {
		f := newFixture(t, b)
		r := f.append("alice", "m1", "jack")
		f.attach("jack", "cli", true)
		f.s.Ack("jack", "cli", r.msg.Seq)
		f.flush()
		f.s.Detach("jack", "cli")
		f.flush()
		cursor := f.attach("jack", "phone", false)
		if n := f.count("jack", cursor); n != 1 {
			t.Fatalf("the first persistent device gets %d messages, want the 1 a transient device acknowledged", n)
		}
	})
	t.Run("GroupMessageToFullQueuesIsRefusedAndCanBeResent", func(t *testing.T) {
		f := newFixture(t, b)
		max := testQueue().MaxQueueMessages
		var last uint64
		for i := range max {
			last = f.append("alice", fmt.Sprint("fill-b", i), "bob").msg.Seq
			f.append("alice", fmt.Sprint("fill-c", i), "carol")
		}
		r := f.append("dave", "g1", "bob", "carol")
		if r.st != queue.Full || r.full != nil {
			t.Fatalf("group message to full queues: status %v, OnFull %v; want Full, not called", r.st, r.full)
		}
		// Room for bob: his device acknowledges everything.
		f.attach("bob", "phone", false)
		f.s.Ack("bob", "phone", last)
		f.flush()
		r = f.append("dave", "g1", "bob", "carol")
		if r.st != queue.Stored || !slices.Equal(r.full, []string{"carol"}) {
			t.Fatalf("resend once bob has room: status %v, full %v; want Stored, [carol]", r.st, r.full)
		}
		if n := f.count("bob", 0); n != 1 {
			t.Fatalf("bob holds %d messages, want the resent 1", n)
		}
	})
	t.Run("TakenOverDeviceIsForgottenAfterDeviceTTL", func(t *testing.T) {
		f := newFixture(t, b)
		f.attach("bob", "phone", false)
		f.attach("bob", "laptop", false)
		f.attach("bob", "phone", false) // a takeover: two connections for a moment
		f.s.Detach("bob", "phone")
		f.s.Detach("bob", "phone")
		r := f.append("alice", "m1", "bob")
		f.s.Ack("bob", "laptop", r.msg.Seq)
		f.clock.Advance(testQueue().DeviceTTL + 2*time.Second)
		// The laptop stays online; the phone, unseen for device_ttl, goes.
		if err := f.s.ForgetUnseen(); err != nil {
			t.Fatal(err)
		}
		if _, err := f.s.Cursor("bob", "phone"); err == nil {
			t.Fatal("the phone is still registered after device_ttl offline")
		}
		f.flush()
		if n := f.count("bob", 0); n != 0 {
			t.Fatalf("%d messages left: the forgotten phone still holds them back", n)
		}
	})
	t.Run("TransientTakeoverKeepsDeviceUntilLastConnection", func(t *testing.T) {
		f := newFixture(t, b)
		f.attach("bob", "phone", false)
		f.attach("bob", "cli", true)
		f.attach("bob", "cli", true)
		f.s.Detach("bob", "cli")
		if _, err := f.s.Cursor("bob", "cli"); err != nil {
			t.Fatalf("transient device forgotten while a connection is open: %v", err)
		}
		f.s.Detach("bob", "cli")
		if _, err := f.s.Cursor("bob", "cli"); err == nil {
			t.Fatal("transient device still registered after its last connection")
		}
	})
	t.Run("SentCopiesGoWithTheMessageAndDecideNothing", func(t *testing.T) {
		f := newFixture(t, b)
		max := testQueue().MaxQueueMessages
		send := func(id string, fanout ...queue.Fanout) result {
			var res result
			done := make(chan struct{})
			f.s.Append(&queue.Request{
				Sender: "alice", ID: id, Meta: []byte("msg"), Fanout: fanout,
				OnFull: func(users []string) { res.full = slices.Clone(users) },
				Done: func(st queue.Status, m queue.Message, err error) {
					if err != nil {
						t.Errorf("append %s: %v", id, err)
					}
					res.st, res.msg = st, m
					close(done)
				},
			})
			<-done
			return res
		}
		// alice has a second device, which needs the copies.
		f.attach("alice", "phone", false)
		f.attach("alice", "laptop", false)
		own := queue.Fanout{To: "alice", Data: []byte("sent"), Meta: []byte("own"), Own: true}
		r := send("g1", queue.Fanout{To: "bob", Data: []byte("to-bob")}, own)
		if r.st != queue.Stored || r.full != nil {
			t.Fatalf("message with a sent copy: %v, full %v; want Stored", r.st, r.full)
		}
		ms, err := f.s.Read("alice", 0, 10)
		if err != nil || len(ms) != 1 || string(ms[0].Data) != "sent" || string(ms[0].Meta) != "own" {
			t.Fatalf("alice's queue after her send: %v, %v; want the sent copy with its own meta", ms, err)
		}
		if ms, _ := f.s.Read("bob", 0, 10); len(ms) != 1 || string(ms[0].Meta) != "msg" {
			t.Fatalf("bob's queue: %v; want the message with the request's meta", ms)
		}
		if r := send("g1", queue.Fanout{To: "bob", Data: []byte("to-bob")}, own); r.st != queue.Duplicate {
			t.Fatalf("resend with a sent copy: %v, want Duplicate", r.st)
		}
		if n := f.count("alice", 0); n != 1 {
			t.Fatalf("alice holds %d sent copies after a resend, want 1", n)
		}
		// A full queue of the sender's skips her copy and refuses nothing.
		for i := range max - 1 {
			f.append("carol", fmt.Sprint("fill", i), "alice")
		}
		r = send("g2", queue.Fanout{To: "bob", Data: []byte("to-bob")}, own)
		if r.st != queue.Stored || r.full != nil {
			t.Fatalf("message while the sender's queue is full: %v, full %v; want Stored, OnFull not called", r.st, r.full)
		}
		if n := f.count("bob", 0); n != 2 {
			t.Fatalf("bob holds %d messages, want 2", n)
		}
	})
	t.Run("ExpiredMessagesAreNotRead", func(t *testing.T) {
		f := newFixture(t, b)
		f.append("alice", "old", "bob")
		f.clock.Advance(testQueue().MessageTTL + 2*time.Second)
		f.append("alice", "new", "bob")
		ms, err := f.s.Read("bob", 0, 10)
		if err != nil || len(ms) != 1 || string(ms[0].Data[:3]) != "new" {
			t.Fatalf("read after message_ttl: %d messages, %v; want the new one", len(ms), err)
		}
	})
}
