// Package delivery feeds queued messages to online devices: in order, with
// at most a window of unacknowledged messages per device, from memory
// while a device keeps up and from the queue on disk when it falls behind
// or reconnects. It tracks its own packet IDs and PUBACKs, never mochi's
// inflight map.
package delivery

import (
	"cmp"
	"errors"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/chatd/chatd/broker/queue"
)

// Sequences. A user's messages have strictly increasing sequences in
// commit order: broker/queue/badgerq numbers them densely,
// broker/queue/jsqueue with the stream sequence, which leaves gaps where
// other users' messages went.
// Delivery relies on one property of every Source:
//
//	once a message of a user is committed, or Head reports its Seq, every
//	message of that user with a lower Seq is committed too, so that a Read
//	starting afterwards returns it unless it has expired.
//
// Notifications (Stored) come after the commit but may come late, out of
// order or never: from another node, or after a resend took a later
// sequence. So a user's tail is trusted across a gap between messages
// heard of in order, and sent from at once, but a device's cursor, which
// the Source may act on by deleting messages, never passes f.sure: every
// message at or below it is known to have reached each device that needs
// it. In a dense queue every gap is empty and sure is head; otherwise sure
// moves over gaps only by a Read (verify), which also finds messages whose
// notification is late or lost. A message heard of late goes into the tail
// in order for the devices yet to reach it and is sent at once, out of
// order, to those already past it. Nothing is skipped: at worst it is sent
// out of order, or sent again after a reconnect.

// Source is the queue delivery reads from and reports acknowledgements to.
type Source interface {
	// Read returns up to max messages of user with Seq > after, in order.
	Read(user string, after uint64, max int) ([]queue.Message, error)
	// Head returns the last committed sequence of user.
	Head(user string) (uint64, error)
	// Ack records that device has acknowledged everything up to cursor.
	Ack(user, device string, cursor uint64)
}

// Sink is where a device's packets are written.
type Sink interface {
	// Publish queues a QoS 1 PUBLISH.
	Publish(pid uint16, topic string, payload []byte, dup bool)
	// PublishQoS0 queues a QoS 0 PUBLISH, for what is never stored.
	PublishQoS0(topic string, payload []byte)
	// Flush writes what is queued: in the calling goroutine when inline,
	// else in the background.
	Flush(inline bool)
}

// Options configures a Delivery.
type Options struct {
	// Source is the durable queue.
	Source Source
	// Logger receives read errors.
	Logger *slog.Logger
	// TailMessages caps a user's in-memory tail of recent messages.
	TailMessages int
	// TailBytes caps the bytes held by the tails of all users together
	// (64 MiB if zero): past it, tails drop their oldest messages, which
	// devices then read from the Source.
	TailBytes int
	// ReadAhead is how many messages one disk read fetches for a device,
	// at most: fewer when they are big (see readBytes).
	ReadAhead int
	// OnDelivered, if set, is called with the Meta of messages a device of
	// user acknowledged that no other device of user had acknowledged
	// before, in order, as its cursor passes them, with no lock held: on
	// the acknowledging connection's goroutine, or on the goroutine of a
	// Read that let the cursor pass messages sent across a gap. It may
	// block that goroutine alone.
	OnDelivered func(user string, metas [][]byte)
	// OnAcked, if set, is told how long each acknowledged message took from
	// being written to its device to its PUBACK.
	OnAcked func(took time.Duration)
	// Now is the clock of OnAcked's durations and of VerifyEvery; nil means time.Now.
	Now func() time.Time
	// VerifyEvery, if set, paces the reads that move a cursor over the
	// gaps of a sparse queue: one per user at most every VerifyEvery,
	// unless a device's in-flight list fills up (see verifySoon). Zero
	// reads at every acknowledgement that waits at a gap.
	VerifyEvery time.Duration
	// Skip, if set, reports whether a message, by its Meta, is not for a
	// device: it is passed over unsent, as if the device had acknowledged
	// it (the sent copy of a message, for the device that sent it). It is
	// called with a feed's lock held and must not block.
	Skip func(device string, meta []byte) bool
}

// Stats are delivery's running totals.
type Stats struct {
	// Sent counts PUBLISHes of stored messages to devices, resends included.
	Sent uint64
	// Acked counts their PUBACKs.
	Acked uint64
}

// ErrClosed is returned by Start after Close.
var ErrClosed = errors.New("delivery is closed")

// Delivery is the set of online devices of all users.
type Delivery struct {
	opts  Options
	log   *slog.Logger
	feeds sync.Map // user -> *feed

	// held is the bytes of messages in all tails (see msgBytes), tailed
	// the number of feeds whose tail holds any; sweeping is set while one
	// goroutine trims every tail to keep held within TailBytes.
	held     atomic.Int64
	tailed   atomic.Int64
	sweeping atomic.Bool

	// life guards closed. Every Source call is made holding it for
	// reading, and every goroutine that calls the Source is added to
	// reads holding it, so that once Close has taken it for writing no
	// call starts; Close then waits for reads.
	life   sync.RWMutex
	closed bool
	// stopping is closed with closed set: it ends the waits between
	// retries, and is read without life by paths that only skip work.
	stopping chan struct{}
	reads    sync.WaitGroup
	// retryFirst and retryMax are the shortest and longest waits before
	// a failed Read is retried: retryFirst and retryMax unless a test
	// changes them.
	retryFirst, retryMax time.Duration

	sent  atomic.Uint64
	acked atomic.Uint64

	// verifySlots bounds the verify reads in flight, so that a Resync of
	// every fed user is a stream of reads, not a burst of one per user.
	verifySlots chan struct{}
}

