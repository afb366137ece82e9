package devices

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/chatd/chatd/broker/queue"
)

// API is the registry as a store offers it: a backend's Store embeds it
// for the device methods of queue.Store and the upkeep methods of the
// conformance suite.
type API[Q any] struct{ r *Registry[Q] }

// API returns the registry's store methods.
func (r *Registry[Q]) API() API[Q] { return API[Q]{r} }

// MayAttach reports whether device of user may connect: it is known, or
// the user has fewer than max_devices devices. With a shared persister
// it answers from this node's copy of the user's records, refreshed at
// every Attach.
func (a API[Q]) MayAttach(user, device string) (bool, error) {
	u, err := a.r.Lock(user)
	if err != nil {
		return false, err
	}
	defer u.mu.Unlock()
	_, known := u.devices[device]
	return known || len(u.devices) < a.r.opts.Settings.MaxDevices, nil
}

// Attach registers a connection of a device of user and returns the
// device's cursor, the last sequence it has acknowledged, and whether it
// subscribed to its inbox on an earlier connection. A device new to the
// store gets everything queued when the user has no persistent device
// (so a user's first persistent device receives the whole backlog, even
// beside transient ones), and what arrives from then on otherwise. A
// transient device is forgotten when its last connection here detaches;
// Attach and Detach are counted, so every Attach must be matched by one
// Detach.
//
// With a shared persister the user's records are read again first, so a
// device that last connected to another node resumes where it
// acknowledged there.
func (a API[Q]) Attach(user, device string, transient bool) (cursor uint64, subscribed bool, err error) {
	r := a.r
	for {
		u, err := r.user(user)
		if err != nil {
			return 0, false, err
		}
		ctx, cancel := r.p.Context()
		cursor, subscribed, again, err := r.attach(ctx, u, device, transient)
		cancel()
		if !again {
			return cursor, subscribed, err
		}
		// Dropped from memory meanwhile: start again on a fresh load.
	}
}

