package revocations_test

import (
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/chatd/chatd/broker/service/revocations"
)

func TestMatches(t *testing.T) {
	at := func(sec int64) time.Time { return time.Unix(sec, 0) }
	byJTI := revocations.Revocation{Issuer: "idp", JTI: "t-1"}
	byUser := revocations.Revocation{User: "bob", Before: 1000}
	for _, tc := range []struct {
		name string
		r    revocations.Revocation
		c    token.Claims
		want bool
	}{
		{"its token", byJTI, token.Claims{User: "bob", Issuer: "idp", ID: "t-1"}, true},
		{"the same jti from another issuer", byJTI, token.Claims{User: "bob", Issuer: "other", ID: "t-1"}, false},
		{"another jti", byJTI, token.Claims{User: "bob", Issuer: "idp", ID: "t-2"}, false},
		{"the user's token issued before", byUser, token.Claims{User: "bob", IssuedAt: at(999)}, true},
		{"issued at the time", byUser, token.Claims{User: "bob", IssuedAt: at(1000)}, true},
		{"issued after", byUser, token.Claims{User: "bob", IssuedAt: at(1001)}, false},
		{"without iat", byUser, token.Claims{User: "bob"}, true},
		{"another user's", byUser, token.Claims{User: "alice", IssuedAt: at(1)}, false},
	} {
		if got := tc.r.Matches(tc.c); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}

// TestStore: revocations hold until their Until, are told to onRevoke,
// survive a reopen, and are forgotten once past.
func TestStore(t *testing.T) {
	db, err := badger.Open(badger.DefaultOptions(t.TempDir()).WithLogger(nil))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var mu sync.Mutex
	now := time.Unix(10_000, 0)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	var told []revocations.Revocation
	s, err := revocations.NewBadger(db, clock, func(r revocations.Revocation) { told = append(told, r) }, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Revoke(revocations.Revocation{JTI: "t-1", Until: 10_100}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Revoke(revocations.Revocation{User: "bob", Before: 9_999, Until: 20_000}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Revoke(revocations.Revocation{}); err == nil {
		t.Fatal("a revocation naming nothing was taken")
	}
	if len(told) != 2 {
		t.Fatalf("told %v", told)
	}
	if _, ok := s.Revoked(token.Claims{User: "alice", ID: "t-1"}); !ok {
		t.Fatal("the revoked jti passes")
	}
	if _, ok := s.Revoked(token.Claims{User: "bob", ID: "t-9", IssuedAt: time.Unix(9_000, 0)}); !ok {
		t.Fatal("bob's old token passes")
	}
	if _, ok := s.Revoked(token.Claims{User: "bob", ID: "t-9", IssuedAt: time.Unix(10_000, 0)}); ok {
		t.Fatal("bob's new token is refused")
	}
	again, err := revocations.NewBadger(db, clock, nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if l := again.List(); len(l) != 2 {
		t.Fatalf("after a reopen: %+v", l)
	}
	mu.Lock()
	now = time.Unix(10_100, 0)
	mu.Unlock()
	if _, ok := again.Revoked(token.Claims{User: "alice", ID: "t-1"}); ok {
		t.Fatal("a revocation outlived the token it names")
	}
	// The next revocation forgets the one past.
	if _, err := again.Revoke(revocations.Revocation{User: "carol", Before: 10_100, Until: 20_000}); err != nil {
		t.Fatal(err)
	}
	// Read at an earlier time, what is stored shows the prune.
	third, err := revocations.NewBadger(db, func() time.Time { return time.Unix(10_000, 0) }, nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if l := third.List(); len(l) != 2 {
		t.Fatalf("%d revocations stored, want bob's and carol's: %+v", len(l), l)
	}
}
