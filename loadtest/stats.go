package loadtest

import (
	"errors"
	"fmt"
	"math/bits"
	"runtime"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"
)

// Latencies are recorded in microseconds from 1 µs to one hour with three
// significant digits: a slow drain can hold a message for minutes.
const (
	histLowest  = 1
	histHighest = 3600 * 1_000_000
	histDigits  = 3
)

// Message records live in pages of pageSize, allocated as the run grows, so
// a delivery finds its record with two loads and no map.
const (
	pageBits = 16
	pageSize = 1 << pageBits
	maxPages = 1 << 14
)

// errLedgerFull is returned when a run sends more messages than a ledger can track.
var errLedgerFull = errors.New("ledger full: more than 2^30 messages in one run")

// Record state flags. The top byte of a record's state holds the index
// of the device that sent the message (stateDevShift).
const (
	flagSent uint32 = 1 << iota
	flagAcked
	flagFailed
	flagRefused
	flagReceipt
)

// stateDevShift places the sending device's index in a record's state.
const stateDevShift = 24

// MaxDevices is the most devices a simulated user may have: a record
// keeps one bit per recipient device and one per device of the sender.
const MaxDevices = 16

// copyShift places, in a record's got bits, the sender's devices that
// received the message's sent copy, above its recipient's devices.
const copyShift = 16

// record is the state of one message; every field is atomic because the
// sender, the PUBACK path and the receivers touch it from different
// goroutines. It has a fixed size whatever the number of devices.
type record struct {
	sentAt atomic.Int64
	route  atomic.Uint64 // from<<32 | to, user indices
	// state holds the flags and, in its top byte, the sending device.
	state atomic.Uint32
	// got has bit k set once device k of the recipient received the
	// message, and bit copyShift+k once device k of the sender received
	// its sent copy.
	got atomic.Uint32
	// overtaker holds, in its low 32 bits, the pair number of a later
	// message of the same pair that the broker may have accepted before
	// this one, and in its high 32 bits the copy number of a later
	// message of the same sending device that may have been; 0 for none
	// (see Ledger.Overtaken). Both numbers count messages of one run, at
	// most 2^30.
	overtaker atomic.Uint64
}

// device returns the index of the device that sent the message.
func (r *record) device() int { return int(r.state.Load() >> stateDevShift) }

type page [pageSize]record

// latShard holds one slice of the latency histograms; deliveries and acks
// are spread over shards so that receivers do not contend on one lock.
type latShard struct {
	mu       sync.Mutex
	deliver  *hdrhistogram.Histogram
	interval *hdrhistogram.Histogram
	ack      *hdrhistogram.Histogram
	receipt  *hdrhistogram.Histogram
	copied   *hdrhistogram.Histogram
	_        [64]byte
}

// receiverState is what one receiving device remembers to check ordering:
// per sending device of another user the messages it received, keyed by
// senderKey, and per other device of its own user the sent copies.
type receiverState struct {
	mu     sync.Mutex
	seen   map[uint64]*pairSeen
	copies []pairSeen
}

// senderKey names a sending device: user index and device index.
func senderKey(from, dev int) uint64 { return uint64(uint32(from))<<8 | uint64(uint8(dev)) }

// pairSeen holds the two highest pair sequence numbers a receiver has seen
// from one sender. A message is out of order when a message of its pair
// numbered above it was delivered first, unless that one is its overtaker
// (see Ledger.Overtaken); as a message has at most one overtaker, the two
// highest numbers are enough to tell. Sent copies are checked the same
// way on their copy numbers, per sending device.
type pairSeen struct{ first, second uint64 }

// outOfOrder reports whether a message numbered n with overtaker o was
// delivered after a message of its pair that the broker accepted after it.
func (p pairSeen) outOfOrder(n, o uint64) bool {
	return (p.first >= n && p.first != o) || (p.second >= n && p.second != o)
}

// add records that the message numbered n was delivered.
func (p *pairSeen) add(n uint64) {
	switch {
	case n > p.first:
		p.first, p.second = n, p.first
	case n > p.second:
		p.second = n
	}
}

type counters struct {
	sent, failed, acked, delivered, unique, dups atomic.Int64
	refused, order, misrouted, foreign, receipts atomic.Int64
	errorEvents, malformed, other                atomic.Int64
	firstSend, firstDelivery, lastDelivery       atomic.Int64
	copies, copyDups, copyOrder, copyMisrouted   atomic.Int64
}

