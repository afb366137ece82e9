// Package token mints the HS256 access tokens of PROTOCOL.md section 6
// and verifies those and the tokens of identity providers (issuers):
// RS, PS, ES and EdDSA keys from PEM files or JWKS, HMAC secrets.
package token

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/chatd/chatd/broker/protocol/topic"
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

// Verifier checks tokens: those with no iss against the shared secret
// (auth.secret, or the development secret), those of a configured issuer
// against that issuer's keys alone.
type Verifier struct {
	// secret verifies tokens without iss; empty refuses them.
	secret []byte
	parser *jwt.Parser
	// issuers are by iss, each with its own keys: one issuer's key never
	// verifies another's token.
	issuers map[string]*issuer
	leeway  time.Duration
	cancel  context.CancelFunc
}

// Claims is what a valid token says.
type Claims struct {
	// User is the user ID it was issued to.
	User string
	// Issuer is its iss; "" for the shared secret's tokens.
	Issuer string
	// ID is its jti, "" if it has none.
	ID string
	// IssuedAt is its iat, zero if it has none.
	IssuedAt time.Time
	// Expiry is its exp.
	Expiry time.Time
}

// NewVerifier returns a Verifier for the shared secret alone: HS256 with
// an exp claim.
func NewVerifier(secret []byte) *Verifier {
	v, _ := New(secret, nil, Options{})
	return v
}

// New returns a Verifier for the shared secret (tokens without iss;
// empty refuses them) and issuers; JWKS issuers fetch their keys in the
// background until Close.
func New(secret []byte, issuers []Issuer, o Options) (*Verifier, error) {
	ctx, cancel := context.WithCancel(context.Background())
	v := &Verifier{
		secret: secret,
		parser: jwt.NewParser(
			jwt.WithValidMethods([]string{jwt.SigningMethodHS256.Alg()}),
			jwt.WithExpirationRequired(),
			jwt.WithIssuedAt(),
			jwt.WithLeeway(o.Leeway),
		),
		issuers: make(map[string]*issuer, len(issuers)),
		leeway:  o.Leeway,
		cancel:  cancel,
	}
	for _, is := range issuers {
		if _, dup := v.issuers[is.Issuer]; dup {
			cancel()
			return nil, fmt.Errorf("issuer %s configured twice", is.Issuer)
		}
		i, err := newIssuer(ctx, is, o)
		if err != nil {
			cancel()
			return nil, err
		}
		v.issuers[is.Issuer] = i
	}
	return v, nil
}

// Close stops fetching keys.
func (v *Verifier) Close() { v.cancel() }

// Verify returns until when a valid token for user is accepted (its exp
// and the leeway), or an error when tok is not one.
func (v *Verifier) Verify(tok, user string) (time.Time, error) {
	c, err := v.Check(tok)
	if err != nil {
		return time.Time{}, err
	}
	if c.User != user {
		return time.Time{}, fmt.Errorf("%w: it names user %q, not username %q", ErrInvalid, c.User, user)
	}
	return v.AcceptedUntil(c), nil
}

// AcceptedUntil returns until when a token of claims c is accepted: its
// exp and the leeway.
func (v *Verifier) AcceptedUntil(c Claims) time.Time { return c.Expiry.Add(v.leeway) }

// Subject returns the user a valid, unexpired token was issued to, for
// HTTP requests that carry a token but no username.
func (v *Verifier) Subject(tok string) (string, error) {
	c, err := v.Check(tok)
	return c.User, err
}

// Check verifies tok and returns its claims.
func (v *Verifier) Check(tok string) (Claims, error) {
	if tok == "" {
		return Claims{}, fmt.Errorf("%w: missing", ErrInvalid)
	}
	var peek jwt.RegisteredClaims
	if _, _, err := jwt.NewParser().ParseUnverified(tok, &peek); err != nil {
		return Claims{}, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if peek.Issuer != "" {
		is, ok := v.issuers[peek.Issuer]
		if !ok {
			return Claims{}, fmt.Errorf("%w: unknown issuer %q", ErrInvalid, peek.Issuer)
		}
		return is.check(tok)
	}
	// An empty HMAC key verifies any token signed with an empty key, which
	// anyone can forge, so fail closed.
	if len(v.secret) == 0 {
		return Claims{}, fmt.Errorf("%w: no iss, and no shared secret to check it with", ErrInvalid)
	}
	var claims jwt.RegisteredClaims
	if _, err := v.parser.ParseWithClaims(tok, &claims, func(*jwt.Token) (any, error) { return v.secret, nil }); err != nil {
		return Claims{}, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if !topic.ValidUser(claims.Subject) {
		return Claims{}, fmt.Errorf("%w: sub %q is not a user ID", ErrInvalid, claims.Subject)
	}
	// WithExpirationRequired guarantees ExpiresAt is set.
	c := Claims{User: claims.Subject, ID: claims.ID, Expiry: claims.ExpiresAt.Time}
	if claims.IssuedAt != nil {
		c.IssuedAt = claims.IssuedAt.Time
	}
	return c, nil
}

// check verifies a token of the issuer.
func (is *issuer) check(tok string) (Claims, error) {
	claims := jwt.MapClaims{}
	if _, err := is.parser.ParseWithClaims(tok, claims, is.key); err != nil {
		return Claims{}, fmt.Errorf("%w: issuer %s: %w", ErrInvalid, is.cfg.Issuer, err)
	}
	name := is.cfg.UserClaim
	if name == "" {
		name = "sub"
	}
	raw, _ := claims[name].(string)
	user := is.cfg.UserPrefix + raw
	if raw == "" || !topic.ValidUser(user) {
		return Claims{}, fmt.Errorf("%w: issuer %s: claim %s %q does not make a user ID (1-64 of A-Z a-z 0-9 _ . -)", ErrInvalid, is.cfg.Issuer, name, raw)
	}
	c := Claims{User: user, Issuer: is.cfg.Issuer}
	c.ID, _ = claims["jti"].(string)
	// The parser required exp; iat is optional.
	if exp, err := claims.GetExpirationTime(); err == nil && exp != nil {
		c.Expiry = exp.Time
	}
	if iat, err := claims.GetIssuedAt(); err == nil && iat != nil {
		c.IssuedAt = iat.Time
	}
	return c, nil
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
