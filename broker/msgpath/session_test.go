package msgpath

import (
	"strconv"
	"strings"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/chatd/chatd/broker/queue"
)

// wantNotFed fails t if device of user is being fed, or its connection
// got a message.
func (pt *pathTest) wantNotFed(cl *client, user, device string) {
	pt.t.Helper()
	pt.barrier() // OnStored of every publish made has run
	if _, _, ok := pt.p.Window(user, device); ok {
		pt.t.Fatalf("device %q of %s is fed", device, user)
	}
	cl.s.w.Wait()
	if n := len(cl.conn.ofType(packets.Publish)); n != 0 {
		pt.t.Fatalf("device %q of %s got %d messages", device, user, n)
	}
}

// TestOpenResumesSubscribedDevice: a persistent device subscribed on an
// earlier connection is fed as soon as it connects again, since the
// subscription is kept with the device; a transient device is forgotten
// with its subscription.
func TestOpenResumesSubscribedDevice(t *testing.T) {
	cases := []struct {
		name      string
		transient bool
	}{
		{"persistent", false},
		{"transient", true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			pt := newPathTest(t, pathConfig{})
			bob := conn{user: "bob", device: "phone", transient: c.transient}
			pt.p.End(pt.subscribe(bob).s)
			alice := pt.open(conn{user: "alice"})
			pt.publish(alice, 1, "inbox/bob", `{"id":"m1"}`)
			alice.conn.waitPackets(t, packets.Puback, 1)

			again := pt.open(bob)
			if c.transient {
				pt.wantNotFed(again, "bob", "phone")
				// A new transient device of a user with no persistent one
				// gets the backlog once it subscribes.
				if err := pt.p.Subscribe(again.s); err != nil {
					t.Fatal(err)
				}
			}
			pk := again.conn.waitPackets(t, packets.Publish, 1)[0]
			if e := decodeEvent(t, pk.Payload); e.From != "alice" || string(e.Msg) != `{"id":"m1"}` {
				t.Fatalf("resumed delivery: %s", pk.Payload)
			}
		})
	}
}

func TestUnsubscribeStopsDelivery(t *testing.T) {
	pt := newPathTest(t, pathConfig{})
	bobConn := conn{user: "bob", device: "phone"}
	bob := pt.subscribe(bobConn)
	pt.p.Unsubscribe(bob.s)
	pt.p.Unsubscribe(bob.s) // twice does nothing more
	alice := pt.open(conn{user: "alice"})
	pt.publish(alice, 1, "inbox/bob", `{"id":"m1"}`)
	alice.conn.waitPackets(t, packets.Puback, 1)
	pt.wantNotFed(bob, "bob", "phone")
	if sent := pt.p.Stats().Sent; sent != 0 {
		t.Fatalf("delivery sent %d messages", sent)
	}

	// Unsubscribed is kept with the device: its next connection is not
	// fed either until it subscribes, and then gets what waited.
	pt.p.End(bob.s)
	again := pt.open(bobConn)
	pt.wantNotFed(again, "bob", "phone")
	if err := pt.p.Subscribe(again.s); err != nil {
		t.Fatal(err)
	}
	if err := pt.p.Subscribe(again.s); err != nil { // twice does nothing more
		t.Fatal(err)
	}
	pk := again.conn.waitPackets(t, packets.Publish, 1)[0]
	if e := decodeEvent(t, pk.Payload); string(e.Msg) != `{"id":"m1"}` {
		t.Fatalf("delivery after subscribing again: %s", pk.Payload)
	}
	if st := pt.p.Stats(); st.Sent != 1 {
		t.Fatalf("delivery sent %d messages, want 1", st.Sent)
	}
}

