// Package queuetest is the conformance suite of the queue contract: the
// tests every queue backend (badgerq on Badger, jsqueue on
// JetStream) runs, and the model-based test of the message path (a store
// and broker/delivery driven by seeded random events and checked against
// a small reference model of docs/PROTOCOL.md after every step).
//
// A backend's own test file calls RunExamples and RunModel with a Backend
// that opens its store.
package queuetest

import (
	"sync"
	"testing"
	"time"

	"github.com/chatd/chatd/broker/msgpath/delivery"
	"github.com/chatd/chatd/broker/queue"
)

// Store is the queue contract, as the message path uses it.
type Store interface {
	delivery.Source
	// Append queues a request; its Done reports the outcome.
	Append(r *queue.Request)
	// Attach registers a connection of a device.
	Attach(user, device string, transient bool) (cursor uint64, subscribed bool, err error)
	// MayAttach reports whether a device may connect under max_devices.
	MayAttach(user, device string) (bool, error)
	// Cursor returns a registered device's cursor.
	Cursor(user, device string) (uint64, error)
	// SetSubscribed records whether a device is subscribed to its inbox.
	SetSubscribed(user, device string, subscribed bool)
	// Detach records that a connection of a device ended.
	Detach(user, device string)
	// Waiting counts a user's messages after a sequence.
	Waiting(user string, after uint64) (uint64, error)
	// Devices lists a user's devices.
	Devices(user string) ([]queue.Device, error)
	// Remove forgets a device at once.
	Remove(user, device string) error
	// Erase forgets a user: devices, messages and dedup keys.
	Erase(user string) ([]string, error)
	// Flush persists acknowledgements and deletes what every device acknowledged.
	Flush() error
	// ForgetUnseen forgets the offline devices unseen for device_ttl.
	ForgetUnseen() error
	// Loaded returns how many users the store keeps in memory.
	Loaded() int
	// EvictIdle drops from memory every user with nothing only there.
	EvictIdle()
	// Close closes the store.
	Close() error
}

// Backend is one implementation of the contract, and how it differs
// where docs/PROTOCOL.md leaves room.
type Backend struct {
	// Name names the backend in test names.
	Name string
	// Open opens the store of run (a fresh one the first time, the same
	// data after Crash) with q, the clock now and deleted as its
	// OnDeleted (nil: none), without fsyncs: the suite's crashes are of
	// the process, not of the machine. The store is closed by the caller.
	Open func(t testing.TB, run string, q queue.Settings, now func() time.Time, deleted queue.DeletedFunc) Store
	// Crash closes s as a crash would: acknowledgements since the last
	// Flush are lost.
	Crash func(s Store) error
	// Remove, if set, deletes what a closed run left behind.
	Remove func(run string)
	// Sparse is set when a user's sequences have gaps (JetStream's stream
	// sequences): delivery may hold a cursor below acknowledged messages
	// until a read shows the gap empty, so an acknowledged message may be
	// delivered again after a reconnect.
	Sparse bool
	// DedupPerRecipient is set when a resent group message is a duplicate
	// per recipient (JetStream's Nats-Msg-Id per copy) rather than for the
	// whole request (a dedup key per sender and id): the resend then
	// reaches the members that were full the first time.
	DedupPerRecipient bool
	// TransientSurvivesCrash is set when a transient device's record is
	// shared with other nodes and so outlives a crash of its node, until
	// device_ttl forgets it.
	TransientSurvivesCrash bool
	// ExpiredCountTowardsCap is set when messages past message_ttl by the
	// store's clock count against max_queue_messages until purged
	// (JetStream's per-subject limit counts what the stream holds).
	ExpiredCountTowardsCap bool
	// NoticeFaults is set when stored-message notifications may come late
	// or never (from another node), which the model then injects.
	NoticeFaults bool
}

// RunExamples runs the suite's example cases against b: each a sequence
// of events that once broke a promise of docs/PROTOCOL.md. RunModel runs
// the model-based test.
func RunExamples(t *testing.T, b Backend) { runExamples(t, b) }

// testQueue is the configuration of the suite: small caps so that they
// are reached, long intervals so that only the test flushes and sweeps.
func testQueue() queue.Settings {
	q := queue.DefaultSettings()
	q.MaxQueueMessages = 6
	q.MaxDevices = 2
	q.MessageTTL = 3 * time.Hour
	q.DeviceTTL = time.Hour
	q.DedupWindow = 24 * time.Hour
	q.AckFlushInterval = time.Hour
	return q
}

// Clock is a clock that moves only when told to.
type Clock struct {
	mu  sync.Mutex
	now time.Time
}

// NewClock returns a clock at start.
func NewClock(start time.Time) *Clock { return &Clock{now: start} }

// Now returns the clock's time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// Advance moves the clock forward by d.
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}
