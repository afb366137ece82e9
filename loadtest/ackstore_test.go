package loadtest

import (
	"io"
	"sync"
	"testing"

	"github.com/eclipse/paho.mqtt.golang/packets"
)

// TestAckStoreSharesNothingWithWriter plays paho's reconnection: the
// writer encodes the publish it was handed while resume reads the store
// and marks the copy it got as a duplicate. Under -race this fails if the
// store keeps, or hands out, the packet the writer encodes.
func TestAckStoreSharesNothingWithWriter(t *testing.T) {
	var acked []uint64
	s := newAckStore(streamTag, func(seq uint64) { acked = append(acked, seq) })
	s.Open()
	pub := packets.NewControlPacket(packets.Publish).(*packets.PublishPacket)
	pub.Qos, pub.MessageID, pub.TopicName = 1, 7, "u/bob/inbox"
	pub.Payload = []byte(`{"id":"` + streamTag + `-42"}`)
	const key = outboundPrefix + "7"
	s.Put(key, pub)

	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // the new connection's writer, holding the queued packet
		defer wg.Done()
		for range 100 {
			if err := pub.Write(io.Discard); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	var resent []*packets.PublishPacket
	go func() { // resume, reading the store
		defer wg.Done()
		for range 100 {
			p := s.Get(key).(*packets.PublishPacket)
			p.Dup = true
			resent = append(resent, p)
		}
	}()
	wg.Wait()

	if pub.Dup {
		t.Error("resume's Dup reached the packet the writer holds")
	}
	// Without -race too: the writer's RemainingLength (set by Write) never
	// reaches the store's copy, taken before the writer had the packet.
	if pub.RemainingLength == 0 || s.Get(key).(*packets.PublishPacket).RemainingLength != 0 {
		t.Errorf("RemainingLength %d written, the store's copy has %d: want the copy untouched",
			pub.RemainingLength, s.Get(key).(*packets.PublishPacket).RemainingLength)
	}
	for i, p := range resent {
		if p == pub || (i > 0 && p == resent[i-1]) {
			t.Fatalf("Get %d returned a shared packet", i)
		}
	}
	if !s.holds(42) {
		t.Fatalf("store does not hold message 42")
	}
	s.Del(key)
	if len(acked) != 1 || acked[0] != 42 || s.pending() != 0 {
		t.Errorf("acked %v, pending %d: want [42], 0", acked, s.pending())
	}
}
