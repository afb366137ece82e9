package msgpath

import (
	"bytes"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/chatd/chatd/broker/queue"
)

func TestReadReceiptForwarded(t *testing.T) {
	pt := newPathTest(t, pathConfig{})
	alice := pt.subscribe(conn{user: "alice", v5: true})
	bob := pt.open(conn{user: "bob"})
	receipt := `{"status":"read","ids":["m1","m2"]}`
	pt.publish(bob, 4, "receipt/alice", receipt)
	// The same receipt again, as from bob's other device or after a
	// reconnect: acknowledged, queued once.
	pt.publish(bob, 5, "receipt/alice", receipt)
	acks := bob.conn.waitPackets(t, packets.Puback, 2)
	wantPuback(t, acks[0], 4, 0)
	wantPuback(t, acks[1], 5, 0)

	pk := alice.conn.waitPackets(t, packets.Publish, 1)[0]
	e := decodeEvent(t, pk.Payload)
	if pk.TopicName != "inbox/alice" || e.Kind != "receipt" || e.Status != "read" || e.By != "bob" ||
		!slices.Equal(e.IDs, []string{"m1", "m2"}) || e.TS != testNow.UnixMilli() {
		t.Fatalf("alice got %s on %q", pk.Payload, pk.TopicName)
	}
	if h := pt.head("alice"); h != 1 {
		t.Fatalf("alice's queue head %d, want the receipt stored once", h)
	}
}

// TestDeliveredReceipts: once a device acknowledges messages, each sender
// gets one delivered receipt with its ids, when receipts are on. The
// receipts carry no Meta, so acknowledging them sends nothing back.
func TestDeliveredReceipts(t *testing.T) {
	for _, on := range []bool{true, false} {
		name := "off"
		if on {
			name = "on"
		}
		t.Run(name, func(t *testing.T) {
			pt := newPathTest(t, pathConfig{opts: func(o *Options) { o.Receipts = on }})
			bob := pt.subscribe(conn{user: "bob", v5: true})
			alice := pt.subscribe(conn{user: "alice"})
			carol := pt.subscribe(conn{user: "carol", v5: true})
			pt.publish(alice, 1, "inbox/bob", `{"id":"m1"}`)
			pt.publish(alice, 2, "inbox/bob", `{"id":"m2"}`)
			alice.conn.waitPackets(t, packets.Puback, 2)
			pt.publish(carol, 1, "inbox/bob", `{"id":"m3"}`)
			carol.conn.waitPackets(t, packets.Puback, 1)
			pubs := bob.conn.waitPackets(t, packets.Publish, 3)
			// Acknowledged last to first: the cursor passes all three at
			// the last PUBACK, one batch.
			for i := len(pubs) - 1; i >= 0; i-- {
				pt.p.Acked(bob.s, pubs[i].PacketID)
			}
			// The acknowledgement reached the store before any receipt.
			if c, err := pt.store.Cursor("bob", ""); err != nil || c != 3 {
				t.Fatalf("bob's cursor %d (%v), want 3", c, err)
			}

			if on {
				for _, want := range []struct {
					cl  *client
					ids []string
				}{{alice, []string{"m1", "m2"}}, {carol, []string{"m3"}}} {
					pk := want.cl.conn.waitPackets(t, packets.Publish, 1)[0]
					e := decodeEvent(t, pk.Payload)
					if e.Kind != "receipt" || e.Status != "delivered" || e.By != "bob" || !slices.Equal(e.IDs, want.ids) {
						t.Fatalf("receipt %s, want ids %v", pk.Payload, want.ids)
					}
					pt.p.Acked(want.cl.s, pk.PacketID)
				}
			}
			// Close queues every receipt handed over; the store is open.
			pt.p.Close()
			wantHeads := map[string]uint64{"alice": 0, "carol": 0, "bob": 3}
			if on {
				wantHeads["alice"], wantHeads["carol"] = 1, 1
			}
			for user, want := range wantHeads {
				if h := pt.head(user); h != want {
					t.Fatalf("%s's queue head %d, want %d", user, h, want)
				}
			}
		})
	}
}

// holdStore holds back the Append of the requests hold selects until
// release is closed, and tells held of each as it starts waiting.
type holdStore struct {
	queue.Store
	hold    func(*queue.Request) bool
	held    chan struct{}
	release chan struct{}
}

func (s *holdStore) Append(r *queue.Request) {
	if s.hold(r) {
		s.held <- struct{}{}
		<-s.release
	}
	s.Store.Append(r)
}

