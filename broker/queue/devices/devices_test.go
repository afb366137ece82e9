package devices_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/queue/devices"
)

// queueState is the fake backend's queue of one user: first is its
// first queued message (0 when empty), head its last.
type queueState struct{ first, head uint64 }

// fake is an in-memory persister; with shared set it is also a Shared
// one, as the JetStream bucket is.
type fake struct {
	mu     sync.Mutex
	shared bool
	recs   map[string]devices.Stored // "user/device" -> record
	rev    uint64
	queue  queueState
	idle   bool
	// failWrites fails Create and Update.
	failWrites error
	// writes lists "user/device" of every Create and Update.
	writes []string
}

func newFake(shared bool) *fake {
	return &fake{shared: shared, recs: make(map[string]devices.Stored), idle: true, queue: queueState{first: 4, head: 9}}
}

func (f *fake) Context() (context.Context, context.CancelFunc) {
	return context.WithCancel(context.Background())
}

func (f *fake) Load(ctx context.Context, user string) (map[string]devices.Stored, queueState, error) {
	recs, err := f.Records(ctx, user)
	f.mu.Lock()
	defer f.mu.Unlock()
	return recs, f.queue, err
}

func (f *fake) Records(_ context.Context, user string) (map[string]devices.Stored, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make(map[string]devices.Stored)
	for k, st := range f.recs {
		var u, d string
		if _, err := fmt.Sscanf(k, "%s %s", &u, &d); err == nil && u == user {
			out[d] = st
		}
	}
	return out, nil
}

func (f *fake) Start(_ context.Context, u *devices.User[queueState], backlog bool) (uint64, error) {
	if backlog && u.Queue.first > 0 {
		return u.Queue.first - 1, nil
	}
	return u.Queue.head, nil
}

func (f *fake) put(user, device string, r devices.Record) uint64 {
	f.rev++
	f.recs[user+" "+device] = devices.Stored{Record: r, Rev: f.rev}
	f.writes = append(f.writes, user+"/"+device)
	return f.rev
}

func (f *fake) Create(_ context.Context, user, device string, r devices.Record) (uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failWrites != nil {
		return 0, f.failWrites
	}
	if st, ok := f.recs[user+" "+device]; ok && !st.Deleted && f.shared {
		return 0, devices.ErrExists
	}
	return f.put(user, device, r), nil
}

func (f *fake) Update(_ context.Context, user, device string, r devices.Record, rev uint64) (uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failWrites != nil {
		return 0, f.failWrites
	}
	if st := f.recs[user+" "+device]; f.shared && st.Rev != rev {
		return 0, fmt.Errorf("revision %d, not %d", st.Rev, rev)
	}
	return f.put(user, device, r), nil
}

func (f *fake) Get(_ context.Context, user, device string) (devices.Record, uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	st, ok := f.recs[user+" "+device]
	if !ok || st.Deleted {
		return devices.Record{}, 0, errors.New("not found")
	}
	return st.Record, st.Rev, nil
}

func (f *fake) Delete(_ context.Context, user, device string, rev uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	k := user + " " + device
	if st := f.recs[k]; rev != 0 && st.Rev != rev {
		return devices.ErrChanged
	}
	f.rev++
	f.recs[k] = devices.Stored{Rev: f.rev, Deleted: true}
	return nil
}

func (f *fake) Idle(*devices.User[queueState]) bool { return f.idle }

// seed stores a record as another node (or an earlier run) left it.
func (f *fake) seed(user, device string, r devices.Record) uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.put(user, device, r)
}

// now is the tests' clock: last-seen times are whole seconds.
var now = time.Unix(1_000_000, 0)

const ttl = time.Hour

// persister is a fake as the registry sees it.
type persister interface {
	devices.Persister[queueState]
	devices.Shared
}

// registry returns a registry on p, shared if p is, and a count of the
// flushes its owner goroutine ran.
func registry(t *testing.T, p *fake, clock *time.Time) (*devices.Registry[queueState], func() int) {
	t.Helper()
	return registryOn(t, p, p.shared, clock)
}

