package jsqueue

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// purgeWorkers bounds the users purged at once by one flush.
const purgeWorkers = 8

// flushLoop persists acknowledgements every AckFlushInterval, forgets
// unseen devices and reads the storage left; on Close it flushes once more.
func (s *Store) flushLoop() {
	defer s.wg.Done()
	tick := time.NewTicker(s.opts.Queue.AckFlushInterval)
	defer tick.Stop()
	sweep := time.NewTicker(sweepInterval(s.opts.Queue.DeviceTTL))
	defer sweep.Stop()
	free := time.NewTicker(freeInterval)
	defer free.Stop()
	evict := time.NewTicker(evictEvery)
	defer evict.Stop()
	for {
		select {
		case <-free.C:
			s.readFree()
		case <-tick.C:
			// Errors are logged and the users flushed again next time.
			_ = s.flush()
		case <-sweep.C:
			s.forgetUnseenDevices(s.opts.Now())
		case <-evict.C:
			s.evictIdleUsers(false)
		case f := <-s.ctl:
			f()
		case <-s.stop:
			// Done and OnStored callbacks of the last requests may still ack.
			<-s.completed
			if s.crashed.Load() {
				return
			}
			if err := s.flush(); err != nil {
				s.closeErr = fmt.Errorf("jsqueue: persist acknowledgements on close: %w", err)
			}
			return
		}
	}
}

// Flush persists acknowledgements and purges what every device has
// acknowledged now, instead of at the next AckFlushInterval, and returns
// what failed. After Close it does nothing.
func (s *Store) Flush() error {
	var err error
	s.onFlusher(func() { err = s.flush() })
	return err
}

// ForgetUnseen forgets, now, the offline devices unseen for device_ttl by
// the store's clock, as the periodic sweep does, and persists that.
// After Close it does nothing.
func (s *Store) ForgetUnseen() error {
	var err error
	s.onFlusher(func() {
		s.forgetUnseenDevices(s.opts.Now())
		err = s.flush()
	})
	return err
}

// onFlusher runs f on the flusher goroutine, which owns flushes, and
// waits for it; after Close it does nothing.
func (s *Store) onFlusher(f func()) {
	done := make(chan struct{})
	select {
	case s.ctl <- func() { f(); close(done) }:
		<-done
	case <-s.stop:
	}
}

// sweepInterval is how often devices unseen for ttl are looked for.
func sweepInterval(ttl time.Duration) time.Duration {
	return min(max(ttl/10, time.Second), time.Hour)
}

// write is one device record a flush writes.
type write struct {
	u    *userState
	name string
	rec  record
	rev  uint64
	fut  jetstream.PubAckFuture
	err  error
}

// flush writes changed device records, deletes forgotten ones, and purges
// what every device of a user has acknowledged. What fails is logged,
// returned, and left dirty for the next flush.
func (s *Store) flush() error {
	s.dirtyM.Lock()
	if len(s.dirty) == 0 {
		s.dirtyM.Unlock()
		return nil
	}
	dirty := s.dirty
	s.dirty = make(map[*userState]struct{}, len(dirty))
	s.dirtyM.Unlock()

	var writes []*write
	var purges []*userState
	deletes := make(map[*userState][]forget)
	for u := range dirty {
		u.mu.Lock()
		for name, d := range u.devices {
			if d.record != d.saved || d.rev == 0 {
				writes = append(writes, &write{u: u, name: name, rec: d.record, rev: d.rev})
			}
		}
		if len(u.forgotten) > 0 {
			deletes[u] = u.forgotten
			u.forgotten = nil
		}
		if low, ok := u.minCursor(); ok && low > u.purged {
			purges = append(purges, u)
		}
		u.mu.Unlock()
	}
	ctx, cancel := s.reqCtx()
	defer cancel()
	err := errors.Join(
		s.writeRecords(ctx, writes),
		s.deleteRecords(ctx, deletes),
		s.purgeAcknowledged(ctx, purges),
	)
	return err
}

