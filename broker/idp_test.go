package broker

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/testutil"
)

// TestIdentityProviderTokens: with an IdP configured (its keys from a
// JWKS served by the test), its tokens log phones in over MQTT and call
// the HTTP API, with no shared secret, on one node and in a cluster,
// through a key rotation and an outage of the IdP; tokens that are wrong
// are refused on both alike, and the shared secret's tokens still work.
func TestIdentityProviderTokens(t *testing.T) {
	for _, cluster := range []bool{false, true} {
		t.Run(map[bool]string{false: "node", true: "cluster"}[cluster], func(t *testing.T) {
			idp := testutil.NewIdP(t, "https://login.example.com/")
			idp.Add("k1", "rsa")
			configure := func(c *config.Config) {
				c.Auth.Issuers = []token.Issuer{{Issuer: idp.Iss, JWKSURL: idp.JWKSURL(), Audience: []string{"chat-app"}}}
			}
			var s, other *Server
			if cluster {
				nodes := startTestClusterWith(t, 3, configure)
				s, other = nodes[0], nodes[2]
			} else {
				s = startServer(t, t.TempDir(), configure)
				other = s
			}
			good := idp.Sign("k1", nil)
			alice := mustDial(t, s, "alice", phoneOpt{clientID: "alice/phone", password: good})
			bob := mustDial(t, other, "bob", phoneOpt{password: idp.Sign("k1", func(c jwt.MapClaims) { c["sub"] = "bob" })})
			alice.send("bob", "m-1", `,"text":"signed in by the IdP"`)
			if got := bob.waitFor(1); innerID(t, got[0]) != "m-1" {
				t.Fatalf("bob got %+v", got)
			}
			if st, b := bearerCall(t, s, http.MethodPost, "/v1/groups", good, `{"id":"idp-group","members":["bob"]}`); st != http.StatusCreated {
				t.Fatalf("create a group with the IdP's token: %d %s", st, b)
			}

			// The IdP rotates its key: a token of the new one is taken
			// (its kid makes the node fetch the JWKS again); then the IdP
			// goes down, and the keys fetched keep working.
			idp.Add("k3", "ec")
			rotated := idp.Sign("k3", func(c jwt.MapClaims) { c["sub"] = "dave" })
			mustDial(t, other, "dave", phoneOpt{password: rotated})
			idp.SetDown(true)
			mustDial(t, other, "dave", phoneOpt{clientID: "dave/second", password: rotated})
			if st, _ := bearerCall(t, s, http.MethodGet, "/v1/devices", good, ""); st != http.StatusOK {
				t.Fatalf("HTTP while the IdP is down: %d", st)
			}

			expired := idp.Sign("k1", func(c jwt.MapClaims) { c["exp"] = time.Now().Add(-time.Hour).Unix() })
			wrongAud := idp.Sign("k1", func(c jwt.MapClaims) { c["aud"] = "another-app" })
			idp.Add("k2", "ec")
			unpublished := idp.Sign("k2", nil)
			idp.Remove("k2") // a key the JWKS no longer publishes
			for name, tok := range map[string]string{"expired": expired, "another audience": wrongAud, "an unpublished key": unpublished} {
				if _, err := dial(t, other, "alice", phoneOpt{clientID: "alice/bad", password: tok}); err == nil || !strings.Contains(err.Error(), "not Authorized") {
					t.Errorf("MQTT with %s: %v, want not authorized", name, err)
				}
				if st, _ := bearerCall(t, other, http.MethodGet, "/v1/devices", tok, ""); st != http.StatusUnauthorized {
					t.Errorf("HTTP with %s: %d, want 401", name, st)
				}
			}
			// alice's token is not bob's.
			if _, err := dial(t, s, "bob", phoneOpt{clientID: "bob/bad", password: good}); err == nil {
				t.Error("alice's IdP token logged bob in")
			}
			// The shared secret's tokens (no iss) still work beside it.
			mustDial(t, other, "carol", phoneOpt{})
		})
	}
}