// maxVerifyReads is how many verify reads may be in flight at once.
const maxVerifyReads = 64

// Stats returns delivery's running totals.
func (d *Delivery) Stats() Stats {
	return Stats{Sent: d.sent.Load(), Acked: d.acked.Load()}
}

// New returns a Delivery reading from opts.Source.
func New(opts Options) *Delivery {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.TailMessages <= 0 {
		opts.TailMessages = 1024
	}
	if opts.ReadAhead <= 0 {
		opts.ReadAhead = 1024
	}
	if opts.TailBytes <= 0 {
		opts.TailBytes = 64 << 20
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Delivery{
		opts: opts, log: opts.Logger, stopping: make(chan struct{}),
		retryFirst: retryFirst, retryMax: retryMax,
		verifySlots: make(chan struct{}, maxVerifyReads),
	}
}

// isClosed reports whether Close was called.
func (d *Delivery) isClosed() bool {
	select {
	case <-d.stopping:
		return true
	default:
		return false
	}
}

// enter reports whether a Source call may start, and if so holds d.life
// for reading until exit: Close waits for the call.
func (d *Delivery) enter() bool {
	d.life.RLock()
	if d.closed {
		d.life.RUnlock()
		return false
	}
	return true
}

// exit ends what enter began.
func (d *Delivery) exit() { d.life.RUnlock() }

// spawn runs fn in a goroutine Close waits for, unless d is closed, and
// reports whether it did.
func (d *Delivery) spawn(fn func()) bool {
	d.life.RLock()
	defer d.life.RUnlock()
	if d.closed {
		return false
	}
	d.reads.Add(1)
	go func() {
		defer d.reads.Done()
		fn()
	}()
	return true
}

// Retries of a failed Read wait retryFirst, then twice as long each time
// up to retryMax, less up to half at random, so that the devices of a
// queue that failed for all of them (a JetStream leader change) do not
// retry in step.
const (
	retryFirst = 10 * time.Millisecond
	retryMax   = 2 * time.Second
)

// backoff waits before retry number attempt (from 0) and reports whether
// to go on: not once d is closed or quit is closed.
func (d *Delivery) backoff(attempt int, quit <-chan struct{}) bool {
	delay := d.retryFirst
	for i := 0; i < attempt && delay < d.retryMax; i++ {
		delay *= 2
	}
	delay = min(delay, d.retryMax)
	delay -= rand.N(delay / 2)
	t := time.NewTimer(delay)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-d.stopping:
		return false
	case <-quit:
		return false
	}
}

// ack reports device's cursor to the Source unless d is closed, and
// reports whether it did.
func (d *Delivery) ack(user, device string, cursor uint64) bool {
	if !d.enter() {
		return false
	}
	defer d.exit()
	d.opts.Source.Ack(user, device, cursor)
	return true
}

// Device is one online device being fed.
type Device struct {
	f      *feed
	name   string
	topic  string
	sink   Sink
	window int

	next  uint64 // one past the last sequence sent in order
	acked uint64 // the cursor: every message with Seq <= acked is acknowledged
	// inflight is what was sent and is not below the cursor, in Seq order;
	// unacked counts its entries not yet acknowledged.
	inflight []inflight
	unacked  int
	nextPID  uint16
	// late holds messages below next this device never had, heard of
	// after it went past them, in order; they are sent first.
	late []queue.Message

	prefetch []queue.Message
	reading  bool
	readHead uint64
	// readMax is how many messages the next read asks for.
	readMax int
	stopped bool
	// quit is closed when the device is stopped, ending a read's retries.
	quit chan struct{}
	// owed is set when acked moved on and the Source is yet to hear of
	// it; owedMetas are the Meta to report with it to OnDelivered.
	owed      bool
	owedMetas [][]byte
}

// owe records that advance moved dev's cursor, with metas to report;
// called with dev.f.mu held.
func (dev *Device) owe(metas [][]byte) {
	dev.owed = true
	dev.owedMetas = append(dev.owedMetas, metas...)
}

// report is a cursor of one device for the Source, and the Meta of the
// messages it passed for OnDelivered.
type report struct {
	device string
	cursor uint64
	metas  [][]byte
}

// takeOwed returns and clears what dev owes the Source; called with
// dev.f.mu held.
func (dev *Device) takeOwed(rs []report) []report {
	if !dev.owed {
		return rs
	}
	rs = append(rs, report{dev.name, dev.acked, dev.owedMetas})
	dev.owed, dev.owedMetas = false, nil
	return rs
}

