// Package peers carries what one node of a cluster must tell the others
// over core NATS: messages it stored, typing signals, presence changes and
// session takeovers. The queues themselves are in JetStream; nothing here
// is durable, so a lost notice only delays something a device would get at
// its next read (a stored message) or is of no lasting value (typing).
//
// Core NATS drops notices without telling anyone (a slow consumer, a
// reconnect, a broken route between servers, a node dying with notices
// unsent), and a device that is connected and idle reads only when told.
// So stored notices are numbered per sender incarnation, heartbeats say
// how many the sender sent, and a bus that finds it may have lost some
// calls Handlers.Missed, on which the node rereads its users' queues.
package peers

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/chatd/chatd/broker/queue"
)

// Subjects of the notices, under the cluster's prefix.
const (
	subjStored    = ".stored"
	subjTyping    = ".typing"
	subjPresence  = ".presence"
	subjSession   = ".session"
	subjHeartbeat = ".heartbeat"
	subjSync      = ".presence.sync"
	subjRemoved   = ".device.removed"
	subjConnected = ".device.connected"
	subjModerated = ".moderated"
	subjErased    = ".erased"
)

// Headers that number stored notices. They are headers, not part of the
// payload, so that nodes of the version before them, which ignore headers
// and check payload lengths, still take the notices of newer nodes during
// a rolling upgrade, and a notice without them is taken unnumbered.
const (
	// hdrNotice on a stored notice is "<boot>.<n>": the sender's
	// incarnation and the notice's number in it, counted from 1.
	hdrNotice = "Chatd-Notice"
	// hdrSent on a heartbeat is the number of the last stored notice its
	// sender sent in the incarnation the heartbeat names.
	hdrSent = "Chatd-Sent"
	// hdrFinal on a heartbeat says that its sender is closing and sends
	// no more: a peer that saw all it sent then lost nothing of it.
	hdrFinal = "Chatd-Final"
)

// Defaults of Options.
const (
	// DefaultHeartbeat is how often a node says it is alive.
	DefaultHeartbeat = time.Second
	// DefaultDeadAfter is the silence after which a node's users are shown offline.
	DefaultDeadAfter = 5 * time.Second
)

// Handlers are what a node does with its peers' notices. Each kind of
// notice has a NATS subscription of its own, dispatched on its own
// goroutine: one handler sees its notices one at a time, but different
// handlers run concurrently (Stored beside Presence, say). They must not
// block. Missed runs on the bus's loop goroutine, and NodeGone there
// too or, for a peer that restarted, on the heartbeats' goroutine.
type Handlers struct {
	// Stored: a peer stored m for user.
	Stored func(user string, m queue.Message)
	// Typing: a peer passes a typing signal for user's devices on topic.
	Typing func(user, topic string, payload []byte)
	// Presence: node has its first connection of user (online) or closed its last.
	Presence func(node, user string, online bool)
	// NodeGone: node stopped beating, or restarted; its connections are gone.
	NodeGone func(node string)
	// SessionStarted: a peer accepted a connection of clientID, which takes
	// over any session of it here.
	SessionStarted func(clientID string)
	// OnlineUsers lists the users with a connection on this node, for a
	// peer that starts and asks.
	OnlineUsers func() []string
	// DeviceRemoved: a peer removed device of user; its connections here
	// end. It may be nil.
	DeviceRemoved func(user, device string)
	// Moderated: a backend disconnected device of user, or every device
	// of user when all is set (a ban); their connections here end. It may
	// be nil.
	Moderated func(user, device string, all bool)
	// Erased: a backend erased user; its connections here end and this
	// node forgets it. It may be nil.
	Erased func(user string)
	// Connected returns which of clientIDs have a connection on this
	// node, for a peer that asks. It may be nil.
	Connected func(clientIDs []string) []string
	// Missed: stored notices of peers may have been lost, so messages may
	// be stored that no device here was told of. It may be nil, and may
	// run at the same time as the other handlers.
	Missed func()
}

