package jsqueue

import (
	"context"
	"fmt"
	"strings"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/chatd/chatd/broker/queue/devices"
)

// Inspection is one user's queue as the stream leader and the device
// bucket hold it, for diagnostics: the messages waiting and where each
// device's cursor is.
type Inspection struct {
	// Stream and Subject are where the user's messages are.
	Stream, Subject string
	// Messages counts them; First and Last are their sequences (0: none).
	Messages, First, Last uint64
	// Cursors are the devices' persisted cursors, by device name.
	Cursors map[string]uint64
}

// String formats in for a log line.
func (in Inspection) String() string {
	return fmt.Sprintf("%s in %s: %d messages, seq %d..%d, cursors %v", in.Subject, in.Stream, in.Messages, in.First, in.Last, in.Cursors)
}

// Inspect reads user's queue from outside a Store (a test after a
// failure, an operator): prefix and shards as the Store was opened with.
func Inspect(ctx context.Context, js jetstream.JetStream, prefix string, shards int, user string) (Inspection, error) {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	n := names{prefix: prefix, shards: shards}
	subj, shard := n.subject(user)
	in := Inspection{Stream: n.stream(shard), Subject: subj, Cursors: map[string]uint64{}}
	st, err := js.Stream(ctx, in.Stream)
	if err != nil {
		return in, fmt.Errorf("inspect %s: %w", user, err)
	}
	info, err := st.Info(ctx, jetstream.WithSubjectFilter(subj))
	if err != nil {
		return in, fmt.Errorf("inspect %s: %w", user, err)
	}
	in.Messages = info.State.Subjects[subj]
	if m, err := st.GetLastMsgForSubject(ctx, subj); err == nil {
		in.Last = m.Sequence
	}
	if m, err := st.GetMsg(ctx, 1, jetstream.WithGetMsgSubject(subj)); err == nil {
		in.First = m.Sequence
	}
	kv, err := js.KeyValue(ctx, n.bucket())
	if err != nil {
		return in, fmt.Errorf("inspect %s: %w", user, err)
	}
	keys, err := kv.ListKeys(ctx)
	if err != nil {
		return in, fmt.Errorf("inspect %s: %w", user, err)
	}
	for k := range keys.Keys() {
		u, d, ok := strings.Cut(k, ".")
		if !ok || u != token(user) {
			continue
		}
		e, err := kv.Get(ctx, k)
		if err != nil {
			continue
		}
		name, err := untoken(d)
		if err != nil {
			continue
		}
		if r, ok := devices.DecodeRecord(e.Value()); ok {
			in.Cursors[name] = r.Cursor
		}
	}
	return in, nil
}
