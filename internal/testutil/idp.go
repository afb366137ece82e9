package testutil

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/MicahParks/jwkset"
	"github.com/golang-jwt/jwt/v5"
)

// IdP is an identity provider served by a test: keys made in the test,
// published as a JWKS that the test rotates and takes down.
type IdP struct {
	t testing.TB
	// Iss is the issuer its tokens name.
	Iss  string
	mu   sync.Mutex
	keys map[string]crypto.Signer // by kid
	algs map[string]jwt.SigningMethod
	down bool
	srv  *httptest.Server
	// Hits counts the JWKS fetches.
	Hits atomic.Int64
}

// NewIdP starts an IdP whose tokens name iss; it stops when t ends.
func NewIdP(t testing.TB, iss string) *IdP {
	p := &IdP{t: t, Iss: iss, keys: map[string]crypto.Signer{}, algs: map[string]jwt.SigningMethod{}}
	p.srv = httptest.NewServer(http.HandlerFunc(p.serve))
	t.Cleanup(p.srv.Close)
	return p
}

func (p *IdP) serve(w http.ResponseWriter, _ *http.Request) {
	p.Hits.Add(1)
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.down {
		http.Error(w, "down", http.StatusServiceUnavailable)
		return
	}
	var set jwkset.JWKSMarshal
	for kid, k := range p.keys {
		jwk, err := jwkset.NewJWKFromKey(k.Public(), jwkset.JWKOptions{Metadata: jwkset.JWKMetadataOptions{KID: kid, ALG: jwkset.ALG(p.algs[kid].Alg()), USE: jwkset.UseSig}})
		if err != nil {
			p.t.Errorf("jwk %s: %v", kid, err)
			return
		}
		set.Keys = append(set.Keys, jwk.Marshal())
	}
	w.Header().Set("Content-Type", "application/json")
	if err := json.NewEncoder(w).Encode(set); err != nil {
		p.t.Errorf("serve JWKS: %v", err)
	}
}

// Add makes a key of kind ("rsa", "ec", "ed") under kid and publishes it.
func (p *IdP) Add(kid, kind string) {
	p.t.Helper()
	var (
		k   crypto.Signer
		alg jwt.SigningMethod
		err error
	)
	switch kind {
	case "rsa":
		k, err = rsa.GenerateKey(rand.Reader, 2048)
		alg = jwt.SigningMethodRS256
	case "ec":
		k, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		alg = jwt.SigningMethodES256
	case "ed":
		_, k, err = ed25519.GenerateKey(rand.Reader)
		alg = jwt.SigningMethodEdDSA
	}
	if err != nil {
		p.t.Fatal(err)
	}
	p.mu.Lock()
	p.keys[kid], p.algs[kid] = k, alg
	p.mu.Unlock()
}

// Remove stops publishing kid.
func (p *IdP) Remove(kid string) {
	p.mu.Lock()
	delete(p.keys, kid)
	p.mu.Unlock()
}

// SetDown makes the JWKS answer 503 (true) or serve again.
func (p *IdP) SetDown(down bool) {
	p.mu.Lock()
	p.down = down
	p.mu.Unlock()
}

// Sign makes a token for alice, audience chat-app, valid for an hour,
// with kid's key; edit changes the claims first.
func (p *IdP) Sign(kid string, edit func(jwt.MapClaims)) string {
	p.t.Helper()
	p.mu.Lock()
	k, alg := p.keys[kid], p.algs[kid]
	p.mu.Unlock()
	now := time.Now()
	c := jwt.MapClaims{"iss": p.Iss, "sub": "alice", "aud": "chat-app", "iat": now.Unix(), "exp": now.Add(time.Hour).Unix(), "jti": "t-1"}
	if edit != nil {
		edit(c)
	}
	tok := jwt.NewWithClaims(alg, c)
	tok.Header["kid"] = kid
	s, err := tok.SignedString(k)
	if err != nil {
		p.t.Fatal(err)
	}
	return s
}

// JWKSURL is where the IdP publishes its keys.
func (p *IdP) JWKSURL() string { return p.srv.URL + "/.well-known/jwks.json" }

// Public returns kid's public key.
func (p *IdP) Public(kid string) crypto.PublicKey {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.keys[kid].Public()
}