// registryOn is registry on any fake.
func registryOn(t *testing.T, p persister, shared bool, clock *time.Time) (*devices.Registry[queueState], func() int) {
	t.Helper()
	before := goleak.IgnoreCurrent()
	stop := make(chan struct{})
	var flushes int
	opts := devices.Options{
		Flush:    func() error { flushes++; return nil },
		Settings: queue.Settings{DeviceTTL: ttl, MaxDevices: 3},
		Now:      func() time.Time { return *clock },
		Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
		Stop:     stop,
	}
	if shared {
		opts.Shared = p
	}
	r := devices.New(p, opts)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case f := <-r.Control():
				f()
			case <-stop:
				return
			}
		}
	}()
	t.Cleanup(func() {
		close(stop)
		<-done
		goleak.VerifyNone(t, before)
	})
	// flushes is read on the owner goroutine, which writes it.
	return r, func() int {
		var n int
		r.Do(func() { n = flushes })
		return n
	}
}

// step is one call on the registry's API.
type step struct {
	op        string // attach, detach, ack, subscribe
	device    string
	transient bool
	cursor    uint64
}

func attach(d string) step          { return step{op: "attach", device: d} }
func attachTransient(d string) step { return step{op: "attach", device: d, transient: true} }
func detach(d string) step          { return step{op: "detach", device: d} }
func ack(d string, c uint64) step   { return step{op: "ack", device: d, cursor: c} }

// run applies steps to user bob and returns the cursor of the last attach.
func run(t *testing.T, api devices.API[queueState], steps []step) uint64 {
	t.Helper()
	var last uint64
	for _, s := range steps {
		switch s.op {
		case "attach":
			c, _, err := api.Attach("bob", s.device, s.transient)
			if err != nil {
				t.Fatalf("attach %s: %v", s.device, err)
			}
			last = c
		case "detach":
			api.Detach("bob", s.device)
		case "ack":
			api.Ack("bob", s.device, s.cursor)
		case "subscribe":
			api.SetSubscribed("bob", s.device, true)
		default:
			t.Fatalf("unknown step %q", s.op)
		}
	}
	return last
}

// bob returns user bob, locked; the caller unlocks it.
func bob(t *testing.T, r *devices.Registry[queueState]) *devices.User[queueState] {
	t.Helper()
	u, err := r.Lock("bob")
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// TestStartCursor checks where a device starts: the queue holds 4..9, so
// the backlog is cursor 3 and the head 9.
func TestStartCursor(t *testing.T) {
	for _, shared := range []bool{false, true} {
		for _, c := range []struct {
			name  string
			steps []step
			want  uint64
		}{
			{"first persistent device gets the backlog", []step{attach("phone")}, 3},
			{"second persistent device starts at the head", []step{attach("phone"), attach("laptop")}, 9},
			{"first transient device gets the backlog", []step{attachTransient("web")}, 3},
			{"a transient device beside a persistent one starts at the head", []step{attach("phone"), attachTransient("web")}, 9},
			{"first persistent device beside a transient one gets the backlog", []step{attachTransient("web"), attach("phone")}, 3},
			{"a known device keeps its cursor", []step{attach("phone"), ack("phone", 7), detach("phone"), attach("phone")}, 7},
			{"a transient device becoming the first persistent one takes the backlog", []step{attachTransient("web"), ack("web", 8), attach("web")}, 3},
			{"a transient device becoming persistent beside one keeps its cursor", []step{attach("phone"), attachTransient("web"), ack("web", 8), attach("web")}, 9},
			{"a transient device that left starts again", []step{attach("phone"), attachTransient("web"), detach("web"), attachTransient("web")}, 9},
		} {
			t.Run(fmt.Sprintf("shared=%v/%s", shared, c.name), func(t *testing.T) {
				clock := now
				r, _ := registry(t, newFake(shared), &clock)
				if got := run(t, r.API(), c.steps); got != c.want {
					t.Fatalf("cursor %d, want %d", got, c.want)
				}
			})
		}
	}
}

// TestMinCursor checks what every device has acknowledged: nothing
// without a persistent device, whatever the transient ones acknowledged.
func TestMinCursor(t *testing.T) {
	for _, c := range []struct {
		name   string
		steps  []step
		want   uint64
		wantOK bool
	}{
		{"no device", nil, 0, false},
		{"transient devices alone release nothing", []step{attachTransient("web"), ack("web", 9)}, 0, false},
		{"one persistent device", []step{attach("phone"), ack("phone", 6)}, 6, true},
		{"the slowest device holds messages back", []step{attach("phone"), attach("laptop"), ack("phone", 6)}, 6, true},
		{"a connected transient device holds messages back", []step{attach("phone"), attachTransient("web"), ack("phone", 9)}, 9, true},
		{"a transient device that left holds nothing back", []step{attachTransient("web"), attach("phone"), ack("phone", 8), detach("web")}, 8, true},
		{"a persistent device that left still holds messages back", []step{attach("phone"), ack("phone", 5), detach("phone"), attach("laptop"), ack("laptop", 9)}, 5, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			clock := now
			r, _ := registry(t, newFake(false), &clock)
			run(t, r.API(), c.steps)
			u := bob(t, r)
			got, ok := u.MinCursor()
			u.Unlock()
			if got != c.want || ok != c.wantOK {
				t.Fatalf("MinCursor %d, %v; want %d, %v", got, ok, c.want, c.wantOK)
			}
		})
	}
}

