package jsqueue

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// userState is what this node knows of one user's devices. The bucket is
// the truth, shared by every node: the cache is refreshed from it on
// Attach and before every purge, and written back by the flush.
type userState struct {
	name string
	mu   sync.Mutex
	// devices are the user's known devices, on any node.
	devices map[string]*deviceState
	// forgotten lists devices whose records the next flush deletes, each
	// at the revision this node judged it by.
	forgotten []forget
	// purged is the sequence up to which this node purged the queue.
	purged uint64
	// evicted is set when the state is dropped from memory: whoever finds
	// it so loads the user again (lockUser).
	evicted bool
	// used is set whenever the state is locked, and cleared by each
	// eviction pass: one that finds it clear evicts the state.
	used bool
	// loading is closed once the state is read from the bucket.
	loading chan struct{}
}

// lockUser returns the state of name, locked, loading it again if it was
// evicted meanwhile.
func (s *Store) lockUser(name string) (*userState, error) {
	for {
		u, err := s.user(name)
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

// Loaded returns how many users' states are in memory: those with a
// device connected here, or something not yet flushed.
func (s *Store) Loaded() int {
	n := 0
	s.users.Range(func(_, _ any) bool { n++; return true })
	return n
}

// EvictIdle drops from memory, now, every user that the bucket and the
// streams hold all of (see evictIdle), however recently it was used; the
// flusher does the same every evictEvery for users unused since its last pass.
// After Close it does nothing.
func (s *Store) EvictIdle() {
	s.onFlusher(func() { s.evictIdleUsers(true) })
}

// Users unused for a whole evictEvery are dropped from memory at its end.
const evictEvery = time.Minute

// evictIdleUsers evicts the idle users: all of them, or those not used
// since the last pass; on the flusher goroutine.
func (s *Store) evictIdleUsers(all bool) {
	s.users.Range(func(_, v any) bool {
		s.evictIdle(v.(*userState), all)
		return true
	})
}

// evictIdle drops u from memory when the bucket and the streams hold all
// of it (no device connected here, every record written, nothing to
// forget or purge) and, unless all, it was not used since the last
// pass. Memory then follows the users in use, not every user ever
// addressed. Runs on the flusher goroutine.
func (s *Store) evictIdle(u *userState, all bool) {
	select {
	case <-u.loading:
	default:
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
		if d.online > 0 || d.record != d.saved || d.rev == 0 {
			return
		}
	}
	if low, ok := u.minCursor(); ok && low > u.purged {
		return
	}
	s.dirtyM.Lock()
	_, dirty := s.dirty[u]
	s.dirtyM.Unlock()
	if dirty {
		return
	}
	u.evicted = true
	s.users.CompareAndDelete(u.name, u)
}

// deviceState is one device's record, what of it the bucket holds, and its
// connections to this node.
type deviceState struct {
	record
	saved record
	// rev is saved's revision in the bucket; 0 if it was never written.
	rev    uint64
	online int
}

// stored is one device record read from the bucket.
type stored struct {
	rec     record
	rev     uint64
	deleted bool
}

// user returns the state of name, loading it from the bucket. The state
// is put in the map before it is read, and read by one caller while the
// others wait, so that there is only ever one: no second load's older
// copy can replace it after an eviction.
func (s *Store) user(name string) (*userState, error) {
	if v, ok := s.users.Load(name); ok {
		return v.(*userState), nil
	}
	u := &userState{name: name, devices: make(map[string]*deviceState), loading: make(chan struct{})}
	if v, loaded := s.users.LoadOrStore(name, u); loaded {
		o := v.(*userState)
		<-o.loading
		return o, nil
	}
	defer close(u.loading)
	ctx, cancel := s.reqCtx()
	defer cancel()
	recs, err := s.readDevices(ctx, name)
	if err != nil {
		u.mu.Lock()
		u.evicted = true
		u.mu.Unlock()
		s.users.CompareAndDelete(name, u)
		return nil, fmt.Errorf("load devices of %s: %w", name, err)
	}
	s.reconcile(u, recs)
	u.mu.Lock()
	u.used = true
	u.mu.Unlock()
	return u, nil
}

// readDevices reads every device record of user from the bucket's stream
// leader, a record per request: a purge decided on a replica's lagging
// copy could miss a device that was just added and delete what it has not
// received.
func (s *Store) readDevices(ctx context.Context, user string) (map[string]stored, error) {
	filter := s.names.kvSubject(deviceFilter(user))
	prefix := s.names.kvSubject(token(user) + ".")
	out := make(map[string]stored)
	for seq := uint64(1); ; {
		sm, err := leaderGet(ctx, s.nc, s.names.kvStream(), msgGetRequest{Seq: seq, NextFor: filter})
		if errors.Is(err, errNotFound) {
			return out, nil
		}
		if err != nil {
			return nil, err
		}
		seq = sm.Sequence + 1
		name, err := untoken(strings.TrimPrefix(sm.Subject, prefix))
		if err != nil {
			return nil, fmt.Errorf("device key %s: %w", sm.Subject, err)
		}
		st := stored{rev: sm.Sequence}
		if deletedRecord(sm.Header) {
			st.deleted = true
		} else if st.rec, err = decodeStored(sm); err != nil {
			return nil, err
		}
		out[name] = st
	}
}

// deletedRecord reports a KV delete or purge marker.
func deletedRecord(hdr []byte) bool {
	if len(hdr) == 0 {
		return false
	}
	h, err := nats.DecodeHeadersMsg(hdr)
	return err == nil && h.Get("KV-Operation") != ""
}

func decodeStored(sm *storedMsg) (record, error) {
	r, ok := decodeRecord(sm.Data)
	if !ok {
		return record{}, fmt.Errorf("device record %s is corrupt (%d bytes)", sm.Subject, len(sm.Data))
	}
	return r, nil
}

// reconcile merges the bucket's records into u. Cursors only grow, so a
// record newer in the bucket is merged with what this node has not
// written yet; a device whose record another node deleted is dropped
// unless it is connected here, in which case it is written again.
func (s *Store) reconcile(u *userState, recs map[string]stored) {
	u.mu.Lock()
	defer u.mu.Unlock()
	expired := s.opts.Now().Add(-s.opts.Queue.DeviceTTL).Unix()
	forgot := false
	for name, st := range recs {
		d, ok := u.devices[name]
		switch {
		case st.deleted && !ok:
		case st.deleted:
			if d.online == 0 {
				delete(u.devices, name)
			} else {
				d.rev, d.saved = st.rev, record{}
			}
		case !ok:
			if st.rec.seen < expired {
				// Unseen for device_ttl: it no longer holds messages back.
				if !u.isForgotten(name) {
					u.forgotten = append(u.forgotten, forget{name, st.rev})
				}
				forgot = true
				continue
			}
			if !u.isForgotten(name) {
				u.devices[name] = &deviceState{record: st.rec, saved: st.rec, rev: st.rev}
			}
		case st.rev > d.rev:
			changed := d.record != d.saved
			merged := st.rec
			merged.cursor = max(merged.cursor, d.cursor)
			merged.seen = max(merged.seen, d.seen)
			if changed {
				merged.subscribed = d.subscribed
			}
			d.record, d.saved, d.rev = merged, st.rec, st.rev
		}
	}
	for name, d := range u.devices {
		if _, ok := recs[name]; !ok && d.rev != 0 {
			if d.online == 0 {
				delete(u.devices, name)
			} else {
				d.rev, d.saved = 0, record{}
			}
		}
	}
	if forgot {
		s.markDirty(u)
	}
}

// forget is a device record to delete, unless it changed after rev
// (another node saw the device since): 0 deletes whatever is there.
type forget struct {
	name string
	rev  uint64
}

// isForgotten reports whether name awaits deletion; called with u.mu held.
func (u *userState) isForgotten(name string) bool {
	return slices.ContainsFunc(u.forgotten, func(f forget) bool { return f.name == name })
}

// unforget drops name from the pending deletions; called with u.mu held.
func (u *userState) unforget(name string) {
	u.forgotten = slices.DeleteFunc(u.forgotten, func(f forget) bool { return f.name == name })
}

// hasPersistent reports whether the user has a device that is not
// transient; called with u.mu held.
func (u *userState) hasPersistent() bool {
	for _, d := range u.devices {
		if !d.transient {
			return true
		}
	}
	return false
}

// minCursor is the sequence every device has acknowledged; ok is false
// when the user has no persistent device. A transient device holds
// messages back while it is connected, but it cannot release them alone:
// they wait for the user's first persistent device.
func (u *userState) minCursor() (uint64, bool) {
	if !u.hasPersistent() {
		return 0, false
	}
	m := ^uint64(0)
	for _, d := range u.devices {
		m = min(m, d.cursor)
	}
	return m, true
}

// Attach registers a connection of a device of user and returns the
// device's cursor, the last sequence it has acknowledged, and whether it
// subscribed to its inbox on an earlier connection. A device new to the
// store gets everything queued when the user has no persistent device
// (so a user's first persistent device receives the whole backlog, even
// beside transient ones), and what arrives from then on otherwise. A
// transient device is forgotten when its last connection on this node
// detaches; Attach and Detach are counted, so every Attach must be
// matched by one Detach.
//
// The user's records are read again from the bucket first, so a device
// that last connected to another node resumes where it acknowledged there.
func (s *Store) Attach(user, device string, transient bool) (cursor uint64, subscribed bool, err error) {
	u, err := s.user(user)
	if err != nil {
		return 0, false, err
	}
	ctx, cancel := s.reqCtx()
	defer cancel()
	recs, err := s.readDevices(ctx, user)
	if err != nil {
		return 0, false, fmt.Errorf("attach %s/%s: %w", user, device, err)
	}
	s.reconcile(u, recs)
	u.mu.Lock()
	if u.evicted {
		// Dropped from memory meanwhile: start again on a fresh load.
		u.mu.Unlock()
		return s.Attach(user, device, transient)
	}
	defer u.mu.Unlock()
	now := s.opts.Now().Unix()
	if d, ok := u.devices[device]; ok {
		if d.transient && !transient {
			// A transient device reconnecting with a persistent session
			// becomes persistent: written now, as a new device is, since
			// it now decides what is deleted.
			r := d.record
			r.transient, r.seen = false, now
			if !u.hasPersistent() {
				// The user's first persistent device: the backlog too, even
				// what it went past as a transient device.
				start, err := s.startCursor(ctx, u)
				if err != nil {
					return 0, false, fmt.Errorf("attach %s/%s: %w", user, device, err)
				}
				r.cursor = min(r.cursor, start)
			}
			rev, err := s.kv.Update(ctx, deviceKey(user, device), r.encode(), d.rev)
			if err != nil {
				return 0, false, fmt.Errorf("register device %s/%s as persistent: %w", user, device, err)
			}
			d.record, d.saved, d.rev = r, r, rev
		}
		d.seen = now
		d.online++
		return d.cursor, d.subscribed, nil
	}
	r := record{seen: now, transient: transient}
	if r.cursor, err = s.startCursor(ctx, u); err != nil {
		return 0, false, fmt.Errorf("attach %s/%s: %w", user, device, err)
	}
	// Written now, not lazily: a device that crashed before its record was
	// written would come back as "new" and skip what it was sent.
	key := deviceKey(user, device)
	rev, err := s.kv.Create(ctx, key, r.encode())
	saved := r
	if errors.Is(err, jetstream.ErrKeyExists) {
		var e jetstream.KeyValueEntry
		if e, err = s.kv.Get(ctx, key); err == nil {
			old, ok := decodeRecord(e.Value())
			switch {
			case !ok:
				err = fmt.Errorf("device record %s is corrupt", key)
			case u.isForgotten(device) || old.seen < now-int64(s.opts.Queue.DeviceTTL/time.Second):
				// A record this node forgot (a transient device that left,
				// one unseen for device_ttl) and has yet to delete: the
				// device registers as new.
				rev, err = s.kv.Update(ctx, key, r.encode(), e.Revision())
			case old.transient && !transient:
				// Registered meanwhile as transient (here, by a connection
				// just ended, or on another node): it holds, and becomes
				// persistent now.
				start := r.cursor // the backlog, when no device is persistent
				r, r.seen, r.transient = old, now, false
				r.cursor = min(r.cursor, start)
				rev, err = s.kv.Update(ctx, key, r.encode(), e.Revision())
			default:
				// Another node registered it meanwhile: that record holds,
				// seen now once the flush writes it.
				saved, rev = old, e.Revision()
				r, r.seen = old, now
			}
		}
	}
	if err != nil {
		return 0, false, fmt.Errorf("register device %s/%s: %w", user, device, err)
	}
	u.unforget(device)
	u.devices[device] = &deviceState{record: r, saved: saved, rev: rev, online: 1}
	return r.cursor, r.subscribed, nil
}

// startCursor is a new device's cursor: before the first queued message
// when the user has no persistent device, the queue's head otherwise.
// Called with u.mu held.
func (s *Store) startCursor(ctx context.Context, u *userState) (uint64, error) {
	subj, shard := s.names.subject(u.name)
	stream := s.names.stream(shard)
	if !u.hasPersistent() {
		first, err := s.firstSeq(ctx, stream, subj)
		if err != nil {
			return 0, err
		}
		if first > 0 {
			return first - 1, nil
		}
	}
	head, err := s.lastSeq(ctx, stream, subj)
	if err != nil {
		return 0, err
	}
	for _, d := range u.devices {
		head = max(head, d.cursor)
	}
	return max(head, u.purged), nil
}

// MayAttach reports whether device of user may connect: it is known, or
// the user has fewer than max_devices devices. It answers from this
// node's copy of the user's records, refreshed at every Attach.
func (s *Store) MayAttach(user, device string) (bool, error) {
	u, err := s.lockUser(user)
	if err != nil {
		return false, err
	}
	defer u.mu.Unlock()
	_, known := u.devices[device]
	return known || len(u.devices) < s.opts.Queue.MaxDevices, nil
}

// Cursor returns the last sequence device of user has acknowledged.
func (s *Store) Cursor(user, device string) (uint64, error) {
	u, err := s.lockUser(user)
	if err != nil {
		return 0, err
	}
	defer u.mu.Unlock()
	d, ok := u.devices[device]
	if !ok {
		return 0, fmt.Errorf("device %s/%s is not registered", user, device)
	}
	return d.cursor, nil
}

// SetSubscribed records whether a device of user is subscribed to its
// inbox; it is persisted within AckFlushInterval.
func (s *Store) SetSubscribed(user, device string, subscribed bool) {
	s.updateDevice(user, device, func(d *deviceState) { d.subscribed = subscribed })
}

// Ack records that device of user has acknowledged every message up to and
// including cursor. It is persisted within AckFlushInterval.
func (s *Store) Ack(user, device string, cursor uint64) {
	s.updateDevice(user, device, func(d *deviceState) { d.cursor = max(d.cursor, cursor) })
}

// Detach records that a connection of device of user ended; a transient
// device is forgotten when its last connection here ends.
func (s *Store) Detach(user, device string) {
	u, err := s.lockUser(user)
	if err != nil {
		s.log.Error("detach", "user", user, "error", err)
		return
	}
	if d, ok := u.devices[device]; ok {
		d.online = max(d.online-1, 0)
		switch {
		case d.online > 0:
		case d.transient:
			delete(u.devices, device)
			s.forgetNow(u, device, d.rev)
		default:
			d.seen = s.opts.Now().Unix()
		}
	}
	u.mu.Unlock()
	s.markDirty(u)
}

// forgetNow deletes the record of a transient device that left, at once:
// left to the flush, a crash in between would bring it back as an
// offline device holding messages back until device_ttl. A record
// rewritten since rev (the device registered again elsewhere) is kept;
// other failures are left to the flush. Called with u.mu held, which
// orders it against a new Attach of the device here.
func (s *Store) forgetNow(u *userState, device string, rev uint64) {
	if rev == 0 {
		return
	}
	ctx, cancel := s.reqCtx()
	defer cancel()
	err := s.kv.Delete(ctx, deviceKey(u.name, device), jetstream.LastRevision(rev))
	var apiErr *jetstream.APIError
	switch {
	case err == nil:
	case errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence:
	default:
		s.log.Warn("forget transient device; the flush tries again", "user", u.name, "device", device, "error", err)
		u.forgotten = append(u.forgotten, forget{device, rev})
	}
}

// updateDevice changes a known device's record and schedules its flush.
func (s *Store) updateDevice(user, device string, change func(*deviceState)) {
	u, err := s.lockUser(user)
	if err != nil {
		s.log.Error("update device", "user", user, "device", device, "error", err)
		return
	}
	d, ok := u.devices[device]
	if ok {
		change(d)
	}
	u.mu.Unlock()
	if ok {
		s.markDirty(u)
	}
}

func (s *Store) markDirty(u *userState) {
	s.dirtyM.Lock()
	s.dirty[u] = struct{}{}
	s.dirtyM.Unlock()
}

// forgetUnseenDevices forgets the offline devices of loaded users unseen
// for device_ttl, so that they stop holding their users' messages back.
func (s *Store) forgetUnseenDevices(now time.Time) {
	before := now.Add(-s.opts.Queue.DeviceTTL).Unix()
	s.users.Range(func(_, v any) bool {
		u := v.(*userState)
		u.mu.Lock()
		changed := false
		for name, d := range u.devices {
			switch {
			case d.online > 0:
				// Seen now: its record must not look unseen after a crash
				// of a server it stayed connected to for device_ttl.
				d.seen = now.Unix()
				changed = true
			case d.online == 0 && d.seen < before:
				delete(u.devices, name)
				u.forgotten = append(u.forgotten, forget{name, d.rev})
				changed = true
			}
		}
		u.mu.Unlock()
		if changed {
			s.markDirty(u)
		}
		return true
	})
}