// Options configures a Bus.
type Options struct {
	// Conn is the node's NATS connection.
	Conn *nats.Conn
	// Node is this node's name, unique in the cluster.
	Node string
	// Prefix starts every subject.
	Prefix string
	// Heartbeat and DeadAfter tune failure detection; zero means the defaults.
	Heartbeat, DeadAfter time.Duration
	// Logger receives bad notices and send errors.
	Logger *slog.Logger
}

// Bus sends this node's notices and dispatches its peers'.
type Bus struct {
	opts Options
	h    Handlers
	boot uint64
	subs []*nats.Subscription
	// started is set by a successful Start, before which Close has nothing to stop.
	started bool
	// stored is the subscription to stored notices, whose drops are losses.
	stored *nats.Subscription

	// sendMu puts stored notices on the wire in the order of their
	// numbers, and a heartbeat after the notices it counts.
	sendMu sync.Mutex
	sent   uint64

	mu    sync.Mutex
	peers map[string]peer
	// tallies are kept per node name for the bus's life, not reaped with
	// peers, so that a node back from a partition is checked for gaps.
	tallies map[string]*tally

	// reconnects and dropped are the loop's last look at the connection's
	// reconnects and the stored subscription's drops.
	reconnects uint64
	dropped    int

	stop chan struct{}
	done chan struct{}
}

// peer is what the bus knows of another node.
type peer struct {
	boot uint64
	seen time.Time
}

// tally is what the bus heard of one incarnation of a peer's numbered
// stored notices.
type tally struct {
	boot uint64
	// heard is the highest number heard, or taken as heard once a loss
	// up to it was reported.
	heard uint64
	// sent is what the peer's latest heartbeat said it sent. It is
	// checked against heard when the next heartbeat comes, not at once:
	// notices and heartbeats are on different subscriptions, dispatched
	// by goroutines of their own, so notices a heartbeat counts may still
	// be queued here when it is handled.
	sent uint64
	// final: the latest heartbeat said the peer is closing.
	final bool
}

// settled reports whether nothing of t's incarnation can have been lost
// unseen: it said it was closing, and all it said it sent was heard.
func (t *tally) settled() bool {
	return t.final && t.heard >= t.sent
}

// Start is New and Bus.Start in one.
func Start(opts Options, h Handlers) (*Bus, error) {
	b := New(opts)
	if err := b.Start(h); err != nil {
		return nil, err
	}
	return b, nil
}

// New returns a bus that sends this node's notices and does not listen
// yet: the server builds it before the parts that send through it, and
// starts it, with the handlers of its peers' notices, once those exist.
func New(opts Options) *Bus {
	if opts.Heartbeat <= 0 {
		opts.Heartbeat = DefaultHeartbeat
	}
	if opts.DeadAfter <= 0 {
		opts.DeadAfter = DefaultDeadAfter
	}
	return &Bus{
		opts: opts, boot: uint64(time.Now().UnixNano()),
		peers: make(map[string]peer), tallies: make(map[string]*tally),
		reconnects: opts.Conn.Stats().Reconnects,
		stop:       make(chan struct{}), done: make(chan struct{}),
	}
}

// Start subscribes to the peers' notices, handing them to h, and starts
// beating; it is called once. Close undoes it.
func (b *Bus) Start(h Handlers) error {
	b.h = h
	opts := b.opts
	subs := []struct {
		subj string
		fn   nats.MsgHandler
	}{
		{subjStored, b.onStored},
		{subjTyping, b.onTyping},
		{subjPresence, b.onPresence},
		{subjSession, b.onSession},
		{subjHeartbeat, b.onHeartbeat},
		{subjSync, b.onSync},
		{subjRemoved, b.onRemoved},
		{subjConnected, b.onConnected},
		{subjModerated, b.onModerated},
		{subjErased, b.onErased},
	}
	for _, s := range subs {
		sub, err := opts.Conn.Subscribe(opts.Prefix+s.subj, s.fn)
		if err != nil {
			return errors.Join(fmt.Errorf("subscribe %s: %w", opts.Prefix+s.subj, err), b.unsubscribe())
		}
		b.subs = append(b.subs, sub)
		if s.subj == subjStored {
			b.stored = sub
		}
	}
	if err := opts.Conn.Flush(); err != nil {
		return errors.Join(fmt.Errorf("subscribe to peers: %w", err), b.unsubscribe())
	}
	b.started = true
	b.beat(false)
	go b.loop()
	return nil
}

