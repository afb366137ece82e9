package queuetest

import (
	"encoding/hex"
	"flag"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chatd/chatd/broker/msgpath/delivery"
	"github.com/chatd/chatd/broker/queue"
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
	// erased is set once its sender was erased: its dedup key may be
	// gone, so it is never sent again.
	erased bool
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
	q             queue.Settings
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
	// told are the messages the store said it deleted as acknowledged by
	// every device, not yet checked; toldBefore those checked.
	told       []notice
	toldBefore map[*mmsg]bool
}

// onDeleted records what the store says it deleted (Options.OnDeleted).
func (r *runner) onDeleted(user string, msgs []queue.Message) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, m := range msgs {
		r.told = append(r.told, notice{user, m})
	}
}

func runEvents(t testing.TB, b Backend, name string, data []byte, settle time.Duration) (err error) {
	r := &runner{
		t: t, b: b, name: name, q: testQueue(), settleTimeout: settle,
		clock: NewClock(time.Now().Truncate(time.Second)),
		users: make(map[string]map[string]*mdev), msgs: make(map[string][]*mmsg),
		byPay: make(map[string]*mmsg), sent: make(map[string][]*sent),
		faulted: make(map[string]bool), lost: make(map[string]bool), toldBefore: make(map[*mmsg]bool),
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
	r.store = r.b.Open(r.t, r.name, r.q, r.clock.Now, r.onDeleted)
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
	case opRemove:
		return r.remove(user, dev)
	case opErase:
		return r.erase(user)
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
