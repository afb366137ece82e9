package hooks

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
)

// presenceOf decodes a presence message as "user on|off".
func presenceOf(t *testing.T, pk packets.Packet) string {
	t.Helper()
	var p struct {
		User   string `json:"user"`
		Online bool   `json:"online"`
	}
	if err := json.Unmarshal(pk.Payload, &p); err != nil {
		t.Fatalf("presence on %s: %v: %s", pk.TopicName, err, pk.Payload)
	}
	if pk.TopicName != "presence/"+p.User {
		t.Fatalf("presence of %s on %s", p.User, pk.TopicName)
	}
	if p.Online {
		return p.User + " on"
	}
	return p.User + " off"
}

// TestPresenceStatesOnSubscribe: a new subscriber to presence topics gets
// the last state of every user its filter matches, as retained QoS 0
// messages, over MQTT 3.1.1 and 5; later changes come live, not
// retained.
func TestPresenceStatesOnSubscribe(t *testing.T) {
	for _, v5 := range []bool{false, true} {
		t.Run(fmt.Sprintf("v5=%v", v5), func(t *testing.T) {
			it := newInboxTest(t, 8)
			it.connect(session{user: "carol"})
			dave := it.connect(session{user: "dave"})
			dave.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}})
			dave.wantClosed()
			it.waitEnded("dave") // and stored offline
			bob := it.connect(session{user: "bob", v5: v5})
			for _, tt := range []struct {
				filter string
				want   []string
			}{
				{"presence/carol", []string{"carol on"}},
				{"presence/erin", nil},
				{"presence/+", []string{"bob on", "carol on", "dave off"}},
			} {
				bob.subscribe(1, tt.filter)
				var got []string
				for _, pk := range bob.held {
					if !pk.FixedHeader.Retain || pk.FixedHeader.Qos != 0 {
						t.Fatalf("%s: state on %s retain %v qos %d", tt.filter, pk.TopicName, pk.FixedHeader.Retain, pk.FixedHeader.Qos)
					}
					got = append(got, presenceOf(t, pk))
				}
				bob.held = nil
				if !slices.Equal(got, tt.want) {
					t.Fatalf("subscribing to %s sent %q, want %q", tt.filter, got, tt.want)
				}
			}
			it.connect(session{user: "erin"})
			pk := bob.readType(packets.Publish)
			if got := presenceOf(t, pk); got != "erin on" || pk.FixedHeader.Retain {
				t.Fatalf("live change: %s, retain %v", got, pk.FixedHeader.Retain)
			}
		})
	}
}

// TestPresenceRetainHandling: an MQTT 5 subscription that asks for no
// retained messages (Retain Handling 2) gets no stored states.
func TestPresenceRetainHandling(t *testing.T) {
	it := newInboxTest(t, 8)
	it.connect(session{user: "carol"})
	bob := it.connect(session{user: "bob", v5: true})
	bob.send(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1},
		PacketID:    1,
		Filters:     packets.Subscriptions{{Filter: "presence/carol", Qos: 0, RetainHandling: 2}},
	})
	if pk := bob.read(); pk.FixedHeader.Type != packets.Suback || len(pk.ReasonCodes) != 1 || pk.ReasonCodes[0] != 0 {
		t.Fatalf("got packet type %d codes %v, want only a SUBACK granting QoS 0", pk.FixedHeader.Type, pk.ReasonCodes)
	}
	bob.subscribe(2, "inbox/bob") // answered next: nothing was sent in between
}

// failingStates is a presence store whose reads fail.
type failingStates struct{}

func (failingStates) Retained(string, func(string, []byte) error) error {
	return errors.New("disk read failed")
}

// TestPresenceReadErrorClosesConnection: a subscriber whose states cannot
// be read is disconnected rather than left without them.
func TestPresenceReadErrorClosesConnection(t *testing.T) {
	it := newInboxTestWith(t, 8, failingStates{})
	bob := it.connect(session{user: "bob"})
	bob.send(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1},
		PacketID:    1,
		Filters:     packets.Subscriptions{{Filter: "presence/carol", Qos: 0}},
	})
	bob.wantClosed()
}
