package queue

import (
	"errors"
	"fmt"
	"time"

	"github.com/dgraph-io/badger/v4"
)

// maxDeletesPerFlush bounds the work of one flush so that acknowledging a
// huge drained queue never stalls the committer; the rest waits for the next.
const maxDeletesPerFlush = 65536

// outcome is the result of one request of a batch.
type outcome struct {
	status Status
	msg    Message
	err    error
}

// commitLoop is the single writer: it groups appends from every connection
// into one Badger commit and persists acknowledgements between them.
func (s *Store) commitLoop() {
	defer s.wg.Done()
	tick := time.NewTicker(s.opts.Queue.AckFlushInterval)
	defer tick.Stop()
	batch := make([]*Request, 0, s.opts.Queue.MaxBatch)
	results := make([]outcome, 0, s.opts.Queue.MaxBatch)
	for {
		select {
		case r := <-s.reqs:
			batch = s.collect(append(batch[:0], r))
			results = s.commit(batch, results[:0])
		case <-tick.C:
			s.flush()
		case <-s.stop:
			for {
				select {
				case r := <-s.reqs:
					batch = s.collect(append(batch[:0], r))
					results = s.commit(batch, results[:0])
				default:
					s.flush()
					return
				}
			}
		}
	}
}

// collect adds to batch whatever is already waiting, up to the batch limits.
func (s *Store) collect(batch []*Request) []*Request {
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

// commit stores a batch in as few Badger transactions as its size allows
// and then reports every outcome in order.
func (s *Store) commit(batch []*Request, results []outcome) []outcome {
	ttl := s.opts.Queue.MessageTTL
	dedupTTL := s.opts.Queue.DedupWindow
	txn := s.db.NewTransaction(true)
	first := 0 // index of the first request in txn
	finish := func(upTo int) {
		if err := txn.Commit(); err != nil {
			err = fmt.Errorf("commit %d messages: %w", upTo-first, err)
			s.log.Error("queue commit failed", "error", err)
			for i := first; i < upTo; i++ {
				if results[i].status == Stored {
					results[i] = outcome{status: Failed, err: err}
				}
			}
		}
		first = upTo
	}
	for i, r := range batch {
		results = append(results, outcome{})
		if r.To == "" {
			results[i].status = Passed
			continue
		}
		st, msg, err := s.stage(txn, r, ttl, dedupTTL)
		if errors.Is(err, badger.ErrTxnTooBig) {
			finish(i)
			txn = s.db.NewTransaction(true)
			st, msg, err = s.stage(txn, r, ttl, dedupTTL)
		}
		results[i] = outcome{status: st, msg: msg, err: err}
	}
	finish(len(batch))
	for i, r := range batch {
		if results[i].status == Stored {
			if u, err := s.user(r.To); err == nil {
				u.mu.Lock()
				u.committed = max(u.committed, results[i].msg.Seq)
				u.mu.Unlock()
			}
		}
	}
	for i, r := range batch {
		o := results[i]
		r.Done(o.status, o.msg, o.err)
		if o.status == Stored && s.opts.OnStored != nil {
			s.opts.OnStored(r.To, o.msg)
		}
	}
	return results
}

// stage checks dedup and the queue cap, assigns the next sequence of the
// recipient and adds the message to txn.
func (s *Store) stage(txn *badger.Txn, r *Request, ttl, dedupTTL time.Duration) (Status, Message, error) {
	u, err := s.user(r.To)
	if err != nil {
		return Failed, Message{}, err
	}
	var dk []byte
	if r.ID != "" {
		dk = dedupKey(r.Sender, r.ID)
		_, err := txn.Get(dk)
		if err == nil {
			return Duplicate, Message{}, nil
		}
		if !errors.Is(err, badger.ErrKeyNotFound) {
			return Failed, Message{}, fmt.Errorf("dedup lookup: %w", err)
		}
	}
	u.mu.Lock()
	if u.undelivered() >= uint64(s.opts.Queue.MaxQueueMessages) {
		s.skipExpired(u)
	}
	if u.undelivered() >= uint64(s.opts.Queue.MaxQueueMessages) {
		u.mu.Unlock()
		return Full, Message{}, nil
	}
	seq := u.head + 1
	u.head = seq
	u.mu.Unlock()
	if err := txn.SetEntry(badger.NewEntry(msgKey(r.To, seq), r.Data).WithTTL(ttl)); err != nil {
		return Failed, Message{}, fmt.Errorf("stage message: %w", err)
	}
	if dk != nil {
		if err := txn.SetEntry(badger.NewEntry(dk, nil).WithTTL(dedupTTL)); err != nil {
			return Failed, Message{}, fmt.Errorf("stage dedup key: %w", err)
		}
	}
	return Stored, Message{Seq: seq, Data: r.Data}, nil
}

// skipExpired moves a full queue's tail past messages that expired
// unread, so that they stop counting against the cap. Called with u.mu held.
func (s *Store) skipExpired(u *userQueue) {
	first := u.head + 1
	err := s.db.View(func(txn *badger.Txn) error {
		io := badger.DefaultIteratorOptions
		io.PrefetchValues = false
		io.Prefix = msgPrefix(u.name)
		it := txn.NewIterator(io)
		defer it.Close()
		it.Seek(msgKey(u.name, u.tail))
		if it.Valid() {
			first = seqOf(it.Item().Key())
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
	u       *userQueue
	devices []deviceWrite
	upTo    uint64
}

// flush persists changed device cursors and deletes messages every device
// has acknowledged.
func (s *Store) flush() {
	s.dirtyM.Lock()
	if len(s.dirty) == 0 {
		s.dirtyM.Unlock()
		return
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
		return
	}
	for _, f := range done {
		u := f.u
		u.mu.Lock()
		for _, w := range f.devices {
			if d, ok := u.devices[w.name]; ok {
				d.saved = w.rec
			}
		}
		if f.upTo > u.deleted {
			u.deleted = f.upTo
			u.tail = max(u.tail, f.upTo+1)
		}
		low, ok := u.minCursor()
		more := ok && low > u.deleted
		u.mu.Unlock()
		if more {
			s.markDirty(u)
		}
	}
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