// TestWrites checks which records are written at once, and which by the
// flush: a Badger-like persister never holds transient devices.
func TestWrites(t *testing.T) {
	for _, c := range []struct {
		name        string
		shared      bool
		steps       []step
		wantAtOnce  []string
		wantPending []string
	}{
		{"a new persistent device is written at once", false, []step{attach("phone")}, []string{"bob/phone"}, nil},
		{"a transient device is never written", false, []step{attachTransient("web"), ack("web", 5)}, nil, nil},
		{"a shared persister writes transient devices", true, []step{attachTransient("web"), ack("web", 5)}, []string{"bob/web"}, []string{"web"}},
		{"an ack waits for the flush", false, []step{attach("phone"), ack("phone", 5)}, []string{"bob/phone"}, []string{"phone"}},
		{"an ack that changes nothing is not written", false, []step{attach("phone"), ack("phone", 2)}, []string{"bob/phone"}, nil},
		{"a subscription waits for the flush", false, []step{attach("phone"), {op: "subscribe", device: "phone"}}, []string{"bob/phone"}, []string{"phone"}},
		{"a transient device becoming persistent is written at once", false, []step{attachTransient("web"), attach("web")}, []string{"bob/web"}, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			clock := now
			p := newFake(c.shared)
			r, _ := registry(t, p, &clock)
			run(t, r.API(), c.steps)
			if !slices.Equal(p.writes, c.wantAtOnce) {
				t.Fatalf("written at once %v, want %v", p.writes, c.wantAtOnce)
			}
			u := bob(t, r)
			writes, _ := r.Pending(u)
			u.Unlock()
			var names []string
			for _, w := range writes {
				names = append(names, w.Name)
			}
			if !slices.Equal(names, c.wantPending) {
				t.Fatalf("pending writes %v, want %v", names, c.wantPending)
			}
		})
	}
}

// TestConnections checks the connection counts: a device is offline only
// when every Attach has its Detach; a transient one is forgotten then.
func TestConnections(t *testing.T) {
	for _, c := range []struct {
		name      string
		steps     []step
		wantKnown []string
	}{
		{"a takeover keeps a transient device", []step{attachTransient("web"), attachTransient("web"), detach("web")}, []string{"web"}},
		{"a transient device is forgotten with its last connection", []step{attachTransient("web"), attachTransient("web"), detach("web"), detach("web")}, nil},
		{"a persistent device stays offline", []step{attach("phone"), detach("phone")}, []string{"phone"}},
		{"an extra detach is harmless", []step{attach("phone"), detach("phone"), detach("phone"), detach("tablet")}, []string{"phone"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			clock := now
			r, _ := registry(t, newFake(false), &clock)
			run(t, r.API(), c.steps)
			u := bob(t, r)
			known := slices.Sorted(func(yield func(string) bool) {
				for name := range u.Devices() {
					if !yield(name) {
						return
					}
				}
			})
			u.Unlock()
			if !slices.Equal(known, c.wantKnown) {
				t.Fatalf("known devices %v, want %v", known, c.wantKnown)
			}
		})
	}
}

// TestMayAttach checks max_devices (3 here): known devices may always
// come back.
func TestMayAttach(t *testing.T) {
	clock := now
	r, _ := registry(t, newFake(false), &clock)
	api := r.API()
	run(t, api, []step{attach("a"), attach("b"), attach("c")})
	for _, c := range []struct {
		device string
		want   bool
	}{{"a", true}, {"c", true}, {"d", false}} {
		if ok, err := api.MayAttach("bob", c.device); err != nil || ok != c.want {
			t.Errorf("MayAttach %s: %v, %v; want %v", c.device, ok, err, c.want)
		}
	}
	if _, err := api.Cursor("bob", "d"); err == nil {
		t.Error("Cursor of an unknown device: no error")
	}
}