// writeRecords writes records with compare-and-set on their revision, all
// in flight at once. A record another node changed meanwhile is merged.
func (s *Store) writeRecords(ctx context.Context, ws []*write) error {
	var errs []error
	for _, w := range ws {
		if w.rev == 0 {
			continue // created synchronously below: a deleted key has a marker to replace
		}
		m := &nats.Msg{
			Subject: s.names.kvSubject(deviceKey(w.u.name, w.name)),
			Data:    w.rec.encode(),
			Header:  nats.Header{jetstream.ExpectedLastSubjSeqHeader: []string{strconv.FormatUint(w.rev, 10)}},
		}
		w.fut, w.err = s.js.PublishMsgAsync(m, jetstream.WithStallWait(s.opts.RequestTimeout))
	}
	for _, w := range ws {
		var rev uint64
		switch {
		case w.rev == 0:
			rev, w.err = s.kv.Create(ctx, deviceKey(w.u.name, w.name), w.rec.encode())
		case w.err == nil:
			select {
			case ack := <-w.fut.Ok():
				rev = ack.Sequence
			case w.err = <-w.fut.Err():
			}
		}
		var apiErr *jetstream.APIError
		if errors.Is(w.err, jetstream.ErrKeyExists) || errors.As(w.err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence {
			w.rec, rev, w.err = s.mergeRecord(ctx, w)
		}
		if errors.Is(w.err, errDeparted) {
			continue
		}
		if w.err != nil {
			s.log.Error("persist device cursor", "user", w.u.name, "device", w.name, "error", w.err)
			errs = append(errs, fmt.Errorf("cursor of %s/%s: %w", w.u.name, w.name, w.err))
			s.markDirty(w.u)
			continue
		}
		w.u.mu.Lock()
		d, here := w.u.devices[w.name]
		if here {
			d.saved, d.rev = w.rec, rev
			d.cursor = max(d.cursor, w.rec.cursor)
			if d.record != d.saved {
				s.markDirty(w.u)
			}
		} else {
			// The device left (a transient one) while its record was being
			// written, and its delete may have lost to this write: delete
			// what was written, unless it changed since.
			s.forgetNow(w.u, w.name, rev)
		}
		w.u.mu.Unlock()
	}
	return errors.Join(errs...)
}

// errDeparted is a record write given up because its device was
// forgotten meanwhile.
var errDeparted = errors.New("device forgotten meanwhile")

// mergeRecord writes w's record merged with the bucket's newer one.
func (s *Store) mergeRecord(ctx context.Context, w *write) (record, uint64, error) {
	key := deviceKey(w.u.name, w.name)
	e, err := s.kv.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		w.u.mu.Lock()
		_, here := w.u.devices[w.name]
		w.u.mu.Unlock()
		if !here {
			// Forgotten meanwhile (a transient device that left): its
			// record stays deleted.
			return w.rec, 0, errDeparted
		}
		rev, err := s.kv.Create(ctx, key, w.rec.encode())
		return w.rec, rev, err
	}
	if err != nil {
		return w.rec, 0, fmt.Errorf("read %s to merge: %w", key, err)
	}
	theirs, ok := decodeRecord(e.Value())
	if !ok {
		return w.rec, 0, fmt.Errorf("device record %s is corrupt", key)
	}
	merged := w.rec
	merged.cursor = max(merged.cursor, theirs.cursor)
	merged.seen = max(merged.seen, theirs.seen)
	rev, err := s.kv.Update(ctx, key, merged.encode(), e.Revision())
	return merged, rev, err
}

// deleteRecords deletes the records of forgotten devices, each only if
// it is still at the revision it was forgotten by: another node that saw
// the device since (its cursor and last-seen time newer than this node's
// copy) keeps it, and this node takes it back at its next read.
func (s *Store) deleteRecords(ctx context.Context, deletes map[*userState][]forget) error {
	var errs []error
	for u, fs := range deletes {
		var failed []forget
		for _, f := range fs {
			var opts []jetstream.KVDeleteOpt
			if f.rev != 0 {
				opts = append(opts, jetstream.LastRevision(f.rev))
			}
			err := s.kv.Delete(ctx, deviceKey(u.name, f.name), opts...)
			var apiErr *jetstream.APIError
			switch {
			case err == nil:
			case errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence:
				s.log.Info("device seen on another node: not forgotten", "user", u.name, "device", f.name)
			default:
				s.log.Error("forget device", "user", u.name, "device", f.name, "error", err)
				errs = append(errs, fmt.Errorf("forget %s/%s: %w", u.name, f.name, err))
				failed = append(failed, f)
			}
		}
		if len(failed) > 0 {
			u.mu.Lock()
			u.forgotten = append(u.forgotten, failed...)
			u.mu.Unlock()
			s.markDirty(u)
		}
	}
	return errors.Join(errs...)
}

// purgeAcknowledged purges, for each user, the messages every device has
// acknowledged. The device set is read from the bucket's leader right
// before: a device added on another node since this node last looked
// starts at the queue's head, so it needs nothing below a cursor that
// every device read here had already reached.
func (s *Store) purgeAcknowledged(ctx context.Context, users []*userState) error {
	work := make(chan *userState)
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	for range min(purgeWorkers, len(users)) {
		wg.Go(func() {
			for u := range work {
				if err := s.purgeUser(ctx, u); err != nil {
					s.log.Error("delete acknowledged messages", "user", u.name, "error", err)
					mu.Lock()
					errs = append(errs, fmt.Errorf("purge queue of %s: %w", u.name, err))
					mu.Unlock()
					s.markDirty(u)
				}
			}
		})
	}
	for _, u := range users {
		work <- u
	}
	close(work)
	wg.Wait()
	return errors.Join(errs...)
}

func (s *Store) purgeUser(ctx context.Context, u *userState) error {
	recs, err := s.readDevices(ctx, u.name)
	if err != nil {
		return err
	}
	s.reconcile(u, recs)
	u.mu.Lock()
	upTo, ok := u.minCursor()
	// Only what the bucket holds counts: a cursor not yet written would
	// be lost with this node.
	for name := range u.devices {
		if st, in := recs[name]; in && !st.deleted {
			upTo = min(upTo, st.rec.cursor)
		} else {
			ok = false
		}
	}
	purged := u.purged
	u.mu.Unlock()
	if !ok || upTo <= purged {
		return nil
	}
	subj, shard := s.names.subject(u.name)
	n, err := purge(ctx, s.nc, s.names.stream(shard), subj, upTo+1)
	if err != nil {
		return err
	}
	s.stats.Deleted.Add(n)
	u.mu.Lock()
	u.purged = max(u.purged, upTo)
	u.mu.Unlock()
	return nil
}
