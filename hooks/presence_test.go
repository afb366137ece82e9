package hooks

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/chatd/chatd/broker/presence"
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
			// A SUBACK comes after the session's hooks, presence included,
			// have run: carol is online once hers is read.
			it.connect(session{user: "carol"}).subscribe(1, "inbox/carol")
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

// TestPresenceRetainHandling: MQTT 5's Retain Handling 0 sends the
// stored states at every SUBSCRIBE, 1 only when the subscription is new,
// 2 never.
func TestPresenceRetainHandling(t *testing.T) {
	it := newInboxTest(t, 8)
	it.connect(session{user: "carol"}).subscribe(1, "inbox/carol")
	bob := it.connect(session{user: "bob", v5: true})
	for i, tt := range []struct {
		filter   string
		handling byte
		want     int // states sent
	}{
		{"presence/carol", 2, 0},
		{"presence/carol", 0, 1}, // existing, sent anyway
		{"presence/carol", 1, 0}, // existing
		{"presence/+", 1, 2},     // new: carol and bob
		{"presence/+", 1, 0},
	} {
		pid := uint16(i + 1)
		bob.send(packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1},
			PacketID:    pid,
			Filters:     packets.Subscriptions{{Filter: tt.filter, Qos: 0, RetainHandling: tt.handling}},
		})
		got := 0
		for {
			pk := bob.read()
			if pk.FixedHeader.Type == packets.Suback {
				if pk.PacketID != pid || len(pk.ReasonCodes) != 1 || pk.ReasonCodes[0] != 0 {
					t.Fatalf("SUBACK id %d codes %v", pk.PacketID, pk.ReasonCodes)
				}
				break
			}
			if pk.FixedHeader.Type != packets.Publish || !pk.FixedHeader.Retain {
				t.Fatalf("packet type %d retain %v before the SUBACK", pk.FixedHeader.Type, pk.FixedHeader.Retain)
			}
			got++
		}
		if got != tt.want {
			t.Fatalf("%s with Retain Handling %d sent %d states, want %d", tt.filter, tt.handling, got, tt.want)
		}
	}
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

// TestPresenceManyStates: a SUBSCRIBE with several presence filters gets
// the states of each, as many as fill more than one write.
func TestPresenceManyStates(t *testing.T) {
	it := newInboxTest(t, 8)
	const users = 1500 // about 100 KiB of states, more than one chunk
	tr := presence.New(it.store.DB(), func(string, []byte, bool, byte) error { return nil }, nil, slog.New(slog.DiscardHandler))
	for i := range users {
		tr.Connected(fmt.Sprintf("u%04d", i))
	}
	bob := it.connect(session{user: "bob"})
	bob.send(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1},
		PacketID:    1,
		Filters:     packets.Subscriptions{{Filter: "presence/+", Qos: 0}, {Filter: "presence/u0007", Qos: 0}},
	})
	seen := make(map[string]int)
	for {
		pk := bob.read()
		if pk.FixedHeader.Type == packets.Suback {
			if len(pk.ReasonCodes) != 2 || pk.ReasonCodes[0] != 0 || pk.ReasonCodes[1] != 0 {
				t.Fatalf("SUBACK codes %v", pk.ReasonCodes)
			}
			break
		}
		if pk.FixedHeader.Type != packets.Publish || !pk.FixedHeader.Retain {
			t.Fatalf("packet type %d retain %v before the SUBACK", pk.FixedHeader.Type, pk.FixedHeader.Retain)
		}
		seen[presenceOf(t, pk)]++
	}
	if len(seen) != users+1 || seen["u0007 on"] != 2 || seen["u1499 on"] != 1 || seen["bob on"] != 1 {
		t.Fatalf("%d states (u0007 %d times, u1499 %d, bob %d), want %d, u0007 twice", len(seen), seen["u0007 on"], seen["u1499 on"], seen["bob on"], users+1)
	}
}