// Close stops beating and listening, and tells the peers how many stored
// notices this node sent, so that they know whether they lost any.
func (b *Bus) Close() error {
	if !b.started {
		return nil
	}
	close(b.stop)
	<-b.done
	b.beat(true)
	return b.unsubscribe()
}

func (b *Bus) unsubscribe() error {
	var err error
	for _, s := range b.subs {
		err = errors.Join(err, s.Unsubscribe())
	}
	b.subs = nil
	return err
}

// loop beats, declares silent peers gone and watches for lost notices.
func (b *Bus) loop() {
	defer close(b.done)
	t := time.NewTicker(b.opts.Heartbeat)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			b.beat(false)
			b.reap(time.Now())
			b.watch()
		case <-b.stop:
			return
		}
	}
}

// beat says this node is alive, or with final that it is closing, and how
// many stored notices it sent.
func (b *Bus) beat(final bool) {
	b.sendMu.Lock()
	defer b.sendMu.Unlock()
	h := nats.Header{hdrSent: []string{strconv.FormatUint(b.sent, 10)}}
	if final {
		h.Set(hdrFinal, "1")
	}
	b.publish(&nats.Msg{Subject: b.opts.Prefix + subjHeartbeat, Header: h,
		Data: binary.BigEndian.AppendUint64(frame(nil, b.opts.Node), b.boot)})
}

// reap reports the peers silent for DeadAfter as gone. One that did not
// say it was closing may have died with stored notices unsent, or be cut
// off by a partition that loses them: that is a loss too.
func (b *Bus) reap(now time.Time) {
	var gone []string
	lost := false
	b.mu.Lock()
	for name, p := range b.peers {
		if now.Sub(p.seen) > b.opts.DeadAfter {
			delete(b.peers, name)
			gone = append(gone, name)
			if t := b.tallies[name]; t != nil && t.boot == p.boot && !t.settled() {
				// Reported once: if the peer comes back as it was, its
				// numbers tell what it sent meanwhile.
				t.heard, t.final = max(t.heard, t.sent), true
				lost = true
			}
		}
	}
	b.mu.Unlock()
	for _, name := range gone {
		b.opts.Logger.Warn("cluster node silent: its connections count as closed", "node", name, "after", b.opts.DeadAfter)
		b.h.NodeGone(name)
	}
	if lost {
		b.missed("a node went silent without closing", "nodes", gone)
	}
}

// watch reports the losses that no numbering shows: notices published
// while this node's connection was down, whose reconnect the loop sees in
// its counter (the connection is shared, so its handlers are not ours),
// and notices the stored subscription dropped because they came faster
// than this node handled them.
func (b *Bus) watch() {
	if r := b.opts.Conn.Stats().Reconnects; r != b.reconnects {
		b.reconnects = r
		b.missed("NATS connection reconnected")
	}
	if b.opts.Conn.IsClosed() {
		// Closed under the bus: the node is stopping, and said so.
		return
	}
	d, err := b.stored.Dropped()
	if err != nil {
		b.opts.Logger.Error("stored notices subscription", "error", err)
		return
	}
	if d != b.dropped {
		b.dropped = d
		b.missed("stored notices dropped: this node was too slow", "dropped", d)
	}
}

// missed tells the node that stored notices of its peers may have been lost.
func (b *Bus) missed(cause string, args ...any) {
	b.opts.Logger.Warn("stored notices of cluster peers may be lost: rereading the queues of connected users",
		append([]any{"cause", cause}, args...)...)
	if b.h.Missed != nil {
		b.h.Missed()
	}
}

