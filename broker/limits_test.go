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
	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/chatd/chatd/config"
)

func TestPublishRateLimit(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *config.Config) { c.Limits.PublishRate = 5 })
	got := make(chan string, 64)
	bob := dialV5(t, s, "bob", func(p *paho5.Publish) { got <- innerID(t, decodeEnvelope(t, p.Payload)) })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
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
	if refused == 0 {
		t.Fatal("30 publishes at once passed a limit of 5/s (bursts of 10)")
	}
	// Everything accepted arrives, in order; nothing refused does.
	alice2 := mustDial(t, s, "carol", phoneOpt{noSub: true})
	alice2.send("bob", "marker", "")
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
	if _, body := scrape(t, s, "/metrics"); !slices.Contains(strings.Split(body, "\n"), fmt.Sprintf(`chatd_refusals_total{code="rate_limited"} %d`, refused)) {
		t.Errorf("metrics do not count %d rate_limited refusals", refused)
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