// Ledger is the accounting of one run: every message sent, acknowledged
// and delivered, with latency histograms. All methods are safe for
// concurrent use.
//
// Each user may have several devices: a message is then owed once to
// every device of its recipient, and, as a sent copy, once to every
// device of its sender but the one that sent it.
type Ledger struct {
	tag       string
	users     []string
	devices   int
	plain     bool
	next      atomic.Uint64
	growMu    sync.Mutex
	pages     [maxPages]atomic.Pointer[page]
	shards    []latShard
	receivers []receiverState
	c         counters

	codesMu sync.Mutex
	codes   map[string]int64
}

// NewLedger returns an empty ledger for a run whose message ids start with
// tag, between the given users (indices into users identify them), each
// with one device; plain says deliveries are bare message objects rather
// than envelopes.
func NewLedger(tag string, users []string, plain bool) *Ledger {
	return NewDeviceLedger(tag, users, 1, plain)
}

// NewDeviceLedger is NewLedger for users with devices devices each, 1 to
// MaxDevices (clamped into that range), numbered from 0.
func NewDeviceLedger(tag string, users []string, devices int, plain bool) *Ledger {
	devices = min(max(devices, 1), MaxDevices)
	n := 4 * runtime.GOMAXPROCS(0)
	l := &Ledger{
		tag:       tag,
		users:     users,
		devices:   devices,
		plain:     plain,
		shards:    make([]latShard, n),
		receivers: make([]receiverState, len(users)*devices),
		codes:     make(map[string]int64),
	}
	for i := range l.shards {
		l.shards[i].deliver = newHist()
		l.shards[i].interval = newHist()
		l.shards[i].ack = newHist()
		l.shards[i].receipt = newHist()
		l.shards[i].copied = newHist()
	}
	for i := range l.receivers {
		l.receivers[i].seen = make(map[uint64]*pairSeen)
		if devices > 1 {
			l.receivers[i].copies = make([]pairSeen, devices)
		}
	}
	return l
}

// Devices returns how many devices each user has.
func (l *Ledger) Devices() int { return l.devices }

func newHist() *hdrhistogram.Histogram {
	return hdrhistogram.New(histLowest, histHighest, histDigits)
}

// recordMicros records a duration given in nanoseconds as microseconds,
// clamped into the histogram's range so that clock skew or a
// pathological delay never loses a sample.
func recordMicros(h *hdrhistogram.Histogram, nanos int64) {
	v := nanos / 1000
	if v < 0 {
		v = 0
	}
	if v > histHighest {
		v = histHighest
	}
	// The value is clamped into range, where RecordValue cannot fail.
	_ = h.RecordValue(v)
}

// Tag returns the run tag that prefixes every message id.
func (l *Ledger) Tag() string { return l.tag }

// NewMessage registers a message from user index from to user index to,
// sent at sentAt (Unix nanoseconds), and returns its sequence number.
func (l *Ledger) NewMessage(from, to int, sentAt int64) (uint64, error) {
	return l.NewMessageFrom(from, 0, to, sentAt)
}

// NewMessageFrom is NewMessage for a message sent by device dev of user
// from, which its other devices must each receive a sent copy of.
func (l *Ledger) NewMessageFrom(from, dev, to int, sentAt int64) (uint64, error) {
	if dev < 0 || dev >= l.devices {
		return 0, fmt.Errorf("new message: device %d of %d", dev, l.devices)
	}
	seq := l.next.Add(1) - 1
	p, err := l.page(seq, true)
	if err != nil {
		return 0, err
	}
	r := &p[seq&(pageSize-1)]
	r.sentAt.Store(sentAt)
	r.route.Store(uint64(uint32(from))<<32 | uint64(uint32(to)))
	r.state.Store(flagSent | uint32(dev)<<stateDevShift)
	l.c.sent.Add(1)
	l.c.firstSend.CompareAndSwap(0, sentAt)
	return seq, nil
}

func (l *Ledger) page(seq uint64, create bool) (*page, error) {
	idx := seq >> pageBits
	if idx >= maxPages {
		return nil, errLedgerFull
	}
	if p := l.pages[idx].Load(); p != nil || !create {
		return p, nil
	}
	l.growMu.Lock()
	defer l.growMu.Unlock()
	if p := l.pages[idx].Load(); p != nil {
		return p, nil
	}
	p := new(page)
	l.pages[idx].Store(p)
	return p, nil
}

