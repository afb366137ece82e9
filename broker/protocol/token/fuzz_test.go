package token_test

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/chatd/chatd/broker/protocol/token"
)

// FuzzVerify feeds Verify and Subject arbitrary strings and checks every
// accepted one against an oracle written without the jwt package's parser:
// it must carry a valid HMAC-SHA256 of its first two segments under the
// secret, say HS256, be unexpired, and name the user it was minted for.
func FuzzVerify(f *testing.F) {
	// signingInput -> user for the tokens minted in this run. Mint stamps
	// the current time, so these cannot live in testdata; the fixed-claims
	// tokens there are checked by the oracle alone.
	minted := map[string]string{}
	for _, user := range []string{"alice", "bob", "a.b-C_9"} {
		tok, err := token.Mint(secret, user, time.Hour)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(tok, user)
		f.Add(tok, "mallory")
		minted[tok[:strings.LastIndexByte(tok, '.')]] = user
	}
	for _, s := range []struct {
		key  []byte
		ttl  time.Duration
		user string
	}{
		{[]byte("another secret entirely"), time.Hour, "alice"},
		{secret, -time.Minute, "alice"},
	} {
		tok, err := token.Mint(s.key, s.user, s.ttl)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(tok, s.user)
	}
	good := token.NewVerifier(secret)
	other := token.NewVerifier([]byte("not the secret"))
	f.Fuzz(func(t *testing.T, tok, user string) {
		sub, err := good.Subject(tok)
		_, verr := good.Verify(tok, user)
		if err != nil {
			if !errors.Is(err, token.ErrInvalid) {
				t.Fatalf("Subject(%q): error %v does not wrap ErrInvalid", tok, err)
			}
			if verr == nil {
				t.Fatalf("Verify(%q, %q) accepted a token Subject refuses (%v)", tok, user, err)
			}
			return
		}
		if (verr == nil) != (sub == user) {
			t.Fatalf("Verify(%q, %q) = %v, but the subject is %q", tok, user, verr, sub)
		}
		if sub == "" {
			t.Fatalf("Subject(%q) accepted an empty subject", tok)
		}
		if _, err := other.Subject(tok); err == nil {
			t.Fatalf("token %q verifies under two different secrets", tok)
		}
		parts := strings.Split(tok, ".")
		if len(parts) != 3 {
			t.Fatalf("accepted %q, which has %d segments", tok, len(parts))
		}
		signing := parts[0] + "." + parts[1]
		mac := hmac.New(sha256.New, secret)
		mac.Write([]byte(signing))
		sig, err := base64.RawURLEncoding.DecodeString(parts[2])
		if err != nil || !hmac.Equal(sig, mac.Sum(nil)) {
			t.Fatalf("accepted %q, whose signature is not the HMAC of its content under the secret", tok)
		}
		var header struct {
			Alg string `json:"alg"`
		}
		if err := decodeSegment(parts[0], &header); err != nil || header.Alg != "HS256" {
			t.Fatalf("accepted %q with header alg %q (%v)", tok, header.Alg, err)
		}
		var claims struct {
			Exp *jwt.NumericDate `json:"exp"`
		}
		if err := decodeSegment(parts[1], &claims); err != nil || claims.Exp == nil || !claims.Exp.After(time.Now()) {
			t.Fatalf("accepted %q, which has no future exp (%v)", tok, err)
		}
		if want, ok := minted[signing]; ok && sub != want {
			t.Fatalf("token minted for %q accepted as %q", want, sub)
		}
	})
}

// decodeSegment decodes one base64url JWT segment as JSON into v.
func decodeSegment(seg string, v any) error {
	b, err := base64.RawURLEncoding.DecodeString(seg)
	if err != nil {
		return err
	}
	return json.NewDecoder(bytes.NewReader(b)).Decode(v)
}
