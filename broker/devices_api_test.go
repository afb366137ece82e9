package broker

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"

	"github.com/chatd/chatd/broker/service/deviceapi"
	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/testutil"
)

// listDevices lists user's devices through s's API, by client ID.
func listDevices(t *testing.T, s *Server, user string) map[string]deviceapi.Device {
	t.Helper()
	st, body := httpDo(t, s, http.MethodGet, "/v1/devices", user)
	if st != http.StatusOK {
		t.Fatalf("GET /v1/devices as %s: %d %s", user, st, body)
	}
	var l deviceapi.List
	if err := json.Unmarshal([]byte(body), &l); err != nil {
		t.Fatalf("devices list %s: %v", body, err)
	}
	out := make(map[string]deviceapi.Device, len(l.Devices))
	for _, d := range l.Devices {
		out[d.ClientID] = d
	}
	return out
}

// waitDevices polls user's device list until ok accepts it.
func waitDevices(t *testing.T, s *Server, user string, ok func(map[string]deviceapi.Device) bool, what string) map[string]deviceapi.Device {
	t.Helper()
	var last map[string]deviceapi.Device
	testutil.Eventually(t, 10*time.Second, func() bool {
		last = listDevices(t, s, user)
		return ok(last)
	}, "%s; last list: %+v", what, &last)
	return last
}