// lookup returns the record of a message this run sent, or nil.
func (l *Ledger) lookup(seq uint64) *record {
	if seq >= l.next.Load() {
		return nil
	}
	p, err := l.page(seq, false)
	if err != nil || p == nil {
		return nil
	}
	r := &p[seq&(pageSize-1)]
	if r.state.Load()&flagSent == 0 {
		return nil
	}
	return r
}

// SendFailed records that the client library refused message seq, so it
// never reached the network and is not expected anywhere.
func (l *Ledger) SendFailed(seq uint64) {
	r := l.lookup(seq)
	if r == nil || r.state.Load()&flagAcked != 0 || r.got.Load() != 0 {
		return
	}
	if r.state.Or(flagFailed)&flagFailed == 0 {
		l.c.failed.Add(1)
	}
}

// RefusedByAck records that the broker refused message seq in its PUBACK
// (an MQTT 5 reason code of 0x80 or above): it was not stored, so it is
// refused rather than lost, and owed nowhere.
func (l *Ledger) RefusedByAck(seq uint64) {
	r := l.lookup(seq)
	if r == nil {
		return
	}
	if r.state.Or(flagRefused)&flagRefused == 0 {
		l.c.refused.Add(1)
	}
}

// Overtaken records that the message numbered n in its pair and c among
// its device's sends (0 when the run has one device per user), from the
// sending device of message seq to user index to, may have been accepted
// by the broker before seq although it was sent after it: it was being
// published when the connection was lost while seq still waited for its
// PUBACK. paho then sends it on the new connection before it resends the
// stored publishes, so which of the two the broker accepted first is
// unknown, and neither order of delivery breaks the ordering promise, nor
// either order of their sent copies. For a seq bound for another user only
// the copy number is kept. A message waits for its PUBACK across at most
// one such reconnection: the sender publishes nothing more until every
// stored publish is acknowledged (client.waitResync).
func (l *Ledger) Overtaken(seq uint64, to int, n, c uint64) {
	r := l.lookup(seq)
	if r == nil {
		return
	}
	var o uint64
	if int(uint32(r.route.Load())) == to {
		o = uint64(uint32(n))
	}
	r.overtaker.Store(uint64(uint32(c))<<32 | o)
}

// Acked records the broker's PUBACK of message seq at time at (Unix
// nanoseconds); a second PUBACK of the same message is ignored.
func (l *Ledger) Acked(seq uint64, at int64) {
	r := l.lookup(seq)
	if r == nil || r.state.Or(flagAcked)&flagAcked != 0 {
		return
	}
	l.c.acked.Add(1)
	from := int(r.route.Load() >> 32)
	s := &l.shards[from%len(l.shards)]
	s.mu.Lock()
	recordMicros(s.ack, at-r.sentAt.Load())
	s.mu.Unlock()
}

// Deliver records payload received at time at (Unix nanoseconds) by the
// user with index receiver. It counts duplicates, order violations per
// sender->receiver pair, misrouted and foreign messages, receipts and
// error events.
func (l *Ledger) Deliver(receiver int, payload []byte, at int64) {
	l.DeliverTo(receiver, 0, payload, at)
}

// DeliverTo is Deliver to device dev of user receiver: duplicates and
// order are counted per receiving device, and sent copies are accounted
// for as well.
func (l *Ledger) DeliverTo(receiver, dev int, payload []byte, at int64) {
	var d delivery
	if err := parseDelivery(payload, l.plain, &d); err != nil {
		l.c.malformed.Add(1)
		return
	}
	if receiver < 0 || receiver >= len(l.users) || dev < 0 || dev >= l.devices {
		l.c.misrouted.Add(1)
		return
	}
	switch string(d.Kind) {
	case "msg":
	case "sent":
		l.sentCopy(receiver, dev, &d, at)
		return
	case "receipt":
		l.c.receipts.Add(1)
		l.receipt(&d, at)
		return
	case "error":
		l.c.errorEvents.Add(1)
		l.refuse(d.ID, d.Code)
		return
	default:
		l.c.other.Add(1)
		return
	}
	r, from, to := l.ours(&d)
	if r == nil {
		return
	}
	l.c.delivered.Add(1)
	if to != receiver || from >= len(l.users) || string(d.Sender) != l.users[from] ||
		(!l.plain && (string(d.From) != l.users[from] || string(d.To) != l.users[to])) {
		l.c.misrouted.Add(1)
	}
	if bit := uint32(1) << dev; r.got.Or(bit)&bit != 0 {
		l.c.dups.Add(1)
		return
	}
	l.c.unique.Add(1)
	l.c.firstDelivery.CompareAndSwap(0, at)
	storeMax(&l.c.lastDelivery, at)

	s := &l.shards[receiver%len(l.shards)]
	s.mu.Lock()
	recordMicros(s.deliver, at-d.SentAt)
	recordMicros(s.interval, at-d.SentAt)
	s.mu.Unlock()

	rs := &l.receivers[receiver*l.devices+dev]
	key := senderKey(from, r.device())
	rs.mu.Lock()
	seen := rs.seen[key]
	if seen == nil {
		seen = new(pairSeen)
		rs.seen[key] = seen
	}
	if seen.outOfOrder(d.N, uint64(uint32(r.overtaker.Load()))) {
		l.c.order.Add(1)
	}
	seen.add(d.N)
	rs.mu.Unlock()
}

