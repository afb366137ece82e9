package broker

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"
	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/testutil"
)

// TestPublishRateLimit sends 30 publishes at once against a limit of 5/s
// (bursts of 10): with no delay allowed the excess is refused; with a long
// one it is slowed down and every publish goes through.
func TestPublishRateLimit(t *testing.T) {
	for _, tt := range []struct {
		name     string
		maxDelay time.Duration
		refused  bool
	}{
		{"refused at once", 0, true},
		{"slowed down", time.Minute, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := startServer(t, t.TempDir(), func(c *config.Config) {
				c.Limits.PublishRate = 5
				c.Limits.PublishMaxDelay = tt.maxDelay
			})
			got := make(chan string, 64)
			bob := dialV5(t, s, "bob", func(p *paho5.Publish) { got <- innerID(t, decodeEnvelope(t, p.Payload)) })
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			if _, err := bob.Subscribe(ctx, &paho5.Subscribe{Subscriptions: []paho5.SubscribeOptions{{Topic: "inbox/bob", QoS: 1}}}); err != nil {
				t.Fatal(err)
			}
			alice := dialV5(t, s, "alice", nil)
			var accepted []string
			refused := 0
			for i := range 30 {
				id := fmt.Sprintf("m-%d", i)
				resp, err := alice.Publish(ctx, &paho5.Publish{QoS: 1, Topic: "inbox/bob", Payload: []byte(`{"id":"` + id + `"}`)})
				switch {
				case resp != nil && resp.ReasonCode == 0x97:
					refused++
				case err == nil && resp.ReasonCode == 0:
					accepted = append(accepted, id)
				default:
					t.Fatalf("publish %d: %v %v", i, resp, err)
				}
			}
			if (refused > 0) != tt.refused {
				t.Fatalf("%d of 30 publishes at once refused by a limit of 5/s (bursts of 10)", refused)
			}
			// Everything accepted arrives, in order; nothing refused does.
			carol := mustDial(t, s, "carol", phoneOpt{noSub: true})
			carol.send("bob", "marker", "")
			for _, want := range append(accepted, "marker") {
				select {
				case id := <-got:
					if id != want {
						t.Fatalf("bob got %s, want %s", id, want)
					}
				case <-ctx.Done():
					t.Fatalf("bob never got %s", want)
				}
			}
			_, body := scrape(t, s, "/metrics")
			lines := strings.Split(body, "\n")
			if refused > 0 && !slices.Contains(lines, fmt.Sprintf(`chatd_refusals_total{code="rate_limited"} %d`, refused)) {
				t.Errorf("metrics do not count %d rate_limited refusals", refused)
			}
			if !tt.refused && !slices.Contains(lines, "chatd_publishes_delayed_total 20") {
				t.Errorf("metrics do not count the 20 publishes past the burst as delayed")
			}
		})
	}
}

// TestRateBudgetSurvivesReconnect: a user who spent its budget does not
// get a fresh one by reconnecting.
func TestRateBudgetSurvivesReconnect(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *config.Config) {
		c.Limits.PublishRate = 0.01
		c.Limits.PublishMaxDelay = 0
	})
	publish := func(c *paho5.Client, id string) byte {
		t.Helper()
		return publishV5(t, c, "inbox/bob", `{"id":"`+id+`"}`)
	}
	alice := dialV5(t, s, "alice", nil)
	if code := publish(alice, "first"); code != 0 {
		t.Fatalf("first publish: 0x%x", code)
	}
	if code := publish(alice, "second"); code != 0x97 {
		t.Fatalf("second publish past a burst of one: 0x%x, want 0x97", code)
	}
	if err := alice.Disconnect(&paho5.Disconnect{}); err != nil {
		t.Fatal(err)
	}
	waitDisconnected(t, s, "alice")
	again := dialV5(t, s, "alice", nil)
	if code := publish(again, "after reconnect"); code != 0x97 {
		t.Fatalf("publish after reconnecting: 0x%x, want 0x97 (the budget was renewed)", code)
	}
}

func TestConnectionsPerUser(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *config.Config) { c.Limits.MaxConnectionsPerUser = 2 })
	mustDial(t, s, "bob", phoneOpt{clientID: "bob/phone"})
	mustDial(t, s, "bob", phoneOpt{clientID: "bob/laptop"})
	if _, err := dial(t, s, "bob", phoneOpt{clientID: "bob/tablet"}); !errors.Is(err, packets.ErrorRefusedServerUnavailable) {
		t.Fatalf("third connection: %v, want server unavailable", err)
	}
	// A reconnecting device takes its own session over: not a third connection.
	if _, err := dial(t, s, "bob", phoneOpt{clientID: "bob/phone"}); err != nil {
		t.Fatalf("takeover refused: %v", err)
	}
	// Other users are not affected.
	mustDial(t, s, "alice", phoneOpt{})
}

func TestDevicesPerUser(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *config.Config) { c.Queue.MaxDevices = 2 })
	for _, d := range []string{"bob/a", "bob/b"} {
		p := mustDial(t, s, "bob", phoneOpt{clientID: d})
		p.client.Disconnect(50)
	}
	if _, err := dial(t, s, "bob", phoneOpt{clientID: "bob/c"}); !errors.Is(err, packets.ErrorRefusedServerUnavailable) {
		t.Fatalf("a third device: %v, want refused", err)
	}
	// Known devices still connect.
	mustDial(t, s, "bob", phoneOpt{clientID: "bob/a"})
}

// waitDisconnected waits until the server has ended clientID's connection.
func waitDisconnected(t *testing.T, s *Server, clientID string) {
	t.Helper()
	testutil.Eventually(t, 10*time.Second, func() bool { return !s.auth.Connected(clientID) }, "%s is still connected", clientID)
}

// TestSubscriptionsPerConnection: past limits.max_subscriptions, new
// filters are refused and the ones the client has are granted again.
func TestSubscriptionsPerConnection(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *config.Config) { c.Limits.MaxSubscriptions = 3 })
	alice := mustDial(t, s, "alice", phoneOpt{}) // inbox/alice: the first
	cases := []struct {
		filter  string
		granted bool
	}{
		{"presence/bob", true},
		{"presence/carol", true},
		{"presence/dave", false},
		{"presence/bob", true},
		{"inbox/alice", true},
	}
	for _, c := range cases {
		tk := alice.client.Subscribe(c.filter, 1, nil)
		if !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
			t.Fatalf("subscribe %s: %v", c.filter, tk.Error())
		}
		code := tk.(*paho.SubscribeToken).Result()[c.filter]
		if granted := code < 0x80; granted != c.granted {
			t.Errorf("%s: SUBACK code 0x%x, want granted %v", c.filter, code, c.granted)
		}
	}
}
