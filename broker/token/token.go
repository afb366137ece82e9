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

// Verify returns nil when tok is a valid, unexpired token whose sub is user.
func (v *Verifier) Verify(tok, user string) error {
	if tok == "" {
		return fmt.Errorf("%w: missing", ErrInvalid)
	}
	var claims jwt.RegisteredClaims
	_, err := v.parser.ParseWithClaims(tok, &claims, func(*jwt.Token) (any, error) { return v.secret, nil })
	if err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if claims.Subject != user {
		return fmt.Errorf("%w: sub %q does not match username %q", ErrInvalid, claims.Subject, user)
	}
	return nil
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
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, os.ErrExist) {
		return ResolveSecret("", dataDir)
	}
	if err != nil {
		return nil, true, fmt.Errorf("create development secret: %w", err)
	}
	if _, err := f.WriteString(s + "\n"); err != nil {
		f.Close()
		return nil, true, fmt.Errorf("write development secret: %w", err)
	}
	if err := f.Close(); err != nil {
		return nil, true, fmt.Errorf("close development secret: %w", err)
	}
	return []byte(s), true, nil
}
