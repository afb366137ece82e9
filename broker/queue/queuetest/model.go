package queuetest

import (
	"encoding/hex"
	"flag"
	"fmt"
	"math/rand/v2"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chatd/chatd/broker/delivery"
	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/config"
)

var (
	seedsFlag  = flag.Int("seeds", 0, "model-based test: random sequences per backend (0: the CI default)")
	seedFlag   = flag.Uint64("seed", 0, "model-based test: run this seed only")
	replayFlag = flag.String("replay", "", "model-based test: run this hex-encoded event sequence only")
	eventsFlag = flag.Int("events", 120, "model-based test: events per sequence")
)

// ciSeeds is how many sequences CI runs per backend: a few hundred, inside
// the suite's time budget.
const ciSeeds = 200

// RunModel drives b's store and a delivery.Delivery on it with seeded
// random event sequences and checks them against the reference model
// after every step. A failing sequence is shrunk and printed with the
// flags that replay it.
func RunModel(t *testing.T, b Backend) {
	if *replayFlag != "" {
		data, err := hex.DecodeString(*replayFlag)
		if err != nil {
			t.Fatalf("-replay: %v", err)
		}
		if err := runEvents(t, b, "replay", data, settleTimeout); err != nil {
			t.Fatalf("replayed sequence:\n%s\n%v", describe(data), err)
		}
		return
	}
	first, n := uint64(1), uint64(ciSeeds)
	if *seedsFlag > 0 {
		n = uint64(*seedsFlag)
	}
	if *seedFlag != 0 {
		first, n = *seedFlag, 1
	}
	if testing.Short() {
		n = min(n, 20)
	}
	var events int
	for seed := first; seed < first+n; seed++ {
		data := Generate(seed, *eventsFlag, b.NoticeFaults)
		events += len(data) / eventBytes
		if err := runEvents(t, b, fmt.Sprintf("s%d", seed), data, settleTimeout); err != nil {
			short, serr := shrink(t, b, data, err)
			t.Fatalf("seed %d fails: %v\nshortest sequence that fails the same way (%d events), with: %v\n%s\nreplay: go test -run Model ./broker/%s -replay %s\n(seed: -seed %d)",
				seed, err, len(short)/eventBytes, serr, describe(short), pkgOf(b), hex.EncodeToString(short), seed)
		}
	}
	t.Logf("%s: %d sequences, %d events, seeds %d..%d", b.Name, n, events, first, first+n-1)
}

// FuzzModel runs the model on the fuzzer's event sequences (the encoding
// of Generate, at most maxFuzzEvents events), seeded with a few
// generated ones.
func FuzzModel(f *testing.F, b Backend) {
	for seed := uint64(1); seed <= 8; seed++ {
		f.Add(Generate(seed, 40, b.NoticeFaults))
	}
	var runs atomic.Int64
	f.Fuzz(func(t *testing.T, data []byte) {
		data = data[:min(len(data), maxFuzzEvents*eventBytes)]
		if err := runEvents(t, b, fmt.Sprintf("f%d", runs.Add(1)), data, settleTimeout); err != nil {
			t.Fatalf("%v\nsequence:\n%s\nreplay: go test -run Model ./broker/%s -replay %s", err, describe(data), pkgOf(b), hex.EncodeToString(data))
		}
	})
}

// maxFuzzEvents bounds a fuzzed sequence, so that one input stays quick.
const maxFuzzEvents = 200

// pkgOf names the package whose tests run b, for the replay hint.
func pkgOf(b Backend) string {
	if b.Sparse {
		return "jsqueue/"
	}
	return "queue/"
}

// shrink removes events from a failing sequence while it still fails
// the same way, so that what is printed is short enough to read.
func shrink(t *testing.T, b Backend, data []byte, err error) ([]byte, error) {
	class := errClass(err)
	tries := 0
	fails := func(d []byte) error {
		tries++
		err := runEvents(t, b, fmt.Sprintf("shrink%d", tries), d, shrinkSettleTimeout)
		if err != nil && errClass(err) == class {
			return err
		}
		return nil
	}
	for chunk := len(data) / eventBytes / 2; chunk >= 1; chunk /= 2 {
		for i := 0; i+chunk*eventBytes <= len(data); {
			cand := slices.Concat(data[:i], data[i+chunk*eventBytes:])
			if e := fails(cand); len(cand) > 0 && e != nil {
				data, err = cand, e
				continue
			}
			i += chunk * eventBytes
		}
	}
	return data, err
}

var (
	eventPrefixRE = regexp.MustCompile(`^.*?\): `)
	namesRE       = regexp.MustCompile(`[ud]\d+|\d+`)
)

// errClass is what a failure says, without the event it happened at and
// the names and numbers in it.
func errClass(err error) string {
	s := eventPrefixRE.ReplaceAllString(err.Error(), "")
	if i := strings.IndexAny(s, "(:"); i > 0 {
		s = s[:i]
	}
	return namesRE.ReplaceAllString(s, "#")
}

