// Package peers carries what one node of a cluster must tell the others
// over core NATS: messages it stored, typing signals, presence changes and
// session takeovers. The queues themselves are in JetStream; nothing here
// is durable, so a lost notice only delays something a device would get at
// its next read (a stored message) or is of no lasting value (typing).
package peers

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
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
)

// Defaults of Options.
const (
	// DefaultHeartbeat is how often a node says it is alive.
	DefaultHeartbeat = time.Second
	// DefaultDeadAfter is the silence after which a node's users are shown offline.
	DefaultDeadAfter = 5 * time.Second
)

// Handlers are what a node does with its peers' notices. Each is called
// on the bus's goroutine, one notice at a time, and must not block.
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

	mu    sync.Mutex
	peers map[string]peer

	stop chan struct{}
	done chan struct{}
}

// peer is what the bus knows of another node.
type peer struct {
	boot uint64
	seen time.Time
}

// Start subscribes to the peers' notices, asks them who is online, and
// starts beating. Close undoes it.
func Start(opts Options, h Handlers) (*Bus, error) {
	if opts.Heartbeat <= 0 {
		opts.Heartbeat = DefaultHeartbeat
	}
	if opts.DeadAfter <= 0 {
		opts.DeadAfter = DefaultDeadAfter
	}
	b := &Bus{
		opts: opts, h: h, boot: uint64(time.Now().UnixNano()),
		peers: make(map[string]peer),
		stop:  make(chan struct{}), done: make(chan struct{}),
	}
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
	}
	for _, s := range subs {
		sub, err := opts.Conn.Subscribe(opts.Prefix+s.subj, s.fn)
		if err != nil {
			return nil, errors.Join(fmt.Errorf("subscribe %s: %w", opts.Prefix+s.subj, err), b.unsubscribe())
		}
		b.subs = append(b.subs, sub)
	}
	if err := opts.Conn.Flush(); err != nil {
		return nil, errors.Join(fmt.Errorf("subscribe to peers: %w", err), b.unsubscribe())
	}
	b.beat()
	go b.loop()
	return b, nil
}

// Close stops beating and listening.
func (b *Bus) Close() error {
	close(b.stop)
	<-b.done
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

// loop beats and declares silent peers gone.
func (b *Bus) loop() {
	defer close(b.done)
	t := time.NewTicker(b.opts.Heartbeat)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			b.beat()
			b.reap(time.Now())
		case <-b.stop:
			return
		}
	}
}

func (b *Bus) beat() {
	b.send(subjHeartbeat, binary.BigEndian.AppendUint64(frame(nil, b.opts.Node), b.boot))
}

// reap reports the peers silent for DeadAfter as gone.
func (b *Bus) reap(now time.Time) {
	var gone []string
	b.mu.Lock()
	for name, p := range b.peers {
		if now.Sub(p.seen) > b.opts.DeadAfter {
			delete(b.peers, name)
			gone = append(gone, name)
		}
	}
	b.mu.Unlock()
	for _, name := range gone {
		b.opts.Logger.Warn("cluster node silent: its connections count as closed", "node", name, "after", b.opts.DeadAfter)
		b.h.NodeGone(name)
	}
}

// Stored tells the peers that m was stored for user.
func (b *Bus) Stored(user string, m queue.Message) {
	p := frame(frame(frame(nil, b.opts.Node), user), string(m.Meta))
	p = binary.BigEndian.AppendUint64(p, m.Seq)
	b.send(subjStored, append(p, m.Data...))
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
	if err := b.opts.Conn.Publish(b.opts.Prefix+subj, payload); err != nil {
		b.opts.Logger.Warn("notify cluster peers", "subject", subj, "error", err)
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
	_, rest, ok := b.fromPeer(msg, false)
	if !ok {
		return
	}
	user, rest, ok := unframe(rest)
	meta, rest, ok2 := unframe(rest)
	if !ok || !ok2 || len(rest) < 8 {
		b.opts.Logger.Error("bad stored notice")
		return
	}
	b.h.Stored(user, queue.Message{Seq: binary.BigEndian.Uint64(rest), Meta: []byte(meta), Data: rest[8:]})
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
	b.mu.Lock()
	p, known := b.peers[node]
	b.peers[node] = peer{boot: boot, seen: time.Now()}
	b.mu.Unlock()
	if known && p.boot != boot {
		// Restarted between two beats: its old connections are gone.
		b.h.NodeGone(node)
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
