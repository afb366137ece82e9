package broker

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"
	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"
	"github.com/golang-jwt/jwt/v5"

	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/chatd/chatd/config"
)

// refusal is one publish the server must refuse, and how.
type refusal struct {
	name    string
	topic   string
	payload string
	code    string
	reason  byte
	ref     string
}

func refusals() []refusal {
	return []refusal{
		{"unknown topic", "chat/bob", `{"id":"r1"}`, "bad_topic", 0x90, "r1"},
		{"invalid user in inbox topic", "inbox/bo b", `{"id":"r2"}`, "bad_topic", 0x90, "r2"},
		{"nested inbox topic", "inbox/bob/x", `{"id":"r3"}`, "bad_topic", 0x90, "r3"},
		{"presence is server-only", "presence/bob", `{"id":"r4"}`, "not_authorized", 0x87, "r4"},
		{"not JSON", "inbox/bob", `hello`, "bad_payload", 0x99, ""},
		{"JSON array", "inbox/bob", `[{"id":"r5"}]`, "bad_payload", 0x99, ""},
		{"no id", "inbox/bob", `{"text":"x"}`, "bad_payload", 0x99, ""},
		{"numeric id", "inbox/bob", `{"id":7}`, "bad_payload", 0x99, ""},
		{"empty id", "inbox/bob", `{"id":""}`, "bad_payload", 0x99, ""},
		{"id too long", "inbox/bob", `{"id":"` + strings.Repeat("x", 65) + `"}`, "bad_payload", 0x99, ""},
		{"too large", "inbox/bob", `{"id":"r6","pad":"` + strings.Repeat("x", 2000) + `"}`, "too_large", 0x95, "r6"},
		{"queue full", "inbox/full", `{"id":"r7"}`, "queue_full", 0x97, "r7"},
	}
}

func errorTestConfig(c *config.Config) {
	c.Limits.MaxMessageBytes = 1024
	c.Queue.MaxQueueMessages = 2
}

// fillQueue leaves user "full" with a full queue.
func fillQueue(t *testing.T, s *Server) {
	t.Helper()
	full := mustDial(t, s, "full", phoneOpt{})
	full.client.Disconnect(100)
	filler := mustDial(t, s, "filler", phoneOpt{noSub: true})
	filler.send("full", "f1", "")
	filler.send("full", "f2", "")
}

func TestErrorsV3(t *testing.T) {
	s := startServer(t, t.TempDir(), errorTestConfig)
	fillQueue(t, s)
	bob := mustDial(t, s, "bob", phoneOpt{})
	alice := mustDial(t, s, "alice", phoneOpt{})
	cases := refusals()
	for i, c := range cases {
		alice.publish(c.topic, []byte(c.payload))
		evs := alice.waitFor(i + 1)
		ev := evs[i]
		if ev.Kind != "error" || ev.Code != c.code || ev.Ref != c.ref || ev.Reason == "" {
			t.Errorf("%s: error event = %+v, want code %s ref %q", c.name, ev, c.code, c.ref)
		}
	}
	// Nothing refused was delivered: the next message is bob's first.
	alice.send("bob", "ok", "")
	if got := bob.waitFor(1)[0]; innerID(t, got) != "ok" {
		t.Fatalf("bob's first message = %s, want ok", got.Msg)
	}
}

// publishV5 publishes payload to topic at QoS 1 and returns the PUBACK's
// reason code; the wait covers a publish held back to its sender's rate.
func publishV5(t testing.TB, c *paho5.Client, topic, payload string) byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := c.Publish(ctx, &paho5.Publish{QoS: 1, Topic: topic, Payload: []byte(payload)})
	if resp == nil {
		t.Fatalf("publish to %s: no PUBACK: %v", topic, err)
	}
	return resp.ReasonCode
}

// dialV5 connects user's device with client ID user over MQTT 5,
// persistent; onMsg, if set, receives what the server publishes to it.
func dialV5(t *testing.T, s *Server, user string, onMsg func(*paho5.Publish)) *paho5.Client {
	t.Helper()
	return dialV5Device(t, s, user, user, nil, onMsg)
}

// dialV5Device connects a device of user over MQTT 5 with client ID
// clientID and CONNECT user properties props, persistent, and fails the
// test unless the CONNACK is a success.
func dialV5Device(t *testing.T, s *Server, user, clientID string, props []paho5.UserProperty, onMsg func(*paho5.Publish)) *paho5.Client {
	t.Helper()
	expiry := uint32(3600)
	c, ca := connectV5(t, s, &paho5.Connect{
		KeepAlive: 30, ClientID: clientID, CleanStart: true,
		Username: user, UsernameFlag: true, Password: []byte(mint(t, user)), PasswordFlag: true,
		Properties: &paho5.ConnectProperties{SessionExpiryInterval: &expiry, User: props},
	}, onMsg)
	if ca.ReasonCode != 0 {
		t.Fatalf("v5 connect %s: reason 0x%x", clientID, ca.ReasonCode)
	}
	return c
}

// connectV5 dials the server and sends cp, failing the test when no
// CONNACK comes; the caller judges the CONNACK. onMsg, if set, receives
// what the server publishes to the client.
func connectV5(t testing.TB, s *Server, cp *paho5.Connect, onMsg func(*paho5.Publish)) (*paho5.Client, *paho5.Connack) {
	t.Helper()
	var cfg paho5.ClientConfig
	if onMsg != nil {
		cfg.OnPublishReceived = []func(paho5.PublishReceived) (bool, error){
			func(pr paho5.PublishReceived) (bool, error) { onMsg(pr.Packet); return true, nil },
		}
	}
	return connectV5With(t, s, cp, cfg)
}

