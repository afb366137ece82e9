package loadtest

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
)

// Packets whose MQTT 5 reason codes the report counts.
const (
	packetConnack    = "CONNACK"
	packetPuback     = "PUBACK"
	packetSuback     = "SUBACK"
	packetDisconnect = "DISCONNECT"
)

// ReasonCount is how many times the broker answered with one MQTT 5
// reason code in one kind of packet.
type ReasonCount struct {
	// Packet is the packet that carried the code: CONNACK, PUBACK, SUBACK
	// or DISCONNECT (sent by the server).
	Packet string `json:"packet"`
	// Code is the reason code.
	Code byte `json:"code"`
	// Name is the code's name in the MQTT 5 specification.
	Name string `json:"name"`
	// Count is how many packets carried it.
	Count int64 `json:"count"`
}

// Hex writes the code as the specification does, 0x97.
func (r ReasonCount) Hex() string { return fmt.Sprintf("0x%02X", r.Code) }

// reasonNames are the MQTT 5 specification's names of the reason codes
// (section 2.4) a server sends; 0x00 is named per packet by reasonName.
var reasonNames = map[byte]string{
	0x01: "granted QoS 1",
	0x02: "granted QoS 2",
	0x04: "disconnect with will message",
	0x10: "no matching subscribers",
	0x80: "unspecified error",
	0x81: "malformed packet",
	0x82: "protocol error",
	0x83: "implementation specific error",
	0x84: "unsupported protocol version",
	0x85: "client identifier not valid",
	0x86: "bad user name or password",
	0x87: "not authorized",
	0x88: "server unavailable",
	0x89: "server busy",
	0x8A: "banned",
	0x8B: "server shutting down",
	0x8C: "bad authentication method",
	0x8D: "keep alive timeout",
	0x8E: "session taken over",
	0x8F: "topic filter invalid",
	0x90: "topic name invalid",
	0x91: "packet identifier in use",
	0x93: "receive maximum exceeded",
	0x94: "topic alias invalid",
	0x95: "packet too large",
	0x96: "message rate too high",
	0x97: "quota exceeded",
	0x98: "administrative action",
	0x99: "payload format invalid",
	0x9A: "retain not supported",
	0x9B: "QoS not supported",
	0x9C: "use another server",
	0x9D: "server moved",
	0x9E: "shared subscriptions not supported",
	0x9F: "connection rate exceeded",
	0xA0: "maximum connect time",
	0xA1: "subscription identifiers not supported",
	0xA2: "wildcard subscriptions not supported",
}

// reasonName names code as carried by packet.
func reasonName(packet string, code byte) string {
	if code == 0 {
		switch packet {
		case packetDisconnect:
			return "normal disconnection"
		case packetSuback:
			return "granted QoS 0"
		}
		return "success"
	}
	if n, ok := reasonNames[code]; ok {
		return n
	}
	return "unknown"
}

// reasonKey names one counter of reasonCounts.
type reasonKey struct {
	packet string
	code   byte
}

// reasonCounts counts the reason codes the MQTT 5 phones of a run received.
type reasonCounts struct {
	mu sync.Mutex
	n  map[reasonKey]int64
}

// add counts one packet carrying code.
func (rc *reasonCounts) add(packet string, code byte) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if rc.n == nil {
		rc.n = make(map[reasonKey]int64)
	}
	rc.n[reasonKey{packet, code}]++
}

// list returns the counts, sorted (see sortReasons); nil when there are none.
func (rc *reasonCounts) list() []ReasonCount {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	var out []ReasonCount
	for k, n := range rc.n {
		out = append(out, ReasonCount{Packet: k.packet, Code: k.code, Name: reasonName(k.packet, k.code), Count: n})
	}
	sortReasons(out)
	return out
}

// sortReasons orders reason counts by packet, then code.
func sortReasons(rs []ReasonCount) {
	slices.SortFunc(rs, func(a, b ReasonCount) int {
		return cmp.Or(strings.Compare(a.Packet, b.Packet), cmp.Compare(a.Code, b.Code))
	})
}

// addReasons returns the reason counts of a and b summed, sorted.
func addReasons(a, b []ReasonCount) []ReasonCount {
	out := slices.Clone(a)
	for _, r := range b {
		i := slices.IndexFunc(out, func(o ReasonCount) bool { return o.Packet == r.Packet && o.Code == r.Code })
		if i < 0 {
			out = append(out, r)
			continue
		}
		out[i].Count += r.Count
	}
	sortReasons(out)
	return out
}

// ProtocolStats tells which MQTT versions the phones of a run spoke, and
// what the MQTT 5 ones agreed with the broker.
type ProtocolStats struct {
	// MQTT311 is the phones that spoke MQTT 3.1.1 and connected.
	MQTT311 int64 `json:"mqtt311_clients"`
	// MQTT5 is the phones that spoke MQTT 5 and connected.
	MQTT5 int64 `json:"mqtt5_clients"`
	// ReceiveMaximum is the Receive Maximum the MQTT 5 phones sent in
	// CONNECT, 0 for none (the protocol's default, 65535).
	ReceiveMaximum int `json:"receive_maximum,omitempty"`
	// GrantedMin is the smallest Receive Maximum a broker's CONNACK gave
	// an MQTT 5 phone (65535 when it gave none), 0 when no MQTT 5 phone
	// connected: how many of its publishes the phone may have unacknowledged.
	GrantedMin int `json:"granted_receive_maximum_min,omitempty"`
	// GrantedMax is the largest.
	GrantedMax int `json:"granted_receive_maximum_max,omitempty"`
}

// protocolStats gathers ProtocolStats as the phones connect.
type protocolStats struct {
	v3, v5                 atomic.Int64
	grantedMin, grantedMax atomic.Int64
}

// granted records the Receive Maximum of one CONNACK.
func (p *protocolStats) granted(n int) {
	v := int64(n)
	storeMax(&p.grantedMax, v)
	for {
		cur := p.grantedMin.Load()
		if (cur != 0 && cur <= v) || p.grantedMin.CompareAndSwap(cur, v) {
			return
		}
	}
}

// addProtocols sums the protocol figures of two shares of a run.
func addProtocols(a, b ProtocolStats) ProtocolStats {
	out := ProtocolStats{
		MQTT311:        a.MQTT311 + b.MQTT311,
		MQTT5:          a.MQTT5 + b.MQTT5,
		ReceiveMaximum: max(a.ReceiveMaximum, b.ReceiveMaximum),
		GrantedMax:     max(a.GrantedMax, b.GrantedMax),
		GrantedMin:     a.GrantedMin,
	}
	if out.GrantedMin == 0 || (b.GrantedMin != 0 && b.GrantedMin < out.GrantedMin) {
		out.GrantedMin = b.GrantedMin
	}
	return out
}