// dialV5Watched connects an MQTT 5 device subscribed to its inbox that
// acknowledges what it gets and reports the server's DISCONNECT reason.
func dialV5Watched(t *testing.T, s *Server, user, clientID string, got chan<- string, disc chan<- byte) {
	t.Helper()
	expiry := uint32(3600)
	cfg := paho5.ClientConfig{
		OnPublishReceived: []func(paho5.PublishReceived) (bool, error){
			func(pr paho5.PublishReceived) (bool, error) { got <- string(pr.Packet.Payload); return true, nil },
		},
		OnServerDisconnect: func(d *paho5.Disconnect) { disc <- d.ReasonCode },
	}
	c, ca := connectV5With(t, s, &paho5.Connect{
		KeepAlive: 30, ClientID: clientID, CleanStart: true,
		Username: user, UsernameFlag: true, Password: []byte(mint(t, user)), PasswordFlag: true,
		Properties: &paho5.ConnectProperties{SessionExpiryInterval: &expiry},
	}, cfg)
	if ca.ReasonCode != 0 {
		t.Fatalf("v5 connect %s: reason 0x%x", clientID, ca.ReasonCode)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Subscribe(ctx, &paho5.Subscribe{Subscriptions: []paho5.SubscribeOptions{{Topic: "inbox/" + user, QoS: 1}}}); err != nil {
		t.Fatalf("subscribe %s: %v", clientID, err)
	}
}

// TestDevicesAPI: a user lists their devices (online, waiting counts)
// and removes a lost tablet, whose backlog is then deleted, and a laptop
// (MQTT 5), whose connection is closed with reason 0x98; the removals
// outlive a restart, and a removed device that connects again is new.
func TestDevicesAPI(t *testing.T) {
	dir := t.TempDir()
	noDelivered := func(c *config.Config) { c.Receipts.Delivered = false }
	s := startServer(t, dir, noDelivered)

	tablet := mustDial(t, s, "alice", phoneOpt{clientID: "alice/tablet"})
	tablet.client.Disconnect(100)
	ph := mustDial(t, s, "alice", phoneOpt{clientID: "alice/phone"})
	laptopGot, laptopDisc := make(chan string, 16), make(chan byte, 1)
	dialV5Watched(t, s, "alice", "alice/laptop", laptopGot, laptopDisc)
	bob := mustDial(t, s, "bob", phoneOpt{})
	bob.send("alice", "m1", "")
	bob.send("alice", "m2", "")
	ph.waitFor(2)
	for range 2 {
		select {
		case <-laptopGot:
		case <-time.After(10 * time.Second):
			t.Fatal("the laptop did not get bob's messages")
		}
	}

	ds := waitDevices(t, s, "alice", func(ds map[string]deviceapi.Device) bool {
		return ds["alice/phone"].Waiting == 0 && ds["alice/laptop"].Waiting == 0
	}, "the online devices' acknowledgements never showed")
	want := map[string]struct {
		online  bool
		waiting uint64
	}{"alice/phone": {true, 0}, "alice/laptop": {true, 0}, "alice/tablet": {false, 2}}
	if len(ds) != len(want) {
		t.Fatalf("devices %+v, want %v", ds, want)
	}
	for id, w := range want {
		d := ds[id]
		if d.Online != w.online || d.Waiting != w.waiting || d.Transient || d.LastSeen < time.Now().Add(-time.Minute).Unix() {
			t.Errorf("%s: %+v, want online %v, %d waiting, seen lately", id, d, w.online, w.waiting)
		}
	}

	// Nobody else may see or remove alice's devices; bad requests are refused.
	for _, c := range []struct {
		method, path, user string
		status             int
	}{
		{http.MethodDelete, "/v1/devices/alice/tablet", "bob", http.StatusNotFound},
		{http.MethodDelete, "/v1/devices/alice/nosuch", "alice", http.StatusNotFound},
		{http.MethodDelete, "/v1/devices/alice/a/b", "alice", http.StatusNotFound},
	} {
		if st, body := httpDo(t, s, c.method, c.path, c.user); st != c.status {
			t.Errorf("%s %s as %s: %d %s, want %d", c.method, c.path, c.user, st, body, c.status)
		}
	}
	resp, err := http.Get("http://" + s.HTTPAddr() + "/v1/devices")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("GET /v1/devices without a token: %d, want 401", resp.StatusCode)
	}
	if ds := listDevices(t, s, "bob"); len(ds) != 1 || !ds["bob"].Online {
		t.Errorf("bob's devices: %+v, want his one online", ds)
	}

	// The lost tablet is removed: nothing is held back for it any more.
	if st, body := httpDo(t, s, http.MethodDelete, "/v1/devices/alice/tablet", "alice"); st != http.StatusNoContent {
		t.Fatalf("remove the tablet: %d %s", st, body)
	}
	testutil.EventuallyNoError(t, 10*time.Second, func() error {
		if n, err := s.queue.Depth("alice"); err != nil || n != 0 {
			return fmt.Errorf("alice's queue holds %d messages (%v), want 0", n, err)
		}
		return nil
	}, "the tablet's backlog was not deleted")

	// The laptop, online, is removed: its connection ends with 0x98.
	if st, body := httpDo(t, s, http.MethodDelete, "/v1/devices/alice/laptop", "alice"); st != http.StatusNoContent {
		t.Fatalf("remove the laptop: %d %s", st, body)
	}
	select {
	case code := <-laptopDisc:
		if code != 0x98 {
			t.Fatalf("the laptop was disconnected with 0x%x, want 0x98", code)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the removed laptop's connection was not closed")
	}
	if ds := waitDevices(t, s, "alice", func(ds map[string]deviceapi.Device) bool { return len(ds) == 1 },
		"removed devices still listed"); !ds["alice/phone"].Online {
		t.Fatalf("after the removals: %+v, want the phone alone, online", ds)
	}

	// Across a restart the removals hold; the tablet, back, is a new
	// device: it gets what is sent from then on, not the old messages.
	stopServer(t, s)
	s = startServer(t, dir, noDelivered)
	if ds := listDevices(t, s, "alice"); len(ds) != 1 || ds["alice/phone"].Online {
		t.Fatalf("after the restart: %+v, want the phone alone, offline", ds)
	}
	tablet = mustDial(t, s, "alice", phoneOpt{clientID: "alice/tablet"})
	bob = mustDial(t, s, "bob", phoneOpt{})
	bob.send("alice", "m3", "")
	if got := tablet.waitFor(1); len(got) != 1 || innerID(t, got[0]) != "m3" {
		t.Fatalf("the tablet, back, got %+v, want m3 alone", got)
	}
	waitDevices(t, s, "alice", func(ds map[string]deviceapi.Device) bool {
		return len(ds) == 2 && ds["alice/phone"].Waiting == 1 && ds["alice/tablet"].Waiting == 0 && ds["alice/tablet"].Online
	}, "after the tablet came back, want the phone with m3 waiting and the tablet online, acknowledged")
}
