package jsqueue

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/chatd/chatd/broker/queue"
)

// The append path is a pipeline of two goroutines. The committer takes
// requests as they come, publishes every recipient's copy asynchronously
// and hands the batch on; the completer waits for the batch's
// acknowledgements in request order, sends again what was lost to a
// leader election or a reconnect, and then calls Done and OnStored. Many
// batches are in flight at once, bounded by MaxPending messages.

// pub is one recipient's copy of a request and its outcome.
type pub struct {
	user   string
	msg    *nats.Msg
	fut    jetstream.PubAckFuture
	err    error
	status queue.Status
	seq    uint64
	// meta and data are what Read would return, for OnStored.
	meta, data []byte
	// own marks the sender's own copy (queue.Fanout.Own).
	own bool
	// held is set while the copy waits, unsent, for the copy before it to
	// the same user to be answered (see order).
	held bool
}

// order keeps each user's copies in request order through a leader
// change. A copy whose publish went to a leader that died is published
// again once the completer has seen it fail, seconds later; copies to the
// same user published meanwhile reach the new leader and are stored
// first, and their recipients would get them out of their sender's
// order. So once a copy to a user is unanswered for longer than
// suspectAfter, later copies to that user are held, then sent one at a
// time, each once every copy before it is answered, until none is held.
// In normal operation copies are answered well within suspectAfter and
// the pipeline stays full.
type order struct {
	mu    sync.Mutex
	users map[string]*userOrder
}

// userOrder is one user's copies the completer has not answered yet.
type userOrder struct {
	// sent are the copies published and not answered, with when.
	sent []sentCopy
	// held are the copies waiting to be published, in request order.
	held []*pub
}

type sentCopy struct {
	p  *pub
	at time.Time
}

// suspectAfter is how long a copy may go unanswered before a leader
// change is suspected: above a replicated round trip even at saturation
// (p50 about 500 ms with three nodes on one 2-core machine; 250 ms cut
// that throughput by three quarters), below a leader election (seconds).
const suspectAfter = time.Second

// pending is one request and its copies: To's first, then the fan-out's.
type pending struct {
	req  *queue.Request
	pubs []pub
}

// batch is what the committer published in one go.
type batch struct {
	items []pending
	start time.Time
	msgs  int
}

// commitLoop is the committer: it publishes requests in arrival order.
func (s *Store) commitLoop() {
	defer s.wg.Done()
	defer close(s.batches)
	for {
		select {
		case r := <-s.reqs:
			s.publish(s.collect(r))
		case <-s.stop:
			// Close waited for Append callers to leave: reqs only shrinks now.
			for {
				select {
				case r := <-s.reqs:
					s.publish(s.collect(r))
				default:
					return
				}
			}
		}
	}
}

// collect returns r and whatever else is already waiting, up to MaxBatch.
func (s *Store) collect(r *queue.Request) []*queue.Request {
	reqs := []*queue.Request{r}
	for len(reqs) < s.opts.Settings.MaxBatch {
		select {
		case r := <-s.reqs:
			reqs = append(reqs, r)
		default:
			return reqs
		}
	}
	return reqs
}

// publish sends every copy of reqs without waiting and passes the batch
// to the completer.
func (s *Store) publish(reqs []*queue.Request) {
	b := &batch{items: make([]pending, len(reqs)), start: time.Now()}
	for i, r := range reqs {
		p := &b.items[i]
		p.req = r
		if r.To == "" && len(r.Fanout) == 0 {
			continue
		}
		p.pubs = make([]pub, 0, len(r.Fanout)+1)
		if r.To != "" {
			p.pubs = append(p.pubs, s.prepare(r, r.To, r.Meta, r.Data))
		}
		for _, f := range r.Fanout {
			c := s.prepare(r, f.To, f.MetaOf(r), f.Data)
			c.own = f.Own
			p.pubs = append(p.pubs, c)
		}
		// The slice does not grow from here: its copies may be pointed at.
		for j := range p.pubs {
			s.dispatch(&p.pubs[j])
		}
		b.msgs += len(p.pubs)
	}
	s.batches <- b
}

