// Package envelope validates message objects and builds the envelopes of
// PROTOCOL.md sections 3 and 5.
package envelope

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"unicode/utf8"
)

// MaxIDLen is the longest message id allowed.
const MaxIDLen = 64

// Validation errors; each maps to one protocol error code.
var (
	// ErrTooLarge is a message object larger than the configured maximum.
	ErrTooLarge = errors.New("message too large")
	// ErrBadPayload is a payload that is not a JSON object with a valid id.
	ErrBadPayload = errors.New("payload is not a JSON object with a string id of 1-64 characters")
)

// Validate checks that payload is a JSON object of at most max bytes with a
// string "id" of 1-64 bytes of valid UTF-8, and returns that id.
func Validate(payload []byte, max int) (string, error) {
	if len(payload) > max {
		return "", fmt.Errorf("%w: %d bytes, limit %d", ErrTooLarge, len(payload), max)
	}
	if !json.Valid(payload) {
		return "", fmt.Errorf("%w: not valid JSON", ErrBadPayload)
	}
	id, found, err := topLevelID(payload)
	if err != nil {
		return "", err
	}
	if !found {
		return "", fmt.Errorf("%w: no id field", ErrBadPayload)
	}
	if len(id) == 0 || len(id) > MaxIDLen {
		return "", fmt.Errorf("%w: id has %d bytes", ErrBadPayload, len(id))
	}
	return id, nil
}

// RefOf returns the id of payload if it has one, for error events about
// payloads that failed other checks; "" otherwise.
func RefOf(payload []byte) string {
	if !json.Valid(payload) {
		return ""
	}
	id, _, err := topLevelID(payload)
	if err != nil || len(id) > MaxIDLen {
		return ""
	}
	return id
}

// topLevelID finds the string value of the top-level "id" key of a valid
// JSON document. It walks the document once without building it, because
// this runs for every message on the hot path.
func topLevelID(b []byte) (string, bool, error) {
	s := ScanObject(b)
	var id string
	found := false
	for s.Next() {
		if !isIDKey(s.Key()) {
			continue
		}
		v, err := decodeString(s.Value())
		if err != nil {
			return "", false, err
		}
		id, found = v, true
	}
	// In a valid document, the scanner fails only where it is no object.
	if s.Err() != nil {
		return "", false, fmt.Errorf("%w: not an object", ErrBadPayload)
	}
	return id, found, nil
}

// decodeString decodes the JSON string token tok holding an id. An id
// must decode to exactly what its sender wrote: encoding/json turns
// invalid UTF-8 and unpaired surrogate escapes into U+FFFD, so such an id
// would come back changed in receipts and error events, and its sender
// could not match them.
func decodeString(tok []byte) (string, error) {
	if len(tok) == 0 || tok[0] != '"' {
		return "", fmt.Errorf("%w: id is not a string", ErrBadPayload)
	}
	if !exactString(tok) {
		return "", fmt.Errorf("%w: id is not valid UTF-8", ErrBadPayload)
	}
	if plain, ok := plainString(tok); ok {
		return plain, nil
	}
	var s string
	if err := json.Unmarshal(tok, &s); err != nil {
		return "", fmt.Errorf("%w: id: %w", ErrBadPayload, err)
	}
	return s, nil
}

// plainString returns the content of the quoted token tok when it needs
// no decoding: nothing in it is escaped, or must be. Most ids are such,
// and json.Unmarshal would take three allocations to return the same.
func plainString(tok []byte) (string, bool) {
	if len(tok) < 2 || tok[len(tok)-1] != '"' {
		return "", false
	}
	in := tok[1 : len(tok)-1]
	for _, c := range in {
		if c < 0x20 || c == '"' || c == '\\' {
			return "", false
		}
	}
	return string(in), true
}

// decodeID decodes the JSON string token tok and checks it is an id of
// 1 to MaxIDLen bytes.
func decodeID(tok []byte) (string, error) {
	id, err := decodeString(tok)
	if err != nil {
		return "", err
	}
	if len(id) == 0 || len(id) > MaxIDLen {
		return "", fmt.Errorf("%w: id has %d bytes", ErrBadPayload, len(id))
	}
	return id, nil
}

