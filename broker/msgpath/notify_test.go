package msgpath

import (
	"slices"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/service/push"
)

// fakePusher records the notifications the path asks for.
type fakePusher struct {
	enabled bool
	sent    recorder[push.Notification]
}

func (p *fakePusher) Enabled() bool { return p.enabled }

func (p *fakePusher) Notify(n push.Notification) bool {
	p.sent.add(n)
	return true
}

// fakePeers records what the path tells the other nodes.
type fakePeers struct {
	stored, typing, sessions recorder[string]
}

func (p *fakePeers) Stored(user string, m queue.Message) { p.stored.add(user) }
func (p *fakePeers) Typing(user, topic string, payload []byte) {
	p.typing.add(user + " " + topic + " " + string(payload))
}
func (p *fakePeers) SessionStarted(clientID string) { p.sessions.add(clientID) }

// TestNotify: a stored message is passed to the other nodes, and a push
// is asked for when its recipient is online nowhere.
func TestNotify(t *testing.T) {
	cases := []struct {
		name          string
		pushOff       bool
		peers         bool
		bob           string // "", "connected" or "subscribed"
		topic, pay    string
		want          []push.Notification
		wantPeerStore []string
	}{
		{name: "offline", topic: "inbox/bob", pay: `{"id":"m1"}`,
			want: []push.Notification{{User: "bob", From: "alice", Kind: "msg", Queued: 1}}},
		{name: "offline, group", topic: "group/team", pay: `{"id":"m1"}`,
			want: []push.Notification{{User: "bob", From: "alice", Kind: "msg", Group: "team", Queued: 1}}},
		{name: "offline, push off", pushOff: true, topic: "inbox/bob", pay: `{"id":"m1"}`},
		{name: "offline, read receipt", topic: "receipt/bob", pay: `{"status":"read","ids":["m1"]}`},
		{name: "subscribed here", bob: "subscribed", topic: "inbox/bob", pay: `{"id":"m1"}`},
		// Connected but not fed here: in a cluster, presence says so.
		{name: "connected, cluster", peers: true, bob: "connected", topic: "inbox/bob", pay: `{"id":"m1"}`,
			wantPeerStore: []string{"bob"}},
		{name: "offline, cluster", peers: true, topic: "inbox/bob", pay: `{"id":"m1"}`,
			want: []push.Notification{{User: "bob", From: "alice", Kind: "msg", Queued: 1}}, wantPeerStore: []string{"bob"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			pusher := &fakePusher{enabled: !c.pushOff}
			peers := &fakePeers{}
			pt := newPathTest(t, pathConfig{opts: func(o *Options) {
				o.Push = pusher
				if c.peers {
					o.Peers = peers
				}
			}})
			if _, err := pt.groups.Create("alice", "team", []string{"bob"}); err != nil {
				t.Fatal(err)
			}
			switch c.bob {
			case "connected":
				pt.open(conn{user: "bob"})
			case "subscribed":
				pt.subscribe(conn{user: "bob"})
			}
			alice := pt.open(conn{user: "alice", device: "phone", v5: true})
			pt.publish(alice, 1, c.topic, c.pay)
			wantPuback(t, alice.conn.waitPackets(t, packets.Puback, 1)[0], 1, 0)
			pt.barrier() // OnStored of the publish has run
			if got := pusher.sent.all(); !slices.Equal(got, c.want) {
				t.Fatalf("push notifications %+v, want %+v", got, c.want)
			}
			if got := peers.stored.all(); !slices.Equal(got, c.wantPeerStore) {
				t.Fatalf("peers told of messages for %v, want %v", got, c.wantPeerStore)
			}
			if c.peers && !slices.Contains(peers.sessions.all(), "alice/phone") {
				t.Fatalf("peers told of sessions %v, not alice/phone", peers.sessions.all())
			}
		})
	}
}

// TestTypingAcrossNodes: a typing signal goes to the other nodes, and one
// from another node reaches the devices here.
func TestTypingAcrossNodes(t *testing.T) {
	peers := &fakePeers{}
	pt := newPathTest(t, pathConfig{opts: func(o *Options) { o.Peers = peers }})
	bob := pt.subscribe(conn{user: "bob"})
	alice := pt.open(conn{user: "alice"})
	pt.p.Publish(alice.s, Publish{Topic: "typing/dave", Payload: []byte(`{}`)})
	want := `dave inbox/dave {"kind":"typing","from":"alice","ts":1700000000000}`
	if got := peers.typing.all(); !slices.Equal(got, []string{want}) {
		t.Fatalf("peers told of typing %q, want %q", got, want)
	}
	pt.p.PeerTyping("bob", "inbox/bob", []byte(`{"kind":"typing","from":"erin"}`))
	pk := bob.conn.waitPackets(t, packets.Publish, 1)[0]
	if pk.FixedHeader.Qos != 0 || string(pk.Payload) != `{"kind":"typing","from":"erin"}` {
		t.Fatalf("bob got %s at QoS %d", pk.Payload, pk.FixedHeader.Qos)
	}
}

// storeQuietly stores data for user as another node would: no device
// here hears of it.
func (pt *pathTest) storeQuietly(user, data string) queue.Message {
	pt.t.Helper()
	got := make(chan queue.Message, 1)
	pt.store.Append(&queue.Request{To: user, Data: []byte(data), Done: func(st queue.Status, m queue.Message, err error) {
		if st != queue.Stored {
			pt.t.Errorf("store for %s: %v %v", user, st, err)
		}
		got <- m
	}})
	return <-got
}

// TestStoredElsewhere: a message another node stored reaches the devices
// here through PeerStored, or through Resync after its notice was lost.
func TestStoredElsewhere(t *testing.T) {
	pt := newPathTest(t, pathConfig{opts: func(o *Options) { o.Peers = &fakePeers{} }})
	bob := pt.subscribe(conn{user: "bob"})
	m := pt.storeQuietly("bob", `{"kind":"msg","n":1}`)
	pt.p.PeerStored("bob", m)
	pk := bob.conn.waitPackets(t, packets.Publish, 1)[0]
	if string(pk.Payload) != `{"kind":"msg","n":1}` {
		t.Fatalf("bob got %s", pk.Payload)
	}
	pt.storeQuietly("bob", `{"kind":"msg","n":2}`) // its notice is lost
	pt.p.Resync()
	pk = bob.conn.waitPackets(t, packets.Publish, 2)[1]
	if string(pk.Payload) != `{"kind":"msg","n":2}` {
		t.Fatalf("bob got %s after Resync", pk.Payload)
	}
}
