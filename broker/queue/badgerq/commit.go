package badgerq

import (
	"errors"
	"fmt"
	"github.com/chatd/chatd/broker/queue"
	"time"

	"github.com/dgraph-io/badger/v4"
)

// maxDeletesPerFlush bounds the work of one flush so that acknowledging a
// huge drained queue never stalls the committer; the rest waits for the next.
const maxDeletesPerFlush = 65536

// outcome is the result of one request of a batch.
type outcome struct {
	status queue.Status
	msg    queue.Message
	err    error
	// to is what was stored for the request's To (u is nil when nothing
	// was); fanout is what was stored for its further recipients; full
	// lists the recipients whose queues were full.
	to     stored
	fanout []stored
	full   []string
}

// stored is one message stored in one user's queue.
type stored struct {
	u   *userQueue
	msg queue.Message
}

// each calls f for every message the request stored.
func (o *outcome) each(f func(stored)) {
	if o.to.u != nil {
		f(o.to)
	}
	for _, st := range o.fanout {
		f(st)
	}
}

// commitLoop is the single writer: it groups appends from every connection
// into one Badger commit and persists acknowledgements between them.
func (s *Store) commitLoop() {
	defer s.wg.Done()
	tick := time.NewTicker(s.opts.Queue.AckFlushInterval)
	defer tick.Stop()
	sweep := time.NewTicker(sweepInterval(s.opts.Queue.DeviceTTL))
	defer sweep.Stop()
	evict := time.NewTicker(evictEvery)
	defer evict.Stop()
	batch := make([]*queue.Request, 0, s.opts.Queue.MaxBatch)
	results := make([]outcome, 0, s.opts.Queue.MaxBatch)
	for {
		select {
		case r := <-s.reqs:
			batch = s.collect(append(batch[:0], r))
			results = s.commit(batch, results[:0])
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
			for {
				select {
				case r := <-s.reqs:
					batch = s.collect(append(batch[:0], r))
					results = s.commit(batch, results[:0])
				default:
					if !s.crashed.Load() {
						s.closeErr = s.flush()
					}
					return
				}
			}
		}
	}
}

// collect adds to batch whatever is already waiting, up to the batch limits.
func (s *Store) collect(batch []*queue.Request) []*queue.Request {
	size := len(batch[0].Data)
	for len(batch) < s.opts.Queue.MaxBatch && size < maxBatchBytes {
		select {
		case r := <-s.reqs:
			batch = append(batch, r)
			size += len(r.Data)
		default:
			return batch
		}
	}
	return batch
}

// batchTxn writes a batch's entries, committing and starting a new Badger
// transaction whenever one is full. A failed commit fails every request
// that had an entry in it; a group message spread over several
// transactions may then reach some of its recipients, which the sender's
// retry cannot repair (its dedup key is written last). Only a failing disk
// gets there.
type batchTxn struct {
	s       *Store
	txn     *badger.Txn
	first   int // index of the first request with an entry in txn
	results []outcome
}

// set adds e on behalf of request idx.
func (b *batchTxn) set(idx int, e *badger.Entry) error {
	err := b.txn.SetEntry(e)
	if errors.Is(err, badger.ErrTxnTooBig) {
		b.commit(idx, idx+1)
		err = b.txn.SetEntry(e)
	}
	return err
}

// commit commits txn for requests [first, upTo) and starts the next one at next.
func (b *batchTxn) commit(next, upTo int) {
	if err := b.txn.Commit(); err != nil {
		err = fmt.Errorf("commit %d messages: %w", upTo-b.first, err)
		b.s.log.Error("queue commit failed", "error", err)
		for i := b.first; i < upTo && i < len(b.results); i++ {
			if b.results[i].status == queue.Stored {
				b.results[i] = outcome{status: queue.Failed, err: err}
			}
		}
	}
	b.txn = b.s.db.NewTransaction(true)
	b.first = next
}

// commit stores a batch in as few Badger transactions as its size allows
// and then reports every outcome in order.
func (s *Store) commit(batch []*queue.Request, results []outcome) []outcome {
	start := time.Now()
	ttl := s.opts.Queue.MessageTTL
	dedupTTL := s.opts.Queue.DedupWindow
	b := &batchTxn{s: s, txn: s.db.NewTransaction(true)}
	for i, r := range batch {
		results = append(results, outcome{})
		b.results = results
		if r.To == "" && len(r.Fanout) == 0 {
			results[i].status = queue.Passed
			continue
		}
		o := s.stage(b, i, r, ttl, dedupTTL)
		// A commit forced while staging this request may already have failed it.
		if results[i].status != queue.Failed {
			results[i] = o
		}
	}
	b.commit(len(batch), len(batch))
	b.txn.Discard()
	s.stats.Commits.Add(1)
	if s.opts.OnCommit != nil {
		s.opts.OnCommit(len(batch), time.Since(start))
	}
	for i := range batch {
		switch results[i].status {
		case queue.Duplicate:
			s.stats.Duplicates.Add(1)
		case queue.Full, queue.Stored:
			s.stats.Full.Add(uint64(len(results[i].full)))
		}
		if results[i].status != queue.Stored {
			continue
		}
		results[i].each(func(st stored) {
			s.stats.Stored.Add(1)
			st.u.mu.Lock()
			st.u.committed = max(st.u.committed, st.msg.Seq)
			st.u.mu.Unlock()
		})
	}
	for i, r := range batch {
		o := &results[i]
		if o.status == queue.Stored && len(o.full) > 0 && r.OnFull != nil {
			r.OnFull(o.full)
		}
		r.Done(o.status, o.msg, o.err)
		if o.status == queue.Stored && r.OnStored != nil {
			o.each(func(st stored) { r.OnStored(st.u.name, st.msg) })
		}
	}
	return results
}