// exactString reports whether a JSON string token decodes without
// replacement characters: it is valid UTF-8 and every \u escape of a
// UTF-16 surrogate is half of a pair.
func exactString(tok []byte) bool {
	if !utf8.Valid(tok) {
		return false
	}
	for i := 0; i < len(tok); i++ {
		if tok[i] != '\\' {
			continue
		}
		i++
		if i >= len(tok) || tok[i] != 'u' {
			continue // a one-character escape, skipped whole
		}
		r, ok := hex4(tok, i+1)
		if !ok {
			return false
		}
		i += 4
		switch {
		case r >= 0xD800 && r < 0xDC00: // high half: a low half must follow
			if i+6 >= len(tok) || tok[i+1] != '\\' || tok[i+2] != 'u' {
				return false
			}
			lo, ok := hex4(tok, i+3)
			if !ok || lo < 0xDC00 || lo > 0xDFFF {
				return false
			}
			i += 6
		case r >= 0xDC00 && r <= 0xDFFF: // a low half alone
			return false
		}
	}
	return true
}

// hex4 decodes the four hex digits at b[i:i+4].
func hex4(b []byte, i int) (rune, bool) {
	if i+4 > len(b) {
		return 0, false
	}
	var r rune
	for _, c := range b[i : i+4] {
		switch {
		case c >= '0' && c <= '9':
			r = r<<4 | rune(c-'0')
		case c >= 'a' && c <= 'f':
			r = r<<4 | rune(c-'a'+10)
		case c >= 'A' && c <= 'F':
			r = r<<4 | rune(c-'A'+10)
		default:
			return 0, false
		}
	}
	return r, true
}

func isIDKey(quoted []byte) bool {
	if string(quoted) == `"id"` {
		return true
	}
	for _, c := range quoted {
		if c == '\\' {
			var k string
			return json.Unmarshal(quoted, &k) == nil && k == "id"
		}
	}
	return false
}

// Message returns the envelope delivering msg from one user to another;
// group is "" for a direct message. User and group IDs need no escaping:
// they are validated to [A-Za-z0-9_.-].
func Message(from, to, group string, tsMillis int64, msg []byte) []byte {
	return message("msg", from, to, group, tsMillis, msg, false)
}

// ServerMessage returns the envelope of a message a backend sent as from
// through the server API: Message's, with "server":true after "from",
// which no client's message has.
func ServerMessage(from, to, group string, tsMillis int64, msg []byte) []byte {
	return message("msg", from, to, group, tsMillis, msg, true)
}

// Sent returns the copy of a message from to another user (group "" for a
// direct message) for the sender's other devices: Message's envelope with
// kind "sent".
func Sent(from, to, group string, tsMillis int64, msg []byte) []byte {
	return message("sent", from, to, group, tsMillis, msg, false)
}

func message(kind, from, to, group string, tsMillis int64, msg []byte, server bool) []byte {
	b := make([]byte, 0, len(msg)+len(from)+len(to)+len(group)+80)
	b = append(b, `{"kind":"`...)
	b = append(b, kind...)
	b = append(b, `","from":"`...)
	b = append(b, from...)
	if server {
		b = append(b, `","server":true,"to":"`...)
	} else {
		b = append(b, `","to":"`...)
	}
	b = append(b, to...)
	if group != "" {
		b = append(b, `","group":"`...)
		b = append(b, group...)
	}
	b = append(b, `","ts":`...)
	b = strconv.AppendInt(b, tsMillis, 10)
	b = append(b, `,"msg":`...)
	b = append(b, msg...)
	b = append(b, '}')
	return b
}

// Error returns the error event queued to a v3 sender whose publish was refused.
func Error(ref, code, reason string) []byte {
	ev := struct {
		Kind   string `json:"kind"`
		Ref    string `json:"ref,omitempty"`
		Code   string `json:"code"`
		Reason string `json:"reason"`
	}{"error", ref, code, reason}
	b, err := json.Marshal(ev)
	if err != nil {
		// Marshalling a struct of strings cannot fail; keep the event minimal if it ever does.
		return []byte(`{"kind":"error","code":"` + code + `"}`)
	}
	return b
}
