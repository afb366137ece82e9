package broker

import (
	"context"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"

	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/hooks"
)

// TestReauthentication: an MQTT 5 client whose token is about to expire
// sends a fresh one in an AUTH packet and keeps its session past the old
// token's expiry; a re-authentication with someone else's token ends the
// connection with 0x87, as a refused CONNECT would.
func TestReauthentication(t *testing.T) {
	s := startServer(t, t.TempDir(), func(c *config.Config) { c.Auth.Leeway = 0 })
	short, err := token.Mint(testSecret, "bob", 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	disc := make(chan byte, 1)
	c, ca := connectV5With(t, s, &paho5.Connect{
		KeepAlive: 30, ClientID: "bob/phone", CleanStart: true,
		Username: "bob", UsernameFlag: true, Password: []byte(short), PasswordFlag: true,
	}, paho5.ClientConfig{OnServerDisconnect: func(d *paho5.Disconnect) { disc <- d.ReasonCode }})
	if ca.ReasonCode != 0 {
		t.Fatalf("connect: 0x%x", ca.ReasonCode)
	}
	reauth := func(c *paho5.Client, tok string) *paho5.AuthResponse {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		r, err := c.Authenticate(ctx, &paho5.Auth{ReasonCode: 0x19, Properties: &paho5.AuthProperties{AuthMethod: hooks.AuthMethod, AuthData: []byte(tok)}})
		if err != nil {
			t.Fatalf("authenticate: %v", err)
		}
		return r
	}

	fresh, err := token.Mint(testSecret, "bob", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if r := reauth(c, fresh); !r.Success || r.ReasonCode != 0 {
		t.Fatalf("re-authentication answered %+v", r)
	}
	cl, ok := s.mqtt.Clients.Get("bob/phone")
	if !ok {
		t.Fatal("no session")
	}
	if exp, ok := s.auth.TokenExpiry(cl); !ok || time.Until(exp) < 50*time.Minute {
		t.Fatalf("session ends at %v: want the fresh token's expiry", exp)
	}
	// Past the first token's expiry, the session goes on.
	select {
	case code := <-disc:
		t.Fatalf("disconnected with 0x%x after re-authenticating", code)
	case <-time.After(3 * time.Second):
	}

	alices, err := token.Mint(testSecret, "alice", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	r := reauth(c, alices)
	code := r.ReasonCode
	if r.Success {
		t.Fatalf("alice's token re-authenticated bob: %+v", r)
	}
	if code == 0 {
		select {
		case code = <-disc:
		case <-time.After(10 * time.Second):
			t.Fatal("no DISCONNECT after a refused re-authentication")
		}
	}
	if code != 0x87 {
		t.Fatalf("refused re-authentication: reason 0x%x, want 0x87 not authorized", code)
	}
}
