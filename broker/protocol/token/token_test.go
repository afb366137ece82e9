package token_test

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/chatd/chatd/broker/protocol/token"
)

var secret = []byte("0123456789abcdef0123456789abcdef")

// sign signs claims with method and key, failing the test on error.
func sign(t *testing.T, method jwt.SigningMethod, claims jwt.Claims, key any) string {
	t.Helper()
	s, err := jwt.NewWithClaims(method, claims).SignedString(key)
	if err != nil {
		t.Fatalf("sign %s: %v", method.Alg(), err)
	}
	return s
}

// mint mints a token with the package under test, failing the test on error.
func mint(t *testing.T, key []byte, user string, ttl time.Duration) string {
	t.Helper()
	s, err := token.Mint(key, user, ttl)
	if err != nil {
		t.Fatalf("Mint: %v", err)
	}
	return s
}

// claimsFor returns valid claims for user expiring in an hour.
func claimsFor(user string) jwt.RegisteredClaims {
	now := time.Now()
	return jwt.RegisteredClaims{
		Subject:   user,
		IssuedAt:  jwt.NewNumericDate(now),
		ExpiresAt: jwt.NewNumericDate(now.Add(time.Hour)),
	}
}

// hmacWithHeader builds a token with an arbitrary header, HMAC-SHA256 signed
// with key, to model an attacker who controls the alg field.
func hmacWithHeader(t *testing.T, header string, claims jwt.RegisteredClaims, key []byte) string {
	t.Helper()
	unsigned := jwt.NewWithClaims(jwt.SigningMethodHS256, claims)
	body, err := unsigned.SigningString()
	if err != nil {
		t.Fatal(err)
	}
	_, payload, _ := strings.Cut(body, ".")
	signing := base64.RawURLEncoding.EncodeToString([]byte(header)) + "." + payload
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(signing))
	return signing + "." + base64.RawURLEncoding.EncodeToString(mac.Sum(nil))
}

func TestVerify(t *testing.T) {
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		secret []byte
		tok    func(t *testing.T) string
		user   string
		ok     bool
	}{
		{
			name: "valid token accepted",
			tok:  func(t *testing.T) string { return mint(t, secret, "alice", time.Hour) },
			user: "alice",
			ok:   true,
		},
		{
			name: "expired refused",
			tok:  func(t *testing.T) string { return mint(t, secret, "alice", -time.Second) },
			user: "alice",
		},
		{
			name: "wrong key refused",
			tok:  func(t *testing.T) string { return mint(t, []byte("another secret entirely"), "alice", time.Hour) },
			user: "alice",
		},
		{
			name: "alg none refused",
			tok: func(t *testing.T) string {
				return sign(t, jwt.SigningMethodNone, claimsFor("alice"), jwt.UnsafeAllowNoneSignatureType)
			},
			user: "alice",
		},
		{
			name: "HS384 refused",
			tok:  func(t *testing.T) string { return sign(t, jwt.SigningMethodHS384, claimsFor("alice"), secret) },
			user: "alice",
		},
		{
			name: "HS512 refused",
			tok:  func(t *testing.T) string { return sign(t, jwt.SigningMethodHS512, claimsFor("alice"), secret) },
			user: "alice",
		},
		{
			name: "RS256 refused",
			tok:  func(t *testing.T) string { return sign(t, jwt.SigningMethodRS256, claimsFor("alice"), rsaKey) },
			user: "alice",
		},
		{
			name: "RS256 header with HMAC signature refused",
			tok: func(t *testing.T) string {
				return hmacWithHeader(t, `{"alg":"RS256","typ":"JWT"}`, claimsFor("alice"), secret)
			},
			user: "alice",
		},
		{
			name: "hand-built HS256 header accepted",
			tok: func(t *testing.T) string {
				return hmacWithHeader(t, `{"alg":"HS256","typ":"JWT"}`, claimsFor("alice"), secret)
			},
			user: "alice",
			ok:   true,
		},
		{
			name: "sub mismatch refused",
			tok:  func(t *testing.T) string { return mint(t, secret, "bob", time.Hour) },
			user: "alice",
		},
		{
			name: "empty sub refused",
			tok:  func(t *testing.T) string { return mint(t, secret, "", time.Hour) },
			user: "alice",
		},
		{
			name: "missing exp refused",
			tok: func(t *testing.T) string {
				return sign(t, jwt.SigningMethodHS256, jwt.RegisteredClaims{Subject: "alice"}, secret)
			},
			user: "alice",
		},
		{
			name: "not yet valid refused",
			tok: func(t *testing.T) string {
				c := claimsFor("alice")
				c.NotBefore = jwt.NewNumericDate(time.Now().Add(time.Hour))
				return sign(t, jwt.SigningMethodHS256, c, secret)
			},
			user: "alice",
		},
		{
			name: "tampered payload refused",
			tok: func(t *testing.T) string {
				good := strings.Split(mint(t, secret, "alice", time.Hour), ".")
				forged := strings.Split(mint(t, secret, "mallory", time.Hour), ".")
				return good[0] + "." + forged[1] + "." + good[2]
			},
			user: "mallory",
		},
		{
			name: "empty token refused",
			tok:  func(*testing.T) string { return "" },
			user: "alice",
		},
		{
			name: "garbage refused",
			tok:  func(*testing.T) string { return "not a token" },
			user: "alice",
		},
		{
			name: "three garbage segments refused",
			tok:  func(*testing.T) string { return "a.b.c" },
			user: "alice",
		},
		{
			name:   "empty verifier secret refuses a token signed with the empty key",
			secret: []byte{},
			tok:    func(t *testing.T) string { return sign(t, jwt.SigningMethodHS256, claimsFor("alice"), []byte{}) },
			user:   "alice",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			key := secret
			if tt.secret != nil {
				key = tt.secret
			}
			_, err := token.NewVerifier(key).Verify(tt.tok(t), tt.user)
			switch {
			case tt.ok && err != nil:
				t.Fatalf("Verify refused a valid token: %v", err)
			case !tt.ok && err == nil:
				t.Fatal("Verify accepted an invalid token")
			case !tt.ok && !errors.Is(err, token.ErrInvalid):
				t.Fatalf("Verify error %v does not wrap ErrInvalid", err)
			}
		})
	}
}

