// Package msgpath is chatd's message path as one unit: a publish is
// checked and stored (publish.go), the store's OnStored of each request
// wakes the recipients' devices (notify, below), delivery feeds them and
// takes their PUBACKs (session.go, broker/msgpath/delivery), the store
// deletes what every device acknowledged, and delivered receipts go back
// to the senders (receipts.go). docs/message-path.md walks it step by
// step.
//
// A Path is built in dependency order from the parts it is given: the
// store, then (inside New) delivery on that store, then the path on both.
// Nothing in it is set after New returns, and it points at nothing that
// points back at it: delivery hands delivered receipts to the path
// through a channel, not a callback into the path.
package msgpath

import (
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/chatd/chatd/broker/msgpath/delivery"
	"github.com/chatd/chatd/broker/protocol/envelope"
	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/service/beforesend"
	"github.com/chatd/chatd/broker/service/events"
	"github.com/chatd/chatd/broker/service/groups"
	"github.com/chatd/chatd/broker/service/push"
)

// Groups reads group memberships.
type Groups interface {
	// Get returns a group, or groups.ErrUnknown.
	Get(id string) (*groups.Group, error)
}

// Presence counts each user's connections and tells who is online.
type Presence interface {
	// Connected records a new connection of user.
	Connected(user string)
	// Disconnected records the end of a connection of user.
	Disconnected(user string)
	// Online reports whether user has a connection on any node.
	Online(user string) bool
}

// Pusher tells a push webhook of messages waiting for offline users.
type Pusher interface {
	// Enabled reports whether a webhook is set.
	Enabled() bool
	// Notify queues a notification without waiting; false means it was
	// dropped (the push service counts and logs its drops).
	Notify(n push.Notification) bool
}

// Events tells an app's backend what happens (events.Emitter).
type Events interface {
	// Enabled reports whether events go anywhere: when not, callers need
	// not build them.
	Enabled() bool
	// Emit queues an event without waiting.
	Emit(typ string, data any)
}

// BeforeSend asks an app's moderation service about a message
// (beforesend.Checker).
type BeforeSend interface {
	// Check reports whether m may be stored, and why not.
	Check(m beforesend.Message) (allow bool, reason string)
}

// noEvents is the Events of a path given none.
type noEvents struct{}

func (noEvents) Enabled() bool    { return false }
func (noEvents) Emit(string, any) {}

// Peers tells the other nodes of a cluster what happens on this one.
type Peers interface {
	// Stored passes a message stored here to the nodes with devices of user.
	Stored(user string, m queue.Message)
	// Typing passes a typing signal to user's devices on the other nodes.
	Typing(user, topic string, payload []byte)
	// SessionStarted ends the sessions of clientID on the other nodes.
	SessionStarted(clientID string)
}

// Readers are the readers of the store other than devices (the bots'
// webhooks), told of each message stored for a user so that an idle one
// reads at once; Stored must not block.
type Readers interface {
	Stored(user string)
}

// Observer counts what the message path does, for metrics.
type Observer interface {
	// Connected counts an established session.
	Connected()
	// Refused counts a refused publish by its protocol error code.
	Refused(code string)
	// Delayed counts a publish held back to its sender's rate.
	Delayed()
	// Acked observes how long a delivered message took to be acknowledged.
	Acked(took time.Duration)
}

// Options are the parts and limits of a Path.
type Options struct {
	// Store is the durable queue; the path does not close it.
	Store queue.Store
	// Groups holds group memberships.
	Groups Groups
	// Presence counts connections; in a cluster, of every node.
	Presence Presence
	// Push notifies offline users; nil sends no notifications.
	Push Pusher
	// Peers is set in a cluster, nil on a single node.
	Peers Peers
	// Readers, if set, is told of every message stored for a user, here
	// or passed on by another node.
	Readers Readers
	// Observe counts sessions, refusals and acknowledgements.
	Observe Observer
	// Events tells the app's backend what happens; nil tells nothing.
	Events Events
	// BeforeSend, if set, is asked about every message before it is stored.
	BeforeSend BeforeSend
	// Receipts sends delivered receipts (PROTOCOL.md section 3).
	Receipts bool
	// Copies sends a user's other devices a copy of each message and read
	// receipt one of its devices sends (PROTOCOL.md section 4).
	Copies bool
	// MaxMessageBytes caps a message object.
	MaxMessageBytes int
	// MaxInflight caps unacknowledged deliveries per device.
	MaxInflight int
	// MaxPendingBytes disconnects a client that stops reading.
	MaxPendingBytes int
	// Now is the clock of envelope timestamps and delivery times; nil
	// means time.Now.
	Now func() time.Time
	// Log receives errors; never message contents.
	Log *slog.Logger
}