// Stored tells the peers that m was stored for user, numbering the notice.
// A number taken by a notice that failed to send shows as a gap.
func (b *Bus) Stored(user string, m queue.Message) {
	p := frame(frame(frame(nil, b.opts.Node), user), string(m.Meta))
	p = binary.BigEndian.AppendUint64(p, m.Seq)
	p = append(p, m.Data...)
	b.sendMu.Lock()
	defer b.sendMu.Unlock()
	b.sent++
	num := strconv.AppendUint(append(strconv.AppendUint(make([]byte, 0, 41), b.boot, 10), '.'), b.sent, 10)
	b.publish(&nats.Msg{Subject: b.opts.Prefix + subjStored, Data: p, Header: nats.Header{hdrNotice: []string{string(num)}}})
}

// Typing passes a typing signal to user's devices on the peers.
func (b *Bus) Typing(user, topic string, payload []byte) {
	b.send(subjTyping, append(frame(frame(frame(nil, b.opts.Node), user), topic), payload...))
}

// Presence tells every node, this one included, that user came online
// here or went offline here. It goes to this node through NATS too, so
// that every node applies each node's changes in one order.
func (b *Bus) Presence(user string, online bool) {
	flag := byte(0)
	if online {
		flag = 1
	}
	b.send(subjPresence, append(frame(frame(nil, b.opts.Node), user), flag))
}

// SessionStarted tells the peers that clientID connected here.
func (b *Bus) SessionStarted(clientID string) {
	b.send(subjSession, frame(frame(nil, b.opts.Node), clientID))
}

// Peer is a live peer as the bus knows it.
type Peer struct {
	// Name is the node's name.
	Name string `json:"name"`
	// HeardMs is how long ago its last heartbeat came, in milliseconds.
	HeardMs int64 `json:"heard_ms"`
}

// Peers lists the nodes heard from within DeadAfter, by name.
func (b *Bus) Peers() []Peer {
	now := time.Now()
	b.mu.Lock()
	out := make([]Peer, 0, len(b.peers))
	for name, p := range b.peers {
		out = append(out, Peer{Name: name, HeardMs: now.Sub(p.seen).Milliseconds()})
	}
	b.mu.Unlock()
	slices.SortFunc(out, func(x, y Peer) int { return strings.Compare(x.Name, y.Name) })
	return out
}

// DeviceRemoved tells the peers that device of user was removed here.
// Like every notice it may be lost: a peer that misses it keeps the
// device's connection there open until it ends.
func (b *Bus) DeviceRemoved(user, device string) {
	b.send(subjRemoved, frame(frame(frame(nil, b.opts.Node), user), device))
}

// Moderated tells the peers that a backend disconnected device of user,
// or every device of user when all is set. Like every notice it may be
// lost; a ban also refuses the next CONNECT on every node.
func (b *Bus) Moderated(user, device string, all bool) {
	flag := byte(0)
	if all {
		flag = 1
	}
	b.send(subjModerated, append(frame(frame(frame(nil, b.opts.Node), user), device), flag))
}

// Erased tells the peers that a backend erased user here. Like every
// notice it may be lost: a peer that misses it keeps the user's
// connections there open until they end, and its last-seen time.
func (b *Bus) Erased(user string) {
	b.send(subjErased, frame(frame(nil, b.opts.Node), user))
}

// ErrSilent is the error of a question some live peers did not answer
// in time.
var ErrSilent = errors.New("cluster nodes did not answer")