// tell passes cursors to the Source and, once the Source has them, their
// messages to OnDelivered: a message whose acknowledgement is dropped at
// Close is delivered, and receipted, again. Called without f.mu held.
func (d *Delivery) tell(user string, rs []report) {
	for _, r := range rs {
		if d.ack(user, r.device, r.cursor) && len(r.metas) > 0 {
			d.opts.OnDelivered(user, r.metas)
		}
	}
}

// stop marks dev stopped; called with dev.f.mu held.
func (dev *Device) stop() {
	if dev.stopped {
		return
	}
	dev.stopped = true
	close(dev.quit)
	clear(dev.prefetch)
	dev.prefetch = nil
	// late stays: never sent now, it still bounds the cursor that a
	// verify in flight reports for a parting device (see missed).
}

type inflight struct {
	seq   uint64
	pid   uint16
	acked bool
	meta  []byte
	sent  time.Time
}

// feed is one user's online devices and recent messages.
type feed struct {
	user    string
	mu      sync.Mutex
	devices map[string]*Device
	// tail holds, in order, every message heard of with Seq > base, so
	// that devices that keep up are fed without reading back from disk;
	// bytes is what its messages cost (see msgBytes). Only insertTail and
	// dropTail change either.
	tail  []queue.Message
	base  uint64
	bytes int64
	// head is the highest sequence heard of; every message with Seq <=
	// sure is known (see Sequences). sure <= head.
	head, sure uint64
	// verifying is set while a verify Read is in flight.
	verifying bool
	// again asks for one more verify once the one in flight ends: it may
	// have read before the message it was asked to find was committed;
	// againNow, for one that must not wait for VerifyEvery.
	again, againNow bool
	// verified is when the last verify Read began, for VerifyEvery.
	verified time.Time
	// paced is set while the verify in flight waits for VerifyEvery
	// before it reads; hurry, signalled by verify, ends the wait.
	paced bool
	hurry chan struct{}
	// receipted is the last sequence reported to OnDelivered, so that a
	// user's second device acknowledging a message reports nothing.
	receipted uint64
	dead      bool
	// parting are devices stopped while a verify was in flight with
	// messages they acknowledged beyond a gap: the verify moves their
	// cursors on and reports them, as it would have had they stayed.
	parting []*Device
}

// Start begins feeding device of user, whose acknowledged cursor is
// cursor, through sink with at most window messages in flight. Messages
// after cursor are (re)sent in order. A device already being fed under
// the same name (a session takeover) is replaced.
func (d *Delivery) Start(user, device string, cursor uint64, window int, sink Sink) (*Device, error) {
	for {
		if d.isClosed() {
			return nil, ErrClosed
		}
		f := d.feedOf(user)
		f.mu.Lock()
		if f.dead {
			f.mu.Unlock()
			continue
		}
		if len(f.devices) == 0 {
			// Stored ignores a feed without devices, whose tail is empty:
			// everything committed so far is read from the Source.
			if !d.enter() {
				f.mu.Unlock()
				d.release(f)
				return nil, ErrClosed
			}
			head, err := d.opts.Source.Head(user)
			d.exit()
			if err != nil {
				f.mu.Unlock()
				d.release(f)
				return nil, err
			}
			f.head = max(f.head, head)
			f.base, f.sure = f.head, f.head
		}
		if old, ok := f.devices[device]; ok {
			old.stop()
		}
		dev := &Device{
			f: f, name: device, topic: "inbox/" + user, sink: sink, window: max(window, 1),
			next: cursor + 1, acked: cursor, quit: make(chan struct{}),
			// A window's worth until a read shows how big messages are.
			readMax: min(d.opts.ReadAhead, max(window, 1)),
		}
		f.devices[device] = dev
		d.pump(dev)
		owed := dev.takeOwed(nil)
		f.mu.Unlock()
		sink.Flush(true)
		d.tell(user, owed)
		return dev, nil
	}
}

// feedOf returns the live feed of user, creating it.
func (d *Delivery) feedOf(user string) *feed {
	if v, ok := d.feeds.Load(user); ok {
		return v.(*feed)
	}
	v, _ := d.feeds.LoadOrStore(user, &feed{user: user, devices: make(map[string]*Device)})
	return v.(*feed)
}

// release drops f when it has no devices left; called without f.mu held.
func (d *Delivery) release(f *feed) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.devices) == 0 && !f.dead {
		f.dead = true
		d.feeds.CompareAndDelete(f.user, f)
	}
}

// Stop ends feeding dev; messages it did not acknowledge are sent again
// when it reconnects.
func (d *Delivery) Stop(dev *Device) {
	f := dev.f
	f.mu.Lock()
	dev.stop()
	if f.devices[dev.name] == dev {
		delete(f.devices, dev.name)
	}
	if f.verifying && len(dev.inflight) > 0 && dev.inflight[0].acked {
		// Left right after acknowledging past a gap: without this its
		// last acknowledgements would only reach the Source at its next
		// connection, and the messages stay stored until then.
		f.parting = append(f.parting, dev)
	}
	d.trim(f)
	f.mu.Unlock()
	d.release(f)
}

