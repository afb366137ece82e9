package broker

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"
	"github.com/golang-jwt/jwt/v5"

	"github.com/chatd/chatd/broker/service/apikeys"
	"github.com/chatd/chatd/internal/testutil"
)

// mintJTI mints a shared-secret token for user with jti, issued at iat.
func mintJTI(t *testing.T, user, jti string, iat time.Time) string {
	t.Helper()
	tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.RegisteredClaims{
		Subject: user, ID: jti, IssuedAt: jwt.NewNumericDate(iat), ExpiresAt: jwt.NewNumericDate(time.Now().Add(time.Hour)),
	}).SignedString(testSecret)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// revoke calls the server API's revocation with body.
func revoke(t *testing.T, s *Server, key, body string) {
	t.Helper()
	if st, b := bearerCall(t, s, http.MethodPost, "/v1/server/revocations", key, body); st != http.StatusOK {
		t.Fatalf("revoke %s: %d %s", body, st, b)
	}
}

// noConnack is dialV5Code's code for a connection closed without a CONNACK.
const noConnack = 0xFF

// dialV5Code connects bob's clientID with tok over MQTT 5 and returns
// the CONNACK's reason code (noConnack if none came) and a channel of the
// server's DISCONNECT.
func dialV5Code(t *testing.T, s *Server, clientID, tok string) (byte, chan byte) {
	t.Helper()
	disc := make(chan byte, 1)
	conn, err := net.Dial("tcp", s.MQTTAddr())
	if err != nil {
		t.Fatal(err)
	}
	c := paho5.NewClient(paho5.ClientConfig{Conn: conn, ClientID: clientID, OnServerDisconnect: func(d *paho5.Disconnect) { disc <- d.ReasonCode }})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ca, err := c.Connect(ctx, &paho5.Connect{
		KeepAlive: 30, ClientID: clientID, CleanStart: true,
		Username: "bob", UsernameFlag: true, Password: []byte(tok), PasswordFlag: true,
	})
	if ca == nil {
		// No CONNACK: a session revoked between the token's check and its
		// start is closed before its CONNACK is written.
		t.Logf("v5 connect %s: %v", clientID, err)
		return noConnack, disc
	}
	if ca.ReasonCode == 0 {
		t.Cleanup(func() { _ = c.Disconnect(&paho5.Disconnect{}) })
	}
	return ca.ReasonCode, disc
}

// TestRevocation: a token revoked by its jti ends its session (MQTT 5:
// DISCONNECT 0x87) and is refused at CONNECT and over HTTP, across a
// restart, while bob's other token goes on; revoking bob's tokens
// issued until now ends that one too (MQTT 3.1.1: the connection
// closes), and a token issued afterwards works.
func TestRevocation(t *testing.T) {
	dir := t.TempDir()
	s := startServer(t, dir, nil)
	key := makeKey(t, s, apikeys.ScopeModerate)
	issued := time.Now().Add(-time.Minute)
	tokA, tokB := mintJTI(t, "bob", "a-1", issued), mintJTI(t, "bob", "b-1", issued)
	code, disc := dialV5Code(t, s, "bob/laptop", tokA)
	if code != 0 {
		t.Fatalf("connect with a fresh token: 0x%x", code)
	}
	phone := mustDial(t, s, "bob", phoneOpt{clientID: "bob/phone", password: tokB})

	revoke(t, s, key, fmt.Sprintf(`{"token":%q}`, tokA))
	select {
	case code := <-disc:
		if code != 0x87 {
			t.Fatalf("revoked session ended with 0x%x, want 0x87", code)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the revoked token's session goes on")
	}
	if !phone.client.IsConnectionOpen() {
		t.Fatal("bob's other token's session ended too")
	}
	refused := func(s *Server) {
		t.Helper()
		if code, _ := dialV5Code(t, s, "bob/laptop", tokA); code != 0x87 {
			t.Fatalf("CONNECT with the revoked token: 0x%x, want 0x87", code)
		}
		if st, _ := bearerCall(t, s, http.MethodGet, "/v1/devices", tokA, ""); st != http.StatusUnauthorized {
			t.Fatalf("HTTP with the revoked token: %d", st)
		}
	}
	refused(s)

	revoke(t, s, key, `{"user":"bob"}`)
	waitClosed(t, phone)
	if _, err := dial(t, s, "bob", phoneOpt{clientID: "bob/phone", password: tokB}); err == nil {
		t.Fatal("a token issued before the user's revocation connects")
	}
	// Issued after the revocation (a second on, as iat counts seconds).
	fresh := mintJTI(t, "bob", "c-1", time.Now().Add(time.Second))
	mustDial(t, s, "bob", phoneOpt{clientID: "bob/phone", password: fresh})
	st, b := bearerCall(t, s, http.MethodGet, "/v1/server/revocations", key, "")
	var list struct{ Revocations []json.RawMessage }
	if st != http.StatusOK || json.Unmarshal(b, &list) != nil || len(list.Revocations) != 2 {
		t.Fatalf("list: %d %s", st, b)
	}
	if st, _ := bearerCall(t, s, http.MethodPost, "/v1/server/revocations", key, `{"user":"bob","jti":"x"}`); st != http.StatusBadRequest {
		t.Fatalf("a revocation naming a user and a jti: %d", st)
	}
	stopServer(t, s)

	s = startServer(t, dir, nil)
	refused(s)
}

// TestClusterRevocation: a revocation made on one node ends the session
// on another and is refused on a third.
func TestClusterRevocation(t *testing.T) {
	nodes := startTestCluster(t, 3)
	key := makeKey(t, nodes[0], apikeys.ScopeModerate)
	tok := mintJTI(t, "bob", "a-1", time.Now().Add(-time.Minute))
	code, disc := dialV5Code(t, nodes[1], "bob/laptop", tok)
	if code != 0 {
		t.Fatalf("connect: 0x%x", code)
	}
	revoke(t, nodes[0], key, `{"jti":"a-1"}`)
	select {
	case code := <-disc:
		if code != 0x87 {
			t.Fatalf("revoked session ended with 0x%x", code)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the session on another node goes on")
	}
	testutil.Eventually(t, 10*time.Second, func() bool {
		code, _ := dialV5Code(t, nodes[2], "bob/tablet", tok)
		return code == 0x87
	}, "the third node refuses the revoked token")
}
