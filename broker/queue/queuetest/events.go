package queuetest

import (
	"fmt"
	"math/rand/v2"
	"strings"
)

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
	opRemove                    // user a, device b: its user removes it (closing its connection)
	opErase                     // user a: the account is erased (devices, queue, what it sent)
	numOps
)

var opNames = [...]string{"direct", "group", "connect", "subscribe", "unsubscribe", "ack", "disconnect", "advance", "flush", "crash", "settle", "notice", "remove", "erase"}

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
	case opErase:
		return "erase " + u
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
		{opAck, 18}, {opDisconnect, 7}, {opAdvance, 3}, {opFlush, 6}, {opCrash, 2}, {opSettle, 4}, {opRemove, 2}, {opErase, 1},
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
