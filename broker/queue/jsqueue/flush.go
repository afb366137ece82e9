package jsqueue

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/queue/devices"
)

// purgeWorkers bounds the users purged at once by one flush.
const purgeWorkers = 8

// deletedPage is how many messages one read for Options.OnDeleted asks.
const deletedPage = 256

// flushLoop persists acknowledgements every AckFlushInterval, forgets
// unseen devices, evicts idle users and reads the storage left; it runs
// what the registry's Control carries. On Close it flushes once more.
func (s *Store) flushLoop() {
	defer s.wg.Done()
	upkeep := s.reg.Upkeep(devices.Duty{Every: freeInterval, Run: s.readFree})
	defer upkeep.Stop()
	for {
		select {
		case tick := <-upkeep.C:
			upkeep.Run(tick)
		case f := <-s.reg.Control():
			f()
		case <-s.stop:
			// Done and OnStored callbacks of the last requests may still ack.
			<-s.completed
			if s.crashed.Load() {
				return
			}
			if err := s.flush(); err != nil {
				// The last node of a cluster stopping has no quorum left
				// to write to, and a record another node changed meanwhile
				// has no next flush to be merged in: what was not persisted
				// is delivered again, which at-least-once allows. Not a
				// failed shutdown.
				s.log.Warn("acknowledgements since the last flush not persisted on close; those messages will be delivered again",
					"error", err)
			}
			return
		}
	}
}

// write is one device record a flush writes.
type write struct {
	devices.Write
	u   *user
	fut jetstream.PubAckFuture
	err error
}

// flush writes changed device records, deletes forgotten ones, and purges
// what every device of a user has acknowledged. What fails is logged,
// returned, and left dirty for the next flush.
func (s *Store) flush() error {
	dirty := s.reg.TakeDirty()
	if dirty == nil {
		return nil
	}
	var writes []*write
	var purges []*user
	deletes := make(map[*user][]devices.Forget)
	for u := range dirty {
		u.Lock()
		ws, forgotten := s.reg.Pending(u)
		for _, w := range ws {
			writes = append(writes, &write{Write: w, u: u})
		}
		if len(forgotten) > 0 {
			deletes[u] = forgotten
		}
		// Every dirty user is looked at, not only those whose cursors
		// here passed what was purged: this node's copy of the other
		// nodes' cursors is as old as its last read, and a user made dirty
		// by a removal elsewhere may have more to delete than it shows.
		// purgeUser reads the bucket and purges only what is new.
		if _, ok := u.MinCursor(); ok {
			purges = append(purges, u)
		}
		u.Unlock()
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
		if w.Rev == 0 {
			continue // created synchronously below: a deleted key has a marker to replace
		}
		m := &nats.Msg{
			Subject: s.names.kvSubject(deviceKey(w.u.Name, w.Name)),
			Data:    w.Record.Encode(),
			Header:  nats.Header{jetstream.ExpectedLastSubjSeqHeader: []string{strconv.FormatUint(w.Rev, 10)}},
		}
		w.fut, w.err = s.js.PublishMsgAsync(m, jetstream.WithStallWait(s.opts.RequestTimeout))
	}
	for _, w := range ws {
		var rev uint64
		switch {
		case w.Rev == 0:
			rev, w.err = s.kv.Create(ctx, deviceKey(w.u.Name, w.Name), w.Record.Encode())
		case w.err == nil:
			select {
			case ack := <-w.fut.Ok():
				rev = ack.Sequence
			case w.err = <-w.fut.Err():
			}
		}
		var apiErr *jetstream.APIError
		if errors.Is(w.err, jetstream.ErrKeyExists) || errors.As(w.err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence {
			w.Record, rev, w.err = s.mergeRecord(ctx, w)
		}
		if errors.Is(w.err, errDeparted) {
			continue
		}
		if w.err != nil {
			s.log.Error("persist device cursor", "user", w.u.Name, "device", w.Name, "error", w.err)
			errs = append(errs, fmt.Errorf("cursor of %s/%s: %w", w.u.Name, w.Name, w.err))
			s.reg.MarkDirty(w.u)
			continue
		}
		w.u.Lock()
		switch here, changed := w.u.Written(w.Name, w.Record, rev); {
		case !here:
			// The device left (a transient one) while its record was being
			// written, and its delete may have lost to this write: delete
			// what was written, unless it changed since.
			s.reg.ForgetNow(w.u, w.Name, rev)
		case changed:
			s.reg.MarkDirty(w.u)
		}
		w.u.Unlock()
	}
	return errors.Join(errs...)
}

// errDeparted is a record write given up because its device was
// forgotten meanwhile.
var errDeparted = errors.New("device forgotten meanwhile")

// mergeRecord writes w's record merged with the bucket's newer one.
func (s *Store) mergeRecord(ctx context.Context, w *write) (devices.Record, uint64, error) {
	p := persister{s}
	theirs, rev, err := p.Get(ctx, w.u.Name, w.Name)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		w.u.Lock()
		_, here := w.u.Device(w.Name)
		w.u.Unlock()
		if !here {
			// Forgotten meanwhile (a transient device that left): its
			// record stays deleted.
			return w.Record, 0, errDeparted
		}
		rev, err := s.kv.Create(ctx, deviceKey(w.u.Name, w.Name), w.Record.Encode())
		return w.Record, rev, err
	}
	if err != nil {
		return w.Record, 0, fmt.Errorf("read %s/%s to merge: %w", w.u.Name, w.Name, err)
	}
	merged := w.Record
	merged.Cursor = max(merged.Cursor, theirs.Cursor)
	merged.Seen = max(merged.Seen, theirs.Seen)
	rev, err = p.Update(ctx, w.u.Name, w.Name, merged, rev)
	return merged, rev, err
}