// prepare makes one recipient's copy of r, to publish.
func (s *Store) prepare(r *queue.Request, to string, meta, data []byte) pub {
	v := queue.EncodeValue(meta, data)
	subj, _ := s.names.subject(to)
	m := &nats.Msg{Subject: subj, Data: v, Header: nats.Header{}}
	if r.ID != "" {
		m.Header.Set(jetstream.MsgIDHeader, msgID(r.Sender, r.ID, to))
	}
	// The stream's MaxAge expires messages by the wall clock; the header
	// lets Read follow Options.Now as well.
	m.Header.Set(expiresHeader, strconv.FormatInt(s.opts.Now().Add(s.opts.Settings.MessageTTL).UnixMilli(), 10))
	meta, body, _ := queue.DecodeValue(v)
	return pub{user: to, msg: m, meta: meta, data: body}
}

// dispatch publishes p now, or holds it behind the copies to the same
// user (see order).
func (s *Store) dispatch(p *pub) {
	if s.order.admit(p, s.opts.Now()) {
		s.publishAsync(p)
	}
}

// admit registers p, dispatched at now, and reports whether to publish
// it now; if not, it is held.
func (o *order) admit(p *pub, now time.Time) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	u := o.users[p.user]
	if u == nil {
		u = &userOrder{}
		o.users[p.user] = u
	}
	if len(u.held) > 0 || len(u.sent) > 0 && now.Sub(u.sent[0].at) > suspectAfter {
		u.held = append(u.held, p)
		p.held = true
		return false
	}
	u.sent = append(u.sent, sentCopy{p, now})
	return true
}

// publishAsync sends p without waiting for its acknowledgement. A full
// set of pending publishes waits for room as long as a publish may wait
// for its acknowledgement.
func (s *Store) publishAsync(p *pub) {
	m := &nats.Msg{Subject: p.msg.Subject, Header: p.msg.Header, Data: p.msg.Data}
	p.fut, p.err = s.js.PublishMsgAsync(m, jetstream.WithStallWait(s.opts.PublishTimeout))
}

// answered records that p, stored or refused, will not be sent again,
// and publishes the copy to the same user it released, if any; called by
// the completer.
func (s *Store) answered(p *pub) {
	if next := s.order.done(p, s.opts.Now()); next != nil {
		s.publishAsync(next)
	}
}

// done records p answered and returns the held copy to publish now: the
// next one to p's user once every copy before it is answered.
func (o *order) done(p *pub, now time.Time) *pub {
	o.mu.Lock()
	defer o.mu.Unlock()
	u := o.users[p.user]
	if u == nil {
		return nil
	}
	for i, c := range u.sent {
		if c.p == p {
			u.sent = append(u.sent[:i], u.sent[i+1:]...)
			break
		}
	}
	switch {
	case len(u.sent) > 0:
		return nil
	case len(u.held) > 0:
		next := u.held[0]
		u.held = u.held[1:]
		next.held = false
		u.sent = append(u.sent, sentCopy{next, now})
		return next
	}
	delete(o.users, p.user)
	return nil
}

// await waits for the answer to p, sent (again, if again), and settles
// it: stored or refused, it is answered (see order); it reports whether
// it failed in a way worth sending it again.
func (s *Store) await(p *pub, again bool) (retry bool) {
	if p.err == nil {
		select {
		case ack := <-p.fut.Ok():
			p.acked(ack, again)
		case err := <-p.fut.Err():
			p.err = err
		}
	}
	switch {
	case p.err == nil || p.full():
	case retryable(p.err):
		return true
	default:
		p.failed()
	}
	s.answered(p)
	return false
}

// completeLoop is the completer: it reports each batch in request order.
func (s *Store) completeLoop() {
	defer s.wg.Done()
	defer close(s.completed)
	for b := range s.batches {
		s.complete(b)
	}
}