// TestSweep checks which devices device_ttl forgets: offline ones unseen
// for it, never connected ones, which are seen now.
func TestSweep(t *testing.T) {
	for _, c := range []struct {
		name       string
		steps      []step
		after      time.Duration
		wantForgot []string
		wantStart  uint64 // cursor of a new persistent device after the sweep
	}{
		{"an offline device unseen for device_ttl is forgotten", []step{attach("phone"), detach("phone")}, ttl + time.Second, []string{"phone"}, 3},
		{"an offline device seen within device_ttl is kept", []step{attach("phone"), detach("phone")}, ttl - time.Second, nil, 9},
		{"a connected device is kept", []step{attach("phone")}, 10 * ttl, nil, 9},
	} {
		t.Run(c.name, func(t *testing.T) {
			clock := now
			r, flushes := registry(t, newFake(false), &clock)
			api := r.API()
			run(t, api, c.steps)
			clock = now.Add(c.after)
			if err := api.ForgetUnseen(); err != nil {
				t.Fatal(err)
			}
			if n := flushes(); n != 1 {
				t.Fatalf("%d flushes, want 1", n)
			}
			u := bob(t, r)
			_, forgotten := r.Pending(u)
			for _, d := range u.Devices() {
				if d.Online > 0 && d.Seen != clock.Unix() {
					t.Errorf("a connected device was last seen at %d, not now", d.Seen)
				}
			}
			u.Unlock()
			var names []string
			for _, f := range forgotten {
				names = append(names, f.Name)
			}
			if !slices.Equal(names, c.wantForgot) {
				t.Fatalf("forgotten %v, want %v", names, c.wantForgot)
			}
			if got := run(t, api, []step{attach("new")}); got != c.wantStart {
				t.Fatalf("a new device starts at %d, want %d", got, c.wantStart)
			}
		})
	}
}

// TestLoad checks what a load makes of stored records: those unseen for
// device_ttl are forgotten, and the flush deletes them.
func TestLoad(t *testing.T) {
	clock := now
	p := newFake(false)
	p.seed("bob", "phone", devices.Record{Cursor: 6, Seen: now.Unix(), Subscribed: true})
	p.seed("bob", "lost", devices.Record{Cursor: 2, Seen: now.Add(-ttl - time.Second).Unix()})
	r, _ := registry(t, p, &clock)
	c, sub, err := r.API().Attach("bob", "phone", false)
	if err != nil || c != 6 || !sub {
		t.Fatalf("attach phone: %d, %v, %v; want 6, true", c, sub, err)
	}
	dirty := r.TakeDirty()
	if len(dirty) != 1 {
		t.Fatalf("%d users dirty after a load that forgot a device, want 1", len(dirty))
	}
	for u := range dirty {
		u.Lock()
		_, forgotten := r.Pending(u)
		low, _ := u.MinCursor()
		u.Unlock()
		if len(forgotten) != 1 || forgotten[0].Name != "lost" || low != 6 {
			t.Fatalf("forgotten %v, min cursor %d; want [lost], 6", forgotten, low)
		}
	}
}

// TestMerge checks how records another node wrote merge into this
// node's copy: cursors and last-seen times only grow, and this node's
// unwritten subscription wins.
func TestMerge(t *testing.T) {
	for _, c := range []struct {
		name   string
		local  []step
		theirs devices.Record
		want   devices.Record
	}{
		{"their larger cursor", nil, devices.Record{Cursor: 8, Seen: now.Unix() + 5}, devices.Record{Cursor: 8, Seen: now.Unix() + 5}},
		{"our larger unwritten cursor", []step{ack("phone", 9)}, devices.Record{Cursor: 5, Seen: now.Unix()}, devices.Record{Cursor: 9, Seen: now.Unix()}},
		{"their subscription, ours unchanged", nil, devices.Record{Cursor: 3, Seen: now.Unix(), Subscribed: true}, devices.Record{Cursor: 3, Seen: now.Unix(), Subscribed: true}},
		{"our unwritten subscription", []step{{op: "subscribe", device: "phone"}}, devices.Record{Cursor: 3, Seen: now.Unix()}, devices.Record{Cursor: 3, Seen: now.Unix(), Subscribed: true}},
	} {
		t.Run(c.name, func(t *testing.T) {
			clock := now
			p := newFake(true)
			r, _ := registry(t, p, &clock)
			api := r.API()
			run(t, api, append([]step{attach("phone")}, c.local...))
			p.seed("bob", "phone", c.theirs)
			recs, err := p.Records(context.Background(), "bob")
			if err != nil {
				t.Fatal(err)
			}
			u := bob(t, r)
			u.Unlock()
			r.Merge(u, recs)
			u.Lock()
			d, _ := u.Device("phone")
			got := d.Record
			u.Unlock()
			if got != c.want {
				t.Fatalf("merged %+v, want %+v", got, c.want)
			}
		})
	}
}