// Stored is called for every message committed to user's queue, ideally
// once and in order, but a late, repeated or missing call loses nothing
// (see Sequences). It feeds the user's online devices from memory and
// reports whether the user has any device being fed. After Close it does
// nothing.
func (d *Delivery) Stored(user string, m queue.Message) bool {
	if d.isClosed() {
		return false
	}
	f := d.lockedFeed(user)
	if f == nil {
		return false
	}
	if len(f.devices) == 0 {
		f.mu.Unlock()
		return false
	}
	d.heard(f, m)
	var buf [4]Sink
	sinks := buf[:0]
	var owed []report
	for _, dev := range f.devices {
		if d.pump(dev) {
			sinks = append(sinks, dev.sink)
		}
		owed = dev.takeOwed(owed)
	}
	f.mu.Unlock()
	flushInBackground(sinks)
	d.keepBudget()
	d.tell(user, owed)
	return true
}

// heard takes in m, committed for f's user, from Stored or a verify read;
// called with f.mu held.
func (d *Delivery) heard(f *feed, m queue.Message) {
	if m.Seq <= f.head {
		d.missed(f, m)
		return
	}
	if m.Seq == f.sure+1 {
		f.sure = m.Seq
	}
	d.insertTail(f, len(f.tail), m)
	f.head = m.Seq
	d.capTail(f)
}

// missed handles m, heard of after a message with a higher Seq or again:
// it goes into the tail unless the tail has it or starts above it, and
// into the late list of every device past it that never had it; called
// with f.mu held.
func (d *Delivery) missed(f *feed, m queue.Message) {
	i, found := slices.BinarySearchFunc(f.tail, m.Seq, bySeq)
	if found {
		// It was heard of before any device went past it.
		return
	}
	if m.Seq > f.base {
		d.insertTail(f, i, m)
		d.capTail(f)
	}
	for _, dev := range f.devices {
		if dev.next > m.Seq && dev.lacks(m.Seq) {
			dev.addLate(m)
		}
	}
	// A parting device is never sent m, but its late list keeps the
	// cursor verified reports for it below m, so that the Source does not
	// delete m before that device's next connection gets it.
	for _, dev := range f.parting {
		if dev.next > m.Seq && dev.lacks(m.Seq) {
			dev.addLate(m)
		}
	}
}

// lacks reports whether dev, already past seq, was never sent it.
func (dev *Device) lacks(seq uint64) bool {
	if seq <= dev.acked {
		return false
	}
	_, sent := slices.BinarySearchFunc(dev.inflight, seq, inflightBySeq)
	_, queued := slices.BinarySearchFunc(dev.late, seq, bySeq)
	return !sent && !queued
}

// addLate queues m, which dev went past without it, to be sent next.
func (dev *Device) addLate(m queue.Message) {
	i, _ := slices.BinarySearchFunc(dev.late, m.Seq, bySeq)
	dev.late = slices.Insert(dev.late, i, m)
}

func bySeq(m queue.Message, seq uint64) int { return cmp.Compare(m.Seq, seq) }

func inflightBySeq(in inflight, seq uint64) int { return cmp.Compare(in.seq, seq) }

// msgOverhead is roughly what a message costs in a tail besides its
// Data and Meta.
const msgOverhead = 64

// msgBytes is what m costs in a tail.
func msgBytes(m queue.Message) int64 {
	return int64(len(m.Data)+len(m.Meta)) + msgOverhead
}

// insertTail puts m at index i of f's tail; called with f.mu held.
func (d *Delivery) insertTail(f *feed, i int, m queue.Message) {
	if len(f.tail) == 0 {
		d.tailed.Add(1)
	}
	f.tail = slices.Insert(f.tail, i, m)
	b := msgBytes(m)
	f.bytes += b
	d.held.Add(b)
}

// dropTail drops the n oldest messages of f's tail, which devices then
// read from the Source; called with f.mu held.
func (d *Delivery) dropTail(f *feed, n int) {
	if n <= 0 {
		return
	}
	var b int64
	for _, m := range f.tail[:n] {
		b += msgBytes(m)
	}
	f.base = f.tail[n-1].Seq
	k := copy(f.tail, f.tail[n:])
	clear(f.tail[k:])
	f.tail = f.tail[:k]
	f.bytes -= b
	d.held.Add(-b)
	if k == 0 {
		d.tailed.Add(-1)
	}
}

// capTail drops f's oldest tail messages beyond TailMessages, and while
// the tails of all users hold more than TailBytes, beyond f's share of
// it; called with f.mu held.
func (d *Delivery) capTail(f *feed) {
	d.dropTail(f, len(f.tail)-d.opts.TailMessages)
	if limit := int64(d.opts.TailBytes); d.held.Load() > limit {
		d.shrink(f, limit/max(1, d.tailed.Load()))
	}
}