// complete waits for a batch's acknowledgements, retries what was lost,
// and reports every request.
func (s *Store) complete(b *batch) {
	var retry []*pub
	for i := range b.items {
		for j := range b.items[i].pubs {
			p := &b.items[i].pubs[j]
			// held is read without the order's lock: the committer set it
			// before handing the batch over, and only this goroutine
			// clears it (answered).
			if p.held {
				// Behind a copy to the same user that failed and waits to
				// be sent again: answer that one first, which sends this.
				s.retry(retry)
				retry = nil
				if p.held {
					// Its predecessor, earlier in request order, was answered
					// or is in retry: this cannot be. Fail it, not hang.
					p.err = fmt.Errorf("store message for %s: held behind a copy never answered", p.user)
					s.log.Error("append pipeline out of order", "user", p.user)
				}
			}
			if s.await(p, false) {
				retry = append(retry, p)
			}
		}
	}
	if len(retry) > 0 {
		s.retry(retry)
	}
	s.stats.Commits.Add(1)
	if s.opts.OnCommit != nil {
		s.opts.OnCommit(b.msgs, time.Since(b.start))
	}
	for i := range b.items {
		s.report(&b.items[i])
	}
}

// acked records an acknowledgement. A duplicate on a second attempt may
// be the first attempt's own copy, whose acknowledgement was lost: it is
// stored either way, under the sequence JetStream reports.
func (p *pub) acked(ack *jetstream.PubAck, again bool) {
	p.err = nil
	p.seq = ack.Sequence
	p.status = queue.Stored
	if ack.Duplicate && !again {
		p.status = queue.Duplicate
	}
}

// full reports, and records, a refusal because the user's queue is at
// max_queue_messages. JetStream answers it with code 503, which must not
// be taken for an unavailable stream and retried.
func (p *pub) full() bool {
	var apiErr *jetstream.APIError
	if errors.As(p.err, &apiErr) && apiErr.ErrorCode == errCodeStoreFailed &&
		strings.Contains(apiErr.Description, "maximum messages per subject") {
		p.status, p.err = queue.Full, nil
		return true
	}
	return false
}

// JetStream error codes the append path tells apart.
const (
	// errCodeStoreFailed is JSStreamStoreFailedF, whose description says
	// why a message was not stored.
	errCodeStoreFailed jetstream.ErrorCode = 10077
	// errCodeClusterNotAvailable is JSClusterNotAvailErr: no quorum yet.
	errCodeClusterNotAvailable jetstream.ErrorCode = 10008
	// errCodeDuplicateInProcess is JSStreamDuplicateMessageConflict: a
	// resend met its first copy still being replicated; the next resend
	// is answered as a duplicate, with the first copy's sequence.
	errCodeDuplicateInProcess jetstream.ErrorCode = 10158
)

// noSpace reports JetStream refusing a message for lack of storage: the
// account's or server's limits (JetStream's max_store), or the disk.
func noSpace(err error) bool {
	var apiErr *jetstream.APIError
	if !errors.As(err, &apiErr) {
		return false
	}
	switch apiErr.ErrorCode {
	case 10002, 10023, 10047: // account limits, insufficient resources, storage exceeded
		return true
	case errCodeStoreFailed:
		return strings.Contains(apiErr.Description, "resources") || strings.Contains(apiErr.Description, "no space")
	}
	return false
}

// failed records p.err as a failure; lack of space is queue.ErrNoSpace,
// as badgerq reports it.
func (p *pub) failed() {
	p.status = queue.Failed
	if noSpace(p.err) {
		p.err = fmt.Errorf("store message for %s: %w (%w)", p.user, queue.ErrNoSpace, p.err)
		return
	}
	p.err = fmt.Errorf("store message for %s: %w", p.user, p.err)
}

// retryable reports errors after which the message may or may not be
// stored and JetStream may answer a second attempt: lost connections and
// acknowledgements, socket errors, streams between leaders. JetStream's
// own refusals are final, but for the want of a quorum.
func retryable(err error) bool {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		// Not every 503: a message JetStream refused to store (10077) is
		// refused again.
		return apiErr.ErrorCode == errCodeClusterNotAvailable || apiErr.ErrorCode == errCodeDuplicateInProcess
	}
	return !errors.Is(err, nats.ErrConnectionClosed) &&
		!errors.Is(err, nats.ErrMaxPayload) &&
		!errors.Is(err, nats.ErrBadSubject) &&
		!errors.Is(err, nats.ErrInvalidConnection) &&
		!errors.Is(err, context.Canceled)
}