// Events. A sequence is a byte string of events of eventBytes bytes each
// (an opcode and three arguments), so that a seed, a replay and a fuzzer
// all drive the same decoder.
const eventBytes = 4

type opcode byte

const (
	opDirect      opcode = iota // sender a, recipient b, c%4==0: resend an earlier id
	opGroup                     // sender a, members bitmask b, c as opDirect
	opConnect                   // user a, device b, c%3==0: transient; c&4: old connection ends first on a takeover
	opSubscribe                 // user a, device b
	opUnsubscribe               // user a, device b
	opAck                       // user a, device b, c: bitmask of the unacknowledged in flight (0: all)
	opDisconnect                // user a, device b
	opAdvance                   // a%3: 1 s, device_ttl, message_ttl; then the unseen-device sweep
	opFlush                     // persist acknowledgements and delete
	opCrash                     // crash the store and reopen it
	opSettle                    // acknowledge everything until every online device has all it must get
	opNotice                    // a%3: release late notifications, next one late, next one lost (NoticeFaults only)
	numOps
)

var opNames = [...]string{"direct", "group", "connect", "subscribe", "unsubscribe", "ack", "disconnect", "advance", "flush", "crash", "settle", "notice"}

const (
	numUsers   = 3
	numDevices = 3
	window     = 3
)

type event struct {
	op      opcode
	a, b, c byte
}

func decode(data []byte) []event {
	var out []event
	for i := 0; i+eventBytes <= len(data); i += eventBytes {
		out = append(out, event{opcode(data[i] % byte(numOps)), data[i+1], data[i+2], data[i+3]})
	}
	return out
}

func userName(b byte) string   { return fmt.Sprintf("u%d", int(b)%numUsers) }
func deviceName(b byte) string { return fmt.Sprintf("d%d", int(b)%numDevices) }

func (e event) String() string {
	u, d := userName(e.a), deviceName(e.b)
	switch e.op {
	case opDirect:
		return fmt.Sprintf("%s sends to %s (resend=%v)", u, userName(e.b), e.c%4 == 0)
	case opGroup:
		return fmt.Sprintf("%s sends to group %03b (resend=%v)", u, e.b%8, e.c%4 == 0)
	case opConnect:
		return fmt.Sprintf("connect %s/%s transient=%v old-ends-first=%v", u, d, e.c%3 == 0, e.c&4 != 0)
	case opAck:
		return fmt.Sprintf("%s/%s acks mask %08b", u, d, e.c)
	case opAdvance:
		return fmt.Sprintf("clock +%s", [...]string{"1s", "device_ttl", "message_ttl"}[e.a%3])
	case opNotice:
		return fmt.Sprintf("notice: %s", [...]string{"release late", "next late", "next lost"}[e.a%3])
	case opFlush, opCrash, opSettle:
		return opNames[e.op]
	}
	return fmt.Sprintf("%s %s/%s", opNames[e.op], u, d)
}

func describe(data []byte) string {
	var b strings.Builder
	for i, e := range decode(data) {
		fmt.Fprintf(&b, "  %3d. %s\n", i+1, e)
	}
	return b.String()
}

// Generate returns the event sequence of seed: n events drawn with
// weights that keep devices connected and messages flowing most of the time.
func Generate(seed uint64, n int, notices bool) []byte {
	rng := rand.New(rand.NewPCG(seed, 0x9e3779b97f4a7c15))
	weights := []struct {
		op opcode
		w  int
	}{
		{opDirect, 20}, {opGroup, 6}, {opConnect, 12}, {opSubscribe, 8}, {opUnsubscribe, 2},
		{opAck, 18}, {opDisconnect, 7}, {opAdvance, 3}, {opFlush, 6}, {opCrash, 2}, {opSettle, 4},
	}
	if notices {
		weights = append(weights, struct {
			op opcode
			w  int
		}{opNotice, 5})
	}
	total := 0
	for _, w := range weights {
		total += w.w
	}
	out := make([]byte, 0, n*eventBytes)
	for range n {
		k := rng.IntN(total)
		op := weights[0].op
		for _, w := range weights {
			if k < w.w {
				op = w.op
				break
			}
			k -= w.w
		}
		out = append(out, byte(op), byte(rng.UintN(256)), byte(rng.UintN(256)), byte(rng.UintN(256)))
	}
	return out
}

// The reference model.

// mmsg is one stored copy of a message, in one user's queue.
type mmsg struct {
	user    string
	seq     uint64
	payload string
	stored  time.Time
	// holders are the devices that must get it (PROTOCOL.md section 3):
	// every device registered when it was stored, and a device that
	// registers while the user has no persistent device.
	holders map[string]bool
	// acked are the devices that acknowledged it.
	acked map[string]bool
	// released is set once the store may delete it: the user has a
	// persistent device and every registered holder acknowledged it.
	released bool
	// faulted is set when its notification was delayed or lost.
	faulted bool
	// gone is set once a read of the store no longer returns it.
	gone bool
}

