// Package token mints and verifies the HS256 access tokens of PROTOCOL.md section 6.
package token

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// DevSecretFile is the name of the development secret inside the data dir.
const DevSecretFile = "dev-secret"

// ErrInvalid is wrapped by every verification failure.
var ErrInvalid = errors.New("invalid token")

// Mint returns a token for user that expires after ttl.
func Mint(secret []byte, user string, ttl time.Duration) (string, error) {
	if len(secret) == 0 {
		return "", errors.New("mint token: empty secret")
	}
	now := time.Now()
	claims := jwt.RegisteredClaims{
		Subject:   user,
		IssuedAt:  jwt.NewNumericDate(now),
		ExpiresAt: jwt.NewNumericDate(now.Add(ttl)),
	}
	s, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString(secret)
	if err != nil {
		return "", fmt.Errorf("mint token for %s: %w", user, err)
	}
	return s, nil
}

// Verifier checks tokens against one secret.
type Verifier struct {
	secret []byte
	parser *jwt.Parser
}

// NewVerifier returns a Verifier for secret that accepts only HS256 with an exp claim.
func NewVerifier(secret []byte) *Verifier {
	return &Verifier{
		secret: secret,
		parser: jwt.NewParser(
			jwt.WithValidMethods([]string{jwt.SigningMethodHS256.Alg()}),
			jwt.WithExpirationRequired(),
		),
	}
}

// Verify returns when a valid token for user expires, or an error when tok
// is not one.
func (v *Verifier) Verify(tok, user string) (time.Time, error) {
	sub, exp, err := v.parse(tok)
	if err != nil {
		return time.Time{}, err
	}
	if sub != user {
		return time.Time{}, fmt.Errorf("%w: sub %q does not match username %q", ErrInvalid, sub, user)
	}
	return exp, nil
}

// Subject returns the user a valid, unexpired token was issued to, for
// HTTP requests that carry a token but no username.
func (v *Verifier) Subject(tok string) (string, error) {
	sub, _, err := v.parse(tok)
	return sub, err
}

// parse checks tok and returns its subject and expiry.
func (v *Verifier) parse(tok string) (string, time.Time, error) {
	if tok == "" {
		return "", time.Time{}, fmt.Errorf("%w: missing", ErrInvalid)
	}
	// An empty HMAC key verifies any token signed with an empty key, which
	// anyone can forge, so fail closed.
	if len(v.secret) == 0 {
		return "", time.Time{}, fmt.Errorf("%w: verifier has no secret", ErrInvalid)
	}
	var claims jwt.RegisteredClaims
	if _, err := v.parser.ParseWithClaims(tok, &claims, func(*jwt.Token) (any, error) { return v.secret, nil }); err != nil {
		return "", time.Time{}, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if claims.Subject == "" {
		return "", time.Time{}, fmt.Errorf("%w: no sub", ErrInvalid)
	}
	// WithExpirationRequired guarantees ExpiresAt is set.
	return claims.Subject, claims.ExpiresAt.Time, nil
}

// ResolveSecret returns configured when it is set, else the development
// secret kept in dataDir, creating it on first use.
func ResolveSecret(configured, dataDir string) (secret []byte, dev bool, err error) {
	if configured != "" {
		return []byte(configured), false, nil
	}
	path := filepath.Join(dataDir, DevSecretFile)
	b, err := os.ReadFile(path)
	if err == nil {
		s := strings.TrimSpace(string(b))
		if s == "" {
			return nil, true, fmt.Errorf("development secret %s is empty", path)
		}
		return []byte(s), true, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, true, fmt.Errorf("read development secret: %w", err)
	}
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return nil, true, fmt.Errorf("create data dir %s: %w", dataDir, err)
	}
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return nil, true, fmt.Errorf("generate development secret: %w", err)
	}
	s := hex.EncodeToString(raw)
	// The secret is written whole to a temporary file and then linked into
	// place, so a concurrent caller (chatd token while chatd serve starts)
	// or a crash never sees an empty or partial secret. Link refuses to
	// replace an existing file, so when another caller wins, its secret is used.
	f, err := os.CreateTemp(dataDir, DevSecretFile+".tmp-*")
	if err != nil {
		return nil, true, fmt.Errorf("create development secret: %w", err)
	}
	tmp := f.Name()
	_, err = f.WriteString(s + "\n")
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Link(tmp, path)
	}
	if rerr := os.Remove(tmp); rerr != nil && err == nil {
		err = rerr
	}
	if errors.Is(err, os.ErrExist) {
		return ResolveSecret("", dataDir)
	}
	if err != nil {
		return nil, true, fmt.Errorf("write development secret %s: %w", path, err)
	}
	return []byte(s), true, nil
}