// retry sends ps again, all at once and in order, until each is answered
// or RetryFor has passed. The same Nats-Msg-Id makes a copy that did land
// a duplicate instead of a second copy; a message without an ID (server
// events) may be stored twice, which at-least-once delivery allows.
func (s *Store) retry(ps []*pub) {
	deadline := time.Now().Add(s.opts.RetryFor)
	wait := 50 * time.Millisecond
	for len(ps) > 0 {
		if time.Now().After(deadline) {
			for _, p := range ps {
				p.status = queue.Failed
				p.err = fmt.Errorf("store message for %s: no acknowledgement within %v: %w", p.user, s.opts.RetryFor, p.err)
				s.answered(p)
			}
			return
		}
		s.log.Warn("publishing again after lost acknowledgements", "messages", len(ps), "error", ps[0].err)
		s.retries.Add(uint64(len(ps)))
		for _, p := range ps {
			s.publishAsync(p)
		}
		var left []*pub
		for _, p := range ps {
			if s.await(p, true) {
				left = append(left, p)
			}
		}
		if len(left) == len(ps) {
			// Nothing went through: give the cluster time to elect a leader.
			time.Sleep(wait)
			wait = min(2*wait, time.Second)
		}
		ps = left
	}
}

// report calls Done for one request and OnStored for its stored copies.
// The request's status follows badgerq: Failed if any copy failed,
// Duplicate if every copy that was not refused is a duplicate, Full if
// every recipient is full, else Stored (after OnFull names the full
// ones); the Message is To's copy.
func (s *Store) report(p *pending) {
	r := p.req
	if len(p.pubs) == 0 {
		r.Done(queue.Passed, queue.Message{}, nil)
		return
	}
	var (
		err           error
		stored, dupes int
		msg           queue.Message
		full          []string
	)
	for i := range p.pubs {
		c := &p.pubs[i]
		if c.own {
			// The sender's own copy decides nothing. It is published
			// with the recipients' copies, not after them, so it may be
			// stored for a message every recipient's full queue refused.
			if c.status == queue.Failed {
				s.log.Warn("sent copy not stored", "user", c.user, "error", c.err)
			}
			if c.status == queue.Stored {
				s.stats.Stored.Add(1)
			}
			continue
		}
		switch c.status {
		case queue.Stored:
			stored++
			s.stats.Stored.Add(1)
			if i == 0 && r.To != "" {
				msg = queue.Message{Seq: c.seq, Meta: c.meta, Data: c.data}
			}
		case queue.Duplicate:
			dupes++
		case queue.Full:
			s.stats.Full.Add(1)
			full = append(full, c.user)
		case queue.Failed:
			err = errors.Join(err, c.err)
		}
	}
	status := queue.Stored
	switch {
	case err != nil:
		// Copies already stored stay; the sender's resend stores the rest
		// and finds the others duplicates.
		status = queue.Failed
	case stored == 0 && dupes > 0:
		status = queue.Duplicate
		s.stats.Duplicates.Add(1)
	case stored == 0:
		// Every recipient's queue was full. JetStream keeps no Nats-Msg-Id
		// of a refused message, so the sender's resend is not a duplicate.
		status = queue.Full
	}
	if status != queue.Stored {
		msg = queue.Message{}
	}
	s.noteSpace(stored > 0, err)
	if status == queue.Stored && len(full) > 0 && r.OnFull != nil {
		r.OnFull(full)
	}
	r.Done(status, msg, err)
	// Even a failed request may have stored some copies: they are
	// delivered, so their users' feeds must hear of them.
	if r.OnStored == nil {
		return
	}
	for i := range p.pubs {
		c := &p.pubs[i]
		if c.status == queue.Stored {
			r.OnStored(c.user, queue.Message{Seq: c.seq, Meta: c.meta, Data: c.data})
		}
	}
}