// connectV5With is connectV5 with the client's callbacks in cfg.
func connectV5With(t testing.TB, s *Server, cp *paho5.Connect, cfg paho5.ClientConfig) (*paho5.Client, *paho5.Connack) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := net.Dial("tcp", s.MQTTAddr())
	if err != nil {
		t.Fatal(err)
	}
	cfg.Conn, cfg.ClientID = conn, cp.ClientID
	c := paho5.NewClient(cfg)
	ca, err := c.Connect(ctx, cp)
	if err != nil {
		t.Fatalf("v5 connect %q: %v", cp.ClientID, err)
	}
	t.Cleanup(func() { _ = c.Disconnect(&paho5.Disconnect{}) })
	return c, ca
}

func TestErrorsV5(t *testing.T) {
	s := startServer(t, t.TempDir(), errorTestConfig)
	fillQueue(t, s)
	got := make(chan *paho5.Publish, 16)
	bob := dialV5(t, s, "bob", func(p *paho5.Publish) { got <- p })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := bob.Subscribe(ctx, &paho5.Subscribe{Subscriptions: []paho5.SubscribeOptions{{Topic: "inbox/bob", QoS: 1}}}); err != nil {
		t.Fatal(err)
	}
	alice := dialV5(t, s, "alice", nil)
	for _, c := range refusals() {
		resp, err := alice.Publish(ctx, &paho5.Publish{QoS: 1, Topic: c.topic, Payload: []byte(c.payload)})
		code := byte(0)
		if resp != nil {
			code = resp.ReasonCode
		}
		if code != c.reason {
			t.Errorf("%s: PUBACK reason 0x%x (err %v), want 0x%x", c.name, code, err, c.reason)
		}
	}
	if _, err := alice.Publish(ctx, &paho5.Publish{QoS: 1, Topic: "inbox/bob", Payload: []byte(`{"id":"ok"}`)}); err != nil {
		t.Fatal(err)
	}
	select {
	case p := <-got:
		if id := innerID(t, decodeEnvelope(t, p.Payload)); id != "ok" {
			t.Fatalf("bob's first message = %s, want ok", id)
		}
	case <-ctx.Done():
		t.Fatal("bob received nothing")
	}
}

func TestConnectRefusals(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	expired, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.RegisteredClaims{
		Subject: "bob", ExpiresAt: jwt.NewNumericDate(time.Now().Add(-time.Minute)),
	}).SignedString(testSecret)
	if err != nil {
		t.Fatal(err)
	}
	otherKey, err := token.Mint([]byte("another-secret"), "bob", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	none, err := jwt.NewWithClaims(jwt.SigningMethodNone, jwt.RegisteredClaims{
		Subject: "bob", ExpiresAt: jwt.NewNumericDate(time.Now().Add(time.Hour)),
	}).SignedString(jwt.UnsafeAllowNoneSignatureType)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, user, clientID, password string
		want                           error
	}{
		{"client id of another user", "bob", "alice", "", packets.ErrorRefusedIDRejected},
		{"device name too long", "bob", "bob/" + strings.Repeat("d", 33), "", packets.ErrorRefusedIDRejected},
		{"device name with bad characters", "bob", "bob/my phone", "", packets.ErrorRefusedIDRejected},
		{"empty device name", "bob", "bob/", "", packets.ErrorRefusedIDRejected},
		{"token of another user", "bob", "bob", mint(t, "alice"), packets.ErrorRefusedNotAuthorised},
		{"expired token", "bob", "bob", expired, packets.ErrorRefusedNotAuthorised},
		{"token signed with another key", "bob", "bob", otherKey, packets.ErrorRefusedNotAuthorised},
		{"alg none", "bob", "bob", none, packets.ErrorRefusedNotAuthorised},
		{"garbage token", "bob", "bob", "not-a-token", packets.ErrorRefusedNotAuthorised},
		{"invalid username", "bo b", "bo b", "x", packets.ErrorRefusedNotAuthorised},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := dial(t, s, c.user, phoneOpt{clientID: c.clientID, password: c.password, noSub: true})
			if !errors.Is(err, c.want) {
				t.Fatalf("connect error = %v, want %v", err, c.want)
			}
		})
	}
	t.Run("empty client id becomes the user", func(t *testing.T) {
		opts := paho.NewClientOptions().AddBroker("tcp://" + s.MQTTAddr()).
			SetUsername("carol").SetPassword(mint(t, "carol")).SetCleanSession(true).SetAutoReconnect(false)
		c := paho.NewClient(opts)
		if tk := c.Connect(); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
			t.Fatalf("connect: %v", tk.Error())
		}
		defer c.Disconnect(50)
		if _, ok := s.mqtt.Clients.Get("carol"); !ok {
			t.Fatal("client with empty id is not known as carol")
		}
	})
}

func TestSubscribeRefusals(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	alice := mustDial(t, s, "alice", phoneOpt{noSub: true})
	cases := []struct {
		filter string
		ok     bool
	}{
		{"inbox/alice", true},
		{"inbox/bob", false},
		{"inbox/#", false},
		{"inbox/+", false},
		{"#", false},
		{"group/g1", false},
		{"receipt/alice", false},
		{"presence/bob", true},
		{"presence/+", true},
	}
	for _, c := range cases {
		tk := alice.client.Subscribe(c.filter, 1, func(paho.Client, paho.Message) {})
		if !tk.WaitTimeout(10 * time.Second) {
			t.Fatalf("%s: no SUBACK", c.filter)
		}
		st := tk.(*paho.SubscribeToken)
		code := st.Result()[c.filter]
		if granted := code < 0x80; granted != c.ok {
			t.Errorf("subscribe %s: SUBACK 0x%x, want granted=%v", c.filter, code, c.ok)
		}
	}
}