// shrink drops f's oldest tail messages until the rest cost at most
// limit bytes; called with f.mu held.
func (d *Delivery) shrink(f *feed, limit int64) {
	n, b := 0, f.bytes
	for n < len(f.tail) && b > limit {
		b -= msgBytes(f.tail[n])
		n++
	}
	d.dropTail(f, n)
}

// keepBudget trims every user's tail to an equal share once the tails
// hold more than TailBytes together: capTail trims only the tail that
// grows, and the tail of a user whose devices never acknowledge would
// otherwise keep its messages for as long as they stay online. It trims
// down to three quarters, so that the next sweep is a while away, and
// skips tails locked elsewhere, which trim themselves when they grow.
// Called without any feed's lock held.
func (d *Delivery) keepBudget() {
	limit := int64(d.opts.TailBytes)
	if d.held.Load() <= limit || !d.sweeping.CompareAndSwap(false, true) {
		return
	}
	defer d.sweeping.Store(false)
	low := limit / 4 * 3
	share := low / max(1, d.tailed.Load())
	d.feeds.Range(func(_, v any) bool {
		f := v.(*feed)
		if f.mu.TryLock() {
			d.shrink(f, share)
			f.mu.Unlock()
		}
		return d.held.Load() > low
	})
}

// TailBytes reports the bytes the tails of all users hold, which
// Options.TailBytes caps.
func (d *Delivery) TailBytes() int64 { return d.held.Load() }

// Ephemeral sends payload at QoS 0 on topic to the online devices of user
// that are being fed, now or never: it is not stored. After Close it does
// nothing.
func (d *Delivery) Ephemeral(user, topic string, payload []byte) {
	if d.isClosed() {
		return
	}
	f := d.lockedFeed(user)
	if f == nil {
		return
	}
	var buf [4]Sink
	sinks := buf[:0]
	for _, dev := range f.devices {
		dev.sink.PublishQoS0(topic, payload)
		sinks = append(sinks, dev.sink)
	}
	f.mu.Unlock()
	flushInBackground(sinks)
}

// lockedFeed returns the live feed of user with its lock held, or nil.
func (d *Delivery) lockedFeed(user string) *feed {
	v, ok := d.feeds.Load(user)
	if !ok {
		return nil
	}
	f := v.(*feed)
	f.mu.Lock()
	if f.dead {
		f.mu.Unlock()
		return nil
	}
	return f
}

// flushInBackground flushes sinks without waiting for their sockets: the
// committer and publishers call it, and a slow phone must hold up neither.
func flushInBackground(sinks []Sink) {
	for _, s := range sinks {
		s.Flush(false)
	}
}

// Acked handles a PUBACK from dev for packet id pid. After Close it does
// nothing: the cursor stays where the Source has it, and what it would
// have passed is sent again on the next connection.
func (d *Delivery) Acked(dev *Device, pid uint16) {
	if d.isClosed() {
		return
	}
	f := dev.f
	f.mu.Lock()
	if dev.stopped {
		f.mu.Unlock()
		return
	}
	found := false
	for i := range dev.inflight {
		if dev.inflight[i].pid == pid && !dev.inflight[i].acked {
			dev.inflight[i].acked = true
			dev.unacked--
			found = true
			d.acked.Add(1)
			if d.opts.OnAcked != nil {
				d.opts.OnAcked(d.opts.Now().Sub(dev.inflight[i].sent))
			}
			break
		}
	}
	if !found {
		f.mu.Unlock()
		return
	}
	if n, metas := d.advance(dev); n > 0 {
		dev.owe(metas)
		d.trim(f)
	}
	sent := d.pump(dev)
	owed := dev.takeOwed(nil)
	f.mu.Unlock()
	if sent {
		// Acks arrive on the device's own connection goroutine, which may
		// wait for its own client's socket.
		dev.sink.Flush(true)
	}
	d.tell(f.user, owed)
}

// advance moves dev's cursor over the acknowledged start of its inflight
// list, up to f.sure and below its first late message, and returns how
// many entries it passed and the Meta to report to OnDelivered; called
// with dev.f.mu held.
func (d *Delivery) advance(dev *Device) (int, [][]byte) {
	f := dev.f
	bound := f.sure
	if len(dev.late) > 0 {
		bound = min(bound, dev.late[0].Seq-1)
	}
	n := 0
	var metas [][]byte
	for n < len(dev.inflight) && dev.inflight[n].acked && dev.inflight[n].seq <= bound {
		in := dev.inflight[n]
		dev.acked = in.seq
		if in.seq > f.receipted && len(in.meta) > 0 && d.opts.OnDelivered != nil {
			metas = append(metas, in.meta)
		}
		n++
	}
	f.receipted = max(f.receipted, dev.acked)
	k := copy(dev.inflight, dev.inflight[n:])
	clear(dev.inflight[k:])
	dev.inflight = dev.inflight[:k]
	if len(dev.inflight) == 0 && len(dev.late) == 0 {
		// Every message sent was at or below bound, and a disk read that
		// moved next on saw everything up to it.
		dev.acked = dev.next - 1
	}
	return n, metas
}