// TestSharedRegistration checks an Attach of a device new to this node
// whose record another node already wrote.
func TestSharedRegistration(t *testing.T) {
	for _, c := range []struct {
		name       string
		theirs     devices.Record
		transient  bool
		wantCursor uint64
		wantRecord devices.Record
	}{
		{"their record holds", devices.Record{Cursor: 7, Seen: now.Unix() - 10, Subscribed: true}, false, 7, devices.Record{Cursor: 7, Seen: now.Unix(), Subscribed: true}},
		{"a record unseen for device_ttl is replaced", devices.Record{Cursor: 7, Seen: now.Add(-2 * ttl).Unix()}, false, 3, devices.Record{Cursor: 3, Seen: now.Unix()}},
		{"a transient record becomes persistent with the backlog", devices.Record{Cursor: 7, Seen: now.Unix(), Transient: true}, false, 3, devices.Record{Cursor: 3, Seen: now.Unix()}},
		{"a transient record stays transient", devices.Record{Cursor: 7, Seen: now.Unix(), Transient: true}, true, 7, devices.Record{Cursor: 7, Seen: now.Unix(), Transient: true}},
	} {
		t.Run(c.name, func(t *testing.T) {
			clock := now
			p := newFake(true)
			p.seed("bob", "phone", c.theirs)
			// The read before Create misses the record: another node
			// wrote it in between.
			r, _ := registryOn(t, &hidingFake{fake: p, hide: "phone"}, true, &clock)
			cursor, _, err := r.API().Attach("bob", "phone", c.transient)
			if err != nil {
				t.Fatal(err)
			}
			if cursor != c.wantCursor {
				t.Fatalf("cursor %d, want %d", cursor, c.wantCursor)
			}
			u := bob(t, r)
			d, _ := u.Device("phone")
			got := d.Record
			u.Unlock()
			if got != c.wantRecord {
				t.Fatalf("record %+v, want %+v", got, c.wantRecord)
			}
			if st := p.recs["bob phone"]; d.Saved != st.Record || d.Rev != st.Rev {
				t.Fatalf("saved %+v at %d, the persister holds %+v at %d", d.Saved, d.Rev, st.Record, st.Rev)
			}
		})
	}
}

// TestEvict checks when a user may leave memory.
func TestEvict(t *testing.T) {
	for _, c := range []struct {
		name      string
		steps     []step
		busyQueue bool
		all       bool
		passes    int
		wantGone  bool
	}{
		{"an idle user goes after a second pass", []step{attach("phone"), detach("phone")}, false, false, 2, true},
		{"one pass is a second chance", []step{attach("phone"), detach("phone")}, false, false, 1, false},
		{"all evicts at once", []step{attach("phone"), detach("phone")}, false, true, 1, true},
		{"a connected device keeps it", []step{attach("phone")}, false, true, 1, false},
		{"an unwritten ack keeps it", []step{attach("phone"), ack("phone", 5), detach("phone")}, false, true, 1, false},
		{"the backend's busy queue keeps it", []step{attach("phone"), detach("phone")}, true, true, 1, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			clock := now
			p := newFake(false)
			p.idle = !c.busyQueue
			r, _ := registry(t, p, &clock)
			api := r.API()
			run(t, api, c.steps)
			before, err := api.Cursor("bob", "phone")
			if err != nil {
				t.Fatal(err)
			}
			r.TakeDirty() // as a flush would, leaving unwritten records unwritten
			for range c.passes {
				r.Do(func() { r.Evict(c.all) })
			}
			if gone := api.Loaded() == 0; gone != c.wantGone {
				t.Fatalf("evicted %v, want %v", gone, c.wantGone)
			}
			// An evicted user loads again as it was.
			if after, err := api.Cursor("bob", "phone"); err != nil || after != before {
				t.Fatalf("cursor %d, %v after eviction; want %d", after, err, before)
			}
		})
	}
}

