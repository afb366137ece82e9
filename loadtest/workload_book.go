package loadtest

import (
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"

	"github.com/chatd/chatd/loadtest/workload"
)

// book is the workload scenario's accounting: every message, read
// receipt, typing signal and presence change the users caused, and what
// of it arrived where. A message is owed to each recipient once the
// broker PUBACKed it; whatever is owed and missing at the end is lost.
type book struct {
	tag   string
	users int
	// index maps user IDs to their index; read-only once built.
	index map[string]int

	mu   sync.Mutex
	msgs map[msgKey]*bookMsg
	// owing holds the messages PUBACKed, not refused, and not yet
	// delivered to every recipient: what the end of a run waits for.
	owing   map[msgKey]*bookMsg
	last    map[uint64]uint64 // sender*users+recipient -> highest n first-delivered
	reads   map[readKey]*bookRead
	typing  map[uint64]int64 // from*users+to -> last typing signal sent at
	changed []presenceChange // each user's last presence change
	actions map[string]*actionTally
	// counts are the figures of the per-second series: messages only.
	counts   Counts
	interval *hdrhistogram.Histogram
	deliver  *hdrhistogram.Histogram
	ack      *hdrhistogram.Histogram
	presence presenceTally
	sessions sessionTally
	refusals map[string]int64
}

// msgKey names a message: its sender and the sender's number for it.
type msgKey struct {
	from int
	n    uint64
}

// readKey names a read receipt: reader, the sender it goes to, and the
// first id it marks read.
type readKey struct {
	reader, sender int
	first          string
}

// bookRead is a read receipt sent and not yet arrived at its sender.
type bookRead struct {
	sentAt int64
	acked  bool
	// online is whether the sender was online when it was sent.
	online bool
}

// bookMsg is one message sent: direct, to a group, or with media.
type bookMsg struct {
	action  string
	sentAt  int64
	acked   bool
	refused bool
	to      []int32 // recipients
	online  []bool  // whether each recipient was online when it was sent
	got     []uint8 // deliveries to each recipient so far (saturating)
}

// presenceChange is when a user last went online or offline.
type presenceChange struct {
	at     int64
	online bool
}

// actionTally is what one kind of action did.
type actionTally struct {
	count, skipped, failed int64
	sent, acked, refused   int64
	expected, delivered    int64
	toOffline, dups, order int64
	received, lost         int64
	ack, deliver, upload   *hdrhistogram.Histogram
}

// presenceTally counts presence notifications the watchers received.
type presenceTally struct {
	changes, events int64
	latency         *hdrhistogram.Histogram
}

// sessionTally counts the users' sessions.
type sessionTally struct {
	connects, disconnects, failed int64
	connect                       *hdrhistogram.Histogram
}

func newBook(tag string, users []string) *book {
	b := &book{
		tag:      tag,
		users:    len(users),
		index:    make(map[string]int, len(users)),
		msgs:     make(map[msgKey]*bookMsg),
		owing:    make(map[msgKey]*bookMsg),
		last:     make(map[uint64]uint64),
		reads:    make(map[readKey]*bookRead),
		typing:   make(map[uint64]int64),
		changed:  make([]presenceChange, len(users)),
		actions:  make(map[string]*actionTally),
		interval: newHist(),
		deliver:  newHist(),
		ack:      newHist(),
		refusals: make(map[string]int64),
	}
	for i, u := range users {
		b.index[u] = i
	}
	for _, a := range workload.ActionNames {
		b.actions[a] = &actionTally{ack: newHist(), deliver: newHist(), upload: newHist()}
	}
	b.presence.latency = newHist()
	b.sessions.connect = newHist()
	return b
}

// msgID is the id of sender's message n in this run.
func (b *book) msgID(n uint64) string { return b.tag + "." + strconv.FormatUint(n, 10) }

// parseMsgID returns the sender's number of an id of this run.
func (b *book) parseMsgID(id string) (uint64, bool) {
	rest, ok := strings.CutPrefix(id, b.tag+".")
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseUint(rest, 10, 64)
	return n, err == nil
}

// acted counts an action taken; skipped ones had nothing to do (a read
// with nothing unread).
func (b *book) acted(action string, skipped bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	t := b.actions[action]
	t.count++
	if skipped {
		t.skipped++
	}
}

// failed counts an action that could not be carried out.
func (b *book) failed(action string) {
	b.mu.Lock()
	b.actions[action].failed++
	b.mu.Unlock()
}