// mdev is one device of a user, as the store should see it.
type mdev struct {
	name       string
	registered bool
	persistent bool
	// online counts its connections (Attach without Detach).
	online   int
	lastSeen time.Time
	// sess is its newest connection; old is a taken-over one not yet ended.
	sess, old *msess
	// cursor is the end of the prefix of its messages it acknowledged in
	// order, as delivery moves it; flushed is cursor at the last Flush.
	cursor, flushed uint64
	subscribedOnce  bool
}

// msess is one connection of a device.
type msess struct {
	dev  *delivery.Device
	sink *sink
	// seqs are the sequences sent on it, in order; pids maps a packet ID
	// in flight to its sequence.
	seqs    []uint64
	pids    map[uint16]uint64
	unacked []uint16
	// acked are the sequences acknowledged on this connection.
	acked map[uint64]bool
	last  uint64
	seen  int
}

// sink records what delivery writes to one connection.
type sink struct {
	mu   sync.Mutex
	pubs []pub
}

type pub struct {
	pid     uint16
	payload string
}

func (s *sink) Publish(pid uint16, _ string, payload []byte, _ bool) {
	s.mu.Lock()
	s.pubs = append(s.pubs, pub{pid, string(payload)})
	s.mu.Unlock()
}
func (s *sink) PublishQoS0(string, []byte) {}
func (s *sink) Flush(bool)                 {}

func (s *sink) since(n int) []pub {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.pubs[n:])
}

// sent is one message a sender published, for resends of its id.
type sent struct {
	id    string
	group bool
	to    []string
	// copies are the recipients that got a copy.
	copies map[string]bool
}

// notice is a stored-message notification.
type notice struct {
	user string
	m    queue.Message
}

// runner drives one sequence.
type runner struct {
	t    testing.TB
	b    Backend
	name string
	// settleTimeout bounds each wait for delivery.
	settleTimeout time.Duration
	q             config.Queue
	clock         *Clock
	store         Store
	dlv           *delivery.Delivery

	users   map[string]map[string]*mdev
	msgs    map[string][]*mmsg // per user, in sequence order
	byPay   map[string]*mmsg
	sent    map[string][]*sent
	attempt int

	mu      sync.Mutex
	notices []notice // told by the store during the current append
	late    []notice
	fault   int             // 1: next notification late, 2: lost
	faulted map[string]bool // "user/seq" of notifications delayed or lost
	// lost are the "user/seq" of lost notifications not yet made up for
	// by a Resync, which the peers bus calls when it sees a gap.
	lost map[string]bool
}

func runEvents(t testing.TB, b Backend, name string, data []byte, settle time.Duration) (err error) {
	r := &runner{
		t: t, b: b, name: name, q: testQueue(), settleTimeout: settle,
		clock: NewClock(time.Now().Truncate(time.Second)),
		users: make(map[string]map[string]*mdev), msgs: make(map[string][]*mmsg),
		byPay: make(map[string]*mmsg), sent: make(map[string][]*sent),
		faulted: make(map[string]bool), lost: make(map[string]bool),
	}
	for i := range numUsers {
		r.users[userName(byte(i))] = make(map[string]*mdev)
	}
	r.open()
	defer func() {
		r.dlv.Close()
		if cerr := r.store.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("close: %w", cerr)
		}
		if b.Remove != nil {
			b.Remove(name)
		}
	}()
	for i, e := range decode(data) {
		if err := r.apply(e); err != nil {
			return fmt.Errorf("event %d (%s): %w", i+1, e, err)
		}
		if err := r.check(r.touched(e)...); err != nil {
			return fmt.Errorf("after event %d (%s): %w", i+1, e, err)
		}
	}
	if err := r.finish(); err != nil {
		return fmt.Errorf("final drain: %w", err)
	}
	return nil
}

// open opens the store and a delivery on it.
func (r *runner) open() {
	r.store = r.b.Open(r.t, r.name, r.q, r.clock.Now, r.onStored)
	r.dlv = delivery.New(delivery.Options{Source: r.store, TailMessages: 4, ReadAhead: 2})
}

// onStored records a notification and passes it on, late or never when
// a fault was asked for.
func (r *runner) onStored(user string, m queue.Message) {
	r.mu.Lock()
	r.notices = append(r.notices, notice{user, m})
	fault := r.fault
	r.fault = 0
	if fault != 0 {
		r.faulted[fmt.Sprintf("%s/%d", user, m.Seq)] = true
	}
	switch fault {
	case 1:
		r.late = append(r.late, notice{user, m})
	case 2:
		r.lost[fmt.Sprintf("%s/%d", user, m.Seq)] = true
	}
	dlv := r.dlv
	r.mu.Unlock()
	if fault == 0 {
		dlv.Stored(user, m)
	}
}

func (r *runner) device(user, name string) *mdev {
	d, ok := r.users[user][name]
	if !ok {
		d = &mdev{name: name}
		r.users[user][name] = d
	}
	return d
}