// Connected asks the live peers which of clientIDs have a connection on
// them and returns those that do. It waits for every peer that beat
// lately, at most wait; those silent by then are named in an error that
// is ErrSilent, beside the answers of the others.
func (b *Bus) Connected(clientIDs []string, wait time.Duration) (map[string]bool, error) {
	b.mu.Lock()
	pending := make(map[string]bool, len(b.peers))
	for name := range b.peers {
		pending[name] = true
	}
	b.mu.Unlock()
	found := make(map[string]bool)
	if len(pending) == 0 || len(clientIDs) == 0 {
		return found, nil
	}
	inbox := b.opts.Conn.NewRespInbox()
	sub, err := b.opts.Conn.SubscribeSync(inbox)
	if err != nil {
		return found, fmt.Errorf("ask peers for connections: %w", err)
	}
	defer sub.Unsubscribe()
	q := frame(nil, b.opts.Node)
	for _, id := range clientIDs {
		q = frame(q, id)
	}
	if err := b.opts.Conn.PublishRequest(b.opts.Prefix+subjConnected, inbox, q); err != nil {
		return found, fmt.Errorf("ask peers for connections: %w", err)
	}
	deadline := time.Now().Add(wait)
	for len(pending) > 0 {
		msg, err := sub.NextMsg(time.Until(deadline))
		if errors.Is(err, nats.ErrTimeout) {
			break
		}
		if err != nil {
			return found, fmt.Errorf("ask peers for connections: %w", err)
		}
		node, ids, ok := unframeAll(msg.Data)
		if !ok {
			b.opts.Logger.Error("bad connections answer")
			continue
		}
		delete(pending, node)
		for _, id := range ids {
			found[id] = true
		}
	}
	if len(pending) > 0 {
		silent := make([]string, 0, len(pending))
		for name := range pending {
			silent = append(silent, name)
		}
		return found, fmt.Errorf("%w within %v: %s", ErrSilent, wait, strings.Join(silent, ", "))
	}
	return found, nil
}

// SyncPresence asks every peer for its online users and applies the
// answers that come within wait.
func (b *Bus) SyncPresence(wait time.Duration) error {
	inbox := b.opts.Conn.NewRespInbox()
	sub, err := b.opts.Conn.SubscribeSync(inbox)
	if err != nil {
		return fmt.Errorf("presence sync: %w", err)
	}
	defer sub.Unsubscribe()
	if err := b.opts.Conn.PublishRequest(b.opts.Prefix+subjSync, inbox, frame(nil, b.opts.Node)); err != nil {
		return fmt.Errorf("presence sync: %w", err)
	}
	deadline := time.Now().Add(wait)
	for {
		msg, err := sub.NextMsg(time.Until(deadline))
		if errors.Is(err, nats.ErrTimeout) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("presence sync: %w", err)
		}
		node, rest, ok := unframe(msg.Data)
		for ok && len(rest) > 0 {
			var user string
			if user, rest, ok = unframe(rest); ok {
				b.h.Presence(node, user, true)
			}
		}
		if !ok {
			b.opts.Logger.Error("bad presence sync answer")
		}
	}
}

func (b *Bus) send(subj string, payload []byte) {
	b.publish(&nats.Msg{Subject: b.opts.Prefix + subj, Data: payload})
}

func (b *Bus) publish(msg *nats.Msg) {
	if err := b.opts.Conn.PublishMsg(msg); err != nil {
		b.opts.Logger.Warn("notify cluster peers", "subject", msg.Subject, "error", err)
	}
}

// fromPeer splits off a notice's origin; own notices are dropped unless keep.
func (b *Bus) fromPeer(msg *nats.Msg, keep bool) (string, []byte, bool) {
	node, rest, ok := unframe(msg.Data)
	if !ok {
		b.opts.Logger.Error("bad cluster notice", "subject", msg.Subject)
		return "", nil, false
	}
	return node, rest, keep || node != b.opts.Node
}

func (b *Bus) onStored(msg *nats.Msg) {
	node, rest, ok := b.fromPeer(msg, false)
	if !ok {
		return
	}
	user, rest, ok := unframe(rest)
	meta, rest, ok2 := unframe(rest)
	if !ok || !ok2 || len(rest) < 8 {
		b.opts.Logger.Error("bad stored notice")
		return
	}
	// A notice without a number is from a node older than numbering; it
	// is taken, and only the other signs of loss cover that node.
	lost := false
	if v := msg.Header.Get(hdrNotice); v != "" {
		boot, n, ok := parseNotice(v)
		if !ok {
			b.opts.Logger.Error("bad stored notice number", "node", node, "number", v)
			return
		}
		lost = b.heard(node, boot, n)
	}
	if lost {
		b.missed("a stored notice skipped numbers", "node", node)
	}
	b.h.Stored(user, queue.Message{Seq: binary.BigEndian.Uint64(rest), Meta: []byte(meta), Data: rest[8:]})
}

