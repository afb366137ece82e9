package loadtest

import (
	"bytes"
	"maps"
	"slices"
	"strings"
	"sync"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"
)

// outboundPrefix is how paho names the store keys of outbound packets.
const outboundPrefix = "o."

// ackStore is a paho Store that reports each outbound publish of this run
// when the broker's PUBACK removes it from the store.
//
// Publish tokens cannot tell that: when paho resends a stored publish after
// a reconnect it completes the original token without error before any
// PUBACK has arrived. The store, on the other hand, keeps a publish until
// its PUBACK is read, and paho resends it from there, so the moment of
// deletion is the moment of acknowledgement, whichever connection carried it.
type ackStore struct {
	mqtt.Store
	tag   string
	onAck func(seq uint64)

	mu   sync.Mutex
	keys map[string]uint64   // store key -> sequence number
	seqs map[uint64]struct{} // sequence numbers held
}

func newAckStore(tag string, onAck func(seq uint64)) *ackStore {
	return &ackStore{
		Store: mqtt.NewOrderedMemoryStore(), // resends in the original order
		tag:   tag,
		onAck: onAck,
		keys:  make(map[string]uint64),
		seqs:  make(map[uint64]struct{}),
	}
}

// Put stores a packet, a publish as a private copy, and remembers which
// message an outbound publish carries.
//
// paho v1.5.1 stores the very packet it then queues for its writer, and
// the writer sets the packet's RemainingLength as it encodes it. Its
// resume reads the store on a reconnection while the new connection's
// writer may be encoding the queued packet: a data race (TestRunCrash
// under CI load). Put runs in the publishing goroutine before the packet
// is queued, so copying here is safe, and the copy is never written.
func (s *ackStore) Put(key string, m packets.ControlPacket) {
	if p, ok := m.(*packets.PublishPacket); ok {
		if strings.HasPrefix(key, outboundPrefix) {
			if seq, ok := parseID(leadingID(p.Payload), s.tag); ok {
				s.mu.Lock()
				s.keys[key] = seq
				s.seqs[seq] = struct{}{}
				s.mu.Unlock()
			}
		}
		m = clonePublish(p)
	}
	s.Store.Put(key, m)
}

// Get returns a stored packet, a publish as a copy: paho's resume sets
// the Dup flag of what Get returns and queues it for a writer, which
// must not share it with the next reconnection's resume.
func (s *ackStore) Get(key string) packets.ControlPacket {
	m := s.Store.Get(key)
	if p, ok := m.(*packets.PublishPacket); ok {
		return clonePublish(p)
	}
	return m
}

// clonePublish returns a copy of p whose header can be written without
// touching p's; the payload, only ever read, is shared.
func clonePublish(p *packets.PublishPacket) *packets.PublishPacket {
	c := *p
	return &c
}

// Del removes a packet; for an outbound publish of this run that is its PUBACK.
func (s *ackStore) Del(key string) {
	s.mu.Lock()
	seq, ok := s.keys[key]
	if ok {
		delete(s.keys, key)
		delete(s.seqs, seq)
	}
	s.mu.Unlock()
	s.Store.Del(key)
	if ok {
		s.onAck(seq)
	}
}

// Reset empties the store, as paho does for a clean session.
func (s *ackStore) Reset() {
	s.mu.Lock()
	clear(s.keys)
	clear(s.seqs)
	s.mu.Unlock()
	s.Store.Reset()
}

// holds reports whether message seq waits in the store for its PUBACK, so
// that paho will (re)send it.
func (s *ackStore) holds(seq uint64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.seqs[seq]
	return ok
}

// held returns the messages that wait in the store for their PUBACK.
func (s *ackStore) held() []uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Collect(maps.Keys(s.seqs))
}

// pending returns how many publishes wait for their PUBACK.
func (s *ackStore) pending() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.keys)
}

// leadingID returns the id of a payload written by appendMessage, whose
// first member is always "id", without scanning the padding.
func leadingID(payload []byte) []byte {
	rest, ok := bytes.CutPrefix(payload, []byte(`{"id":"`))
	if !ok {
		return nil
	}
	end := bytes.IndexByte(rest, '"')
	if end < 0 {
		return nil
	}
	return rest[:end]
}