// TestFailedRegistration checks that a device whose first record could
// not be written is not registered.
func TestFailedRegistration(t *testing.T) {
	clock := now
	p := newFake(false)
	p.failWrites = errors.New("disk on fire")
	r, _ := registry(t, p, &clock)
	api := r.API()
	if _, _, err := api.Attach("bob", "phone", false); err == nil {
		t.Fatal("attach with a failing persister: no error")
	}
	if _, err := api.Cursor("bob", "phone"); err == nil {
		t.Fatal("the device is registered anyway")
	}
}

// TestDoAfterStop checks that the owner's work is refused, not waited
// for, once the backend closed.
func TestDoAfterStop(t *testing.T) {
	stop := make(chan struct{})
	close(stop)
	r := devices.New(newFake(false), devices.Options{Stop: stop, Flush: func() error { return errors.New("ran") }})
	if err := r.API().Flush(); err != nil {
		t.Fatalf("Flush after stop ran: %v", err)
	}
}

// TestRecordCodec checks the record layout both persisters share.
func TestRecordCodec(t *testing.T) {
	for _, r := range []devices.Record{
		{},
		{Cursor: 1<<64 - 1, Seen: -1},
		{Cursor: 42, Seen: now.Unix(), Subscribed: true},
		{Cursor: 7, Seen: now.Unix(), Transient: true},
		{Cursor: 7, Seen: now.Unix(), Subscribed: true, Transient: true},
	} {
		got, ok := devices.DecodeRecord(r.Encode())
		if !ok || got != r {
			t.Errorf("%+v decodes as %+v, %v", r, got, ok)
		}
	}
	// A persistent record keeps the one-flag layout Badger stores.
	if b := (devices.Record{Cursor: 1, Seen: 2, Subscribed: true}).Encode(); len(b) != 17 || b[16] != 1 || b[7] != 1 || b[15] != 2 {
		t.Errorf("layout % x", b)
	}
	for _, n := range []int{0, 16, 18} {
		if _, ok := devices.DecodeRecord(make([]byte, n)); ok {
			t.Errorf("%d bytes decode", n)
		}
	}
}

// hidingFake hides one device's record from Records, as a read that came
// just before another node wrote it.
type hidingFake struct {
	*fake
	hide string
}

func (h *hidingFake) Records(ctx context.Context, user string) (map[string]devices.Stored, error) {
	recs, err := h.fake.Records(ctx, user)
	delete(recs, h.hide)
	return recs, err
}

func (h *hidingFake) Load(ctx context.Context, user string) (map[string]devices.Stored, queueState, error) {
	recs, err := h.Records(ctx, user)
	return recs, h.queue, err
}

// TestFlushBookkeeping checks what a flush records once its writes and
// deletes are done.
func TestFlushBookkeeping(t *testing.T) {
	clock := now
	r, _ := registry(t, newFake(false), &clock)
	api := r.API()
	run(t, api, []step{attach("phone"), ack("phone", 5), attach("laptop"), detach("laptop")})
	u := bob(t, r)
	defer u.Unlock()
	for _, c := range []struct {
		name        string
		rec         devices.Record
		wantHere    bool
		wantChanged bool
		wantCursor  uint64
	}{
		{"the record written", devices.Record{Cursor: 5, Seen: now.Unix()}, true, false, 5},
		{"an older record: written again", devices.Record{Cursor: 4, Seen: now.Unix()}, true, true, 5},
		{"a merged larger cursor is taken", devices.Record{Cursor: 8, Seen: now.Unix()}, true, false, 8},
	} {
		here, changed := u.Written("phone", c.rec, 7)
		d, _ := u.Device("phone")
		if here != c.wantHere || changed != c.wantChanged || d.Cursor != c.wantCursor || d.Rev != 7 {
			t.Errorf("%s: here %v, changed %v, cursor %d, rev %d; want %v, %v, %d, 7", c.name, here, changed, d.Cursor, d.Rev, c.wantHere, c.wantChanged, c.wantCursor)
		}
	}
	if here, _ := u.Written("gone", devices.Record{}, 1); here {
		t.Error("a device not known is here")
	}
	if !r.Rewrite(u, []devices.Forget{{Name: "laptop"}, {Name: "gone"}}) {
		t.Fatal("the laptop, attached again after it was forgotten, is not written again")
	}
	writes, _ := r.Pending(u)
	if len(writes) != 1 || writes[0].Name != "laptop" || writes[0].Rev != 0 {
		t.Fatalf("pending writes %+v, want the laptop's, over no revision", writes)
	}
}

