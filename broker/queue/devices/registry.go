// Package devices is the device registry of chatd's queue backends: for
// each user, the devices known, their cursors, subscribed flags and
// connections, and the rules that decide where a new device starts,
// what every device has acknowledged, and which devices are forgotten.
// Each backend persists the records through a Persister (badgerq: Badger
// keys; jsqueue: a JetStream KV bucket, shared by every node) and keeps
// its own state of each user's queue in the registry's User, under the
// same lock.
//
// The rules:
//   - a device new to the registry starts before the user's first queued
//     message when the user has no persistent device, so that the first
//     persistent device receives the whole backlog, even beside transient
//     ones; at the queue's head otherwise;
//   - a transient device holds messages back while it is connected, but
//     cannot release them alone (MinCursor); it is forgotten when its
//     last connection here ends;
//   - a transient device reconnecting with a persistent session becomes
//     persistent, its record written at once, and takes the backlog too
//     if it is the user's first persistent device;
//   - a persistent device's first record is written at once, not lazily:
//     one that crashed before would come back as new and skip what it was
//     sent; later changes are written by the next flush;
//   - an offline device unseen for device_ttl is forgotten, so that it
//     stops holding messages back; one connected all along is seen now.
//
// Concurrency: one goroutine of the backend, the owner, runs its
// flushes, the sweep and eviction: it selects on Control and on the
// Upkeep's ticker. Everything else may be called from any goroutine.
package devices

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/chatd/chatd/broker/queue"
)

// Persister stores a registry's device records and reads each user's
// queue state. Q is the backend's state of one user's queue.
type Persister[Q any] interface {
	// Context bounds the persister calls of one registry operation.
	Context() (context.Context, context.CancelFunc)
	// Load reads the records of user's devices and its queue state.
	Load(ctx context.Context, user string) (map[string]Stored, Q, error)
	// Start returns the cursor a device new to u starts at: just before
	// u's first queued message when backlog is set and the queue holds
	// one, u's head otherwise. Called with u locked.
	Start(ctx context.Context, u *User[Q], backlog bool) (uint64, error)
	// Create writes a device's first record and returns its revision
	// (never 0); a shared persister returns ErrExists if it has one.
	Create(ctx context.Context, user, device string, r Record) (uint64, error)
	// Update writes a device's record over revision rev and returns the
	// new revision (never 0).
	Update(ctx context.Context, user, device string, r Record, rev uint64) (uint64, error)
	// Idle reports whether nothing of u's queue state lives only in
	// memory, so that u may be evicted. Called with u locked.
	Idle(u *User[Q]) bool
}

// Shared is what a persister shared by several nodes adds. Its records
// are the truth: every node writes transient devices too, reads a
// user's records again before an Attach, and writes with
// compare-and-set on revisions.
type Shared interface {
	// Records reads every device record of user, deletion markers included.
	Records(ctx context.Context, user string) (map[string]Stored, error)
	// Get reads one device's record and its revision.
	Get(ctx context.Context, user, device string) (Record, uint64, error)
	// Delete deletes a device's record if it is at revision rev (any
	// revision if rev is 0), else returns an error that is ErrChanged.
	Delete(ctx context.Context, user, device string, rev uint64) error
}

// ErrExists is a Create of a record that exists.
var ErrExists = errors.New("device record exists")

// ErrChanged is a Delete of a record changed since the revision given.
var ErrChanged = errors.New("device record changed")

// Options configures a Registry.
type Options struct {
	// Shared, if set, is the persister's shared side: see Shared.
	Shared Shared
	// Flush is the backend's flush, run on its owner goroutine by
	// API.Flush, API.ForgetUnseen and the Upkeep.
	Flush func() error
	// Settings give device_ttl, max_devices and the flush interval.
	Settings queue.Settings
	// Now is the clock of last-seen times; nil means time.Now.
	Now func() time.Time
	// Logger receives errors of operations that return none.
	Logger *slog.Logger
	// Stop is closed when the backend closes: the owner goroutine stops
	// taking work from Control.
	Stop <-chan struct{}
}