// heard records stored notice n of node's incarnation boot and reports
// whether notices before it were lost.
func (b *Bus) heard(node string, boot, n uint64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	t := b.tallies[node]
	switch {
	case t == nil:
		// The first notice of a node unknown until now says nothing of
		// the ones before it. If this node started after the peer, they
		// came before this node took connections, and its devices read
		// their queues when they connect; what was lost while this
		// node's interest in the subject spread to the other servers is
		// normally lost before the presence sync wait ends, so before any
		// device is here. If the peer started after this node, its first
		// heartbeat, counting 0, normally comes first and makes any
		// notice after 1 a gap. Either way its later heartbeats count
		// from here.
		b.tallies[node] = &tally{boot: boot, heard: n}
		return false
	case t.boot != boot:
		// The peer restarted: the notices of its new incarnation are
		// numbered from 1 again, and this node, listening all along,
		// should have heard each. Its old incarnation may have died
		// with notices unsent, unless it said it was closing.
		b.tallies[node] = &tally{boot: boot, heard: n}
		return !t.settled() || n > 1
	}
	lost := n > t.heard+1
	t.heard = max(t.heard, n)
	return lost
}

// sentBy records what a heartbeat of node's incarnation boot said it sent,
// and reports whether notices counted by its previous heartbeat are still
// unheard, and so lost.
func (b *Bus) sentBy(node string, boot, sent uint64, final bool) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	t := b.tallies[node]
	switch {
	case t == nil:
		// Unknown until now: see heard.
		b.tallies[node] = &tally{boot: boot, heard: sent, sent: sent, final: final}
		return false
	case t.boot != boot:
		// Restarted: its notices from 1 are checked at its next heartbeat.
		b.tallies[node] = &tally{boot: boot, sent: sent, final: final}
		return !t.settled()
	}
	lost := t.heard < t.sent
	// Reported once: the reread covers what was counted.
	t.heard = max(t.heard, t.sent)
	t.sent, t.final = sent, final
	return lost
}

// parseNotice splits a hdrNotice value into incarnation and number.
func parseNotice(v string) (boot, n uint64, ok bool) {
	bs, ns, ok := strings.Cut(v, ".")
	if !ok {
		return 0, 0, false
	}
	boot, err := strconv.ParseUint(bs, 10, 64)
	if err != nil {
		return 0, 0, false
	}
	n, err = strconv.ParseUint(ns, 10, 64)
	if err != nil || n == 0 {
		return 0, 0, false
	}
	return boot, n, true
}

func (b *Bus) onTyping(msg *nats.Msg) {
	_, rest, ok := b.fromPeer(msg, false)
	if !ok {
		return
	}
	user, rest, ok := unframe(rest)
	topic, payload, ok2 := unframe(rest)
	if !ok || !ok2 {
		b.opts.Logger.Error("bad typing notice")
		return
	}
	b.h.Typing(user, topic, payload)
}

func (b *Bus) onPresence(msg *nats.Msg) {
	node, rest, ok := b.fromPeer(msg, true)
	if !ok {
		return
	}
	user, rest, ok := unframe(rest)
	if !ok || len(rest) != 1 {
		b.opts.Logger.Error("bad presence notice")
		return
	}
	b.h.Presence(node, user, rest[0] == 1)
}

func (b *Bus) onSession(msg *nats.Msg) {
	_, rest, ok := b.fromPeer(msg, false)
	if !ok {
		return
	}
	clientID, _, ok := unframe(rest)
	if !ok {
		b.opts.Logger.Error("bad session notice")
		return
	}
	b.h.SessionStarted(clientID)
}

