package jsqueue

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/chatd/chatd/broker/cluster/natsnode"
	"github.com/chatd/chatd/broker/queue"
)

// Read returns up to max messages of user with Seq > after, in order. It
// sees every message acknowledged before it was called, whichever node
// appended it.
//
// It costs two requests: the stream leader names the user's last
// sequence, then one replica (the nearest, often this node's own) sends a
// batch of up to max messages in one answer. A replica that lags behind
// the leader's last sequence is caught by the first answer, and the rest
// is read from the leader a message at a time: a delivery that took a
// short batch for the end of the queue would skip what the replica missed.
func (s *Store) Read(user string, after uint64, max int) ([]queue.Message, error) {
	if max <= 0 {
		return nil, nil
	}
	ctx, cancel := s.reqCtx()
	defer cancel()
	// While a stream changes leaders its reads go unanswered for a
	// moment: ask again rather than fail a device's delivery.
	var out []queue.Message
	err := natsnode.UntilAnswered(ctx, func(ctx context.Context) (err error) {
		out, err = s.read(ctx, user, after, max)
		return err
	})
	return out, err
}

// maxBatch bounds the messages asked of a replica in one request, and so
// the buffer that receives them.
const maxBatch = 1024

// read is one attempt of Read.
func (s *Store) read(ctx context.Context, user string, after uint64, max int) ([]queue.Message, error) {
	subj, shard := s.names.subject(user)
	stream := s.names.stream(shard)
	now := s.opts.Now().UnixMilli()
	last, err := s.lastSeq(ctx, stream, subj)
	if err != nil {
		return nil, fmt.Errorf("read queue of %s: %w", user, err)
	}
	if last <= after {
		return nil, nil
	}
	var out []queue.Message
	// from is the last sequence seen, expired or not.
	from := after
	for len(out) < max && from < last {
		ask := min(max-len(out), maxBatch)
		msgs, err := directBatch(ctx, s.nc, stream, msgGetRequest{Seq: from + 1, NextFor: subj, Batch: ask, UpToSeq: last})
		if err != nil {
			return nil, fmt.Errorf("read queue of %s after %d: %w", user, from, err)
		}
		for _, m := range msgs {
			seq, err := seqOf(m)
			if err != nil {
				return nil, fmt.Errorf("read queue of %s: %w", user, err)
			}
			from = seq
			if expired(m.Header, now) {
				continue
			}
			meta, data, err := queue.DecodeValue(m.Data)
			if err != nil {
				return nil, fmt.Errorf("read queue of %s: message %d: %w", user, seq, err)
			}
			out = append(out, queue.Message{Seq: seq, Meta: meta, Data: data})
		}
		if len(msgs) < ask {
			break // the end, or a lagging replica: the leader tells below
		}
	}
	for len(out) < max && from < last {
		// The replica stopped short of the leader's last sequence: it lags,
		// or the messages were deleted meanwhile. The leader knows which.
		sm, err := leaderGet(ctx, s.nc, stream, msgGetRequest{Seq: from + 1, NextFor: subj})
		if errors.Is(err, errNotFound) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("read queue of %s after %d: %w", user, from, err)
		}
		if sm.Sequence > last {
			break
		}
		from = sm.Sequence
		if len(sm.Header) > 0 {
			if h, err := nats.DecodeHeadersMsg(sm.Header); err == nil && expired(h, now) {
				continue
			}
		}
		meta, data, err := queue.DecodeValue(sm.Data)
		if err != nil {
			return nil, fmt.Errorf("read queue of %s: message %d: %w", user, sm.Sequence, err)
		}
		out = append(out, queue.Message{Seq: sm.Sequence, Meta: meta, Data: data})
	}
	return out, nil
}

// expiresHeader carries a message's expiry, in Unix milliseconds by the
// store's clock.
const expiresHeader = "Chatd-Expires"

// expired reports a message whose expiry header is at or before now
// (Unix milliseconds); messages without one expire by the stream's MaxAge alone.
func expired(h nats.Header, now int64) bool {
	v := h.Get(expiresHeader)
	if v == "" {
		return false
	}
	exp, err := strconv.ParseInt(v, 10, 64)
	return err == nil && exp <= now
}

// Head returns the last sequence of user's queue that is durable, or the
// largest cursor of its devices known here if that is larger (a queue
// emptied by acknowledgement).
func (s *Store) Head(user string) (uint64, error) {
	ctx, cancel := s.reqCtx()
	defer cancel()
	subj, shard := s.names.subject(user)
	last, err := s.lastSeq(ctx, s.names.stream(shard), subj)
	if err != nil {
		return 0, fmt.Errorf("head of %s: %w", user, err)
	}
	u, err := s.reg.Lock(user)
	if err != nil {
		return 0, err
	}
	defer u.Unlock()
	return max(last, u.MaxCursor(), u.Queue.purged), nil
}

// Depth returns how many messages of user are stored and not yet deleted.
func (s *Store) Depth(user string) (uint64, error) {
	ctx, cancel := s.reqCtx()
	defer cancel()
	subj, shard := s.names.subject(user)
	info, err := s.streams[shard].Info(ctx, jetstream.WithSubjectFilter(subj))
	if err != nil {
		return 0, fmt.Errorf("depth of %s: %w", user, err)
	}
	return info.State.Subjects[subj], nil
}

// Waiting counts the messages of user with Seq > after. User sequences
// are the stream's, with gaps, so it asks the stream: an ephemeral
// consumer of the user's subject from after+1 counts them as pending,
// and is deleted at once. It costs two requests, for the devices API,
// not the message path.
func (s *Store) Waiting(user string, after uint64) (uint64, error) {
	ctx, cancel := s.reqCtx()
	defer cancel()
	subj, shard := s.names.subject(user)
	c, err := s.streams[shard].CreateConsumer(ctx, jetstream.ConsumerConfig{
		FilterSubject:     subj,
		DeliverPolicy:     jetstream.DeliverByStartSequencePolicy,
		OptStartSeq:       after + 1,
		AckPolicy:         jetstream.AckNonePolicy,
		MemoryStorage:     true,
		Replicas:          1,
		InactiveThreshold: time.Minute,
	})
	if err != nil {
		return 0, fmt.Errorf("count waiting messages of %s: %w", user, err)
	}
	n := c.CachedInfo().NumPending
	// Left behind, it goes after InactiveThreshold anyway.
	if err := s.streams[shard].DeleteConsumer(ctx, c.CachedInfo().Name); err != nil {
		s.log.Warn("delete counting consumer", "user", user, "error", err)
	}
	return n, nil
}

// lastSeq asks the stream leader for the sequence of the last message on
// subj; 0 when it has none.
func (s *Store) lastSeq(ctx context.Context, stream, subj string) (uint64, error) {
	sm, err := leaderGet(ctx, s.nc, stream, msgGetRequest{LastFor: subj})
	if errors.Is(err, errNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	return sm.Sequence, nil
}

// firstSeq asks the stream leader for the sequence of the first message
// on subj; 0 when it has none.
func (s *Store) firstSeq(ctx context.Context, stream, subj string) (uint64, error) {
	sm, err := leaderGet(ctx, s.nc, stream, msgGetRequest{Seq: 1, NextFor: subj})
	if errors.Is(err, errNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	return sm.Sequence, nil
}
