package token

import (
	"context"
	"crypto/elliptic"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/MicahParks/keyfunc/v3"
	"github.com/golang-jwt/jwt/v5"
	"golang.org/x/time/rate"

	"github.com/chatd/chatd/broker/protocol/topic"
)

// Issuer is an identity provider whose tokens are accepted (auth.issuers):
// its keys, and what its tokens must say.
type Issuer struct {
	// Issuer is the exact iss of its tokens.
	Issuer string `mapstructure:"issuer" json:"issuer"`
	// JWKSURL is where it publishes its keys (https, or http on loopback).
	JWKSURL string `mapstructure:"jwks_url" json:"jwks_url"`
	// PublicKeyFile is a PEM public key (RSA, EC or Ed25519) instead.
	PublicKeyFile string `mapstructure:"public_key_file" json:"public_key_file"`
	// Secret is an HMAC key instead, for HS256 tokens.
	Secret string `mapstructure:"secret" json:"secret"`
	// Audience lists the aud values accepted, one of which a token must
	// carry; empty does not check aud.
	Audience []string `mapstructure:"audience" json:"audience"`
	// Algorithms pins the signing algorithms; empty takes those of the
	// key's type (see Validate).
	Algorithms []string `mapstructure:"algorithms" json:"algorithms"`
	// UserClaim names the claim holding the user ID; "" means sub.
	UserClaim string `mapstructure:"user_claim" json:"user_claim"`
	// UserPrefix is put before the claim's value to make the user ID,
	// so that two issuers' users cannot be each other.
	UserPrefix string `mapstructure:"user_prefix" json:"user_prefix"`
}

// Algorithm families.
var (
	hmacAlgs       = []string{"HS256", "HS384", "HS512"}
	asymmetricAlgs = []string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)

// Validate checks is: one kind of key, a usable URL, and algorithms of
// that kind only (never none, never HMAC with a public key).
func (is Issuer) Validate() error {
	if is.Issuer == "" {
		return errors.New("issuer: required (the exact iss of its tokens)")
	}
	kinds := 0
	for _, set := range []string{is.JWKSURL, is.PublicKeyFile, is.Secret} {
		if set != "" {
			kinds++
		}
	}
	if kinds != 1 {
		return fmt.Errorf("issuer %s: give exactly one of jwks_url, public_key_file and secret", is.Issuer)
	}
	if is.JWKSURL != "" {
		if err := checkJWKSURL(is.JWKSURL); err != nil {
			return fmt.Errorf("issuer %s: jwks_url: %w", is.Issuer, err)
		}
	}
	if is.Secret != "" && len(is.Secret) < 32 {
		return fmt.Errorf("issuer %s: secret: at least 32 bytes, got %d", is.Issuer, len(is.Secret))
	}
	allowed := asymmetricAlgs
	if is.Secret != "" {
		allowed = hmacAlgs
	}
	for _, a := range is.Algorithms {
		if !slices.Contains(allowed, a) {
			return fmt.Errorf("issuer %s: algorithm %q is not one of %s for its kind of key", is.Issuer, a, strings.Join(allowed, ", "))
		}
	}
	if c := is.UserClaim; c != "" && !validClaimName(c) {
		return fmt.Errorf("issuer %s: user_claim %q is not a claim name", is.Issuer, c)
	}
	if is.UserPrefix != "" && !topic.ValidUser(is.UserPrefix) {
		return fmt.Errorf("issuer %s: user_prefix %q: only A-Z a-z 0-9 _ . -", is.Issuer, is.UserPrefix)
	}
	return nil
}

func validClaimName(c string) bool {
	return len(c) <= 64 && !strings.ContainsAny(c, " \t\n")
}

// checkJWKSURL accepts https URLs, and http ones to a loopback host (an
// IdP on the same machine, or a test's).
func checkJWKSURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil {
		return err
	}
	switch {
	case u.Host == "":
		return fmt.Errorf("%q has no host", raw)
	case u.Scheme == "https":
		return nil
	case u.Scheme == "http":
		host := u.Hostname()
		if ip := net.ParseIP(host); host == "localhost" || ip != nil && ip.IsLoopback() {
			return nil
		}
		return fmt.Errorf("%q: keys are fetched over https (http only on loopback)", raw)
	}
	return fmt.Errorf("%q: want an https URL", raw)
}

// Options tune a Verifier's issuers.
type Options struct {
	// Leeway is the clock skew allowed on exp, nbf and iat.
	Leeway time.Duration
	// RefreshInterval is how often JWKS are fetched again; zero means an hour.
	RefreshInterval time.Duration
	// UnknownKIDEvery bounds the fetches that tokens with an unknown kid
	// cause: one per interval per issuer; zero means 5 minutes.
	UnknownKIDEvery time.Duration
	// Client fetches the JWKS; nil uses a client with a 10 s timeout.
	Client *http.Client
	// Logger receives fetch failures.
	Logger *slog.Logger
}

