// Package apikeys holds the API keys of app backends: credentials for the
// server API (PROTOCOL.md section 7), separate from users' access tokens.
// A key is shown once when made; only a hash of its secret is stored, in
// a file of the data directory on one node and in a replicated JetStream
// bucket in a cluster.
package apikeys

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"
)

// Scopes a key may hold: what each lets its backend do.
const (
	// ScopeSend sends messages from server-named senders.
	ScopeSend = "send"
	// ScopeModerate disconnects devices and bans users.
	ScopeModerate = "moderate"
	// ScopeRead queries presence, devices and queues.
	ScopeRead = "read"
	// ScopeErase erases and exports users.
	ScopeErase = "erase"
)

// Scopes lists every scope, in the order --help shows them.
var Scopes = []string{ScopeSend, ScopeModerate, ScopeRead, ScopeErase}

// prefix starts every key, so that a key is recognised as one in logs,
// configuration and secret scanners, and never taken for a JWT.
const prefix = "chatd_"

// ErrUnknown is the error of an operation on a key that does not exist.
var ErrUnknown = errors.New("no such API key")

// Key is what is stored of an API key: never its secret.
type Key struct {
	// ID names the key in lists and revocations; it is part of the key.
	ID string `json:"id"`
	// Name is what the operator called it.
	Name string `json:"name"`
	// Scopes are what it may do.
	Scopes []string `json:"scopes"`
	// Hash is the hex SHA-256 of the key's secret part.
	Hash string `json:"hash"`
	// Created is when it was made, in Unix seconds.
	Created int64 `json:"created"`
}

// Allows reports whether k holds scope.
func (k Key) Allows(scope string) bool { return slices.Contains(k.Scopes, scope) }

// Store keeps keys. Both implementations run the one conformance test.
type Store interface {
	// Put adds or replaces a key.
	Put(k Key) error
	// Get returns the key of id, or ErrUnknown.
	Get(id string) (Key, error)
	// List returns every key, by ID.
	List() ([]Key, error)
	// Delete revokes the key of id, or answers ErrUnknown.
	Delete(id string) error
}

var namePattern = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,64}$`)

// New makes a key named name with scopes at now: what to store, and the
// key to show once.
func New(name string, scopes []string, now time.Time) (Key, string, error) {
	if !namePattern.MatchString(name) {
		return Key{}, "", fmt.Errorf("key name %q: 1-64 characters of A-Z a-z 0-9 _ . -", name)
	}
	if len(scopes) == 0 {
		return Key{}, "", fmt.Errorf("a key needs at least one scope of %s", strings.Join(Scopes, ", "))
	}
	var clean []string
	for _, s := range scopes {
		if !slices.Contains(Scopes, s) {
			return Key{}, "", fmt.Errorf("unknown scope %q: scopes are %s", s, strings.Join(Scopes, ", "))
		}
		if !slices.Contains(clean, s) {
			clean = append(clean, s)
		}
	}
	var id [8]byte
	var secret [32]byte
	if _, err := rand.Read(id[:]); err != nil {
		return Key{}, "", fmt.Errorf("key id: %w", err)
	}
	if _, err := rand.Read(secret[:]); err != nil {
		return Key{}, "", fmt.Errorf("key secret: %w", err)
	}
	k := Key{ID: hex.EncodeToString(id[:]), Name: name, Scopes: clean, Created: now.Unix()}
	s := base64.RawURLEncoding.EncodeToString(secret[:])
	k.Hash = hash(s)
	return k, prefix + k.ID + "_" + s, nil
}

// IsKey reports whether token has the form of an API key (and so is not a
// user's access token).
func IsKey(token string) bool { return strings.HasPrefix(token, prefix) }

// Check returns the stored key that token is, or an error that says why
// it is none.
func Check(s Store, token string) (Key, error) {
	rest, ok := strings.CutPrefix(token, prefix)
	id, secret, ok2 := strings.Cut(rest, "_")
	if !ok || !ok2 || id == "" || secret == "" {
		return Key{}, errors.New("not an API key")
	}
	k, err := s.Get(id)
	if errors.Is(err, ErrUnknown) {
		return Key{}, errors.New("unknown or revoked API key")
	}
	if err != nil {
		return Key{}, fmt.Errorf("read API key %s: %w", id, err)
	}
	if subtle.ConstantTimeCompare([]byte(hash(secret)), []byte(k.Hash)) != 1 {
		return Key{}, errors.New("unknown or revoked API key")
	}
	return k, nil
}

// validID reports whether id can be a key's ID, before any store sees it.
func validID(id string) bool {
	if len(id) != 16 {
		return false
	}
	_, err := hex.DecodeString(id)
	return err == nil
}

func hash(secret string) string {
	h := sha256.Sum256([]byte(secret))
	return hex.EncodeToString(h[:])
}