// ours returns the record of the message d carries and its sender's and
// recipient's user indices; nil, counted as foreign, when d is not one of
// this run's messages.
func (l *Ledger) ours(d *delivery) (r *record, from, to int) {
	if seq, ok := parseID(d.ID, l.tag); ok {
		r = l.lookup(seq)
	}
	if r == nil {
		l.c.foreign.Add(1)
		return nil, 0, 0
	}
	route := r.route.Load()
	return r, int(route >> 32), int(uint32(route))
}

// sentCopy records the sent copy d of one of the receiving user's own
// messages, received by its device dev: it must come once to every device
// of the sender but the one that sent the message, in the order that
// device sent its messages. A copy that reaches another user or the
// sending device is misrouted and does not count as received.
func (l *Ledger) sentCopy(receiver, dev int, d *delivery, at int64) {
	r, from, to := l.ours(d)
	if r == nil {
		return
	}
	sender := r.device()
	if from != receiver || dev == sender || from >= len(l.users) || to >= len(l.users) ||
		string(d.Sender) != l.users[from] || string(d.From) != l.users[from] || string(d.To) != l.users[to] {
		l.c.copyMisrouted.Add(1)
		return
	}
	if bit := uint32(1) << (copyShift + dev); r.got.Or(bit)&bit != 0 {
		l.c.copyDups.Add(1)
		return
	}
	l.c.copies.Add(1)
	s := &l.shards[receiver%len(l.shards)]
	s.mu.Lock()
	recordMicros(s.copied, at-d.SentAt)
	s.mu.Unlock()

	if d.C == 0 || len(l.receivers[receiver*l.devices+dev].copies) <= sender {
		// Only a sender with several devices numbers its sends.
		return
	}
	rs := &l.receivers[receiver*l.devices+dev]
	rs.mu.Lock()
	seen := &rs.copies[sender]
	if seen.outOfOrder(d.C, r.overtaker.Load()>>32) {
		l.c.copyOrder.Add(1)
	}
	seen.add(d.C)
	rs.mu.Unlock()
}

// receipt records the send->receipt latency of the messages a delivered
// receipt names: the "double tick" a sender's user sees.
func (l *Ledger) receipt(d *delivery, at int64) {
	if string(d.Status) != "delivered" || d.IDs == nil {
		return
	}
	err := eachString(d.IDs, func(id []byte) {
		seq, ok := parseID(id, l.tag)
		if !ok {
			return
		}
		r := l.lookup(seq)
		if r == nil || r.state.Or(flagReceipt)&flagReceipt != 0 {
			return
		}
		s := &l.shards[int(r.route.Load()>>32)%len(l.shards)]
		s.mu.Lock()
		recordMicros(s.receipt, at-r.sentAt.Load())
		s.mu.Unlock()
	})
	if err != nil {
		l.c.malformed.Add(1)
	}
}

// refuse records an error event about message id: the broker acknowledged
// it but will never deliver it, so it is refused rather than lost.
func (l *Ledger) refuse(id, code []byte) {
	l.codesMu.Lock()
	l.codes[string(code)]++
	l.codesMu.Unlock()
	seq, ok := parseID(id, l.tag)
	if !ok {
		return
	}
	if r := l.lookup(seq); r != nil && r.state.Or(flagRefused)&flagRefused == 0 {
		l.c.refused.Add(1)
	}
}