// deleteRecords deletes the records of forgotten devices, each only if
// it is still at the revision it was forgotten by: another node that saw
// the device since (its cursor and last-seen time newer than this node's
// copy) keeps it, and this node takes it back at its next read.
func (s *Store) deleteRecords(ctx context.Context, deletes map[*user][]devices.Forget) error {
	var errs []error
	for u, fs := range deletes {
		var failed []devices.Forget
		for _, f := range fs {
			err := persister{s}.Delete(ctx, u.Name, f.Name, f.Rev)
			switch {
			case err == nil:
			case errors.Is(err, devices.ErrChanged):
				s.log.Info("device seen on another node: not forgotten", "user", u.Name, "device", f.Name)
			default:
				s.log.Error("forget device", "user", u.Name, "device", f.Name, "error", err)
				errs = append(errs, fmt.Errorf("forget %s/%s: %w", u.Name, f.Name, err))
				failed = append(failed, f)
			}
		}
		if len(failed) > 0 {
			u.Lock()
			u.ForgetLater(failed...)
			u.Unlock()
			s.reg.MarkDirty(u)
		}
	}
	return errors.Join(errs...)
}

// purgeAcknowledged purges, for each user, the messages every device has
// acknowledged. The device set is read from the bucket's leader right
// before: a device added on another node since this node last looked
// starts at the queue's head, so it needs nothing below a cursor that
// every device read here had already reached.
func (s *Store) purgeAcknowledged(ctx context.Context, users []*user) error {
	work := make(chan *user)
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	for range min(purgeWorkers, len(users)) {
		wg.Go(func() {
			for u := range work {
				if err := s.purgeUser(ctx, u); err != nil {
					s.log.Error("delete acknowledged messages", "user", u.Name, "error", err)
					mu.Lock()
					errs = append(errs, fmt.Errorf("purge queue of %s: %w", u.Name, err))
					mu.Unlock()
					s.reg.MarkDirty(u)
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

func (s *Store) purgeUser(ctx context.Context, u *user) error {
	recs, err := s.readDevices(ctx, u.Name)
	if err != nil {
		return err
	}
	s.reg.Merge(u, recs)
	u.Lock()
	upTo, ok := u.MinCursor()
	// Only what the bucket holds counts: a cursor not yet written would
	// be lost with this node.
	for name := range u.Devices() {
		if st, in := recs[name]; in && !st.Deleted {
			upTo = min(upTo, st.Record.Cursor)
		} else {
			ok = false
		}
	}
	purged := u.Queue.purged
	u.Unlock()
	if !ok || upTo <= purged {
		return nil
	}
	var gone []queue.Message
	if s.opts.OnDeleted != nil {
		// Read before the purge: the Meta of what it deletes.
		var err error
		if gone, err = s.metasUpTo(u.Name, purged, upTo); err != nil {
			return err
		}
	}
	subj, shard := s.names.subject(u.Name)
	n, err := purge(ctx, s.nc, s.names.stream(shard), subj, upTo+1)
	if err != nil {
		return err
	}
	s.stats.Deleted.Add(n)
	if n > 0 && len(gone) > 0 {
		// n is 0 when another node purged them first: it told of them.
		s.opts.OnDeleted(u.Name, gone)
	}
	u.Lock()
	u.Queue.purged = max(u.Queue.purged, upTo)
	u.Unlock()
	return nil
}

// metasUpTo reads the Seq and Meta of user's messages after after, up to
// upTo, for Options.OnDeleted.
func (s *Store) metasUpTo(user string, after, upTo uint64) ([]queue.Message, error) {
	var out []queue.Message
	for {
		msgs, err := s.Read(user, after, deletedPage)
		if err != nil {
			return nil, err
		}
		for _, m := range msgs {
			if m.Seq > upTo {
				return out, nil
			}
			out = append(out, queue.Message{Seq: m.Seq, Meta: m.Meta})
			after = m.Seq
		}
		if len(msgs) < deletedPage {
			return out, nil
		}
	}
}