func (r *runner) hasPersistent(user string) bool {
	for _, d := range r.users[user] {
		if d.registered && d.persistent {
			return true
		}
	}
	return false
}

func (r *runner) registered(user string) int {
	n := 0
	for _, d := range r.users[user] {
		if d.registered {
			n++
		}
	}
	return n
}

// maybeExpired reports a message the store may have expired: its
// message_ttl has begun to pass (Badger rounds expiry up to a second).
func (r *runner) maybeExpired(m *mmsg) bool {
	return !r.clock.Now().Before(m.stored.Add(r.q.MessageTTL))
}

func (r *runner) apply(e event) error {
	user, dev := userName(e.a), deviceName(e.b)
	switch e.op {
	case opDirect:
		return r.publish(user, []string{userName(e.b)}, false, e.c%4 == 0)
	case opGroup:
		var to []string
		for i := range numUsers {
			if e.b&(1<<i) != 0 && userName(byte(i)) != user {
				to = append(to, userName(byte(i)))
			}
		}
		if len(to) == 0 {
			return nil
		}
		return r.publish(user, to, true, e.c%4 == 0)
	case opConnect:
		return r.connect(user, dev, e.c%3 == 0, e.c&4 != 0)
	case opSubscribe:
		return r.subscribe(user, dev)
	case opUnsubscribe:
		d := r.users[user][dev]
		if d == nil || d.sess == nil || d.sess.dev == nil {
			return nil
		}
		if err := r.drain(user, d, d.sess); err != nil {
			return err
		}
		r.dlv.Stop(d.sess.dev)
		// What is in flight is sent again if the device subscribes again:
		// a new feed on the same connection starts over from the cursor.
		d.sess = &msess{sink: d.sess.sink, seen: d.sess.seen, pids: make(map[uint16]uint64), acked: make(map[uint64]bool)}
		r.store.SetSubscribed(user, dev, false)
		return nil
	case opAck:
		return r.ack(user, dev, e.c)
	case opDisconnect:
		d := r.users[user][dev]
		if d == nil || d.sess == nil {
			return nil
		}
		r.end(user, d, d.sess)
		d.sess = nil
		return nil
	case opAdvance:
		r.clock.Advance([...]time.Duration{time.Second, r.q.DeviceTTL + 2*time.Second, r.q.MessageTTL + 2*time.Second}[e.a%3])
		if err := r.store.ForgetUnseen(); err != nil {
			return fmt.Errorf("forget unseen devices: %w", err)
		}
		r.forgetUnseen()
		r.flushed()
		return nil
	case opFlush:
		if err := r.store.Flush(); err != nil {
			return fmt.Errorf("flush: %w", err)
		}
		r.flushed()
		return nil
	case opCrash:
		return r.crash()
	case opSettle:
		return r.settle()
	case opNotice:
		if !r.b.NoticeFaults {
			return nil
		}
		switch e.a % 3 {
		case 0:
			r.releaseLate()
		default:
			r.mu.Lock()
			r.fault = int(e.a % 3)
			r.mu.Unlock()
		}
		return nil
	}
	return nil
}