// stage checks dedup and the queue caps, assigns the next sequence of each
// recipient and adds the message to txn.
func (s *Store) stage(b *batchTxn, idx int, r *queue.Request, ttl, dedupTTL time.Duration) outcome {
	var dk []byte
	if r.ID != "" {
		dk = dedupKey(r.Sender, r.ID)
		_, err := b.txn.Get(dk)
		if err == nil {
			return outcome{status: queue.Duplicate}
		}
		if !errors.Is(err, badger.ErrKeyNotFound) {
			return outcome{status: queue.Failed, err: fmt.Errorf("dedup lookup: %w", err)}
		}
		// Only client messages stop at the disk reserve: server-made
		// events (receipts, errors) follow messages already stored and
		// are bounded by them.
		if s.lowDisk.Load() {
			return outcome{status: queue.Failed, err: queue.ErrNoSpace}
		}
	}
	o := outcome{status: queue.Stored}
	if r.To != "" {
		st, full, err := s.stageOne(b, idx, r.To, r.Meta, r.Data, ttl)
		switch {
		case err != nil:
			return outcome{status: queue.Failed, err: err}
		case full:
			o.full = append(o.full, r.To)
		default:
			o.to, o.msg = st, st.msg
		}
	}
	for _, f := range r.Fanout {
		st, full, err := s.stageOne(b, idx, f.To, r.Meta, f.Data, ttl)
		switch {
		case err != nil:
			return outcome{status: queue.Failed, err: err}
		case full:
			o.full = append(o.full, f.To)
		default:
			o.fanout = append(o.fanout, st)
		}
	}
	if o.to.u == nil && len(o.fanout) == 0 {
		// Stored nowhere: no dedup key, so that the sender's resend, once
		// there is room, is stored rather than taken for a duplicate.
		return outcome{status: queue.Full, full: o.full}
	}
	if dk != nil {
		if err := b.set(idx, badger.NewEntry(dk, nil).WithTTL(dedupTTL)); err != nil {
			return outcome{status: queue.Failed, err: fmt.Errorf("stage dedup key: %w", err)}
		}
	}
	return o
}

// stageOne adds one recipient's copy to txn; full reports a queue at its cap.
func (s *Store) stageOne(b *batchTxn, idx int, to string, meta, data []byte, ttl time.Duration) (st stored, full bool, err error) {
	u, err := s.lockUser(to)
	if err != nil {
		return stored{}, false, err
	}
	if u.undelivered() >= uint64(s.opts.Queue.MaxQueueMessages) {
		s.skipExpired(u)
	}
	if u.undelivered() >= uint64(s.opts.Queue.MaxQueueMessages) {
		u.mu.Unlock()
		return stored{}, true, nil
	}
	seq := u.head + 1
	u.head = seq
	u.mu.Unlock()
	v, m, d := encodeValue(meta, data)
	e := badger.NewEntry(msgKey(to, seq), v)
	// The expiry follows the store's clock (Options.Now), not Badger's,
	// rounded up to Badger's whole seconds so that a message never
	// expires before message_ttl.
	e.ExpiresAt = uint64(s.opts.Now().Add(ttl + time.Second - 1).Unix())
	if err := b.set(idx, e); err != nil {
		return stored{}, false, fmt.Errorf("stage message: %w", err)
	}
	return stored{u: u, msg: queue.Message{Seq: seq, Meta: m, Data: d}}, false, nil
}

// skipExpired moves a full queue's tail past messages that expired
// unread, so that they stop counting against the cap. Called with u.mu held.
func (s *Store) skipExpired(u *userQueue) {
	first := u.head + 1
	err := s.db.View(func(txn *badger.Txn) error {
		if f := firstLive(txn, u.name, u.tail, uint64(s.opts.Now().Unix())); f != 0 {
			first = f
		}
		return nil
	})
	if err != nil {
		s.log.Error("queue cap check", "user", u.name, "error", err)
		return
	}
	if first > u.tail {
		u.tail = first
		u.deleted = max(u.deleted, first-1)
	}
}

