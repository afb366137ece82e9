package serverapi

import (
	"fmt"
	"net/http"
	"time"

	"github.com/chatd/chatd/broker/msgpath"
	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/chatd/chatd/broker/protocol/topic"
	"github.com/chatd/chatd/broker/service/apikeys"
	"github.com/chatd/chatd/broker/service/httpjson"
	"github.com/chatd/chatd/broker/service/revocations"
)

// Revocations keeps the revoked tokens (revocations.Store).
type Revocations interface {
	// Revoke stores r and ends the sessions it revokes on every node.
	Revoke(r revocations.Revocation) (revocations.Revocation, error)
	// List returns the revocations that hold now.
	List() []revocations.Revocation
}

// Tokens checks access tokens (token.Verifier).
type Tokens interface {
	// Check verifies a token and returns its claims.
	Check(tok string) (token.Claims, error)
}

// maxLeeway is the most auth.leeway allows: a token is accepted that
// long past its exp, and so revoked that long.
const maxLeeway = 5 * time.Minute

// RevokeRequest is the body of POST /v1/server/revocations: a token
// itself, a token by its issuer and jti, or a user's tokens.
type RevokeRequest struct {
	// Token is a valid token to revoke (it must have a jti).
	Token string `json:"token"`
	// Issuer and JTI name a token; Issuer "" is the shared secret's.
	Issuer string `json:"issuer"`
	JTI    string `json:"jti"`
	// Expires is that token's exp, in Unix seconds; 0 keeps the
	// revocation for auth.max_token_age.
	Expires int64 `json:"expires"`
	// User revokes every token of the user issued up to Before.
	User string `json:"user"`
	// Before is in Unix seconds; 0 means now.
	Before int64 `json:"before"`
}

// RevocationList is the body of GET /v1/server/revocations.
type RevocationList struct {
	// Revocations are those that hold now, newest first.
	Revocations []revocations.Revocation `json:"revocations"`
}

func (h *Handler) registerRevocations(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/server/revocations", h.revoke)
	mux.HandleFunc("GET /v1/server/revocations", h.listRevocations)
}

func (h *Handler) revoke(w http.ResponseWriter, r *http.Request) {
	k, ok := h.auth(w, r, apikeys.ScopeModerate)
	if !ok {
		return
	}
	var req RevokeRequest
	if !decodeBody(w, r, &req, maxModerationBody) {
		return
	}
	bad := func(reason string) { httpjson.Fail(w, http.StatusBadRequest, msgpath.CodeBadPayload, reason) }
	now := h.Now()
	var rev revocations.Revocation
	switch {
	case req.Token != "" && req.JTI == "" && req.User == "":
		c, err := h.Tokens.Check(req.Token)
		if err != nil {
			bad("token: " + err.Error() + " (a token that is not accepted needs no revoking)")
			return
		}
		if c.ID == "" {
			bad("token: it has no jti; revoke the user's tokens instead ({\"user\":...})")
			return
		}
		rev = revocations.Revocation{Issuer: c.Issuer, JTI: c.ID, Until: c.Expiry.Add(maxLeeway).Unix()}
	case req.JTI != "" && req.Token == "" && req.User == "":
		until := now.Add(h.MaxTokenAge).Unix()
		if req.Expires > 0 {
			until = time.Unix(req.Expires, 0).Add(maxLeeway).Unix()
		}
		rev = revocations.Revocation{Issuer: req.Issuer, JTI: req.JTI, Until: until}
	case req.User != "" && req.Token == "" && req.JTI == "":
		if !topic.ValidUser(req.User) {
			bad(fmt.Sprintf("user %q is not a user ID", req.User))
			return
		}
		before := req.Before
		if before == 0 {
			before = now.Unix()
		}
		rev = revocations.Revocation{User: req.User, Before: before, Until: time.Unix(before, 0).Add(h.MaxTokenAge).Unix()}
	default:
		bad(`give one of {"token":...}, {"jti":...,"issuer":...}, {"user":...}`)
		return
	}
	if rev.Until <= now.Unix() {
		bad("the tokens named have expired already")
		return
	}
	rev, err := h.Revocations.Revoke(rev)
	if err != nil {
		h.internal(w, "revoke", err)
		return
	}
	h.Log.Info("tokens revoked", "user", rev.User, "jti", rev.JTI, "issuer", rev.Issuer, "key", k.Name)
	httpjson.Write(w, http.StatusOK, rev)
}

func (h *Handler) listRevocations(w http.ResponseWriter, r *http.Request) {
	if _, ok := h.auth(w, r, apikeys.ScopeModerate); !ok {
		return
	}
	list := h.Revocations.List()
	if list == nil {
		list = []revocations.Revocation{}
	}
	httpjson.Write(w, http.StatusOK, RevocationList{Revocations: list})
}