// publish appends one message (a fresh id, or a resend of one of the
// sender's earlier ids) and checks the outcome against the model.
func (r *runner) publish(from string, to []string, group, resend bool) error {
	var s *sent
	if olds := r.sent[from]; resend && len(olds) > 0 {
		s = olds[len(olds)-1]
		to = s.to
	} else {
		s = &sent{id: fmt.Sprintf("m%d", len(olds)+1), group: group, to: to, copies: make(map[string]bool)}
		r.sent[from] = append(r.sent[from], s)
	}
	r.attempt++
	attempt := r.attempt
	payload := func(u string) string { return fmt.Sprintf("a%d>%s", attempt, u) }
	req := &queue.Request{Sender: from, ID: s.id}
	if s.group {
		for _, u := range to {
			req.Fanout = append(req.Fanout, queue.Fanout{To: u, Data: []byte(payload(u))})
		}
	} else {
		req.To, req.Data = to[0], []byte(payload(to[0]))
	}
	var full []string
	req.OnFull = func(users []string) { full = slices.Clone(users) }
	type result struct {
		st  queue.Status
		err error
	}
	done := make(chan result, 1)
	req.Done = func(st queue.Status, _ queue.Message, err error) { done <- result{st, err} }
	must, may := make(map[string]int), make(map[string]int)
	for _, u := range to {
		must[u], may[u] = r.queueBounds(u)
	}
	r.mu.Lock()
	r.notices = nil
	r.mu.Unlock()
	r.store.Append(req)
	res := <-done
	// A barrier: the notifications of req all come before the next Done.
	barrier := make(chan struct{})
	r.store.Append(&queue.Request{Done: func(queue.Status, queue.Message, error) { close(barrier) }})
	<-barrier
	r.mu.Lock()
	notices := r.notices
	r.notices = nil
	r.mu.Unlock()

	got := make(map[string]queue.Message)
	for _, n := range notices {
		if _, dup := got[n.user]; dup {
			return fmt.Errorf("two copies of one message for %s", n.user)
		}
		if string(n.m.Data) != payload(n.user) {
			return fmt.Errorf("notification for %s carries %q, want %q", n.user, n.m.Data, payload(n.user))
		}
		got[n.user] = n.m
	}
	switch {
	case res.st == queue.Failed:
		return fmt.Errorf("append failed: %w", res.err)
	case res.st == queue.Duplicate && len(s.copies) == 0:
		return fmt.Errorf("a duplicate of %s/%s, which was never stored", from, s.id)
	case res.st != queue.Stored && len(got) > 0:
		return fmt.Errorf("status %v but %d copies stored", res.st, len(got))
	case res.st == queue.Stored && len(got) == 0:
		return fmt.Errorf("status Stored but no copy stored")
	case res.st != queue.Stored && len(full) > 0:
		return fmt.Errorf("OnFull called for a request of status %v", res.st)
	}
	hadCopies := len(s.copies) > 0
	for _, u := range to {
		m, stored := got[u]
		named := slices.Contains(full, u)
		switch {
		case stored && s.copies[u]:
			return fmt.Errorf("resend of %s/%s stored a second copy for %s", from, s.id, u)
		case stored && hadCopies && !r.b.DedupPerRecipient:
			return fmt.Errorf("resend of %s/%s stored for %s: the whole request is a duplicate", from, s.id, u)
		case stored && must[u] >= r.q.MaxQueueMessages:
			return fmt.Errorf("stored for %s beyond max_queue_messages: %d messages must be kept", u, must[u])
		case stored && named:
			return fmt.Errorf("stored for %s, and OnFull named it", u)
		case stored:
			s.copies[u] = true
			r.addMessage(u, m)
		case res.st == queue.Stored && !s.copies[u] && !named:
			return fmt.Errorf("no copy for %s and OnFull did not name it (named %v)", u, full)
		case (named || res.st == queue.Full && !s.copies[u]) && may[u] < r.q.MaxQueueMessages:
			return fmt.Errorf("%s refused as full, but its queue holds at most %d of %d", u, may[u], r.q.MaxQueueMessages)
		}
	}
	return nil
}

// queueBounds returns how many messages of user's queue the store must
// still hold against max_queue_messages (stored, not expired, not yet
// released) and how many it may hold (stored, not seen deleted, and not
// certainly skipped as expired).
func (r *runner) queueBounds(user string) (must, may int) {
	for _, m := range r.msgs[user] {
		if !m.released && !r.maybeExpired(m) {
			must++
		}
		if !m.gone && (r.b.ExpiredCountTowardsCap || !r.surelyExpired(m)) {
			may++
		}
	}
	return must, may
}

// surelyExpired reports a message past message_ttl by more than the
// store's rounding.
func (r *runner) surelyExpired(m *mmsg) bool {
	return !r.clock.Now().Before(m.stored.Add(r.q.MessageTTL + time.Second))
}

// addMessage records a stored copy and who must get it.
func (r *runner) addMessage(user string, m queue.Message) {
	mm := &mmsg{user: user, seq: m.Seq, payload: string(m.Data), stored: r.clock.Now(),
		holders: make(map[string]bool), acked: make(map[string]bool)}
	noPersistent := !r.hasPersistent(user)
	for name, d := range r.users[user] {
		if d.registered {
			mm.holders[name] = true
		}
	}
	_ = noPersistent
	r.mu.Lock()
	mm.faulted = r.faulted[fmt.Sprintf("%s/%d", user, m.Seq)]
	r.mu.Unlock()
	if n := len(r.msgs[user]); n > 0 && r.msgs[user][n-1].seq >= m.Seq {
		r.t.Logf("note: %s's message %d stored after %d", user, m.Seq, r.msgs[user][n-1].seq)
	}
	i, _ := slices.BinarySearchFunc(r.msgs[user], m.Seq, func(x *mmsg, s uint64) int { return cmpU(x.seq, s) })
	r.msgs[user] = slices.Insert(r.msgs[user], i, mm)
	r.byPay[mm.payload] = mm
}