// Registry is the device registry of one store.
type Registry[Q any] struct {
	p      Persister[Q]
	shared Shared
	opts   Options
	log    *slog.Logger
	users  sync.Map // user ID -> *User[Q]
	dirtyM sync.Mutex
	dirty  map[*User[Q]]struct{}
	// ctl carries work to the owner goroutine.
	ctl chan func()
}

// New returns an empty registry whose records p persists.
func New[Q any](p Persister[Q], opts Options) *Registry[Q] {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Registry[Q]{
		p:      p,
		shared: opts.Shared,
		opts:   opts,
		log:    opts.Logger,
		dirty:  make(map[*User[Q]]struct{}),
		ctl:    make(chan func()),
	}
}

// user returns the user name, loading it. The user is put in the map
// before it is read, and read by one caller while the others wait, so
// that there is only ever one: no second load's older copy can replace
// it after an eviction.
func (r *Registry[Q]) user(name string) (*User[Q], error) {
	if v, ok := r.users.Load(name); ok {
		u := v.(*User[Q])
		<-u.loading
		return u, nil
	}
	u := &User[Q]{Name: name, devices: make(map[string]*Device), loading: make(chan struct{})}
	if v, loaded := r.users.LoadOrStore(name, u); loaded {
		o := v.(*User[Q])
		<-o.loading
		return o, nil
	}
	defer close(u.loading)
	ctx, cancel := r.p.Context()
	defer cancel()
	recs, q, err := r.p.Load(ctx, name)
	if err != nil {
		u.mu.Lock()
		u.evicted = true
		u.mu.Unlock()
		r.users.CompareAndDelete(name, u)
		return nil, err
	}
	u.mu.Lock()
	u.Queue = q
	r.merge(u, recs)
	u.used = true
	u.mu.Unlock()
	return u, nil
}

// Lock returns the user name, loaded and locked, loading it again if it
// was evicted meanwhile.
func (r *Registry[Q]) Lock(name string) (*User[Q], error) {
	for {
		u, err := r.user(name)
		if err != nil {
			return nil, err
		}
		u.mu.Lock()
		if !u.evicted {
			u.used = true
			return u, nil
		}
		u.mu.Unlock()
	}
}

// MarkDirty schedules u for the next flush.
func (r *Registry[Q]) MarkDirty(u *User[Q]) {
	r.dirtyM.Lock()
	r.dirty[u] = struct{}{}
	r.dirtyM.Unlock()
}

// TakeDirty returns the users marked dirty since the last call, for a
// flush; the flush marks again those it fails to persist.
func (r *Registry[Q]) TakeDirty() map[*User[Q]]struct{} {
	r.dirtyM.Lock()
	defer r.dirtyM.Unlock()
	if len(r.dirty) == 0 {
		return nil
	}
	dirty := r.dirty
	r.dirty = make(map[*User[Q]]struct{}, len(dirty))
	return dirty
}

// persisted reports whether a device with record rec has it persisted:
// a transient device's only with a shared persister.
func (r *Registry[Q]) persisted(rec Record) bool {
	return !rec.Transient || r.shared != nil
}

// unsaved reports whether d's record is yet to be written.
func (r *Registry[Q]) unsaved(d *Device) bool {
	return r.persisted(d.Record) && (d.Record != d.Saved || d.Rev == 0)
}

// Pending returns what a flush persists of u: the records to write, and
// the devices forgotten, whose records it deletes and which it takes
// from u. Called with u locked.
func (r *Registry[Q]) Pending(u *User[Q]) (writes []Write, forgotten []Forget) {
	for name, d := range u.devices {
		if r.unsaved(d) {
			writes = append(writes, Write{Name: name, Record: d.Record, Rev: d.Rev})
		}
	}
	forgotten, u.forgotten = u.forgotten, nil
	return writes, forgotten
}

// Rewrite marks for writing again the devices of forgotten that were
// attached again while a flush deleted their records: the delete may
// have taken the new record with it. It reports whether there were any.
// Called with u locked.
func (r *Registry[Q]) Rewrite(u *User[Q], forgotten []Forget) bool {
	again := false
	for _, f := range forgotten {
		if d, ok := u.devices[f.Name]; ok && r.persisted(d.Record) {
			d.Saved, d.Rev = Record{}, 0
			again = true
		}
	}
	return again
}