// TestCloseQueuesHandedOverReceipts: receipts delivery handed to the path
// before Close are queued before Close returns, while the store is still
// open, even those waiting behind a slow Append.
func TestCloseQueuesHandedOverReceipts(t *testing.T) {
	hs := &holdStore{
		hold: func(r *queue.Request) bool {
			return r.To == "alice" && bytes.Contains(r.Data, []byte(`"status":"delivered"`))
		},
		held:    make(chan struct{}, 3),
		release: make(chan struct{}),
	}
	pt := newPathTest(t, pathConfig{
		opts: func(o *Options) { o.Receipts = true },
		wrap: func(s queue.Store) queue.Store { hs.Store = s; return hs },
	})
	bob := pt.subscribe(conn{user: "bob", v5: true})
	alice := pt.open(conn{user: "alice", v5: true})
	for i, id := range []string{"m1", "m2", "m3"} {
		pt.publish(alice, uint16(i+1), "inbox/bob", `{"id":"`+id+`"}`)
	}
	alice.conn.waitPackets(t, packets.Puback, 3)
	pubs := bob.conn.waitPackets(t, packets.Publish, 3)

	// The first receipt holds the receipts goroutine in Append; the next
	// two wait in the channel.
	pt.p.Acked(bob.s, pubs[0].PacketID)
	select {
	case <-hs.held:
	case <-time.After(wait):
		t.Fatal("the first delivered receipt was not appended")
	}
	pt.p.Acked(bob.s, pubs[1].PacketID)
	pt.p.Acked(bob.s, pubs[2].PacketID)
	if n := len(pt.p.delivered); n != 2 {
		t.Fatalf("%d receipts wait in the channel, want 2", n)
	}

	closed := make(chan struct{})
	go func() {
		pt.p.Close()
		close(closed)
	}()
	select {
	case <-pt.p.stop:
	case <-time.After(wait):
		t.Fatal("Close did not stop the receipts goroutine")
	}
	select {
	case <-closed:
		t.Fatal("Close returned while a receipt was still being appended")
	default:
	}
	close(hs.release)
	select {
	case <-closed:
	case <-time.After(wait):
		t.Fatal("Close did not return")
	}

	var ids []string
	for _, e := range pt.queued("alice") {
		if e.Status != "delivered" || e.By != "bob" || len(e.IDs) != 1 {
			t.Fatalf("alice has %+v, want one delivered receipt per batch", e)
		}
		ids = append(ids, e.IDs[0])
	}
	if !slices.Equal(ids, []string{"m1", "m2", "m3"}) {
		t.Fatalf("delivered receipts queued for %v, want m1, m2, m3", ids)
	}
}

func TestTypingIsNotStored(t *testing.T) {
	for _, qos := range []byte{0, 1} {
		for _, v5 := range []bool{true, false} {
			t.Run(protoName(v5)+"/qos"+strconv.Itoa(int(qos)), func(t *testing.T) {
				pt := newPathTest(t, pathConfig{})
				bob := pt.subscribe(conn{user: "bob", v5: v5})
				carol := pt.open(conn{user: "carol"}) // connected, not subscribed
				alice := pt.open(conn{user: "alice", v5: v5})
				pt.p.Publish(alice.s, Publish{Topic: "typing/bob", Payload: []byte(`{}`), PacketID: 8, QoS: qos})
				pt.p.Publish(alice.s, Publish{Topic: "typing/carol", Payload: []byte(`{}`), PacketID: 9, QoS: qos})
				pt.p.Publish(alice.s, Publish{Topic: "typing/dave", Payload: []byte(`{}`), PacketID: 10, QoS: qos})

				pk := bob.conn.waitPackets(t, packets.Publish, 1)[0]
				e := decodeEvent(t, pk.Payload)
				if pk.TopicName != "inbox/bob" || pk.FixedHeader.Qos != 0 || pk.PacketID != 0 ||
					e.Kind != "typing" || e.From != "alice" || e.TS != testNow.UnixMilli() {
					t.Fatalf("typing signal %s on %q qos %d", pk.Payload, pk.TopicName, pk.FixedHeader.Qos)
				}
				for _, user := range []string{"bob", "carol", "dave"} {
					if h := pt.head(user); h != 0 {
						t.Fatalf("a typing signal was stored for %s", user)
					}
				}
				carol.s.w.Wait()
				if n := len(carol.conn.packets()); n != 0 {
					t.Fatalf("carol, not subscribed, got %d packets", n)
				}
				alice.s.w.Wait()
				acks := alice.conn.ofType(packets.Puback)
				if qos == 0 {
					if len(acks) != 0 {
						t.Fatalf("QoS 0 typing answered with %d PUBACKs", len(acks))
					}
					return
				}
				if len(acks) != 3 {
					t.Fatalf("QoS 1 typing answered with %d PUBACKs, want 3", len(acks))
				}
				for i, ack := range acks {
					wantPuback(t, ack, uint16(8+i), 0)
				}
			})
		}
	}
}
