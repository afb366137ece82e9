package jsqueue

import (
	"context"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/chatd/chatd/broker/cluster/natsnode"
	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/queue/queuetest"
)

// jetstreamBackend is the JetStream store as a conformance-suite backend: one
// embedded NATS for every run, and each run's users renamed apart, so
// that runs share streams instead of creating their own.
func jetstreamBackend(t *testing.T) queuetest.Backend {
	dir := t.TempDir()
	node, err := natsnode.Start(context.Background(), natsnode.Config{Name: "conformance", Dir: dir, Listen: "127.0.0.1:0", Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(node.Shutdown)
	var (
		mu   sync.Mutex
		runs = make(map[string]string)
	)
	return queuetest.Backend{
		Name: "jetstream",
		Open: func(t testing.TB, run string, q queue.Settings, now func() time.Time, deleted queue.DeletedFunc) queuetest.Store {
			mu.Lock()
			prefix, ok := runs[run]
			if !ok {
				prefix = "r" + strconv.Itoa(len(runs)) + "-"
				runs[run] = prefix
			}
			mu.Unlock()
			var told queue.DeletedFunc
			if deleted != nil {
				told = func(user string, msgs []queue.Message) { deleted(strings.TrimPrefix(user, prefix), msgs) }
			}
			s, err := Open(context.Background(), Options{
				Conn: node.Conn(), Settings: q, Replicas: 1, Shards: 2, Logger: quiet(), Now: now, OnDeleted: told,
			})
			if err != nil {
				t.Fatalf("open jsqueue: %v", err)
			}
			return renamed{s, prefix}
		},
		Crash:                  func(s queuetest.Store) error { return Crash(s.(renamed).Store) },
		Sparse:                 true,
		DedupPerRecipient:      true,
		TransientSurvivesCrash: true,
		ExpiredCountTowardsCap: true,
		NoticeFaults:           true,
	}
}

// renamed is a Store whose users are prefixed, so that runs sharing
// streams never see each other's users.
type renamed struct {
	*Store
	prefix string
}

func (r renamed) Read(user string, after uint64, max int) ([]queue.Message, error) {
	return r.Store.Read(r.prefix+user, after, max)
}
func (r renamed) Head(user string) (uint64, error) { return r.Store.Head(r.prefix + user) }
func (r renamed) Ack(user, device string, cursor uint64) {
	r.Store.Ack(r.prefix+user, device, cursor)
}
func (r renamed) Append(q *queue.Request) {
	c := *q
	if c.To != "" {
		c.To = r.prefix + c.To
	}
	c.Sender = r.prefix + c.Sender
	c.Fanout = make([]queue.Fanout, len(q.Fanout))
	for i, f := range q.Fanout {
		c.Fanout[i] = f
		c.Fanout[i].To = r.prefix + f.To
	}
	if q.OnFull != nil {
		c.OnFull = func(users []string) {
			out := make([]string, len(users))
			for i, u := range users {
				out[i] = strings.TrimPrefix(u, r.prefix)
			}
			q.OnFull(out)
		}
	}
	if q.OnStored != nil {
		c.OnStored = func(user string, m queue.Message) { q.OnStored(strings.TrimPrefix(user, r.prefix), m) }
	}
	r.Store.Append(&c)
}
func (r renamed) Attach(user, device string, transient bool) (uint64, bool, error) {
	return r.Store.Attach(r.prefix+user, device, transient)
}
func (r renamed) MayAttach(user, device string) (bool, error) {
	return r.Store.MayAttach(r.prefix+user, device)
}
func (r renamed) Cursor(user, device string) (uint64, error) {
	return r.Store.Cursor(r.prefix+user, device)
}
func (r renamed) SetSubscribed(user, device string, subscribed bool) {
	r.Store.SetSubscribed(r.prefix+user, device, subscribed)
}
func (r renamed) Detach(user, device string) { r.Store.Detach(r.prefix+user, device) }
func (r renamed) Devices(user string) ([]queue.Device, error) {
	return r.Store.Devices(r.prefix + user)
}
func (r renamed) Waiting(user string, after uint64) (uint64, error) {
	return r.Store.Waiting(r.prefix+user, after)
}
func (r renamed) Remove(user, device string) error    { return r.Store.Remove(r.prefix+user, device) }
func (r renamed) Erase(user string) ([]string, error) { return r.Store.Erase(r.prefix + user) }

func TestConformance(t *testing.T) {
	before := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, before) })
	queuetest.RunExamples(t, jetstreamBackend(t))
}

// TestModel runs the model-based test of the message path on JetStream;
// -seeds, -seed and -replay choose the sequences.
func TestModel(t *testing.T) {
	before := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, before) })
	queuetest.RunModel(t, jetstreamBackend(t))
}