func (b *Bus) onHeartbeat(msg *nats.Msg) {
	node, rest, ok := b.fromPeer(msg, false)
	if !ok {
		return
	}
	if len(rest) != 8 {
		b.opts.Logger.Error("bad heartbeat", "node", node)
		return
	}
	boot := binary.BigEndian.Uint64(rest)
	// A heartbeat without a count is from a node older than numbering.
	var sent uint64
	counted := false
	if v := msg.Header.Get(hdrSent); v != "" {
		var err error
		if sent, err = strconv.ParseUint(v, 10, 64); err != nil {
			b.opts.Logger.Error("bad heartbeat count", "node", node, "sent", v)
			return
		}
		counted = true
	}
	b.mu.Lock()
	p, known := b.peers[node]
	b.peers[node] = peer{boot: boot, seen: time.Now()}
	b.mu.Unlock()
	if known && p.boot != boot {
		// Restarted between two beats: its old connections are gone.
		b.h.NodeGone(node)
	}
	if counted && b.sentBy(node, boot, sent, msg.Header.Get(hdrFinal) != "") {
		b.missed("a node sent stored notices never heard", "node", node)
	}
}

func (b *Bus) onSync(msg *nats.Msg) {
	if _, _, ok := b.fromPeer(msg, false); !ok || msg.Reply == "" {
		return
	}
	// Answers are split to stay far under NATS's 1 MB payload limit; the
	// asker reads answers until its wait ends.
	head := frame(nil, b.opts.Node)
	answer := head
	flush := func() {
		if err := msg.Respond(answer); err != nil {
			b.opts.Logger.Warn("answer presence sync", "error", err)
		}
		answer = append([]byte(nil), head...)
	}
	for _, u := range b.h.OnlineUsers() {
		answer = frame(answer, u)
		if len(answer) > syncChunk {
			flush()
		}
	}
	flush()
}

func (b *Bus) onRemoved(msg *nats.Msg) {
	_, rest, ok := b.fromPeer(msg, false)
	if !ok || b.h.DeviceRemoved == nil {
		return
	}
	user, rest, ok := unframe(rest)
	device, _, ok2 := unframe(rest)
	if !ok || !ok2 {
		b.opts.Logger.Error("bad device removed notice")
		return
	}
	b.h.DeviceRemoved(user, device)
}

func (b *Bus) onModerated(msg *nats.Msg) {
	_, rest, ok := b.fromPeer(msg, false)
	if !ok || b.h.Moderated == nil {
		return
	}
	user, rest, ok := unframe(rest)
	device, rest, ok2 := unframe(rest)
	if !ok || !ok2 || len(rest) != 1 {
		b.opts.Logger.Error("bad moderation notice")
		return
	}
	b.h.Moderated(user, device, rest[0] == 1)
}

func (b *Bus) onErased(msg *nats.Msg) {
	_, rest, ok := b.fromPeer(msg, false)
	if !ok || b.h.Erased == nil {
		return
	}
	user, rest, ok := unframe(rest)
	if !ok || len(rest) != 0 {
		b.opts.Logger.Error("bad erase notice")
		return
	}
	b.h.Erased(user)
}

func (b *Bus) onConnected(msg *nats.Msg) {
	node, ids, ok := unframeAll(msg.Data)
	if !ok {
		b.opts.Logger.Error("bad connections question")
		return
	}
	if node == b.opts.Node || msg.Reply == "" || b.h.Connected == nil {
		return
	}
	answer := frame(nil, b.opts.Node)
	for _, id := range b.h.Connected(ids) {
		answer = frame(answer, id)
	}
	if err := msg.Respond(answer); err != nil {
		b.opts.Logger.Warn("answer connections question", "error", err)
	}
}

// unframeAll splits b into its first frame and the rest, all frames.
func unframeAll(b []byte) (first string, rest []string, ok bool) {
	first, b, ok = unframe(b)
	for ok && len(b) > 0 {
		var s string
		if s, b, ok = unframe(b); ok {
			rest = append(rest, s)
		}
	}
	return first, rest, ok
}

// syncChunk is the size at which a presence sync answer is split.
const syncChunk = 256 << 10

// frame appends s with a two-byte length.
func frame(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

// unframe splits a frame off b.
func unframe(b []byte) (string, []byte, bool) {
	if len(b) < 2 {
		return "", nil, false
	}
	n := int(binary.BigEndian.Uint16(b))
	if len(b) < 2+n {
		return "", nil, false
	}
	return string(b[2 : 2+n]), b[2+n:], true
}
