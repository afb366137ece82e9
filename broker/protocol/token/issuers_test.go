package token_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/chatd/chatd/internal/testutil"
)

// issuerOf is the configuration of p's issuer, audience chat-app.
func issuerOf(p *testutil.IdP) token.Issuer {
	return token.Issuer{Issuer: p.Iss, JWKSURL: p.JWKSURL(), Audience: []string{"chat-app"}}
}

func newVerifier(t *testing.T, o token.Options, issuers ...token.Issuer) *token.Verifier {
	t.Helper()
	if o.UnknownKIDEvery == 0 {
		o.UnknownKIDEvery = 50 * time.Millisecond
	}
	o.Logger = slog.New(slog.DiscardHandler)
	v, err := token.New(secret, issuers, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(v.Close)
	return v
}

// TestJWKSIssuers: tokens of two IdPs, RSA, EC and Ed25519 keys fetched
// from their JWKS, log alice in; each way a token can be wrong is
// refused; a key of one IdP never verifies the other's tokens.
func TestJWKSIssuers(t *testing.T) {
	a, b := testutil.NewIdP(t, "https://a.example/"), testutil.NewIdP(t, "https://b.example/")
	a.Add("a-rsa", "rsa")
	a.Add("a-ec", "ec")
	a.Add("a-ed", "ed")
	b.Add("b-rsa", "rsa")
	bIss := issuerOf(b)
	bIss.UserPrefix, bIss.Audience = "b.", nil
	v := newVerifier(t, token.Options{Leeway: 5 * time.Second}, issuerOf(a), bIss)

	for _, kid := range []string{"a-rsa", "a-ec", "a-ed"} {
		c, err := v.Check(a.Sign(kid, nil))
		if err != nil || c.User != "alice" || c.Issuer != a.Iss || c.ID != "t-1" || c.IssuedAt.IsZero() {
			t.Fatalf("%s: %+v, %v", kid, c, err)
		}
	}
	if c, err := v.Check(b.Sign("b-rsa", nil)); err != nil || c.User != "b.alice" {
		t.Fatalf("b's token: %+v, %v; want user b.alice", c, err)
	}
	if _, err := v.Verify(a.Sign("a-rsa", nil), "alice"); err != nil {
		t.Fatal(err)
	}
	if _, err := v.Verify(a.Sign("a-rsa", nil), "bob"); !errors.Is(err, token.ErrInvalid) {
		t.Fatalf("alice's token as bob: %v", err)
	}

	// b's key, and a kid b publishes, on a token claiming to be a's.
	forged := b.Sign("b-rsa", func(c jwt.MapClaims) { c["iss"] = a.Iss })
	// The same key as an HMAC secret (the algorithm confusion).
	pub, err := x509.MarshalPKIXPublicKey(a.Public("a-rsa"))
	if err != nil {
		t.Fatal(err)
	}
	confused := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{"iss": a.Iss, "sub": "alice", "aud": "chat-app", "exp": time.Now().Add(time.Hour).Unix()})
	confused.Header["kid"] = "a-rsa"
	confusedTok, err := confused.SignedString(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}))
	if err != nil {
		t.Fatal(err)
	}
	none, err := jwt.NewWithClaims(jwt.SigningMethodNone, jwt.MapClaims{"iss": a.Iss, "sub": "alice", "aud": "chat-app", "exp": time.Now().Add(time.Hour).Unix()}).SignedString(jwt.UnsafeAllowNoneSignatureType)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, tok, want string
	}{
		{"another issuer's key", forged, "issuer https://a.example/"},
		{"HMAC with the public key", confusedTok, "signing method HS256 is invalid"},
		{"alg none", none, "signing method none is invalid"},
		{"unknown issuer", a.Sign("a-rsa", func(c jwt.MapClaims) { c["iss"] = "https://evil.example/" }), "unknown issuer"},
		{"wrong audience", a.Sign("a-rsa", func(c jwt.MapClaims) { c["aud"] = "other-app" }), "aud"},
		{"no audience", a.Sign("a-rsa", func(c jwt.MapClaims) { delete(c, "aud") }), "aud"},
		{"expired beyond the leeway", a.Sign("a-rsa", func(c jwt.MapClaims) { c["exp"] = time.Now().Add(-time.Minute).Unix() }), "expired"},
		{"no exp", a.Sign("a-rsa", func(c jwt.MapClaims) { delete(c, "exp") }), "exp"},
		{"not valid yet", a.Sign("a-rsa", func(c jwt.MapClaims) { c["nbf"] = time.Now().Add(time.Minute).Unix() }), "not valid yet"},
		{"issued in the future", a.Sign("a-rsa", func(c jwt.MapClaims) { c["iat"] = time.Now().Add(time.Minute).Unix() }), "used before issued"},
		{"no user", a.Sign("a-rsa", func(c jwt.MapClaims) { delete(c, "sub") }), "does not make a user ID"},
		{"user not an ID", a.Sign("a-rsa", func(c jwt.MapClaims) { c["sub"] = "auth0|123" }), "does not make a user ID"},
		{"bad signature", a.Sign("a-rsa", nil)[:len(a.Sign("a-rsa", nil))-4] + "AAAA", "signature"},
		{"garbage", "not.a.token", "invalid"},
	} {
		_, err := v.Check(tc.tok)
		if !errors.Is(err, token.ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want ErrInvalid mentioning %q", tc.name, err, tc.want)
		}
	}
	// Within the leeway an expired token still passes.
	if _, err := v.Check(a.Sign("a-rsa", func(c jwt.MapClaims) { c["exp"] = time.Now().Add(-2 * time.Second).Unix() })); err != nil {
		t.Fatalf("expired within the leeway: %v", err)
	}
	// The shared secret still verifies tokens without iss.
	if u, err := v.Subject(mint(t, secret, "carol", time.Hour)); err != nil || u != "carol" {
		t.Fatalf("shared secret: %q, %v", u, err)
	}
}

