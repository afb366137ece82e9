package loadtest

import (
	"context"
	"testing"
	"time"

	"github.com/Shopify/toxiproxy/v2/toxics"
	mqtt "github.com/eclipse/paho.mqtt.golang"
)

// waitFor fails the test unless ch yields within d; d only bounds a hang.
func waitFor(t *testing.T, ch <-chan struct{}, d time.Duration, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(d):
		t.Fatalf("no %s within %s", what, d)
	}
}

// proxiedClient connects a plain paho client through fp and reports its
// connections and losses on the returned channels.
func proxiedClient(t *testing.T, fp *FaultProxy, id string) (c mqtt.Client, up, lost chan struct{}) {
	t.Helper()
	up, lost = make(chan struct{}, 16), make(chan struct{}, 16)
	opts := mqtt.NewClientOptions().
		AddBroker("tcp://" + fp.Addr()).
		SetClientID(id).
		SetCleanSession(false).
		SetAutoReconnect(true).
		SetMaxReconnectInterval(200 * time.Millisecond).
		SetKeepAlive(30 * time.Second).
		SetOnConnectHandler(func(mqtt.Client) { up <- struct{}{} }).
		SetConnectionLostHandler(func(mqtt.Client, error) { lost <- struct{}{} })
	c = mqtt.NewClient(opts)
	if tok := c.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("connect through proxy: %v", tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(0) })
	waitFor(t, up, 5*time.Second, "first connection")
	return c, up, lost
}

func TestFaultProxyCutsAreSeenAndHealed(t *testing.T) {
	upstream := startMochi(t)
	for _, kind := range []string{cutDown, cutReset, cutStall} {
		t.Run(kind, func(t *testing.T) {
			fp, err := NewFaultProxy(upstream)
			if err != nil {
				t.Fatal(err)
			}
			defer fp.Close()
			if err := fp.Shape(5*time.Millisecond, 0, 0); err != nil {
				t.Fatal(err)
			}
			c, up, lost := proxiedClient(t, fp, "cut-"+kind)

			cut := make(chan error, 1)
			go func() { cut <- fp.Cut(context.Background(), kind, 300*time.Millisecond) }()
			// Keep data flowing: reset_peer acts on the next bytes it sees.
			ticker := time.NewTicker(20 * time.Millisecond)
			defer ticker.Stop()
			deadline := time.After(10 * time.Second)
		publish:
			for {
				select {
				case <-lost:
					break publish
				case <-ticker.C:
					c.Publish("probe", 0, false, "x")
				case <-deadline:
					t.Fatal("the cut was not seen as a lost connection within 10s")
				}
			}
			if err := <-cut; err != nil {
				t.Fatal(err)
			}
			waitFor(t, up, 10*time.Second, "reconnection after the cut healed")
			if names := toxicNames(fp); !names["latency_upstream"] || !names["latency_downstream"] || names["cut_upstream"] {
				t.Errorf("toxics after the cut: %v, want the latency back and no cut", names)
			}
		})
	}
}

func TestFaultProxyShapeDelaysTraffic(t *testing.T) {
	upstream := startMochi(t)
	fp, err := NewFaultProxy(upstream)
	if err != nil {
		t.Fatal(err)
	}
	defer fp.Close()
	const latency = 100 * time.Millisecond
	if err := fp.Shape(latency, 0, 1000); err != nil {
		t.Fatal(err)
	}
	names := toxicNames(fp)
	for _, want := range []string{"latency_upstream", "latency_downstream", "bandwidth_upstream", "bandwidth_downstream"} {
		if !names[want] {
			t.Errorf("toxic %s not installed; have %v", want, names)
		}
	}
	c, _, _ := proxiedClient(t, fp, "shaped")
	// A QoS 1 round trip crosses the proxy twice, each way delayed by at
	// least the latency: a lower bound, whatever the machine's speed.
	start := time.Now()
	if tok := c.Publish("probe", 1, false, "x"); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("publish: %v", tok.Error())
	}
	if rtt := time.Since(start); rtt < 2*latency {
		t.Errorf("PUBACK after %s through a proxy adding %s each way", rtt, latency)
	}
	if err := fp.Shape(latency, 0, 0); err == nil {
		t.Error("adding the latency toxics twice succeeded")
	}
	fp.Heal()
	if n := len(fp.proxy.Toxics.GetToxicArray()); n != 0 {
		t.Errorf("%d toxics left after Heal", n)
	}
}

func toxicNames(fp *FaultProxy) map[string]bool {
	names := map[string]bool{}
	for _, tx := range fp.proxy.Toxics.GetToxicArray() {
		if w, ok := tx.(*toxics.ToxicWrapper); ok {
			names[w.Name] = true
		}
	}
	return names
}