// sending records message n of from to recipients before it is published,
// so that no delivery can come before its record.
func (b *book) sending(action string, from int, n uint64, to []int, online []bool, now int64) {
	m := &bookMsg{action: action, sentAt: now, to: make([]int32, len(to)), online: online, got: make([]uint8, len(to))}
	for i, t := range to {
		m.to[i] = int32(t)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.msgs[msgKey{from, n}] = m
	b.actions[action].sent++
	b.counts.Sent++
}

// sendFailed records that message n of from was not PUBACKed.
func (b *book) sendFailed(from int, n uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if m := b.msgs[msgKey{from, n}]; m != nil {
		b.actions[m.action].failed++
		b.counts.SendFailed++
	}
}

// acked records the PUBACK of message n of from.
func (b *book) acked(from int, n uint64, now int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	m := b.msgs[msgKey{from, n}]
	if m == nil || m.acked {
		return
	}
	m.acked = true
	t := b.actions[m.action]
	t.acked++
	if !m.refused {
		t.expected += int64(len(m.to))
		if slices.Contains(m.got, 0) {
			b.owing[msgKey{from, n}] = m
		}
	}
	b.counts.Acked++
	recordMicros(t.ack, now-m.sentAt)
	recordMicros(b.ack, now-m.sentAt)
}

// refused records an error event for message id of from: the broker did
// not store it for anyone, and owes it to no one.
func (b *book) refused(from int, id, code string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refusals[code]++
	b.counts.ErrorEvents++
	n, ok := b.parseMsgID(id)
	if !ok {
		return
	}
	m := b.msgs[msgKey{from, n}]
	if m == nil || m.refused {
		return
	}
	m.refused = true
	t := b.actions[m.action]
	t.refused++
	b.counts.Refused++
	if m.acked {
		t.expected -= int64(len(m.to))
	}
	delete(b.owing, msgKey{from, n})
}

// delivered records message id from sender arriving at recipient and
// returns whether it was this run's and the first delivery there.
func (b *book) delivered(recipient int, sender, id string, now int64) (first bool) {
	from, ok := b.index[sender]
	n, ok2 := b.parseMsgID(id)
	b.mu.Lock()
	defer b.mu.Unlock()
	b.counts.Delivered++
	if !ok || !ok2 {
		b.counts.Foreign++
		return false
	}
	m := b.msgs[msgKey{from, n}]
	if m == nil {
		b.counts.Foreign++
		return false
	}
	i := slices.Index(m.to, int32(recipient))
	if i < 0 {
		b.counts.Misrouted++
		return false
	}
	t := b.actions[m.action]
	if m.got[i] > 0 {
		t.dups++
		b.counts.Duplicates++
		if m.got[i] < 255 {
			m.got[i]++
		}
		return false
	}
	m.got[i] = 1
	if !slices.Contains(m.got, 0) {
		delete(b.owing, msgKey{from, n})
	}
	t.delivered++
	b.counts.Unique++
	pair := uint64(from)*uint64(b.users) + uint64(recipient)
	if n < b.last[pair] {
		t.order++
		b.counts.OrderViolations++
	} else {
		b.last[pair] = n
	}
	if !m.online[i] {
		t.toOffline++
		return true
	}
	for _, h := range []*hdrhistogram.Histogram{t.deliver, b.deliver, b.interval} {
		recordMicros(h, now-m.sentAt)
	}
	return true
}

// readSending records a read receipt from reader to sender marking ids
// read, before it is published: it may reach the sender before its
// PUBACK reaches the reader.
func (b *book) readSending(reader, sender int, ids []string, online bool, now int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.actions[workload.Read].sent++
	b.reads[readKey{reader, sender, ids[0]}] = &bookRead{sentAt: now, online: online}
}

// readAcked records the PUBACK of a read receipt, or its failure: then
// it is owed to no one.
func (b *book) readAcked(reader, sender int, ids []string, ok bool, now int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	t := b.actions[workload.Read]
	k := readKey{reader, sender, ids[0]}
	rd := b.reads[k]
	if !ok {
		t.failed++
		if rd != nil && !rd.acked {
			delete(b.reads, k)
		}
		return
	}
	t.acked++
	t.expected++
	if rd != nil {
		recordMicros(t.ack, now-rd.sentAt)
		rd.acked = true
	}
}

// readArrived records a read receipt by reader arriving at sender.
func (b *book) readArrived(sender int, reader string, ids []string, now int64) {
	r, ok := b.index[reader]
	if !ok || len(ids) == 0 {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	t := b.actions[workload.Read]
	k := readKey{r, sender, ids[0]}
	rd, ok := b.reads[k]
	if !ok {
		t.dups++
		return
	}
	delete(b.reads, k)
	t.delivered++
	if !rd.online {
		t.toOffline++
		return
	}
	recordMicros(t.deliver, now-rd.sentAt)
}

// typingSent records a typing signal from one user to another.
func (b *book) typingSent(from, to int, online bool, now int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	t := b.actions[workload.Typing]
	t.sent++
	if online {
		t.expected++
	}
	b.typing[uint64(from)*uint64(b.users)+uint64(to)] = now
}

// typingArrived records a typing signal from sender reaching recipient.
func (b *book) typingArrived(recipient int, sender string, now int64) {
	from, ok := b.index[sender]
	if !ok {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	t := b.actions[workload.Typing]
	t.received++
	if at, ok := b.typing[uint64(from)*uint64(b.users)+uint64(recipient)]; ok {
		recordMicros(t.deliver, now-at)
	}
}

// uploaded records a media upload that took ns nanoseconds.
func (b *book) uploaded(ns int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	recordMicros(b.actions[workload.Media].upload, ns)
}

// presenceChanged records user going online or offline at now.
func (b *book) presenceChanged(user int, online bool, now int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.changed[user] = presenceChange{at: now, online: online}
	b.presence.changes++
}

// presenceSeen records a presence notification for user received at now.
func (b *book) presenceSeen(user string, online bool, now int64) {
	i, ok := b.index[user]
	if !ok {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.presence.events++
	if c := b.changed[i]; c.online == online && c.at > 0 {
		recordMicros(b.presence.latency, now-c.at)
	}
}

// connected records a session that began, CONNECT to SUBACK taking ns
// nanoseconds, or one that could not (ns < 0).
func (b *book) connected(ns int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if ns < 0 {
		b.sessions.failed++
		return
	}
	b.sessions.connects++
	recordMicros(b.sessions.connect, ns)
}

// disconnected records a session that ended.
func (b *book) disconnected() {
	b.mu.Lock()
	b.sessions.disconnects++
	b.mu.Unlock()
}

// errorEvent counts an error event the broker queued, by code.
func (b *book) errorEvent(code string) {
	b.mu.Lock()
	b.refusals[code]++
	b.counts.ErrorEvents++
	b.mu.Unlock()
}

// outstandingTo returns the deliveries owed to the users for which
// recipient is true and not yet made, and the read receipts owed to them
// and not yet arrived (typing signals are never owed: they are not
// stored).
func (b *book) outstandingTo(recipient func(user int) bool) int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	var n int64
	for _, m := range b.owing {
		for i, to := range m.to {
			if m.got[i] == 0 && recipient(int(to)) {
				n++
			}
		}
	}
	for k, rd := range b.reads {
		if rd.acked && recipient(k.sender) {
			n++
		}
	}
	return n
}

// Snapshot returns the message counts so far.
func (b *book) Snapshot() Counts {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.counts
}

// TakeInterval returns the send->deliver latencies since the last call
// and starts a new interval.
func (b *book) TakeInterval() *hdrhistogram.Histogram {
	b.mu.Lock()
	defer b.mu.Unlock()
	h := b.interval
	b.interval = newHist()
	return h
}

// result returns the final accounting: what each action did, with what
// was owed and never arrived counted lost, and the run's message counts.
func (b *book) result() (map[string]ActionResult, PresenceResult, SessionResult, Counts, map[string]int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, t := range b.actions {
		t.lost = 0
	}
	counts := b.counts
	for _, m := range b.msgs {
		if !m.acked || m.refused {
			if !m.acked && !m.refused && !slices.ContainsFunc(m.got, func(g uint8) bool { return g > 0 }) {
				counts.InFlight++
			}
			continue
		}
		for _, g := range m.got {
			if g == 0 {
				b.actions[m.action].lost++
				counts.Lost++
			}
		}
	}
	reads := b.actions[workload.Read]
	for _, rd := range b.reads {
		if rd.acked {
			reads.lost++
			counts.Lost++
		}
	}
	out := make(map[string]ActionResult, len(b.actions))
	for name, t := range b.actions {
		a := ActionResult{
			Count: t.count, Skipped: t.skipped, Failed: t.failed,
			Sent: t.sent, Acked: t.acked, Refused: t.refused,
			Expected: t.expected, Delivered: t.delivered, ToOffline: t.toOffline,
			Duplicates: t.dups, OrderViolations: t.order, Lost: t.lost,
			Received: t.received,
			Ack:      PercentilesOf(t.ack), Deliver: PercentilesOf(t.deliver),
		}
		if name == workload.Media {
			u := PercentilesOf(t.upload)
			a.Upload = &u
		}
		out[name] = a
	}
	pres := PresenceResult{Changes: b.presence.changes, Events: b.presence.events, Latency: PercentilesOf(b.presence.latency)}
	sess := SessionResult{Connects: b.sessions.connects, Disconnects: b.sessions.disconnects, Failed: b.sessions.failed, Connect: PercentilesOf(b.sessions.connect)}
	return out, pres, sess, counts, maps.Clone(b.refusals)
}

// deliverHistogram returns a copy of the send->deliver latencies of
// messages to online recipients.
func (b *book) deliverHistogram() *hdrhistogram.Histogram {
	b.mu.Lock()
	defer b.mu.Unlock()
	return hdrhistogram.Import(b.deliver.Export())
}

// ackHistogram returns a copy of the send->PUBACK latencies of messages.
func (b *book) ackHistogram() *hdrhistogram.Histogram {
	b.mu.Lock()
	defer b.mu.Unlock()
	return hdrhistogram.Import(b.ack.Export())
}
