// Package revocations keeps the access tokens an app's backend revoked
// before they expire (PROTOCOL.md section 6): one token by its issuer and
// jti, or every token of a user issued up to a time (a password change,
// a stolen phone). Every node keeps them all in memory (records.Set), in
// Badger or, in a cluster, in a replicated bucket, so that a CONNECT costs
// no read; each is forgotten once the tokens it names have expired.
package revocations

import (
	"encoding/base64"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/chatd/chatd/broker/service/records"
)

// Revocation is one revoked token (Issuer and JTI), or every token of
// User issued at or before Before.
type Revocation struct {
	// Issuer and JTI name one token; Issuer is "" for the shared secret's.
	Issuer string `json:"issuer,omitempty"`
	JTI    string `json:"jti,omitempty"`
	// User names the user whose tokens issued up to Before are revoked.
	User string `json:"user,omitempty"`
	// Before is in Unix seconds.
	Before int64 `json:"before,omitempty"`
	// Until is when the tokens it names have all expired and it is
	// forgotten, in Unix seconds.
	Until int64 `json:"until"`
	// Created is when it was made, in Unix seconds.
	Created int64 `json:"created"`
}

// Matches reports whether r revokes the token of c.
func (r Revocation) Matches(c token.Claims) bool {
	if r.JTI != "" {
		return c.ID == r.JTI && c.Issuer == r.Issuer
	}
	// A token without iat cannot show it was issued after: refused.
	return c.User == r.User && (c.IssuedAt.IsZero() || c.IssuedAt.Unix() <= r.Before)
}

// key is where r is stored: valid as a Badger key suffix and a KV key.
func (r Revocation) key() string {
	if r.JTI != "" {
		return tokenKey(r.Issuer, r.JTI)
	}
	return userKey(r.User)
}

// The parts of a key are encoded, and never empty: a KV key's tokens
// are [-_=A-Za-z0-9] and a user ID may hold dots.
func tokenKey(issuer, jti string) string { return "token.i" + enc(issuer) + ".j" + enc(jti) }

func userKey(user string) string { return "user.u" + enc(user) }

func enc(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }

// Store is every revocation.
type Store struct {
	set *records.Set[Revocation]
	now func() time.Time
	log *slog.Logger
}

// OnRevoke is told of each revocation as it reaches this node, to end
// the sessions it revokes here.
type OnRevoke func(Revocation)

// Revoke stores r (Created set now) and tells every node, this one
// first; it also forgets the revocations whose tokens have all expired.
func (s *Store) Revoke(r Revocation) (Revocation, error) {
	switch {
	case r.JTI == "" && r.User == "":
		return r, fmt.Errorf("revoke: name a token (jti) or a user")
	case r.JTI != "" && r.User != "":
		return r, fmt.Errorf("revoke: name a token (jti) or a user, not both")
	}
	r.Created = s.now().Unix()
	if err := s.set.Put(r.key(), r); err != nil {
		return r, fmt.Errorf("revoke: %w", err)
	}
	s.prune()
	return r, nil
}

// Revoked returns the revocation of the token of c, if one holds.
func (s *Store) Revoked(c token.Claims) (Revocation, bool) {
	now := s.now().Unix()
	if c.ID != "" {
		if r, ok := s.set.Get(tokenKey(c.Issuer, c.ID)); ok && now < r.Until && r.Matches(c) {
			return r, true
		}
	}
	if r, ok := s.set.Get(userKey(c.User)); ok && now < r.Until && r.Matches(c) {
		return r, true
	}
	return Revocation{}, false
}

// List returns the revocations that hold now, newest first.
func (s *Store) List() []Revocation {
	now := s.now().Unix()
	out := slices.DeleteFunc(slices.Collect(maps.Values(s.set.All())), func(r Revocation) bool { return now >= r.Until })
	slices.SortFunc(out, func(a, b Revocation) int {
		if a.Created != b.Created {
			return int(b.Created - a.Created)
		}
		return strings.Compare(a.key(), b.key())
	})
	return out
}

// prune deletes the revocations past their Until. A failure is logged
// and left for the next Revoke: a past revocation matches nothing.
func (s *Store) prune() {
	now := s.now().Unix()
	for k, r := range s.set.All() {
		if now >= r.Until {
			if err := s.set.Delete(k); err != nil {
				s.log.Warn("forget an expired revocation", "key", k, "error", err)
			}
		}
	}
}

// Close stops following the other nodes' changes.
func (s *Store) Close() { s.set.Close() }
