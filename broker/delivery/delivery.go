// Package delivery feeds queued messages to online devices: in order, with
// at most a window of unacknowledged messages per device, from memory
// while a device keeps up and from the queue on disk when it falls behind
// or reconnects. It tracks its own packet IDs and PUBACKs, never mochi's
// inflight map.
package delivery

import (
	"cmp"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/chatd/chatd/broker/queue"
)

// Sequences. A user's messages have strictly increasing sequences in
// commit order: broker/queue numbers them densely, broker/jsqueue with the
// stream sequence, which leaves gaps where other users' messages went.
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
	// ReadAhead is how many messages one disk read fetches for a device.
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
}

// Stats are delivery's running totals.
type Stats struct {
	// Sent counts PUBLISHes of stored messages to devices, resends included.
	Sent uint64
	// Acked counts their PUBACKs.
	Acked uint64
}

// Delivery is the set of online devices of all users.
type Delivery struct {
	opts  Options
	log   *slog.Logger
	feeds sync.Map // user -> *feed
	reads sync.WaitGroup
	sent  atomic.Uint64
	acked atomic.Uint64
}

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
	return &Delivery{opts: opts, log: opts.Logger}
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
	stopped  bool
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
	// that devices that keep up are fed without reading back from disk.
	tail []queue.Message
	base uint64
	// head is the highest sequence heard of; every message with Seq <=
	// sure is known (see Sequences). sure <= head.
	head, sure uint64
	// verifying is set while a verify Read is in flight.
	verifying bool
	// receipted is the last sequence reported to OnDelivered, so that a
	// user's second device acknowledging a message reports nothing.
	receipted uint64
	dead      bool
}

// Start begins feeding device of user, whose acknowledged cursor is
// cursor, through sink with at most window messages in flight. Messages
// after cursor are (re)sent in order. A device already being fed under
// the same name (a session takeover) is replaced.
func (d *Delivery) Start(user, device string, cursor uint64, window int, sink Sink) (*Device, error) {
	for {
		f := d.feedOf(user)
		f.mu.Lock()
		if f.dead {
			f.mu.Unlock()
			continue
		}
		if len(f.devices) == 0 {
			// Stored ignores a feed without devices, whose tail is empty:
			// everything committed so far is read from the Source.
			head, err := d.opts.Source.Head(user)
			if err != nil {
				f.mu.Unlock()
				d.release(f)
				return nil, err
			}
			f.head = max(f.head, head)
			f.base, f.sure = f.head, f.head
		}
		if old, ok := f.devices[device]; ok {
			old.stopped = true
		}
		dev := &Device{
			f: f, name: device, topic: "inbox/" + user, sink: sink, window: max(window, 1),
			next: cursor + 1, acked: cursor,
		}
		f.devices[device] = dev
		d.pump(dev)
		f.mu.Unlock()
		sink.Flush(true)
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
	dev.stopped = true
	if f.devices[dev.name] == dev {
		delete(f.devices, dev.name)
	}
	f.trim()
	f.mu.Unlock()
	d.release(f)
}

// Stored is called for every message committed to user's queue, ideally
// once and in order, but a late, repeated or missing call loses nothing
// (see Sequences). It feeds the user's online devices from memory and
// reports whether the user has any device being fed.
func (d *Delivery) Stored(user string, m queue.Message) bool {
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
	for _, dev := range f.devices {
		if d.pump(dev) {
			sinks = append(sinks, dev.sink)
		}
	}
	f.mu.Unlock()
	flushInBackground(sinks)
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
	f.tail = append(f.tail, m)
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
		f.tail = slices.Insert(f.tail, i, m)
		d.capTail(f)
	}
	for _, dev := range f.devices {
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

// capTail drops f's oldest tail messages beyond TailMessages; called with
// f.mu held.
func (d *Delivery) capTail(f *feed) {
	if len(f.tail) > d.opts.TailMessages {
		drop := len(f.tail) - d.opts.TailMessages
		f.base = f.tail[drop-1].Seq
		n := copy(f.tail, f.tail[drop:])
		clear(f.tail[n:])
		f.tail = f.tail[:n]
	}
}

// Ephemeral sends payload at QoS 0 on topic to the online devices of user
// that are being fed, now or never: it is not stored.
func (d *Delivery) Ephemeral(user, topic string, payload []byte) {
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

// Acked handles a PUBACK from dev for packet id pid.
func (d *Delivery) Acked(dev *Device, pid uint16) {
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
				d.opts.OnAcked(time.Since(dev.inflight[i].sent))
			}
			break
		}
	}
	if !found {
		f.mu.Unlock()
		return
	}
	n, metas := d.advance(dev)
	acked := dev.acked
	sent := d.pump(dev)
	if n > 0 {
		f.trim()
	}
	f.mu.Unlock()
	if sent {
		// Acks arrive on the device's own connection goroutine, which may
		// wait for its own client's socket.
		dev.sink.Flush(true)
	}
	if n > 0 {
		d.opts.Source.Ack(f.user, dev.name, acked)
	}
	if len(metas) > 0 {
		d.opts.OnDelivered(f.user, metas)
	}
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
	// An acknowledgement out of order frees a slot of the window; the
	// second bound keeps a client that never acknowledges one message from
	// growing the list without end.
	for !dev.stopped && dev.unacked < dev.window && len(dev.inflight) < 2*dev.window && (dev.next <= f.head || len(dev.late) > 0) {
		m, ok := dev.take()
		if !ok {
			d.readAhead(dev)
			break
		}
		pid := dev.allocPID()
		in := inflight{seq: m.Seq, pid: pid, meta: m.Meta, sent: time.Now()}
		if k := len(dev.inflight); k == 0 || dev.inflight[k-1].seq < m.Seq {
			dev.inflight = append(dev.inflight, in)
		} else {
			// A late message: the cursor must wait for it.
			i, _ := slices.BinarySearchFunc(dev.inflight, m.Seq, inflightBySeq)
			dev.inflight = slices.Insert(dev.inflight, i, in)
		}
		d.sent.Add(1)
		dev.unacked++
		dev.next = max(dev.next, m.Seq+1)
		dev.sink.Publish(pid, dev.topic, m.Data, false)
		sent = true
	}
	if d.runningLow(dev) {
		d.readAhead(dev)
	}
	if len(dev.inflight) > 0 && dev.inflight[0].acked && dev.inflight[0].seq > f.sure && f.sure < f.head {
		// The cursor waits at a gap the tail was trusted across.
		d.verify(f)
	}
	return sent
}