func cmpU(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// connect opens a connection of a device: a new one, or a takeover of
// its current connection, with the old one ending before or after.
func (r *runner) connect(user, name string, transient, oldEndsFirst bool) error {
	d := r.device(user, name)
	may, err := r.store.MayAttach(user, name)
	if err != nil {
		return fmt.Errorf("may attach: %w", err)
	}
	want := d.registered || r.registered(user) < r.q.MaxDevices
	if may != want {
		return fmt.Errorf("MayAttach(%s/%s) = %v, want %v (%d devices registered)", user, name, may, want, r.registered(user))
	}
	if !may {
		return nil
	}
	old := d.sess
	if old != nil && oldEndsFirst {
		r.end(user, d, old)
		old = nil
		d.sess = nil
	}
	_, subscribed, err := r.store.Attach(user, name, transient)
	if err != nil {
		return fmt.Errorf("attach: %w", err)
	}
	if subscribed && !d.subscribedOnce {
		return fmt.Errorf("%s/%s attached as subscribed, but it never subscribed", user, name)
	}
	if !d.registered {
		// A device new to the store: the whole backlog when the user has no
		// persistent device, what comes from now on otherwise.
		if !r.hasPersistent(user) {
			for _, m := range r.msgs[user] {
				if !m.released {
					m.holders[name] = true
				}
			}
		}
		d.registered, d.persistent = true, !transient
		d.cursor, d.flushed, d.subscribedOnce = 0, 0, false
	} else if !transient && !d.persistent {
		// A transient device becoming persistent has its record, cursor
		// included, written at once; if it is the user's first persistent
		// device, it gets the backlog too.
		if !r.hasPersistent(user) {
			for _, m := range r.msgs[user] {
				if !m.released {
					m.holders[name] = true
					delete(m.acked, name)
				}
			}
			d.cursor = 0
		}
		d.persistent = true
		d.flushed = d.cursor
	}
	d.online++
	d.lastSeen = r.clock.Now()
	d.sess = &msess{sink: &sink{}, pids: make(map[uint16]uint64), acked: make(map[uint64]bool)}
	if subscribed {
		if err := r.start(user, d); err != nil {
			return err
		}
	}
	if old != nil {
		r.end(user, d, old)
	}
	return nil
}

// subscribe starts feeding a connected device, from its cursor.
func (r *runner) subscribe(user, name string) error {
	d := r.users[user][name]
	if d == nil || d.sess == nil || d.sess.dev != nil {
		return nil
	}
	r.store.SetSubscribed(user, name, true)
	d.subscribedOnce = true
	return r.start(user, d)
}

func (r *runner) start(user string, d *mdev) error {
	cursor, err := r.store.Cursor(user, d.name)
	if err != nil {
		return fmt.Errorf("cursor of %s/%s: %w", user, d.name, err)
	}
	dev, err := r.dlv.Start(user, d.name, cursor, window, d.sess.sink)
	if err != nil {
		return fmt.Errorf("start delivery to %s/%s: %w", user, d.name, err)
	}
	d.sess.dev = dev
	return nil
}

// end ends one connection of a device, as the inbox hook does.
func (r *runner) end(user string, d *mdev, s *msess) {
	if s.dev != nil {
		r.dlv.Stop(s.dev)
		s.dev = nil
	}
	r.store.Detach(user, d.name)
	d.online = max(d.online-1, 0)
	if d.online > 0 {
		return
	}
	d.lastSeen = r.clock.Now()
	if !d.persistent {
		r.unregister(user, d)
	}
}

// unregister forgets a device: it no longer holds anything back.
func (r *runner) unregister(user string, d *mdev) {
	d.registered, d.persistent = false, false
	for _, m := range r.msgs[user] {
		delete(m.holders, d.name)
		delete(m.acked, d.name)
	}
}

// ack acknowledges what mask picks of a connection's unacknowledged
// deliveries (all of them for 0), in the order they were sent.
func (r *runner) ack(user, name string, mask byte) error {
	d := r.users[user][name]
	if d == nil || d.sess == nil || d.sess.dev == nil {
		return nil
	}
	if err := r.drain(user, d, d.sess); err != nil {
		return err
	}
	s := d.sess
	var keep []uint16
	for i, pid := range s.unacked {
		if mask != 0 && mask&(1<<(i%8)) == 0 {
			keep = append(keep, pid)
			continue
		}
		seq := s.pids[pid]
		delete(s.pids, pid)
		r.dlv.Acked(s.dev, pid)
		s.acked[seq] = true
		if m := r.msgAt(user, seq); m != nil {
			m.acked[name] = true
		}
	}
	s.unacked = keep
	// The cursor delivery moves: the acknowledged prefix of what was sent.
	for _, seq := range s.seqs {
		if seq <= d.cursor {
			continue
		}
		if !s.acked[seq] {
			break
		}
		d.cursor = seq
	}
	return nil
}

func (r *runner) msgAt(user string, seq uint64) *mmsg {
	ms := r.msgs[user]
	i, ok := slices.BinarySearchFunc(ms, seq, func(x *mmsg, s uint64) int { return cmpU(x.seq, s) })
	if !ok {
		return nil
	}
	return ms[i]
}

// drain takes what delivery wrote to a connection since the last look
// and checks it: known messages, in order, within the window, and not
// one acknowledged before (but after a crash, or across a gap).
func (r *runner) drain(user string, d *mdev, s *msess) error {
	for _, p := range s.sink.since(s.seen) {
		s.seen++
		m := r.byPay[p.payload]
		if m == nil || m.user != user {
			return fmt.Errorf("%s/%s got %q, which is not one of its user's messages", user, d.name, p.payload)
		}
		if _, busy := s.pids[p.pid]; busy {
			return fmt.Errorf("%s/%s got packet ID %d while it is in flight", user, d.name, p.pid)
		}
		if len(s.unacked) >= window {
			return fmt.Errorf("%s/%s got a message beyond its window of %d", user, d.name, window)
		}
		if m.seq <= s.last && !m.faulted {
			return fmt.Errorf("%s/%s got message %d after %d: out of order", user, d.name, m.seq, s.last)
		}
		if m.seq <= d.cursor && !r.b.Sparse {
			return fmt.Errorf("%s/%s got message %d again after acknowledging up to %d", user, d.name, m.seq, d.cursor)
		}
		s.last = max(s.last, m.seq)
		s.seqs = append(s.seqs, m.seq)
		s.pids[p.pid] = m.seq
		s.unacked = append(s.unacked, p.pid)
	}
	return nil
}

// forgetUnseen mirrors the sweep: offline devices unseen for device_ttl
// are forgotten, connected ones are seen now.
func (r *runner) forgetUnseen() {
	now := r.clock.Now()
	before := now.Add(-r.q.DeviceTTL)
	for user, devs := range r.users {
		for _, d := range devs {
			switch {
			case d.online > 0:
				// The sweep marks connected devices seen.
				d.lastSeen = now
			case d.registered && d.lastSeen.Before(before):
				r.unregister(user, d)
			}
		}
	}
}

// flushed notes that every cursor is persisted.
func (r *runner) flushed() {
	for _, devs := range r.users {
		for _, d := range devs {
			d.flushed = d.cursor
		}
	}
}

// crash crashes the store and delivery and reopens them: connections are
// gone without a Detach, cursors are back to their last flush, and a
// transient device is gone (or, where its record is shared, offline).
func (r *runner) crash() error {
	r.dlv.Close()
	if err := r.b.Crash(r.store); err != nil {
		return fmt.Errorf("crash: %w", err)
	}
	r.mu.Lock()
	r.late = nil
	r.fault = 0
	clear(r.lost) // a restarted node reads every queue it feeds
	r.mu.Unlock()
	for user, devs := range r.users {
		// Acknowledgements past the last flush are lost, and with them the
		// right to delete what they released.
		for _, m := range r.msgs[user] {
			if m.gone {
				continue
			}
			m.released = false
			for name := range m.acked {
				if d := devs[name]; d == nil || m.seq > d.flushed {
					delete(m.acked, name)
				}
			}
		}
		for _, d := range devs {
			d.sess, d.old = nil, nil
			d.online = 0
			d.cursor = d.flushed
			if d.registered && !d.persistent && !r.b.TransientSurvivesCrash {
				r.unregister(user, d)
			}
		}
	}
	r.open()
	return nil
}

// releaseLate passes the delayed notifications on, newest first, and
// resyncs delivery when some were lost, as the peers bus does when it
// sees a gap in a peer's notices.
func (r *runner) releaseLate() {
	r.mu.Lock()
	late := r.late
	r.late = nil
	lost := len(r.lost) > 0
	clear(r.lost)
	dlv := r.dlv
	r.mu.Unlock()
	for i := len(late) - 1; i >= 0; i-- {
		dlv.Stored(late[i].user, late[i].m)
	}
	if lost {
		dlv.Resync()
	}
}

// noticePending reports a message whose notification the test holds back
// or lost and has not made up for: delivery need not have found it yet.
func (r *runner) noticePending(m *mmsg) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, n := range r.late {
		if n.user == m.user && n.m.Seq == m.seq {
			return true
		}
	}
	return r.lost[fmt.Sprintf("%s/%d", m.user, m.seq)]
}