// issuer is one accepted issuer, ready to check tokens.
type issuer struct {
	cfg    Issuer
	parser *jwt.Parser
	key    jwt.Keyfunc
}

// newIssuer prepares is; a JWKS issuer starts fetching its keys in the
// background, until ctx ends.
func newIssuer(ctx context.Context, is Issuer, o Options) (*issuer, error) {
	if err := is.Validate(); err != nil {
		return nil, err
	}
	algs := is.Algorithms
	var key jwt.Keyfunc
	switch {
	case is.Secret != "":
		secret := []byte(is.Secret)
		key = func(*jwt.Token) (any, error) { return secret, nil }
		if len(algs) == 0 {
			algs = []string{"HS256"}
		}
	case is.PublicKeyFile != "":
		pub, alg, err := readPublicKey(is.PublicKeyFile)
		if err != nil {
			return nil, fmt.Errorf("issuer %s: %w", is.Issuer, err)
		}
		key = func(*jwt.Token) (any, error) { return pub, nil }
		if len(algs) == 0 {
			algs = alg
		}
	default:
		kf, err := jwks(ctx, is, o)
		if err != nil {
			return nil, fmt.Errorf("issuer %s: %w", is.Issuer, err)
		}
		key = kf.Keyfunc
		if len(algs) == 0 {
			algs = asymmetricAlgs
		}
	}
	opts := []jwt.ParserOption{
		jwt.WithValidMethods(algs),
		jwt.WithExpirationRequired(),
		jwt.WithIssuer(is.Issuer),
		jwt.WithIssuedAt(),
		jwt.WithLeeway(o.Leeway),
	}
	if len(is.Audience) > 0 {
		opts = append(opts, jwt.WithAudience(is.Audience...))
	}
	return &issuer{cfg: is, parser: jwt.NewParser(opts...), key: key}, nil
}

// jwks makes the key function of a JWKS issuer: keys cached, fetched
// again every RefreshInterval and, rate-limited, for an unknown kid; the
// cache keeps serving while the IdP is down, and a start while it is
// down is not an error (tokens fail until the keys come).
func jwks(ctx context.Context, is Issuer, o Options) (keyfunc.Keyfunc, error) {
	every := o.UnknownKIDEvery
	if every <= 0 {
		every = 5 * time.Minute
	}
	refresh := o.RefreshInterval
	if refresh <= 0 {
		refresh = time.Hour
	}
	client := o.Client
	if client == nil {
		client = &http.Client{Timeout: 10 * time.Second}
	}
	log := o.Logger
	if log == nil {
		log = slog.Default()
	}
	noError := true
	return keyfunc.NewDefaultOverrideCtx(ctx, []string{is.JWKSURL}, keyfunc.Override{
		Client:                    client,
		HTTPTimeout:               client.Timeout,
		NoErrorReturnFirstHTTPReq: &noError,
		RefreshInterval:           refresh,
		RefreshUnknownKID:         rate.NewLimiter(rate.Every(every), 1),
		// This bounds the wait for the rate and the fetch after it alike
		// (jwkset uses one context for both): a token over the rate,
		// whose wait would be minutes, fails at once, and a fetch has the
		// client's timeout.
		RateLimitWaitMax: client.Timeout,
		RefreshErrorHandlerFunc: func(u string) func(context.Context, error) {
			return func(_ context.Context, err error) {
				log.Warn("JWKS fetch failed; keeping the keys fetched before", "issuer", is.Issuer, "error", err)
			}
		},
	})
}

// readPublicKey reads a PEM public key and the algorithms its type signs.
func readPublicKey(path string) (any, []string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("public_key_file: %w", err)
	}
	if k, err := jwt.ParseRSAPublicKeyFromPEM(b); err == nil {
		return k, []string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}, nil
	}
	if k, err := jwt.ParseECPublicKeyFromPEM(b); err == nil {
		switch k.Curve {
		case elliptic.P256():
			return k, []string{"ES256"}, nil
		case elliptic.P384():
			return k, []string{"ES384"}, nil
		case elliptic.P521():
			return k, []string{"ES512"}, nil
		}
		return nil, nil, fmt.Errorf("public_key_file %s: unsupported curve", path)
	}
	if k, err := jwt.ParseEdPublicKeyFromPEM(b); err == nil {
		return k, []string{"EdDSA"}, nil
	}
	return nil, nil, fmt.Errorf("public_key_file %s: not a PEM RSA, EC or Ed25519 public key", path)
}
