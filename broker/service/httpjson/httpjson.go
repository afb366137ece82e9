// Package httpjson writes the JSON answers of chatd's HTTP API: bodies,
// and the one error body every refusal has (docs/PROTOCOL.md section 7).
package httpjson

import (
	"encoding/json"
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