func storeMax(v *atomic.Int64, x int64) {
	for {
		cur := v.Load()
		if x <= cur || v.CompareAndSwap(cur, x) {
			return
		}
	}
}

// Counts is the message accounting of a run. When users have several
// devices, a message is owed once to every device of its recipient:
// Unique, Duplicates, Lost and OrderViolations then count per message and
// recipient device, and the Copies fields count the sent copies owed to
// the sender's other devices.
type Counts struct {
	// Sent is every message handed to the MQTT client, including failed ones.
	Sent int64 `json:"sent"`
	// SendFailed is the messages the MQTT client refused before sending.
	SendFailed int64 `json:"send_failed"`
	// Acked is the messages the broker PUBACKed.
	Acked int64 `json:"acked"`
	// Delivered is every delivery of this run's messages, duplicates included.
	Delivered int64 `json:"delivered"`
	// Unique is the messages delivered at least once, counted once per recipient device.
	Unique int64 `json:"unique"`
	// Duplicates is the deliveries beyond the first of a message to a device.
	Duplicates int64 `json:"duplicates"`
	// Lost is the messages PUBACKed (or delivered elsewhere) but never
	// delivered, counted once per recipient device missed (final counts only).
	Lost int64 `json:"lost"`
	// InFlight is the messages neither PUBACKed nor delivered when the run stopped (final counts only).
	InFlight int64 `json:"in_flight"`
	// Refused is the messages the broker refused: in an MQTT 5 PUBACK's
	// reason code, or acknowledged and then refused with an error event.
	Refused int64 `json:"refused"`
	// OrderViolations is first deliveries that came after a message of their sender->receiver pair
	// numbered above them, which the broker must have accepted after them.
	OrderViolations int64 `json:"order_violations"`
	// Misrouted is deliveries to the wrong user or attributed to the wrong sender.
	Misrouted int64 `json:"misrouted"`
	// Foreign is messages received that this run did not send (earlier runs, other clients).
	Foreign int64 `json:"foreign"`
	// Receipts is receipt events received.
	Receipts int64 `json:"receipts"`
	// ErrorEvents is error events received.
	ErrorEvents int64 `json:"error_events"`
	// Malformed is payloads that could not be parsed.
	Malformed int64 `json:"malformed"`
	// Other is events of any other kind (typing...).
	Other int64 `json:"other"`

	// CopiesExpected is the sent copies owed: for every message the broker
	// stored, one to each device of its sender but the one that sent it
	// (final counts only; 0 with one device per user).
	CopiesExpected int64 `json:"copies_expected"`
	// CopiesReceived is the sent copies received at least once, once per
	// message and device.
	CopiesReceived int64 `json:"copies_received"`
	// CopiesLost is the sent copies owed and never received (final counts only).
	CopiesLost int64 `json:"copies_lost"`
	// CopyDuplicates is the receptions beyond the first of a copy by a device.
	CopyDuplicates int64 `json:"copy_duplicates"`
	// CopyOrderViolations is first receptions of a copy that came after the
	// copy of a later send of the same device.
	CopyOrderViolations int64 `json:"copy_order_violations"`
	// CopiesMisrouted is copies received by another user, or by the device
	// that sent the message, or naming the wrong users.
	CopiesMisrouted int64 `json:"copies_misrouted"`
}

// Snapshot returns the running counters; Lost and InFlight stay zero until Final.
func (l *Ledger) Snapshot() Counts {
	c := &l.c
	return Counts{
		Sent:            c.sent.Load(),
		SendFailed:      c.failed.Load(),
		Acked:           c.acked.Load(),
		Delivered:       c.delivered.Load(),
		Unique:          c.unique.Load(),
		Duplicates:      c.dups.Load(),
		Refused:         c.refused.Load(),
		OrderViolations: c.order.Load(),
		Misrouted:       c.misrouted.Load(),
		Foreign:         c.foreign.Load(),
		Receipts:        c.receipts.Load(),
		ErrorEvents:     c.errorEvents.Load(),
		Malformed:       c.malformed.Load(),
		Other:           c.other.Load(),

		CopiesReceived:      c.copies.Load(),
		CopyDuplicates:      c.copyDups.Load(),
		CopyOrderViolations: c.copyOrder.Load(),
		CopiesMisrouted:     c.copyMisrouted.Load(),
	}
}