// settleTimeout bounds how long delivery may take to bring every online
// device what it must get; shrinking, which replays a failure many
// times, waits less.
const (
	settleTimeout       = 10 * time.Second
	shrinkSettleTimeout = time.Second
)

// settle acknowledges everything delivered until every subscribed
// connection has acknowledged every message it must get.
func (r *runner) settle() error {
	deadline := time.Now().Add(r.settleTimeout)
	for {
		missing, err := r.settleOnce()
		if err != nil || missing == "" {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not delivered within %v: %s", r.settleTimeout, missing)
		}
		time.Sleep(time.Millisecond)
	}
}

// settleOnce acknowledges what is in flight and says what is missing.
func (r *runner) settleOnce() (string, error) {
	var missing []string
	for _, user := range sortedUsers(r.users) {
		for _, name := range sortedDevices(r.users[user]) {
			d := r.users[user][name]
			if d.sess == nil || d.sess.dev == nil {
				continue
			}
			if err := r.ack(user, name, 0); err != nil {
				return "", err
			}
			for _, m := range r.msgs[user] {
				if m.holders[name] && !m.acked[name] && !r.maybeExpired(m) && !r.noticePending(m) {
					missing = append(missing, fmt.Sprintf("%s/%s lacks %d", user, name, m.seq))
				}
			}
		}
	}
	return strings.Join(missing, ", "), nil
}