// attach is Attach on a loaded user; again reports a user evicted
// meanwhile.
func (r *Registry[Q]) attach(ctx context.Context, u *User[Q], device string, transient bool) (cursor uint64, subscribed, again bool, err error) {
	if r.shared != nil {
		recs, err := r.shared.Records(ctx, u.Name)
		if err != nil {
			return 0, false, false, attachErr(u.Name, device, err)
		}
		r.Merge(u, recs)
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.evicted {
		return 0, false, true, nil
	}
	u.used = true
	now := r.opts.Now().Unix()
	if d, ok := u.devices[device]; ok {
		switch {
		case d.Transient && !transient:
			if err := r.persist(ctx, u, device, d, now); err != nil {
				return 0, false, false, err
			}
		case d.Transient && d.Online == 0:
			// Known here only from its record: connected on another node.
			if err := r.claim(ctx, u, device, d, now); err != nil {
				return 0, false, false, err
			}
		}
		d.Seen = now
		d.Online++
		return d.Cursor, d.Subscribed, false, nil
	}
	rec := Record{Seen: now, Transient: transient}
	if rec.Cursor, err = r.p.Start(ctx, u, !u.HasPersistent()); err != nil {
		return 0, false, false, attachErr(u.Name, device, err)
	}
	var saved Record
	var rev uint64
	if r.persisted(rec) {
		// Written now, not lazily: a device that crashed before its
		// record was written would come back as "new" and skip what it
		// was sent.
		saved = rec
		rev, err = r.p.Create(ctx, u.Name, device, rec)
		if errors.Is(err, ErrExists) && r.shared != nil {
			rec, saved, rev, err = r.registered(ctx, u, device, rec)
		}
		if err != nil {
			return 0, false, false, fmt.Errorf("register device %s/%s: %w", u.Name, device, err)
		}
	}
	u.unforget(device)
	u.devices[device] = &Device{Record: rec, Saved: saved, Rev: rev, Online: 1}
	return rec.Cursor, rec.Subscribed, false, nil
}

// persist makes transient device d persistent, its record written now,
// as a new device's is, since it now decides what is deleted. The user's
// first persistent device takes the backlog too, even what it went past
// as a transient device. Called with u locked.
func (r *Registry[Q]) persist(ctx context.Context, u *User[Q], device string, d *Device, now int64) error {
	rec := d.Record
	rec.Transient, rec.Seen = false, now
	if !u.HasPersistent() {
		start, err := r.p.Start(ctx, u, true)
		if err != nil {
			return attachErr(u.Name, device, err)
		}
		rec.Cursor = min(rec.Cursor, start)
	}
	rev, err := r.p.Update(ctx, u.Name, device, rec, d.Rev)
	if err != nil {
		return fmt.Errorf("register device %s/%s as persistent: %w", u.Name, device, err)
	}
	d.Record, d.Saved, d.Rev = rec, rec, rev
	return nil
}

// claim writes now the record of transient device d, connected on
// another node until this connection here: that node's Detach deletes
// the record at the revision it knows, and this write, a new revision,
// keeps it there. One deleted meanwhile is written anew. Called with u
// locked.
func (r *Registry[Q]) claim(ctx context.Context, u *User[Q], device string, d *Device, now int64) error {
	rec := d.Record
	rec.Seen = now
	rev, err := r.p.Update(ctx, u.Name, device, rec, d.Rev)
	if err != nil {
		rev, err = r.p.Create(ctx, u.Name, device, rec)
	}
	if err != nil {
		return fmt.Errorf("register device %s/%s here: %w", u.Name, device, err)
	}
	d.Record, d.Saved, d.Rev = rec, rec, rev
	return nil
}

// registered resolves the Create of fresh, the record of a device new
// here, that a shared persister already holds: it returns the record the
// device takes, what of it the persister holds, and its revision. Called
// with u locked.
func (r *Registry[Q]) registered(ctx context.Context, u *User[Q], device string, fresh Record) (rec, saved Record, rev uint64, err error) {
	old, rev, err := r.shared.Get(ctx, u.Name, device)
	if err != nil {
		return fresh, fresh, 0, err
	}
	switch {
	case u.isForgotten(device) || old.Seen < fresh.Seen-int64(r.opts.Settings.DeviceTTL/time.Second):
		// A record this node forgot (a transient device that left, one
		// unseen for device_ttl) and has yet to delete: the device
		// registers as new.
		rev, err = r.p.Update(ctx, u.Name, device, fresh, rev)
		return fresh, fresh, rev, err
	case old.Transient && !fresh.Transient:
		// Registered meanwhile as transient (here, by a connection just
		// ended, or on another node): it holds, and becomes persistent
		// now, with the backlog when no device is persistent.
		rec = old
		rec.Seen, rec.Transient = fresh.Seen, false
		rec.Cursor = min(old.Cursor, fresh.Cursor)
		rev, err = r.p.Update(ctx, u.Name, device, rec, rev)
		return rec, rec, rev, err
	default:
		// Another node registered it meanwhile: that record holds, seen
		// now once the flush writes it.
		rec = old
		rec.Seen = fresh.Seen
		return rec, old, rev, nil
	}
}

// Cursor returns the last sequence device of user has acknowledged.
func (a API[Q]) Cursor(user, device string) (uint64, error) {
	u, err := a.r.Lock(user)
	if err != nil {
		return 0, err
	}
	defer u.mu.Unlock()
	d, ok := u.devices[device]
	if !ok {
		return 0, fmt.Errorf("device %s/%s is not registered", user, device)
	}
	return d.Cursor, nil
}

// SetSubscribed records whether a device of user is subscribed to its
// inbox; the next flush persists it.
func (a API[Q]) SetSubscribed(user, device string, subscribed bool) {
	a.r.update(user, device, func(d *Device) { d.Subscribed = subscribed })
}

// Ack records that device of user has acknowledged every message up to
// and including cursor; the next flush persists it.
func (a API[Q]) Ack(user, device string, cursor uint64) {
	a.r.update(user, device, func(d *Device) { d.Cursor = max(d.Cursor, cursor) })
}

// update changes a known device's record and schedules its flush.
func (r *Registry[Q]) update(user, device string, change func(*Device)) {
	u, err := r.Lock(user)
	if err != nil {
		r.log.Error("update device", "user", user, "device", device, "error", err)
		return
	}
	d, ok := u.devices[device]
	if ok {
		change(d)
	}
	u.mu.Unlock()
	if ok {
		r.MarkDirty(u)
	}
}

// Detach records that a connection of device of user ended; a transient
// device is forgotten when its last connection here ends.
func (a API[Q]) Detach(user, device string) {
	r := a.r
	u, err := r.Lock(user)
	if err != nil {
		r.log.Error("detach", "user", user, "error", err)
		return
	}
	if d, ok := u.devices[device]; ok {
		d.Online = max(d.Online-1, 0)
		switch {
		case d.Online > 0:
		case d.Transient:
			delete(u.devices, device)
			r.ForgetNow(u, device, d.Rev)
		default:
			d.Seen = r.opts.Now().Unix()
		}
	}
	u.mu.Unlock()
	r.MarkDirty(u)
}

// Devices lists the devices of user, by name. With a shared persister
// the user's records are read again first, so that devices registered
// on other nodes are listed too, as last written there.
func (a API[Q]) Devices(user string) ([]queue.Device, error) {
	u, err := a.r.current(user)
	if err != nil {
		return nil, fmt.Errorf("devices of %s: %w", user, err)
	}
	defer u.mu.Unlock()
	out := make([]queue.Device, 0, len(u.devices))
	for name, d := range u.devices {
		out = append(out, queue.Device{
			Name: name, Cursor: d.Cursor, Seen: time.Unix(d.Seen, 0),
			Transient: d.Transient, Connected: d.Online > 0,
		})
	}
	slices.SortFunc(out, func(x, y queue.Device) int { return cmp.Compare(x.Name, y.Name) })
	return out, nil
}

// Remove forgets device of user at once, connected or not: it no longer
// holds messages back, its record is deleted, and the flush run now
// deletes what the user's other devices have all acknowledged. A flush
// before the removal deletes what every device, the removed one
// included, had acknowledged: a user's last device, removed after it
// read everything, leaves nothing for the next device to get again as a
// backlog. Its connections here are left to the caller to close; their
// Acks and Detach then find no device. A device that connects again is
// new.
func (a API[Q]) Remove(user, device string) error {
	_, err := a.remove(user, device, false)
	if err != nil {
		return fmt.Errorf("remove device %s/%s: %w", user, device, err)
	}
	return nil
}

// RemoveAll forgets every device of user at once, as Remove does one,
// and returns their names, sorted; the flush after the removal deletes
// nothing, as no device is left to have acknowledged anything.
func (a API[Q]) RemoveAll(user string) ([]string, error) {
	names, err := a.remove(user, "", true)
	if err != nil {
		return nil, fmt.Errorf("remove the devices of %s: %w", user, err)
	}
	return names, nil
}

// remove forgets device of user, or every device of user when all is
// set ("" names the bare {user} device), after a flush, and flushes
// again; it returns the names forgotten.
func (a API[Q]) remove(user, device string, all bool) ([]string, error) {
	r := a.r
	u, err := r.current(user)
	if err != nil {
		return nil, err
	}
	if _, ok := u.devices[device]; !ok && !all {
		u.mu.Unlock()
		return nil, queue.ErrUnknownDevice
	}
	u.mu.Unlock()
	r.MarkDirty(u)
	if err := a.Flush(); err != nil {
		return nil, err
	}
	// Read again: the user may have been evicted and loaded anew, or the
	// device removed, meanwhile.
	if u, err = r.current(user); err != nil {
		return nil, err
	}
	names := []string{device}
	if all {
		names = slices.Sorted(maps.Keys(u.devices))
	} else if _, ok := u.devices[device]; !ok {
		u.mu.Unlock()
		return nil, queue.ErrUnknownDevice
	}
	for _, name := range names {
		delete(u.devices, name)
		// Revision 0: the removal wins over whatever another node wrote
		// of the device meanwhile.
		u.forgotten = append(u.forgotten, Forget{name, 0})
	}
	u.mu.Unlock()
	r.MarkDirty(u)
	if err := a.Flush(); err != nil {
		return names, err
	}
	if r.shared != nil {
		// The cursors this flush read may lag what the other devices
		// acknowledged on other nodes, which write them at their next
		// flush: the flush after that deletes what they then allow.
		r.MarkDirty(u)
	}
	return names, nil
}

// Removed drops from this node's memory a device another node removed
// (see Remove), if its user is loaded here, and schedules the user's
// flush. A record this node wrote of it since the removal is deleted
// too, unless it changed again (the device registered anew). Without a
// shared persister it does nothing.
func (a API[Q]) Removed(user, device string) {
	r := a.r
	if r.shared == nil {
		return
	}
	v, ok := r.users.Load(user)
	if !ok {
		return
	}
	u := v.(*User[Q])
	if !u.loaded() {
		// Being loaded: the load reads the record as the removal left it.
		return
	}
	u.mu.Lock()
	if u.evicted {
		u.mu.Unlock()
		return
	}
	if d, ok := u.devices[device]; ok {
		delete(u.devices, device)
		r.ForgetNow(u, device, d.Rev)
	}
	u.mu.Unlock()
	// The removing node deleted what the cursors it read allowed; this
	// node's next flush writes the cursors of the devices here and
	// deletes what those, without the removed one, now allow.
	r.MarkDirty(u)
}

// current returns user loaded and locked, its records read again first
// with a shared persister.
func (r *Registry[Q]) current(user string) (*User[Q], error) {
	if r.shared == nil {
		return r.Lock(user)
	}
	for {
		u, err := r.user(user)
		if err != nil {
			return nil, err
		}
		ctx, cancel := r.p.Context()
		recs, err := r.shared.Records(ctx, user)
		cancel()
		if err != nil {
			return nil, err
		}
		u.mu.Lock()
		if u.evicted {
			u.mu.Unlock()
			continue
		}
		r.merge(u, recs)
		u.used = true
		return u, nil
	}
}

// Loaded returns how many users are in memory: those with a device
// connected here, or something not yet persisted.
func (a API[Q]) Loaded() int {
	n := 0
	a.r.users.Range(func(_, _ any) bool { n++; return true })
	return n
}

// Flush persists acknowledgements and deletes what every device has
// acknowledged now, instead of at the next flush interval, and returns
// what failed. After Close it does nothing.
func (a API[Q]) Flush() error {
	var err error
	a.r.Do(func() { err = a.r.opts.Flush() })
	return err
}

// ForgetUnseen forgets, now, the offline devices unseen for device_ttl
// by the store's clock, as the periodic sweep does, and persists that.
// After Close it does nothing.
func (a API[Q]) ForgetUnseen() error {
	var err error
	a.r.Do(func() {
		a.r.Sweep(a.r.opts.Now())
		err = a.r.opts.Flush()
	})
	return err
}

// EvictIdle drops from memory, now, every user the persister holds all
// of, however recently it was used; the owner does the same every
// EvictEvery for users unused since its last pass. After Close it does
// nothing.
func (a API[Q]) EvictIdle() {
	a.r.Do(func() { a.r.Evict(true) })
}