// Path is the message path of one node.
type Path struct {
	store    queue.Store
	delivery *delivery.Delivery
	groups   Groups
	presence Presence
	push     Pusher
	peers    Peers
	readers  Readers
	observe  Observer
	events   Events
	// beforeSend is nil when no service is asked.
	beforeSend BeforeSend
	now        func() time.Time
	log        *slog.Logger
	limits     limits
	copies     bool
	receipts   bool

	// notify is p.stored as a func value, made once: every stored request
	// carries it as its OnStored.
	notify func(user string, m queue.Message)
	// delivered carries delivered receipts from delivery to the receipts
	// goroutine; stop ends that goroutine, done closes when it has.
	delivered chan receipt
	// dropped counts batches whose receipts came after Close.
	dropped *atomic.Uint64
	stop    chan struct{}
	done    chan struct{}
	closed  sync.Once
}

// limits are the Options' caps.
type limits struct {
	maxMessageBytes, maxInflight, maxPendingBytes int
}

// verifyEvery paces the reads that move a device's cursor over the gaps
// of a sparse queue (JetStream's, in a cluster): a cursor behind what its
// device acknowledged only delays the deletion of those messages, and
// one read per user per verifyEvery replaces one read per acknowledgement.
const verifyEvery = 500 * time.Millisecond

// receiptBacklog is how many acknowledged batches may wait for their
// delivered receipts to be queued before acknowledgements wait too.
const receiptBacklog = 1024

