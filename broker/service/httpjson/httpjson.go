// Package httpjson writes the JSON answers of chatd's HTTP API: bodies,
// and the one error body every refusal has (docs/PROTOCOL.md section 7).
package httpjson

import (
	"encoding/json"
	"log/slog"
	"net/http"
)

// Error is the body of every refusal: a protocol error code, and a
// reason for people.
type Error struct {
	Code   string `json:"error"`
	Reason string `json:"reason"`
}

// Write answers status with v as JSON.
func Write(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	// The status line is out: all that can fail now is the client's
	// connection, which is nothing to act on.
	_ = json.NewEncoder(w).Encode(v)
}

// Fail answers status with an Error of code and reason.
func Fail(w http.ResponseWriter, status int, code, reason string) {
	Write(w, status, Error{Code: code, Reason: reason})
}

// Internal answers 500 for what failed with err, the server's own fault,
// and logs err: the client learns nothing of it.
func Internal(w http.ResponseWriter, log *slog.Logger, what string, err error) {
	log.Error(what, "error", err)
	Fail(w, http.StatusInternalServerError, "internal", "internal error")
}

// Authenticated returns the user authenticate finds for r. When it finds
// none it answers 401 not_authorized, saying why, and ok is false.
func Authenticated(w http.ResponseWriter, r *http.Request, authenticate func(*http.Request) (string, error)) (user string, ok bool) {
	user, err := authenticate(r)
	if err != nil {
		Fail(w, http.StatusUnauthorized, "not_authorized", err.Error())
		return "", false
	}
	return user, true
}
