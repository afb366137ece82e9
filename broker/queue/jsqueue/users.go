package jsqueue

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/chatd/chatd/broker/queue/devices"
)

// queueState is what this node knows of one user's queue, kept in the
// device registry's User beside the user's devices.
type queueState struct {
	// purged is the sequence up to which this node purged the queue.
	purged uint64
}

// user is one user's devices and queue state. The bucket is the truth,
// shared by every node: the registry's copy is refreshed from it on
// Attach and before every purge, and written back by the flush.
type user = devices.User[queueState]

// deviceAPI is the registry's methods, as the Store offers them.
type deviceAPI = devices.API[queueState]

// persister keeps the device records in the bucket, for the device
// registry: a shared persister (devices.Shared), as every node reads and
// writes the same records.
type persister struct{ s *Store }

// Context bounds the calls of one registry operation by RequestTimeout.
func (p persister) Context() (context.Context, context.CancelFunc) { return p.s.reqCtx() }

// Load reads a user's device records; the queue state starts empty.
func (p persister) Load(ctx context.Context, name string) (map[string]devices.Stored, queueState, error) {
	recs, err := p.s.readDevices(ctx, name)
	if err != nil {
		return nil, queueState{}, fmt.Errorf("load devices of %s: %w", name, err)
	}
	return recs, queueState{}, nil
}

// Records reads every device record of user from the bucket's leader.
func (p persister) Records(ctx context.Context, name string) (map[string]devices.Stored, error) {
	return p.s.readDevices(ctx, name)
}

// Start is a new device's cursor: before the first queued message for
// the backlog (when there is one), the queue's head otherwise, which
// never goes below a cursor or the purge of this node.
func (p persister) Start(ctx context.Context, u *user, backlog bool) (uint64, error) {
	s := p.s
	subj, shard := s.names.subject(u.Name)
	stream := s.names.stream(shard)
	if backlog {
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
	return max(head, u.MaxCursor(), u.Queue.purged), nil
}

// Create writes a device's first record; devices.ErrExists if the bucket
// has one.
func (p persister) Create(ctx context.Context, user, device string, r devices.Record) (uint64, error) {
	rev, err := p.s.kv.Create(ctx, deviceKey(user, device), r.Encode())
	if errors.Is(err, jetstream.ErrKeyExists) {
		return 0, fmt.Errorf("%w (%w)", devices.ErrExists, err)
	}
	return rev, err
}

// Update writes a device's record if the bucket holds revision rev.
func (p persister) Update(ctx context.Context, user, device string, r devices.Record, rev uint64) (uint64, error) {
	return p.s.kv.Update(ctx, deviceKey(user, device), r.Encode(), rev)
}

// Get reads one device's record and its revision.
func (p persister) Get(ctx context.Context, user, device string) (devices.Record, uint64, error) {
	key := deviceKey(user, device)
	e, err := p.s.kv.Get(ctx, key)
	if err != nil {
		return devices.Record{}, 0, err
	}
	r, ok := devices.DecodeRecord(e.Value())
	if !ok {
		return devices.Record{}, 0, fmt.Errorf("device record %s is corrupt", key)
	}
	return r, e.Revision(), nil
}

// Delete deletes a device's record if it is still at revision rev (any,
// if rev is 0); devices.ErrChanged if it is not.
func (p persister) Delete(ctx context.Context, user, device string, rev uint64) error {
	var opts []jetstream.KVDeleteOpt
	if rev != 0 {
		opts = append(opts, jetstream.LastRevision(rev))
	}
	err := p.s.kv.Delete(ctx, deviceKey(user, device), opts...)
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence {
		return fmt.Errorf("%w (%w)", devices.ErrChanged, err)
	}
	return err
}

// Idle reports whether the streams hold all of u's queue: nothing every
// device acknowledged is left to purge.
func (persister) Idle(u *user) bool {
	low, ok := u.MinCursor()
	return !ok || low <= u.Queue.purged
}

// readDevices reads every device record of user from the bucket's stream
// leader, a record per request: a purge decided on a replica's lagging
// copy could miss a device that was just added and delete what it has not
// received.
func (s *Store) readDevices(ctx context.Context, user string) (map[string]devices.Stored, error) {
	filter := s.names.kvSubject(deviceFilter(user))
	prefix := s.names.kvSubject(token(user) + ".")
	out := make(map[string]devices.Stored)
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
		st := devices.Stored{Rev: sm.Sequence}
		if deletedRecord(sm.Header) {
			st.Deleted = true
		} else if st.Record, err = decodeStored(sm); err != nil {
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

func decodeStored(sm *storedMsg) (devices.Record, error) {
	r, ok := devices.DecodeRecord(sm.Data)
	if !ok {
		return devices.Record{}, fmt.Errorf("device record %s is corrupt (%d bytes)", sm.Subject, len(sm.Data))
	}
	return r, nil
}