// deviceWrite is a device record written by a flush.
type deviceWrite struct {
	name string
	rec  record
}

// userFlush is what a flush wrote for one user.
type userFlush struct {
	u         *userQueue
	devices   []deviceWrite
	forgotten []string
	upTo      uint64
}

// flush persists changed device cursors and deletes messages every device
// has acknowledged. What fails is logged, returned, and left dirty for the
// next flush.
func (s *Store) flush() error {
	s.dirtyM.Lock()
	if len(s.dirty) == 0 {
		s.dirtyM.Unlock()
		return nil
	}
	dirty := s.dirty
	s.dirty = make(map[*userQueue]struct{}, len(dirty))
	s.dirtyM.Unlock()

	wb := s.db.NewWriteBatch()
	defer wb.Cancel()
	var done []userFlush
	var err error
	budget := maxDeletesPerFlush
	for u := range dirty {
		f, e := s.stageFlush(wb, u, &budget)
		if e != nil {
			err = e
			break
		}
		done = append(done, f)
	}
	if err == nil {
		err = wb.Flush()
	}
	if err != nil {
		s.log.Error("persist acknowledgements", "error", err)
		for u := range dirty {
			s.markDirty(u)
		}
		return fmt.Errorf("persist acknowledgements: %w", err)
	}
	for _, f := range done {
		u := f.u
		u.mu.Lock()
		for _, w := range f.devices {
			if d, ok := u.devices[w.name]; ok {
				d.saved = w.rec
			}
		}
		rewrite := false
		for _, name := range f.forgotten {
			if d, ok := u.devices[name]; ok && !d.transient {
				// Attached again while this flush deleted its old record,
				// which may have taken the new one with it: written again.
				d.saved = record{}
				rewrite = true
			}
		}
		if f.upTo > u.deleted {
			s.stats.Deleted.Add(f.upTo - u.deleted)
			u.deleted = f.upTo
			u.tail = max(u.tail, f.upTo+1)
		}
		low, ok := u.minCursor()
		more := ok && low > u.deleted || rewrite
		u.mu.Unlock()
		if more {
			s.markDirty(u)
		}
	}
	return nil
}

// stageFlush adds one user's cursor writes and deletions to wb.
func (s *Store) stageFlush(wb *badger.WriteBatch, u *userQueue, budget *int) (userFlush, error) {
	f := userFlush{u: u}
	u.mu.Lock()
	for name, d := range u.devices {
		if !d.transient && d.record != d.saved {
			f.devices = append(f.devices, deviceWrite{name, d.record})
		}
	}
	forgotten := u.forgotten
	f.forgotten = forgotten
	u.forgotten = nil
	from := max(u.deleted+1, u.tail)
	upTo, ok := u.minCursor()
	if !ok || upTo < from {
		upTo = from - 1 // nothing to delete
	}
	if upTo >= from && upTo-from+1 > uint64(*budget) {
		upTo = from + uint64(*budget) - 1
	}
	u.mu.Unlock()

	for _, w := range f.devices {
		if err := wb.Set(deviceKey(u.name, w.name), w.rec.encode()); err != nil {
			return f, fmt.Errorf("write cursor of %s/%s: %w", u.name, w.name, err)
		}
	}
	for _, name := range forgotten {
		if err := wb.Delete(deviceKey(u.name, name)); err != nil {
			return f, fmt.Errorf("forget device %s/%s: %w", u.name, name, err)
		}
	}
	for seq := from; seq <= upTo; seq++ {
		if err := wb.Delete(msgKey(u.name, seq)); err != nil {
			return f, fmt.Errorf("delete message %s/%d: %w", u.name, seq, err)
		}
		*budget--
	}
	f.upTo = upTo
	return f, nil
}

// sweepInterval is how often devices unseen for ttl are looked for: often
// enough that a lost phone stops holding messages back soon after ttl.
func sweepInterval(ttl time.Duration) time.Duration {
	return min(max(ttl/10, time.Second), time.Hour)
}

// forgetUnseenDevices forgets the offline devices of loaded users unseen
// for device_ttl, so that they stop holding their users' messages back
// (users not loaded are checked when they are). It runs on the committer
// goroutine, like the flush that deletes their records.
func (s *Store) forgetUnseenDevices(now time.Time) {
	before := now.Add(-s.opts.Queue.DeviceTTL).Unix()
	s.users.Range(func(_, v any) bool {
		u := v.(*userQueue)
		u.mu.Lock()
		changed := false
		for name, d := range u.devices {
			switch {
			case d.online > 0:
				// Seen now: its record must not look unseen after a crash
				// of a server it stayed connected to for device_ttl.
				d.seen = now.Unix()
				changed = true
			case d.online == 0 && !d.transient && d.seen < before:
				delete(u.devices, name)
				u.forgotten = append(u.forgotten, name)
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