// pump queues for dev what its window allows and reports whether it queued
// anything; the caller flushes dev.sink after releasing dev.f.mu.
func (d *Delivery) pump(dev *Device) bool {
	f := dev.f
	sent := false
	for {
		sentNow, skipped := d.send(dev)
		sent = sent || sentNow
		if !skipped {
			break
		}
		// Skipped messages count as acknowledged: move the cursor over
		// them now, and send on if that freed room in the window.
		n, metas := d.advance(dev)
		if n == 0 {
			break
		}
		dev.owe(metas)
		d.trim(f)
	}
	if d.runningLow(dev) {
		d.readAhead(dev)
	}
	if len(dev.inflight) > 0 && dev.inflight[0].acked && dev.inflight[0].seq > f.sure && f.sure < f.head {
		// The cursor waits at a gap the tail was trusted across.
		d.verifySoon(f, len(dev.inflight) >= dev.window)
	}
	return sent
}

// send queues for dev what its window allows, and reports whether it
// queued anything and whether it passed over a message Options.Skip
// said is not for dev; called with dev.f.mu held.
func (d *Delivery) send(dev *Device) (sent, skipped bool) {
	f := dev.f
	// An acknowledgement out of order frees a slot of the window; the
	// second bound keeps a client that never acknowledges one message from
	// growing the list without end.
	for !dev.stopped && dev.unacked < dev.window && len(dev.inflight) < 2*dev.window && (dev.next <= f.head || len(dev.late) > 0) {
		m, ok := dev.take()
		if !ok {
			d.readAhead(dev)
			break
		}
		skip := d.opts.Skip != nil && d.opts.Skip(dev.name, m.Meta)
		// A skipped message holds its place, acknowledged, with no packet
		// ID (0 is never allocated), so that the cursor passes it in order.
		in := inflight{seq: m.Seq, meta: m.Meta, acked: skip}
		if !skip {
			in.pid, in.sent = dev.allocPID(), d.opts.Now()
		}
		if k := len(dev.inflight); k == 0 || dev.inflight[k-1].seq < m.Seq {
			dev.inflight = append(dev.inflight, in)
		} else {
			// A late message: the cursor must wait for it.
			i, _ := slices.BinarySearchFunc(dev.inflight, m.Seq, inflightBySeq)
			dev.inflight = slices.Insert(dev.inflight, i, in)
		}
		dev.next = max(dev.next, m.Seq+1)
		if skip {
			skipped = true
			continue
		}
		d.sent.Add(1)
		dev.unacked++
		dev.sink.Publish(in.pid, dev.topic, m.Data, false)
		sent = true
	}
	return sent, skipped
}

// runningLow reports whether a device draining from disk should read its
// next batch now, while it still has half a batch to send, so that it
// never waits for the disk; called with dev.f.mu held.
func (d *Delivery) runningLow(dev *Device) bool {
	n := len(dev.prefetch)
	if dev.reading || n == 0 || n >= dev.readMax/2 {
		return false
	}
	// The tail serves a device only from f.base on.
	return dev.prefetch[n-1].Seq < dev.f.base
}

// take returns dev's next message: a late one, else the first with Seq >=
// dev.next from the read-ahead or the tail. Gaps in a disk read are
// sequences of other users, or that expired or were never stored.
func (dev *Device) take() (queue.Message, bool) {
	if len(dev.late) > 0 {
		m := dev.late[0]
		dev.late[0] = queue.Message{}
		dev.late = dev.late[1:]
		return m, true
	}
	// The read-ahead holds nothing below next: reads keep only what is at
	// or above it, and next moves only through the read-ahead while it has
	// anything.
	if len(dev.prefetch) > 0 {
		m := dev.prefetch[0]
		dev.prefetch[0] = queue.Message{}
		dev.prefetch = dev.prefetch[1:]
		return m, true
	}
	if t := dev.f.tail; len(t) > 0 && dev.next > dev.f.base {
		// In a dense queue next is at a known offset; else search.
		if first := t[0].Seq; dev.next >= first && dev.next-first < uint64(len(t)) && t[dev.next-first].Seq == dev.next {
			return t[dev.next-first], true
		}
		if i, _ := slices.BinarySearchFunc(t, dev.next, bySeq); i < len(t) {
			return t[i], true
		}
	}
	if dev.readHead >= dev.next && !dev.reading {
		// The last disk read saw everything up to readHead and nothing at
		// dev.next: those sequences are gone, continue after them.
		dev.next = dev.readHead + 1
		dev.readHead = 0
		return dev.take()
	}
	return queue.Message{}, false
}

// allocPID returns a packet ID not in use by dev's inflight messages.
func (dev *Device) allocPID() uint16 {
	for {
		dev.nextPID++
		if dev.nextPID == 0 {
			dev.nextPID = 1
		}
		used := false
		for _, in := range dev.inflight {
			if in.pid == dev.nextPID {
				used = true
				break
			}
		}
		if !used {
			return dev.nextPID
		}
	}
}

// readAhead starts one disk read for dev, unless one is under way or d is
// closed; called with dev.f.mu held.
func (d *Delivery) readAhead(dev *Device) {
	if dev.reading || dev.stopped {
		return
	}
	dev.reading = d.spawn(func() { d.readLoop(dev) })
}