// Merge merges the persister's records into u, locking it; see merge.
func (r *Registry[Q]) Merge(u *User[Q], recs map[string]Stored) {
	u.mu.Lock()
	defer u.mu.Unlock()
	r.merge(u, recs)
}

// merge merges the persister's records into u, locked. A record new to u
// joins it, unless it is unseen for device_ttl: that device is forgotten.
// With a shared persister, cursors only grow, so a record newer there is
// merged with what this node has not written yet, and a device whose
// record another node deleted is dropped unless it is connected here, in
// which case it is written again.
func (r *Registry[Q]) merge(u *User[Q], recs map[string]Stored) {
	expired := r.opts.Now().Add(-r.opts.Settings.DeviceTTL).Unix()
	forgot := false
	for name, st := range recs {
		d, ok := u.devices[name]
		switch {
		case st.Deleted && !ok:
		case st.Deleted:
			if d.Online == 0 {
				delete(u.devices, name)
			} else {
				d.Rev, d.Saved = st.Rev, Record{}
			}
		case !ok:
			if st.Record.Seen < expired {
				// Unseen for device_ttl: it no longer holds messages back.
				if !u.isForgotten(name) {
					u.forgotten = append(u.forgotten, Forget{name, st.Rev})
				}
				forgot = true
				continue
			}
			if !u.isForgotten(name) {
				u.devices[name] = &Device{Record: st.Record, Saved: st.Record, Rev: st.Rev}
			}
		case st.Rev > d.Rev:
			changed := d.Record != d.Saved
			merged := st.Record
			merged.Cursor = max(merged.Cursor, d.Cursor)
			merged.Seen = max(merged.Seen, d.Seen)
			if changed {
				merged.Subscribed = d.Subscribed
			}
			d.Record, d.Saved, d.Rev = merged, st.Record, st.Rev
		}
	}
	for name, d := range u.devices {
		if _, ok := recs[name]; !ok && d.Rev != 0 {
			if d.Online == 0 {
				delete(u.devices, name)
			} else {
				d.Rev, d.Saved = 0, Record{}
			}
		}
	}
	if forgot {
		r.MarkDirty(u)
	}
}

// ForgetNow deletes, at once, the record of a transient device that left
// a shared persister: left to the flush, a crash in between would bring
// it back as an offline device holding messages back until device_ttl.
// A record rewritten since rev (the device registered again elsewhere)
// is kept; other failures are left to the flush. Called with u locked,
// which orders it against a new Attach of the device here.
func (r *Registry[Q]) ForgetNow(u *User[Q], device string, rev uint64) {
	if rev == 0 || r.shared == nil {
		return
	}
	ctx, cancel := r.p.Context()
	defer cancel()
	err := r.shared.Delete(ctx, u.Name, device, rev)
	if err != nil && !errors.Is(err, ErrChanged) {
		r.log.Warn("forget transient device; the flush tries again", "user", u.Name, "device", device, "error", err)
		u.forgotten = append(u.forgotten, Forget{device, rev})
	}
}

// Sweep forgets the offline devices of loaded users unseen for
// device_ttl at now, so that they stop holding their users' messages
// back (users not loaded are checked when they are); a device connected
// here is seen now. The next flush persists it. Run on the owner.
func (r *Registry[Q]) Sweep(now time.Time) {
	before := now.Add(-r.opts.Settings.DeviceTTL).Unix()
	r.users.Range(func(_, v any) bool {
		u := v.(*User[Q])
		u.mu.Lock()
		changed := false
		for name, d := range u.devices {
			switch {
			case d.Online > 0:
				// Seen now: its record must not look unseen after a crash
				// of a server it stayed connected to for device_ttl.
				d.Seen = now.Unix()
				changed = true
			case d.Seen < before:
				delete(u.devices, name)
				u.forgotten = append(u.forgotten, Forget{name, d.Rev})
				changed = true
			}
		}
		u.mu.Unlock()
		if changed {
			r.MarkDirty(u)
		}
		return true
	})
}

// EvictEvery is the pace of eviction passes: users unused for a whole
// EvictEvery are dropped from memory at its end, soon enough that memory
// follows the users in use, not every user ever addressed, late enough
// that a user who keeps receiving is not loaded again for every message.
const EvictEvery = time.Minute