// Outstanding returns how many deliveries, sent copies included, the
// messages sent and neither refused nor failed still owe: what a drain
// still waits for.
func (l *Ledger) Outstanding() int64 {
	c := &l.c
	owing := c.sent.Load() - c.failed.Load() - c.refused.Load()
	d := int64(l.devices)
	return owing*d - c.unique.Load() + owing*(d-1) - c.copies.Load()
}

// Final scans every message and returns the counts with Lost, InFlight and
// the copies expected and lost filled in, plus up to maxSamples losses
// described as "id from->to" (with several devices per user, the devices
// are named, and a lost copy reads "id copy from->to").
//
// Every sent message is exactly one of: failed, refused, in flight
// (neither PUBACKed nor delivered nor copied) or stored; a stored message
// owes one delivery to each device of its recipient, each either
// delivered (Unique) or lost, and one sent copy to each device of its
// sender but the sending one, each either received or lost. A refused
// message owes nothing, though any copy of it received counts as
// expected and received (a cluster may store one).
func (l *Ledger) Final(maxSamples int) (Counts, []string) {
	c := l.Snapshot()
	var unique, refused, lost, inflight, failed int64
	var copiesExpected, copiesReceived int64
	var samples []string
	devs := uint32(1)<<l.devices - 1
	n := l.next.Load()
	for seq := uint64(0); seq < n; seq++ {
		r := l.lookup(seq)
		if r == nil {
			continue
		}
		st := r.state.Load()
		got := r.got.Load()
		delivered, copied := got&devs, got>>copyShift&devs
		stored := false
		switch {
		case st&flagFailed != 0:
			failed++
		case delivered != 0:
			stored = true
		case st&flagRefused != 0:
			refused++
			copiesExpected += int64(bits.OnesCount32(copied))
			copiesReceived += int64(bits.OnesCount32(copied))
		case st&flagAcked != 0 || copied != 0:
			stored = true
		default:
			inflight++
		}
		if !stored {
			continue
		}
		route := r.route.Load()
		from, to := int(route>>32), int(uint32(route))
		unique += int64(bits.OnesCount32(delivered))
		lost += int64(l.devices - bits.OnesCount32(delivered))
		sender := r.device()
		owed := devs &^ (1 << sender)
		copiesExpected += int64(bits.OnesCount32(owed))
		copiesReceived += int64(bits.OnesCount32(copied & owed))
		for k := range l.devices {
			if len(samples) >= maxSamples {
				break
			}
			if delivered&(1<<k) == 0 {
				samples = append(samples, fmt.Sprintf("%s-%d %s->%s", l.tag, seq,
					l.deviceName(from, sender), l.deviceName(to, k)))
			}
		}
		for k := range l.devices {
			if len(samples) >= maxSamples {
				break
			}
			if owed&^copied&(1<<k) != 0 {
				samples = append(samples, fmt.Sprintf("%s-%d copy %s->%s", l.tag, seq,
					l.deviceName(from, sender), l.deviceName(from, k)))
			}
		}
	}
	c.Unique, c.Refused, c.Lost, c.InFlight, c.SendFailed = unique, refused, lost, inflight, failed
	c.CopiesExpected, c.CopiesReceived, c.CopiesLost = copiesExpected, copiesReceived, copiesExpected-copiesReceived
	return c, samples
}

func (l *Ledger) userName(i int) string {
	if i < 0 || i >= len(l.users) {
		return fmt.Sprintf("#%d", i)
	}
	return l.users[i]
}

// deviceName names device dev of user index i as its client ID: the user
// ID alone when users have one device each.
func (l *Ledger) deviceName(i, dev int) string {
	if l.devices == 1 {
		return l.userName(i)
	}
	return deviceClientID(l.userName(i), dev)
}

// deviceClientID is the client ID of device dev of user (PROTOCOL.md
// section 1: {user}/{device}).
func deviceClientID(user string, dev int) string {
	return user + "/d" + strconv.Itoa(dev)
}

// RefusalCodes returns how many error events carried each code.
func (l *Ledger) RefusalCodes() map[string]int64 {
	l.codesMu.Lock()
	defer l.codesMu.Unlock()
	out := make(map[string]int64, len(l.codes))
	for k, v := range l.codes {
		out[k] = v
	}
	return out
}