func sortedUsers(m map[string]map[string]*mdev) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func sortedDevices(m map[string]*mdev) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// touched returns the users whose queues e may change; nil means all.
// Only they are read back after e: only a flush deletes, and an event
// on one user's devices changes no other queue.
func (r *runner) touched(e event) []string {
	switch e.op {
	case opDirect:
		return []string{userName(e.a), userName(e.b)}
	case opGroup:
		return nil
	case opConnect, opSubscribe, opUnsubscribe, opAck, opDisconnect:
		return []string{userName(e.a)}
	}
	return nil
}

// check brings the model's releases up to date and checks the store's
// contents for users (all when none are given): nothing a device must
// still get is deleted, and nothing is there that was never stored.
func (r *runner) check(users ...string) error {
	if len(users) == 0 {
		users = sortedUsers(r.users)
	}
	for _, user := range users {
		d := r.users[user]
		for _, name := range sortedDevices(d) {
			if s := d[name].sess; s != nil {
				if err := r.drain(user, d[name], s); err != nil {
					return err
				}
			}
		}
		r.release(user)
		present, err := r.store.Read(user, 0, 10000)
		if err != nil {
			return fmt.Errorf("read %s: %w", user, err)
		}
		have := make(map[uint64]bool, len(present))
		for _, p := range present {
			m := r.msgAt(user, p.Seq)
			if m == nil {
				return fmt.Errorf("%s's queue holds message %d, which was never stored", user, p.Seq)
			}
			if m.gone {
				return fmt.Errorf("%s's message %d is back after it was deleted", user, p.Seq)
			}
			have[p.Seq] = true
		}
		for _, m := range r.msgs[user] {
			if have[m.seq] || r.maybeExpired(m) || m.gone {
				continue
			}
			if !m.released {
				return fmt.Errorf("%s's message %d was deleted, but %s", user, m.seq, r.waitingFor(m))
			}
			m.gone = true
		}
	}
	return nil
}

// release marks the messages of user the store may now delete: the user
// has a persistent device and every registered holder acknowledged them.
func (r *runner) release(user string) {
	if !r.hasPersistent(user) {
		return
	}
	for _, m := range r.msgs[user] {
		if m.released {
			continue
		}
		done := true
		for name := range m.holders {
			if r.users[user][name].registered && !m.acked[name] {
				done = false
				break
			}
		}
		m.released = done
	}
}

func (r *runner) waitingFor(m *mmsg) string {
	if !r.hasPersistent(m.user) {
		return "the user has no persistent device yet"
	}
	var w []string
	for name := range m.holders {
		if !m.acked[name] {
			w = append(w, name)
		}
	}
	slices.Sort(w)
	return "it is not acknowledged by " + strings.Join(w, ", ")
}

// finish connects every registered persistent device, delivers and
// acknowledges everything, disconnects, flushes, and checks that every
// device got what it must, that nothing released is left behind, and
// that the store keeps no user in memory.
func (r *runner) finish() error {
	r.releaseLate()
	for _, user := range sortedUsers(r.users) {
		for _, name := range sortedDevices(r.users[user]) {
			d := r.users[user][name]
			if !d.registered {
				continue
			}
			if d.sess == nil {
				if err := r.connect(user, name, !d.persistent, false); err != nil {
					return err
				}
			}
			if err := r.subscribe(user, name); err != nil {
				return err
			}
		}
	}
	if err := r.settle(); err != nil {
		return err
	}
	if err := r.check(); err != nil {
		return err
	}
	for _, user := range sortedUsers(r.users) {
		for _, name := range sortedDevices(r.users[user]) {
			if d := r.users[user][name]; d.sess != nil {
				r.end(user, d, d.sess)
				d.sess = nil
			}
		}
	}
	deadline := time.Now().Add(r.settleTimeout)
	for {
		if err := r.store.Flush(); err != nil {
			return fmt.Errorf("flush: %w", err)
		}
		if err := r.check(); err != nil {
			return err
		}
		r.store.EvictIdle()
		left := r.leftBehind()
		if left == "" && r.store.Loaded() == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			if left == "" {
				return fmt.Errorf("%d users kept in memory with no device connected and everything flushed", r.store.Loaded())
			}
			return fmt.Errorf("left behind after every device acknowledged: %s", left)
		}
		time.Sleep(time.Millisecond)
	}
}

// leftBehind lists the messages the store still holds of users who have
// a persistent device, all of whose devices acknowledged everything.
func (r *runner) leftBehind() string {
	var left []string
	for _, user := range sortedUsers(r.users) {
		if !r.hasPersistent(user) {
			continue
		}
		for _, m := range r.msgs[user] {
			if !m.gone && !r.maybeExpired(m) {
				left = append(left, fmt.Sprintf("%s/%d", user, m.seq))
			}
		}
	}
	return strings.Join(left, ", ")
}