// TestEndDetaches: End stops feeding the device and tells the store and
// presence the connection is gone; a transient device is forgotten once
// its last connection ends, a persistent one is kept.
func TestEndDetaches(t *testing.T) {
	cases := []struct {
		name      string
		transient bool
	}{
		{"persistent", false},
		{"transient", true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			pt := newPathTest(t, pathConfig{})
			bobConn := conn{user: "bob", device: "phone", transient: c.transient}
			older := pt.subscribe(bobConn)
			// A takeover: the newer connection is opened before the
			// older one ends.
			newer := pt.subscribe(bobConn)
			pt.p.End(older.s)
			if _, err := pt.store.Cursor("bob", "phone"); err != nil {
				t.Fatalf("the device went with its older connection: %v", err)
			}
			if !pt.presence.Online("bob") {
				t.Fatal("bob went offline with his older connection")
			}

			pt.p.End(newer.s)
			_, err := pt.store.Cursor("bob", "phone")
			if c.transient != (err != nil) {
				t.Fatalf("after the last connection of a transient=%v device ended, its cursor: %v", c.transient, err)
			}
			if pt.presence.Online("bob") {
				t.Fatal("bob is online with no connection")
			}
			ann := pt.announced.all()
			if last := ann[len(ann)-1]; !strings.HasPrefix(last, `presence/bob {"user":"bob","online":false`) {
				t.Fatalf("last presence announced: %q", last)
			}

			alice := pt.open(conn{user: "alice"})
			pt.publish(alice, 1, "inbox/bob", `{"id":"m1"}`)
			alice.conn.waitPackets(t, packets.Puback, 1)
			pt.wantNotFed(older, "bob", "phone")
			pt.wantNotFed(newer, "bob", "phone")
			if n := len(older.conn.closes()) + len(newer.conn.closes()); n != 0 {
				t.Fatalf("End closed %d connections: closing is the broker's", n)
			}
		})
	}
}

// TestTransientDeviceFreesItsSeat: a transient device forgotten at End
// no longer counts against max_devices.
func TestTransientDeviceFreesItsSeat(t *testing.T) {
	pt := newPathTest(t, pathConfig{settings: func(s *queue.Settings) { s.MaxDevices = 1 }})
	pt.p.End(pt.open(conn{user: "bob", device: "a", transient: true}).s)
	ok, err := pt.store.MayAttach("bob", "b")
	if err != nil || !ok {
		t.Fatalf("MayAttach of a second device after the transient one left: %v, %v", ok, err)
	}
	pt.p.End(pt.open(conn{user: "bob", device: "b"}).s)
	if ok, err := pt.store.MayAttach("bob", "c"); err != nil || ok {
		t.Fatalf("MayAttach past max_devices after a persistent device left: %v, %v", ok, err)
	}
}

// TestReceiveMaximumCapsWindow: an MQTT 5 client's Receive Maximum
// lowers the window below max_inflight; 3.1.1 has none.
func TestReceiveMaximumCapsWindow(t *testing.T) {
	cases := []struct {
		name       string
		v5         bool
		receiveMax int
		window     int
	}{
		{"v5 receive maximum 1", true, 1, 1},
		{"v5 receive maximum above max_inflight", true, 100, 3},
		{"v5 without receive maximum", true, 0, 3},
		{"3.1.1", false, 1, 3},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			pt := newPathTest(t, pathConfig{opts: func(o *Options) { o.MaxInflight = 3 }})
			bob := pt.subscribe(conn{user: "bob", v5: c.v5, receiveMax: c.receiveMax})
			alice := pt.open(conn{user: "alice"})
			for i := range 4 {
				pt.publish(alice, uint16(i+1), "inbox/bob", `{"id":"m`+strconv.Itoa(i)+`"}`)
			}
			alice.conn.waitPackets(t, packets.Puback, 4)
			pubs := bob.conn.waitPackets(t, packets.Publish, c.window)
			pt.barrier()
			bob.s.w.Wait()
			if n := len(bob.conn.ofType(packets.Publish)); n != c.window {
				t.Fatalf("bob got %d messages unacknowledged, want %d", n, c.window)
			}
			if inflight, _, ok := pt.p.Window("bob", ""); !ok || inflight != c.window {
				t.Fatalf("window: %d in flight (fed %v), want %d", inflight, ok, c.window)
			}
			// Each acknowledgement lets one more through.
			pt.p.Acked(bob.s, pubs[0].PacketID)
			bob.conn.waitPackets(t, packets.Publish, c.window+1)
			if _, _, _, acked := pt.obs.snapshot(); acked != 1 {
				t.Fatalf("observed %d acknowledgements, want 1", acked)
			}
		})
	}
}
