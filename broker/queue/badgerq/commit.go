package badgerq

import (
	"bytes"
	"errors"
	"fmt"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/queue/devices"
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
	u   *user
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
	upkeep := s.reg.Upkeep()
	defer upkeep.Stop()
	batch := make([]*queue.Request, 0, s.opts.Settings.MaxBatch)
	results := make([]outcome, 0, s.opts.Settings.MaxBatch)
	for {
		select {
		case r := <-s.reqs:
			batch = s.collect(append(batch[:0], r))
			results = s.commit(batch, results[:0])
		case tick := <-upkeep.C:
			upkeep.Run(tick)
		case f := <-s.reg.Control():
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
	for len(batch) < s.opts.Settings.MaxBatch && size < maxBatchBytes {
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
	ttl := s.opts.Settings.MessageTTL
	dedupTTL := s.opts.Settings.DedupWindow
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
			st.u.Lock()
			st.u.Queue.committed = max(st.u.Queue.committed, st.msg.Seq)
			st.u.Unlock()
		})
	}
	for i, r := range batch {
		o := &results[i]
		if o.status == queue.Stored && len(o.full) > 0 && r.OnFull != nil {
			r.OnFull(o.full)
		}
		r.Done(o.status, o.msg, o.err)
		if o.status == queue.Stored && r.OnStored != nil {
			o.each(func(st stored) { r.OnStored(st.u.Name, st.msg) })
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
		st, full, err := s.stageOne(b, idx, r.To, r.Meta, r.Data, ttl, false)
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
		if f.Own {
			continue
		}
		st, full, err := s.stageOne(b, idx, f.To, f.MetaOf(r), f.Data, ttl, false)
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
	// The sender's own copies follow the recipients' in the same commit;
	// a full queue of the sender's, or one with no device but the
	// sender's, skips them.
	for _, f := range r.Fanout {
		if !f.Own {
			continue
		}
		st, full, err := s.stageOne(b, idx, f.To, f.MetaOf(r), f.Data, ttl, true)
		switch {
		case err != nil:
			return outcome{status: queue.Failed, err: err}
		case !full:
			o.fanout = append(o.fanout, st)
		}
	}
	if dk != nil {
		if err := b.set(idx, badger.NewEntry(dk, nil).WithTTL(dedupTTL)); err != nil {
			return outcome{status: queue.Failed, err: fmt.Errorf("stage dedup key: %w", err)}
		}
	}
	return o
}

// stageOne adds one recipient's copy to txn; full reports a queue at its
// cap, or for an own copy (queue.Fanout.Own) a user with at most one
// device, the sender's, which would never be sent it.
func (s *Store) stageOne(b *batchTxn, idx int, to string, meta, data []byte, ttl time.Duration, own bool) (st stored, full bool, err error) {
	u, err := s.reg.Lock(to)
	if err != nil {
		return stored{}, false, err
	}
	if own && u.DeviceCount() < 2 {
		u.Unlock()
		return stored{}, true, nil
	}
	if undelivered(u) >= uint64(s.opts.Settings.MaxQueueMessages) {
		s.skipExpired(u)
	}
	if undelivered(u) >= uint64(s.opts.Settings.MaxQueueMessages) {
		u.Unlock()
		return stored{}, true, nil
	}
	seq := u.Queue.head + 1
	u.Queue.head = seq
	u.Unlock()
	v := queue.EncodeValue(meta, data)
	m, d, _ := queue.DecodeValue(v)
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
// unread, so that they stop counting against the cap. Called with u locked.
func (s *Store) skipExpired(u *user) {
	q := &u.Queue
	first := q.head + 1
	err := s.db.View(func(txn *badger.Txn) error {
		if f := firstLive(txn, u.Name, q.tail, uint64(s.opts.Now().Unix())); f != 0 {
			first = f
		}
		return nil
	})
	if err != nil {
		s.log.Error("queue cap check", "user", u.Name, "error", err)
		return
	}
	if first > q.tail {
		q.tail = first
		q.deleted = max(q.deleted, first-1)
	}
}

// userFlush is what a flush wrote for one user.
type userFlush struct {
	u         *user
	writes    []devices.Write
	forgotten []devices.Forget
	upTo      uint64
	// deleted are the messages deleted, with their Meta, when
	// Options.OnDeleted is set.
	deleted []queue.Message
}

// flush persists changed device cursors and deletes messages every device
// has acknowledged. What fails is logged, returned, and left dirty for the
// next flush. It runs on the committer goroutine.
func (s *Store) flush() error {
	dirty := s.reg.TakeDirty()
	if dirty == nil {
		return nil
	}
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
			s.reg.MarkDirty(u)
		}
		return fmt.Errorf("persist acknowledgements: %w", err)
	}
	for _, f := range done {
		u := f.u
		u.Lock()
		for _, w := range f.writes {
			u.Written(w.Name, w.Record, written)
		}
		rewrite := s.reg.Rewrite(u, f.forgotten)
		if f.upTo > u.Queue.deleted {
			s.stats.Deleted.Add(f.upTo - u.Queue.deleted)
			u.Queue.deleted = f.upTo
			u.Queue.tail = max(u.Queue.tail, f.upTo+1)
		}
		low, ok := u.MinCursor()
		more := ok && low > u.Queue.deleted || rewrite
		u.Unlock()
		if more {
			s.reg.MarkDirty(u)
		}
		if len(f.deleted) > 0 {
			s.opts.OnDeleted(u.Name, f.deleted)
		}
	}
	return nil
}

// stageFlush adds one user's record writes and deletions to wb.
func (s *Store) stageFlush(wb *badger.WriteBatch, u *user, budget *int) (userFlush, error) {
	f := userFlush{u: u}
	u.Lock()
	f.writes, f.forgotten = s.reg.Pending(u)
	from := max(u.Queue.deleted+1, u.Queue.tail)
	upTo, ok := u.MinCursor()
	if !ok || upTo < from {
		upTo = from - 1 // nothing to delete
	}
	if upTo >= from && upTo-from+1 > uint64(*budget) {
		upTo = from + uint64(*budget) - 1
	}
	u.Unlock()

	for _, w := range f.writes {
		if err := wb.Set(deviceKey(u.Name, w.Name), w.Record.Encode()); err != nil {
			return f, fmt.Errorf("write cursor of %s/%s: %w", u.Name, w.Name, err)
		}
	}
	for _, d := range f.forgotten {
		if err := wb.Delete(deviceKey(u.Name, d.Name)); err != nil {
			return f, fmt.Errorf("forget device %s/%s: %w", u.Name, d.Name, err)
		}
	}
	if s.opts.OnDeleted != nil && upTo >= from {
		var err error
		if f.deleted, err = s.metas(u.Name, from, upTo); err != nil {
			return f, err
		}
	}
	for seq := from; seq <= upTo; seq++ {
		if err := wb.Delete(msgKey(u.Name, seq)); err != nil {
			return f, fmt.Errorf("delete message %s/%d: %w", u.Name, seq, err)
		}
		*budget--
	}
	f.upTo = upTo
	return f, nil
}

// metas reads the Seq and Meta of user's messages from..upTo that are
// still stored and not expired, for Options.OnDeleted.
func (s *Store) metas(user string, from, upTo uint64) ([]queue.Message, error) {
	var out []queue.Message
	now := uint64(s.opts.Now().Unix())
	err := s.db.View(func(txn *badger.Txn) error {
		io := badger.DefaultIteratorOptions
		io.Prefix = msgPrefix(user)
		it := txn.NewIterator(io)
		defer it.Close()
		for it.Seek(msgKey(user, from)); it.Valid(); it.Next() {
			item := it.Item()
			seq := seqOf(item.Key())
			if seq > upTo {
				break
			}
			if expired(item, now) {
				continue
			}
			err := item.Value(func(v []byte) error {
				meta, _, err := queue.DecodeValue(v)
				if err != nil {
					return err
				}
				out = append(out, queue.Message{Seq: seq, Meta: bytes.Clone(meta)})
				return nil
			})
			if err != nil {
				return fmt.Errorf("read message %s/%d: %w", user, seq, err)
			}
		}
		return nil
	})
	return out, err
}