// Evict drops from memory the idle users (see evict): all of them, or
// those not used since the last pass. Run on the owner, so that no
// flush or commit is half done.
func (r *Registry[Q]) Evict(all bool) {
	r.users.Range(func(_, v any) bool {
		r.evict(v.(*User[Q]), all)
		return true
	})
}

// evict drops u from memory when the persister holds all of it (no
// device connected here, every record written, nothing to forget, the
// persister's Idle) and, unless all, it was not used since the last
// pass. Loading it again gives the same user.
func (r *Registry[Q]) evict(u *User[Q], all bool) {
	if !u.loaded() {
		return
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	used := u.used
	u.used = false // a second chance: the next pass evicts it if unused
	if u.evicted || used && !all || len(u.forgotten) > 0 {
		return
	}
	for _, d := range u.devices {
		if d.Online > 0 || r.unsaved(d) {
			return
		}
	}
	if !r.p.Idle(u) {
		return
	}
	r.dirtyM.Lock()
	_, dirty := r.dirty[u]
	r.dirtyM.Unlock()
	if dirty {
		return
	}
	u.evicted = true
	r.users.CompareAndDelete(u.Name, u)
}

// Control carries work to the owner goroutine, which runs each function
// it receives.
func (r *Registry[Q]) Control() <-chan func() { return r.ctl }

// Do runs f on the owner goroutine and waits for it; after Stop it does
// nothing.
func (r *Registry[Q]) Do(f func()) {
	done := make(chan struct{})
	select {
	case r.ctl <- func() { f(); close(done) }:
		<-done
	case <-r.opts.Stop:
	}
}

// SweepInterval is how often devices unseen for ttl are looked for:
// often enough that a lost phone stops holding messages back soon after
// ttl.
func SweepInterval(ttl time.Duration) time.Duration {
	return min(max(ttl/10, time.Second), time.Hour)
}

// Duty is periodic work of the owner goroutine.
type Duty struct {
	// Every is its pace.
	Every time.Duration
	// Run does it.
	Run func()
	// next is when it is next due, from the Upkeep's start.
	next time.Duration
}

// Upkeep is the owner goroutine's periodic work: the backend's flush
// every flush interval, Sweep every SweepInterval of device_ttl,
// Evict(false) every EvictEvery, then the backend's own duties. One
// ticker at the shortest pace paces them all: each runs at the first
// tick at or after it is due, and a tick the owner was too busy for is
// dropped, as a time.Ticker drops it.
type Upkeep[Q any] struct {
	ticker *time.Ticker
	// C ticks; the owner then calls Run with the tick's time.
	C      <-chan time.Time
	duties []Duty
	start  time.Time
}

// Upkeep starts the owner's ticker, for the registry's duties and the
// backend's own; the owner stops it.
func (r *Registry[Q]) Upkeep(own ...Duty) *Upkeep[Q] {
	k := &Upkeep[Q]{start: time.Now()}
	k.duties = append([]Duty{
		// The backend logs its errors and flushes the users again next time.
		{Every: r.opts.Settings.AckFlushInterval, Run: func() { _ = r.opts.Flush() }},
		{Every: SweepInterval(r.opts.Settings.DeviceTTL), Run: func() { r.Sweep(r.opts.Now()) }},
		{Every: EvictEvery, Run: func() { r.Evict(false) }},
	}, own...)
	pace := k.duties[0].Every
	for i := range k.duties {
		k.duties[i].next = k.duties[i].Every
		pace = min(pace, k.duties[i].Every)
	}
	k.ticker = time.NewTicker(pace)
	k.C = k.ticker.C
	return k
}

// Run does what is due at tick, in the order of the duties.
func (k *Upkeep[Q]) Run(tick time.Time) {
	at := tick.Sub(k.start)
	for i := range k.duties {
		d := &k.duties[i]
		if at < d.next {
			continue
		}
		for d.next <= at {
			d.next += d.Every
		}
		d.Run()
	}
}

// Stop stops the ticker.
func (k *Upkeep[Q]) Stop() { k.ticker.Stop() }

// attachErr wraps an error of Attach.
func attachErr(user, device string, err error) error {
	return fmt.Errorf("attach %s/%s: %w", user, device, err)
}