// New builds the path on opts.Store: delivery first, then the path; it
// starts the goroutine that queues delivered receipts (idle when they are
// off), which Close stops.
func New(opts Options) (*Path, error) {
	if opts.Store == nil || opts.Groups == nil || opts.Presence == nil || opts.Observe == nil {
		return nil, errors.New("msgpath: Store, Groups, Presence and Observe are required")
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	delivered := make(chan receipt, receiptBacklog)
	stop := make(chan struct{})
	dropped := new(atomic.Uint64)
	dopts := delivery.Options{
		Source:       opts.Store,
		Logger:       opts.Log,
		TailMessages: max(1024, 4*opts.MaxInflight),
		ReadAhead:    1024,
		OnAcked:      opts.Observe.Acked,
		Now:          opts.Now,
		VerifyEvery:  verifyEvery,
		// Copies stored before the setting was turned off are still
		// kept from the device they came from.
		Skip: envelope.MadeBy,
	}
	if opts.Receipts {
		dopts.OnDelivered = func(user string, metas [][]byte) {
			// Called after an acknowledgement, outside delivery's locks:
			// waiting here slows that device's acknowledgements alone.
			select {
			case delivered <- receipt{user, metas}:
			case <-stop:
				// Only after Close, with connections still open because
				// shutdown gave up waiting for them: counted and logged.
				dropped.Add(1)
			}
		}
	}
	p := &Path{
		store:      opts.Store,
		delivery:   delivery.New(dopts),
		groups:     opts.Groups,
		presence:   opts.Presence,
		push:       opts.Push,
		peers:      opts.Peers,
		readers:    opts.Readers,
		observe:    opts.Observe,
		events:     opts.Events,
		beforeSend: opts.BeforeSend,
		now:        opts.Now,
		log:        opts.Log,
		limits:     limits{opts.MaxMessageBytes, opts.MaxInflight, opts.MaxPendingBytes},
		copies:     opts.Copies,
		receipts:   opts.Receipts,
		delivered:  delivered,
		dropped:    dropped,
		stop:       stop,
		done:       make(chan struct{}),
	}
	if p.events == nil {
		p.events = noEvents{}
	}
	p.notify = p.stored
	go p.queueReceipts()
	return p, nil
}

// Close stops delivery and the receipts goroutine. The store stays open:
// the server closes it after the clients' last publishes are answered.
func (p *Path) Close() {
	p.closed.Do(func() {
		p.delivery.Close()
		close(p.stop)
		<-p.done
		if n := p.dropped.Load(); n > 0 {
			p.log.Warn("delivered receipts dropped at shutdown: acknowledged after the path closed", "batches", n)
		}
	})
}

// stored is the notify step: it runs on the store's committer goroutine
// for every copy a request of the path stored, once it is durable, and
// must not block. It feeds the recipient's devices here, wakes the other
// readers (a bot's webhook), passes the message to the other nodes, and
// asks for a push when no device of the recipient is online anywhere.
func (p *Path) stored(user string, m queue.Message) {
	online := p.delivery.Stored(user, m)
	if p.readers != nil {
		p.readers.Stored(user)
	}
	if p.peers != nil {
		p.peers.Stored(user, m)
		if !online {
			// The user may be online on another node, which feeds it.
			online = p.presence.Online(user)
		}
	}
	if !online && len(m.Meta) > 0 {
		p.notifyPush(user, m.Meta)
	}
	if p.events.Enabled() {
		p.emitStored(user, m)
	}
}

// emitStored emits the stored event of a message (not of a receipt or a
// sent copy, whose Meta names no sender).
func (p *Path) emitStored(user string, m queue.Message) {
	from, group, id, ok := envelope.ParseMeta(m.Meta)
	if !ok {
		return
	}
	from, server := envelope.SenderName(from)
	p.events.Emit(events.MessageStored, events.Stored{To: user, From: from, Server: server, Group: group, ID: id, Seq: m.Seq})
}

// DeliveredEvents returns the store's OnDeleted that emits the delivered
// event of each message every device of its recipient acknowledged (not
// of a receipt or a sent copy), or nil when ev is not enabled, so that
// the store does not read what it deletes for nothing. The store is
// built before the path, so this is a function of ev alone.
func DeliveredEvents(ev Events) queue.DeletedFunc {
	if ev == nil || !ev.Enabled() {
		return nil
	}
	return func(user string, msgs []queue.Message) {
		for _, m := range msgs {
			from, group, id, ok := envelope.ParseMeta(m.Meta)
			if !ok {
				continue
			}
			from, server := envelope.SenderName(from)
			ev.Emit(events.MessageDelivered, events.Delivered{To: user, From: from, Server: server, Group: group, ID: id, Seq: m.Seq})
		}
	}
}

// notifyPush tells the push webhook that user, who has no device online,
// has a message waiting.
func (p *Path) notifyPush(user string, meta []byte) {
	// This runs on the store's goroutine, which must not wait, and asking
	// the queue's depth is a JetStream request in a cluster: skip it all
	// when no webhook is set.
	if p.push == nil || !p.push.Enabled() {
		return
	}
	from, group, _, ok := envelope.ParseMeta(meta)
	if !ok {
		return
	}
	from, _ = envelope.SenderName(from)
	queued, err := p.store.Depth(user)
	if err != nil {
		p.log.Error("queue depth for push", "user", user, "error", err)
		return
	}
	p.push.Notify(push.Notification{User: user, From: from, Kind: "msg", Group: group, Queued: queued})
}

// Delivered sends delivered receipts for messages of user that a reader
// other than a device took (a bot's webhook), by their Meta, when
// receipts are on. It may wait for a saturated committer.
func (p *Path) Delivered(user string, metas [][]byte) {
	if p.receipts {
		p.sendDelivered(user, metas)
	}
}

// PeerStored feeds user's devices here with a message another node stored.
func (p *Path) PeerStored(user string, m queue.Message) {
	p.delivery.Stored(user, m)
	if p.readers != nil {
		p.readers.Stored(user)
	}
}

// PeerTyping passes another node's typing signal to user's devices here.
func (p *Path) PeerTyping(user, topic string, payload []byte) {
	p.delivery.Ephemeral(user, topic, payload)
}

// Resync rereads the queues of the users with a device here, after
// notices of other nodes' stored messages were lost.
func (p *Path) Resync() { p.delivery.Resync() }

// Stats returns delivery's running totals.
func (p *Path) Stats() delivery.Stats { return p.delivery.Stats() }

// Window reports how many messages are in flight unacknowledged to a
// device of user and the next sequence it will be sent; ok is false when
// it is not online here.
func (p *Path) Window(user, device string) (inflight int, next uint64, ok bool) {
	return p.delivery.Window(user, device)
}