// runningLow reports whether a device draining from disk should read its
// next batch now, while it still has half a batch to send, so that it
// never waits for the disk; called with dev.f.mu held.
func (d *Delivery) runningLow(dev *Device) bool {
	n := len(dev.prefetch)
	if dev.reading || n == 0 || n >= d.opts.ReadAhead/2 {
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

// readAhead starts one disk read for dev; called with dev.f.mu held.
func (d *Delivery) readAhead(dev *Device) {
	if dev.reading {
		return
	}
	dev.reading = true
	after, head := dev.next-1, dev.f.head
	if n := len(dev.prefetch); n > 0 {
		after = max(after, dev.prefetch[n-1].Seq)
	}
	d.reads.Add(1)
	go func() {
		defer d.reads.Done()
		msgs, err := d.opts.Source.Read(dev.f.user, after, d.opts.ReadAhead)
		f := dev.f
		f.mu.Lock()
		dev.reading = false
		if err != nil {
			f.mu.Unlock()
			d.log.Error("read queue for delivery", "user", f.user, "device", dev.name, "error", err)
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
		if len(msgs) < d.opts.ReadAhead {
			dev.readHead = head
		}
		sent := d.pump(dev)
		f.mu.Unlock()
		if sent {
			dev.sink.Flush(true)
		}
	}()
}

// verify reads f's user's messages after f.sure to move sure over the gaps
// the tail was trusted across, handles any message heard of only now as
// missed, and moves on the cursors that waited; called with f.mu held.
func (d *Delivery) verify(f *feed) {
	if f.verifying {
		return
	}
	f.verifying = true
	after, head := f.sure, f.head
	d.reads.Add(1)
	go func() {
		defer d.reads.Done()
		msgs, err := d.opts.Source.Read(f.user, after, d.opts.ReadAhead)
		f.mu.Lock()
		f.verifying = false
		if err != nil || len(f.devices) == 0 {
			f.mu.Unlock()
			if err != nil {
				d.log.Error("read queue to verify delivery", "user", f.user, "error", err)
			}
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
		type cursor struct {
			device string
			acked  uint64
		}
		var (
			cursors []cursor
			metas   [][]byte
			sinks   []Sink
		)
		for _, dev := range f.devices {
			n, m := d.advance(dev)
			if n > 0 {
				cursors = append(cursors, cursor{dev.name, dev.acked})
				metas = append(metas, m...)
			}
			if d.pump(dev) {
				sinks = append(sinks, dev.sink)
			}
		}
		if len(cursors) > 0 {
			f.trim()
		}
		if len(msgs) == d.opts.ReadAhead {
			// Read on, to the end of the queue: a message whose
			// notification was lost is found only by reading.
			d.verify(f)
		}
		f.mu.Unlock()
		for _, s := range sinks {
			s.Flush(true)
		}
		for _, c := range cursors {
			d.opts.Source.Ack(f.user, c.device, c.acked)
		}
		if len(metas) > 0 {
			d.opts.OnDelivered(f.user, metas)
		}
	}()
}

// trim drops tail messages every online device has acknowledged; called with f.mu held.
func (f *feed) trim() {
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
	if n == 0 {
		return
	}
	f.base = f.tail[n-1].Seq
	k := copy(f.tail, f.tail[n:])
	clear(f.tail[k:])
	f.tail = f.tail[:k]
}

// Close waits for disk reads in progress; call it before closing the Source.
func (d *Delivery) Close() {
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