// readLoop reads dev's next messages, retrying a failed Read until it
// succeeds or dev is stopped or d closed: a device with nothing in flight
// has nothing else to start another. It clears dev.reading when it ends.
func (d *Delivery) readLoop(dev *Device) {
	f := dev.f
	for attempt := 0; ; attempt++ {
		f.mu.Lock()
		if dev.stopped {
			dev.reading = false
			f.mu.Unlock()
			return
		}
		after, head, asked := dev.next-1, f.head, dev.readMax
		if n := len(dev.prefetch); n > 0 {
			after = max(after, dev.prefetch[n-1].Seq)
		}
		f.mu.Unlock()
		if !d.enter() {
			break
		}
		msgs, err := d.opts.Source.Read(f.user, after, asked)
		d.exit()
		if err == nil {
			d.readDone(dev, msgs, head, asked)
			return
		}
		d.log.Error("read queue for delivery", "user", f.user, "device", dev.name, "attempt", attempt+1, "error", err)
		if !d.backoff(attempt, dev.quit) {
			break
		}
	}
	f.mu.Lock()
	dev.reading = false
	f.mu.Unlock()
}

// readBytes is about the most one read for a device fetches. What it
// fetches waits in the device's read-ahead for its window, and a device
// that never acknowledges keeps it there: ReadAhead messages of the
// largest size would be 64 MiB or more per device.
const readBytes = 4 << 20

// readDone takes in msgs, read for dev after every message up to head was
// committed with asked as the most to return, and sends what dev's window
// allows.
func (d *Delivery) readDone(dev *Device, msgs []queue.Message, head uint64, asked int) {
	f := dev.f
	f.mu.Lock()
	dev.reading = false
	if dev.stopped {
		f.mu.Unlock()
		return
	}
	// Messages below next were sent from the tail meanwhile, or are
	// ones this device went past before hearing of them.
	i, _ := slices.BinarySearchFunc(msgs, dev.next, bySeq)
	for _, m := range msgs[:i] {
		if dev.lacks(m.Seq) {
			dev.addLate(m)
		}
	}
	dev.prefetch = append(dev.prefetch, msgs[i:]...)
	if len(msgs) < asked {
		dev.readHead = head
	}
	if len(msgs) > 0 {
		var size int64
		for _, m := range msgs {
			size += msgBytes(m)
		}
		dev.readMax = int(min(int64(d.opts.ReadAhead), max(1, readBytes*int64(len(msgs))/size)))
	}
	sent := d.pump(dev)
	owed := dev.takeOwed(nil)
	f.mu.Unlock()
	if sent {
		dev.sink.Flush(true)
	}
	d.tell(f.user, owed)
}

// verify reads f's user's messages after f.sure to move sure over the gaps
// the tail was trusted across, handles any message heard of only now as
// missed, and moves on the cursors that waited; called with f.mu held.
// It reads at once: a paced verify still waiting is hurried.
func (d *Delivery) verify(f *feed) {
	switch {
	case f.verifying && f.paced:
		// Still waiting to read: reading now serves this request too.
		f.paced = false
		select {
		case f.hurry <- struct{}{}:
		default:
		}
	case f.verifying:
		f.again, f.againNow = true, true
	default:
		f.paced = false
		f.verifying = d.spawn(func() { d.verifyLoop(f) })
	}
}

// verifySoon is verify for a cursor waiting at a gap, paced by
// VerifyEvery: such a cursor costs nothing but the deletion of what is
// acknowledged, so a user's many acknowledgements share one read. An
// urgent one, for a device whose in-flight list is full and so cannot be
// sent more, reads at once. Called with f.mu held.
func (d *Delivery) verifySoon(f *feed, urgent bool) {
	if d.opts.VerifyEvery <= 0 || urgent {
		d.verify(f)
		return
	}
	if f.verifying {
		f.again = true
		return
	}
	if f.hurry == nil {
		f.hurry = make(chan struct{}, 1)
	}
	f.paced = true
	f.verifying = d.spawn(func() { d.verifyLoop(f) })
}

// pace waits, before a paced verify Read of f, until VerifyEvery has
// passed since the last one began, or verify hurries it, or d stops.
func (d *Delivery) pace(f *feed) {
	f.mu.Lock()
	wait := d.opts.VerifyEvery - d.opts.Now().Sub(f.verified)
	hurry, paced := f.hurry, f.paced
	f.mu.Unlock()
	if !paced || wait <= 0 {
		return
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-t.C:
	case <-hurry:
	case <-d.stopping:
	}
}

// Resync reads the queue of every user with a device being fed after what
// delivery has heard of, to find messages whose notification never came:
// the peers bus calls it when it learns that notices were lost.
func (d *Delivery) Resync() {
	d.feeds.Range(func(_, v any) bool {
		f := v.(*feed)
		f.mu.Lock()
		if len(f.devices) > 0 && !f.dead {
			d.verify(f)
		}
		f.mu.Unlock()
		return true
	})
}