func TestMintEmptySecret(t *testing.T) {
	if _, err := token.Mint(nil, "alice", time.Hour); err == nil {
		t.Fatal("Mint with an empty secret succeeded")
	}
}

func TestResolveSecretConfiguredWins(t *testing.T) {
	dir := t.TempDir()
	got, dev, err := token.ResolveSecret("configured", dir)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != "configured" || dev {
		t.Fatalf("ResolveSecret = %q, dev %v; want configured, dev false", got, dev)
	}
	if _, err := os.Stat(filepath.Join(dir, token.DevSecretFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("configured secret still created a development secret: %v", err)
	}
}

func TestResolveSecretDev(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "nested", "data")
	first, dev, err := token.ResolveSecret("", dir)
	if err != nil {
		t.Fatal(err)
	}
	if !dev || len(first) < 32 {
		t.Fatalf("first call: secret %q dev %v; want a long development secret", first, dev)
	}
	fi, err := os.Stat(filepath.Join(dir, token.DevSecretFile))
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Errorf("development secret mode %v, want 0600", perm)
	}
	second, dev, err := token.ResolveSecret("", dir)
	if err != nil {
		t.Fatal(err)
	}
	if string(second) != string(first) || !dev {
		t.Fatalf("second call: secret %q dev %v; want %q dev true", second, dev, first)
	}
	tok := mint(t, first, "alice", time.Hour)
	if _, err := token.NewVerifier(second).Verify(tok, "alice"); err != nil {
		t.Fatalf("token minted with the first secret refused by the second: %v", err)
	}
}

func TestResolveSecretErrors(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T, dir string) string
	}{
		{
			name: "empty secret file",
			setup: func(t *testing.T, dir string) string {
				if err := os.WriteFile(filepath.Join(dir, token.DevSecretFile), []byte("\n"), 0o600); err != nil {
					t.Fatal(err)
				}
				return dir
			},
		},
		{
			name: "data dir under a regular file",
			setup: func(t *testing.T, dir string) string {
				file := filepath.Join(dir, "file")
				if err := os.WriteFile(file, nil, 0o600); err != nil {
					t.Fatal(err)
				}
				return filepath.Join(file, "data")
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dataDir := tt.setup(t, t.TempDir())
			if s, _, err := token.ResolveSecret("", dataDir); err == nil {
				t.Fatalf("ResolveSecret succeeded with %q", s)
			}
		})
	}
}

// TestResolveSecretConcurrent models `chatd serve` and `chatd token` creating
// the development secret at the same moment: every caller must get the same
// secret and none may see a half-written file.
func TestResolveSecretConcurrent(t *testing.T) {
	for range 20 {
		dir := t.TempDir()
		const n = 8
		secrets := make([][]byte, n)
		errs := make([]error, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() { secrets[i], _, errs[i] = token.ResolveSecret("", dir) })
		}
		wg.Wait()
		for i := range n {
			if errs[i] != nil {
				t.Fatalf("caller %d: %v", i, errs[i])
			}
			if string(secrets[i]) != string(secrets[0]) {
				t.Fatalf("caller %d got %q, caller 0 got %q", i, secrets[i], secrets[0])
			}
		}
	}
}