// TestRemove checks a removal: the device is gone from the list at once,
// a second removal finds none, and a node that had the device connected
// drops it when told, deleting the record it wrote since.
func TestRemove(t *testing.T) {
	clock := now
	p := newFake(true)
	here, _ := registry(t, p, &clock)
	there, _ := registry(t, p, &clock)
	if _, _, err := there.API().Attach("bob", "phone", false); err != nil {
		t.Fatal(err)
	}
	if _, _, err := here.API().Attach("bob", "laptop", false); err != nil {
		t.Fatal(err)
	}
	if err := here.API().Remove("bob", "phone"); err != nil {
		t.Fatalf("remove: %v", err)
	}
	if err := here.API().Remove("bob", "phone"); !errors.Is(err, queue.ErrUnknownDevice) {
		t.Fatalf("second removal: %v, want ErrUnknownDevice", err)
	}
	ds, err := here.API().Devices("bob")
	if err != nil || len(ds) != 1 || ds[0].Name != "laptop" || !ds[0].Connected || ds[0].Seen.Unix() != now.Unix() {
		t.Fatalf("devices here: %+v, %v; want the connected laptop, seen now", ds, err)
	}
	// The flush of the fake deletes nothing: the record there wrote is
	// still in the persister, as if written after the removal's delete.
	there.API().Removed("bob", "phone")
	u := bob(t, there)
	_, known := u.Device("phone")
	u.Unlock()
	if known {
		t.Fatal("the node the phone was connected to still has it after Removed")
	}
	if st := p.recs["bob phone"]; !st.Deleted {
		t.Fatalf("record after Removed: %+v, want deleted", st)
	}
	// Its connection's end finds no device, and writes nothing back.
	there.API().Detach("bob", "phone")
	if ds, _ := there.API().Devices("bob"); len(ds) != 1 || ds[0].Name != "laptop" || ds[0].Connected {
		t.Fatalf("devices there: %+v, want the laptop, connected elsewhere", ds)
	}
}

// TestTransientMove: a clean-session device that connects to another
// node while its old connection is still open keeps its record when the
// old connection's end is handled after the new one's start.
func TestTransientMove(t *testing.T) {
	clock := now
	p := newFake(true)
	a, _ := registry(t, p, &clock)
	b, _ := registry(t, p, &clock)
	if _, _, err := a.API().Attach("bob", "cli", true); err != nil {
		t.Fatal(err)
	}
	clock = clock.Add(time.Second)
	if _, _, err := b.API().Attach("bob", "cli", true); err != nil {
		t.Fatal(err)
	}
	a.API().Detach("bob", "cli")
	if st := p.recs["bob cli"]; st.Deleted || !st.Record.Transient || st.Record.Seen != clock.Unix() {
		t.Fatalf("record after the old node's detach: %+v, want the new node's", st)
	}
	if ds, err := b.API().Devices("bob"); err != nil || len(ds) != 1 || !ds[0].Connected {
		t.Fatalf("devices on the new node: %+v, %v; want cli connected", ds, err)
	}

	// The old node's delete comes between the new node's read of the
	// records and its claim: the record is written anew.
	p2 := newFake(true)
	c, _ := registryOn(t, &deletingFake{fake: p2, device: "cli"}, true, &clock)
	p2.seed("bob", "cli", devices.Record{Seen: clock.Unix(), Transient: true})
	if _, _, err := c.API().Attach("bob", "cli", true); err != nil {
		t.Fatal(err)
	}
	if st := p2.recs["bob cli"]; st.Deleted || !st.Record.Transient {
		t.Fatalf("record deleted under a connected device: %+v", st)
	}
}

// deletingFake deletes one device's record just after each Records read,
// as another node's Detach racing with this node's Attach.
type deletingFake struct {
	*fake
	device string
}

func (d *deletingFake) Records(ctx context.Context, user string) (map[string]devices.Stored, error) {
	recs, err := d.fake.Records(ctx, user)
	if err == nil {
		err = d.fake.Delete(ctx, user, d.device, 0)
	}
	return recs, err
}

func (d *deletingFake) Load(ctx context.Context, user string) (map[string]devices.Stored, queueState, error) {
	recs, err := d.Records(ctx, user)
	return recs, d.queue, err
}