// verifyLoop is verify's read, retried until it succeeds, f has no
// devices left or d is closed: a message whose notification was lost is
// found only by reading. It clears f.verifying when it ends.
func (d *Delivery) verifyLoop(f *feed) {
	d.pace(f)
	for attempt := 0; ; attempt++ {
		f.mu.Lock()
		if len(f.devices) == 0 && len(f.parting) == 0 {
			f.verifying, f.again, f.againNow = false, false, false
			f.mu.Unlock()
			return
		}
		f.mu.Unlock()
		slot := false
		select {
		case d.verifySlots <- struct{}{}:
			slot = true
		case <-d.stopping:
		}
		if !slot || !d.enter() {
			if slot {
				<-d.verifySlots
			}
			break
		}
		// Read what is known now: a wait for a slot may have been long.
		f.mu.Lock()
		after, head := f.sure, f.head
		f.verified, f.paced = d.opts.Now(), false
		if f.hurry != nil {
			// A hurry this read serves, sent before its wait began, must
			// not cut the next one short.
			select {
			case <-f.hurry:
			default:
			}
		}
		f.mu.Unlock()
		msgs, err := d.opts.Source.Read(f.user, after, d.opts.ReadAhead)
		d.exit()
		<-d.verifySlots
		if err == nil {
			d.verified(f, msgs, head)
			return
		}
		d.log.Error("read queue to verify delivery", "user", f.user, "attempt", attempt+1, "error", err)
		if !d.backoff(attempt, nil) {
			break
		}
	}
	f.mu.Lock()
	f.verifying = false
	f.mu.Unlock()
}

// verified takes in msgs, read for f after every message up to head was
// committed.
func (d *Delivery) verified(f *feed, msgs []queue.Message, head uint64) {
	f.mu.Lock()
	f.verifying = false
	if len(f.devices) == 0 && len(f.parting) == 0 {
		f.mu.Unlock()
		return
	}
	// The read returned every message up to its last, and up to head
	// too unless it stopped at max: those were committed before it
	// began. Messages above head are ones whose notification is yet to
	// come, or lost.
	var checked uint64
	for _, m := range msgs {
		d.heard(f, m)
		checked = m.Seq
	}
	if len(msgs) < d.opts.ReadAhead {
		checked = max(checked, head)
	}
	f.sure = max(f.sure, checked)
	var (
		owed  []report
		sinks []Sink
	)
	for _, dev := range f.devices {
		if n, m := d.advance(dev); n > 0 {
			dev.owe(m)
		}
		if d.pump(dev) {
			sinks = append(sinks, dev.sink)
		}
		owed = dev.takeOwed(owed)
	}
	parting := f.parting
	f.parting = nil
	for _, dev := range parting {
		if n, m := d.advance(dev); n > 0 {
			dev.owe(m)
		}
		owed = dev.takeOwed(owed)
		if len(dev.inflight) > 0 && dev.inflight[0].acked {
			f.parting = append(f.parting, dev) // for the verify that reads on
		}
	}
	if len(owed) > 0 {
		d.trim(f)
	}
	if len(msgs) == d.opts.ReadAhead || f.again {
		// Read on, to the end of the queue: a message whose
		// notification was lost is found only by reading. At once, but
		// for a read only paced ones asked for meanwhile.
		now := len(msgs) == d.opts.ReadAhead || f.againNow
		f.again, f.againNow = false, false
		if now {
			d.verify(f)
		} else {
			d.verifySoon(f, false)
		}
	}
	if !f.verifying {
		f.parting = nil
	}
	f.mu.Unlock()
	d.keepBudget()
	for _, s := range sinks {
		s.Flush(true)
	}
	d.tell(f.user, owed)
}

// trim drops tail messages every online device has acknowledged; called
// with f.mu held.
func (d *Delivery) trim(f *feed) {
	if len(f.tail) == 0 {
		return
	}
	low := f.head
	for _, dev := range f.devices {
		low = min(low, dev.acked)
	}
	n := 0
	for n < len(f.tail) && f.tail[n].Seq <= low {
		n++
	}
	d.dropTail(f, n)
}

// Close ends delivery's use of the Source: it waits for calls in flight,
// ends the retries of failed reads, and from then on no call starts:
// Start fails with ErrClosed, and Stored, Acked and Ephemeral do nothing.
// Call it before closing the Source.
func (d *Delivery) Close() {
	d.life.Lock()
	if !d.closed {
		d.closed = true
		close(d.stopping)
	}
	d.life.Unlock()
	d.reads.Wait()
}

// Window reports how many messages are in flight unacknowledged to a
// device of user and the next sequence it will be sent; ok is false when
// it is not online.
func (d *Delivery) Window(user, device string) (inflight int, next uint64, ok bool) {
	v, found := d.feeds.Load(user)
	if !found {
		return 0, 0, false
	}
	f := v.(*feed)
	f.mu.Lock()
	defer f.mu.Unlock()
	dev, ok := f.devices[device]
	if !ok {
		return 0, 0, false
	}
	return dev.unacked, dev.next, true
}