// TestJWKSRotationAndOutage: a token signed with a key the IdP published
// after the last fetch makes the verifier fetch again; while the IdP is
// down the keys fetched before keep working, and tokens with unknown
// kids over the rate fail at once without fetching; a verifier started
// while the IdP is down starts, and takes its tokens once it is back.
func TestJWKSRotationAndOutage(t *testing.T) {
	p := testutil.NewIdP(t, "https://idp.example/")
	p.Add("k1", "rsa")
	// One fetch for an unknown kid per hour: the rotation's.
	v := newVerifier(t, token.Options{RefreshInterval: time.Hour, UnknownKIDEvery: time.Hour}, issuerOf(p))
	if _, err := v.Check(p.Sign("k1", nil)); err != nil {
		t.Fatal(err)
	}
	p.Add("k2", "ec")
	p.Remove("k1")
	if _, err := v.Check(p.Sign("k2", nil)); err != nil {
		t.Fatalf("a token of the rotated key: %v", err)
	}

	p.SetDown(true)
	if _, err := v.Check(p.Sign("k2", nil)); err != nil {
		t.Fatalf("while the IdP is down: %v", err)
	}
	p.Add("k3", "rsa")
	unknown := p.Sign("k3", nil)
	before, start := p.Hits.Load(), time.Now()
	for range 20 {
		if _, err := v.Check(unknown); err == nil {
			t.Fatal("a key the verifier never fetched was accepted")
		}
	}
	if n, took := p.Hits.Load()-before, time.Since(start); n != 0 || took > 5*time.Second {
		t.Fatalf("20 tokens with an unknown kid over the rate: %d fetches in %v, want none, at once", n, took)
	}

	// A verifier started while the IdP is down, refreshing often.
	late := newVerifier(t, token.Options{RefreshInterval: 100 * time.Millisecond, UnknownKIDEvery: time.Hour}, issuerOf(p))
	if _, err := late.Check(p.Sign("k2", nil)); err == nil {
		t.Fatal("a token accepted before any key was fetched")
	}
	p.SetDown(false)
	testutil.Eventually(t, 10*time.Second, func() bool {
		_, err := late.Check(unknown)
		return err == nil
	}, "the keys, once the IdP is back")
}

// TestPublicKeyFileIssuer: an issuer given by a PEM public key, its
// algorithm taken from the key, and an HMAC issuer with its own secret.
func TestPublicKeyFileIssuer(t *testing.T) {
	k, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(k.Public())
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "idp.pem")
	if err := os.WriteFile(file, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	hs := strings.Repeat("h", 32)
	v := newVerifier(t, token.Options{},
		token.Issuer{Issuer: "pem-idp", PublicKeyFile: file, UserClaim: "uid"},
		token.Issuer{Issuer: "own-service", Secret: hs})
	claims := jwt.MapClaims{"iss": "pem-idp", "uid": "dave", "exp": time.Now().Add(time.Hour).Unix()}
	tok := sign(t, jwt.SigningMethodES384, claims, k)
	if c, err := v.Check(tok); err != nil || c.User != "dave" {
		t.Fatalf("PEM issuer: %+v, %v", c, err)
	}
	if _, err := v.Check(sign(t, jwt.SigningMethodHS256, jwt.MapClaims{"iss": "own-service", "sub": "erin", "exp": time.Now().Add(time.Hour).Unix()}, []byte(hs))); err != nil {
		t.Fatalf("HMAC issuer: %v", err)
	}
	// The shared secret does not verify a token naming an issuer.
	if _, err := v.Check(sign(t, jwt.SigningMethodHS256, jwt.MapClaims{"iss": "own-service", "sub": "erin", "exp": time.Now().Add(time.Hour).Unix()}, secret)); !errors.Is(err, token.ErrInvalid) {
		t.Fatalf("the shared secret's signature on own-service's token: %v", err)
	}
}

func TestIssuerValidate(t *testing.T) {
	for _, tc := range []struct {
		is   token.Issuer
		want string
	}{
		{token.Issuer{JWKSURL: "https://x.example/jwks"}, "issuer: required"},
		{token.Issuer{Issuer: "x"}, "exactly one of"},
		{token.Issuer{Issuer: "x", JWKSURL: "https://x.example/jwks", Secret: strings.Repeat("s", 32)}, "exactly one of"},
		{token.Issuer{Issuer: "x", JWKSURL: "http://x.example/jwks"}, "https"},
		{token.Issuer{Issuer: "x", JWKSURL: "https://x.example/jwks", Algorithms: []string{"HS256"}}, "not one of"},
		{token.Issuer{Issuer: "x", JWKSURL: "https://x.example/jwks", Algorithms: []string{"none"}}, "not one of"},
		{token.Issuer{Issuer: "x", Secret: strings.Repeat("s", 32), Algorithms: []string{"RS256"}}, "not one of"},
		{token.Issuer{Issuer: "x", Secret: "short"}, "at least 32 bytes"},
		{token.Issuer{Issuer: "x", JWKSURL: "https://x.example/jwks", UserPrefix: "a/b"}, "user_prefix"},
	} {
		if err := tc.is.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.is, err, tc.want)
		}
	}
	for _, ok := range []token.Issuer{
		{Issuer: "x", JWKSURL: "https://x.example/jwks"},
		{Issuer: "x", JWKSURL: "http://127.0.0.1:8081/jwks"},
		{Issuer: "x", Secret: strings.Repeat("s", 32), Algorithms: []string{"HS512"}},
	} {
		if err := ok.Validate(); err != nil {
			t.Errorf("%+v: %v", ok, err)
		}
	}
}