// Histograms returns merged copies of the latency histograms, in
// microseconds: send->deliver (first deliveries), send->PUBACK and
// send->delivered receipt.
func (l *Ledger) Histograms() (deliver, ack, receipt *hdrhistogram.Histogram) {
	deliver, ack, receipt = newHist(), newHist(), newHist()
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		deliver.Merge(s.deliver)
		ack.Merge(s.ack)
		receipt.Merge(s.receipt)
		s.mu.Unlock()
	}
	return deliver, ack, receipt
}

// CopyHistogram returns a merged copy of the send->sent-copy latency
// histogram, in microseconds: first receptions of sent copies.
func (l *Ledger) CopyHistogram() *hdrhistogram.Histogram {
	h := newHist()
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		h.Merge(s.copied)
		s.mu.Unlock()
	}
	return h
}

// TakeInterval returns the send->deliver histogram of the deliveries since
// the previous call, and starts a new interval.
func (l *Ledger) TakeInterval() *hdrhistogram.Histogram {
	h := newHist()
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		h.Merge(s.interval)
		s.interval.Reset()
		s.mu.Unlock()
	}
	return h
}

// FirstSend returns when the first message was sent, Unix nanoseconds, or 0.
func (l *Ledger) FirstSend() int64 { return l.c.firstSend.Load() }

// DeliveryWindow returns when the first and the last message were first
// delivered, Unix nanoseconds, or zeros when nothing was.
func (l *Ledger) DeliveryWindow() (first, last int64) {
	return l.c.firstDelivery.Load(), l.c.lastDelivery.Load()
}

// Percentiles summarises a latency distribution in milliseconds.
type Percentiles struct {
	// Count is the number of samples.
	Count int64 `json:"count"`
	// P50 is the median.
	P50 float64 `json:"p50_ms"`
	// P90 is the 90th percentile.
	P90 float64 `json:"p90_ms"`
	// P99 is the 99th percentile.
	P99 float64 `json:"p99_ms"`
	// P999 is the 99.9th percentile.
	P999 float64 `json:"p99_9_ms"`
	// Max is the largest sample.
	Max float64 `json:"max_ms"`
	// Mean is the arithmetic mean.
	Mean float64 `json:"mean_ms"`
}

// PercentilesOf summarises a histogram of microsecond values.
func PercentilesOf(h *hdrhistogram.Histogram) Percentiles {
	if h.TotalCount() == 0 {
		return Percentiles{}
	}
	v := h.ValueAtPercentiles([]float64{50, 90, 99, 99.9})
	ms := func(us int64) float64 { return float64(us) / 1000 }
	return Percentiles{
		Count: h.TotalCount(),
		P50:   ms(v[50]),
		P90:   ms(v[90]),
		P99:   ms(v[99]),
		P999:  ms(v[99.9]),
		Max:   ms(h.Max()),
		Mean:  h.Mean() / 1000,
	}
}

// Bin is one bar of a latency histogram.
type Bin struct {
	// FromMs is the bin's lower bound in milliseconds.
	FromMs float64 `json:"from_ms"`
	// ToMs is the bin's upper bound in milliseconds.
	ToMs float64 `json:"to_ms"`
	// Count is the samples in [FromMs, ToMs).
	Count int64 `json:"count"`
}

// LogBins folds a microsecond histogram into bins whose bounds follow the
// 1-2-5 series, which reads well on a log axis.
func LogBins(h *hdrhistogram.Histogram) []Bin {
	if h.TotalCount() == 0 {
		return nil
	}
	var bounds []int64
	for decade := int64(1); decade <= histHighest; decade *= 10 {
		bounds = append(bounds, decade, 2*decade, 5*decade)
	}
	counts := make([]int64, len(bounds))
	for _, bar := range h.Distribution() {
		if bar.Count == 0 {
			continue
		}
		i := sort.Search(len(bounds), func(i int) bool { return bounds[i] > bar.From }) - 1
		if i < 0 {
			i = 0
		}
		counts[i] += bar.Count
	}
	first, last := -1, -1
	for i, n := range counts {
		if n > 0 {
			if first < 0 {
				first = i
			}
			last = i
		}
	}
	bins := make([]Bin, 0, last-first+1)
	for i := first; i <= last; i++ {
		to := float64(bounds[i]) * 2
		if i+1 < len(bounds) {
			to = float64(bounds[i+1])
		}
		bins = append(bins, Bin{FromMs: float64(bounds[i]) / 1000, ToMs: to / 1000, Count: counts[i]})
	}
	return bins
}
