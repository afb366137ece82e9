package envelope

import (
	"bytes"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"
)

// receiptLimit is the server's default max_message_bytes, the limit
// ReadReceipt is called with on the publish path.
const receiptLimit = 64 << 10

func FuzzReadReceipt(f *testing.F) {
	for _, s := range []string{
		`{"status":"read","ids":["m-1","m-2"]}`,
		`{"status":"delivered","ids":["m-1"]}`,
		`{"status":"read","ids":[]}`,
		`{"status":"read","ids":[""]}`,
		`{"status":"read","ids":["m-1",1]}`,
		`{"status":"read","ids":null}`,
		`["read"]`,
		`null`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		ids, err := ReadReceipt(b, receiptLimit)
		if err != nil {
			// The publish path maps exactly these two errors to protocol codes.
			if !errors.Is(err, ErrBadPayload) && !errors.Is(err, ErrTooLarge) {
				t.Fatalf("ReadReceipt(%q): error %v wraps neither ErrBadPayload nor ErrTooLarge", b, err)
			}
			if ids != nil {
				t.Fatalf("ReadReceipt(%q) returned ids %q with error %v", b, ids, err)
			}
			return
		}
		// Decoded independently of ReadReceipt's struct: the document must
		// be an object, so a bare array or string never passes as a receipt.
		var obj map[string]json.RawMessage
		if err := json.Unmarshal(b, &obj); err != nil || obj == nil {
			t.Fatalf("accepted %q, which is not a JSON object (%v)", b, err)
		}
		// encoding/json matches keys case-insensitively, so look for any
		// spelling of "status" holding "read".
		read := false
		for k, v := range obj {
			var s string
			if strings.EqualFold(k, "status") && json.Unmarshal(v, &s) == nil && s == "read" {
				read = true
			}
		}
		if !read {
			t.Fatalf("accepted %q without status \"read\"", b)
		}
		if len(ids) == 0 || len(ids) > MaxReceiptIDs {
			t.Fatalf("accepted %q with %d ids", b, len(ids))
		}
		for _, id := range ids {
			if len(id) == 0 || len(id) > MaxIDLen {
				t.Fatalf("accepted %q with an id of %d bytes", b, len(id))
			}
		}
		for _, id := range ids {
			exactID(t, b, id)
		}
		// The ids go back out in a Receipt event; they must survive that
		// encoding unchanged.
		var ev struct {
			IDs []string `json:"ids"`
		}
		out := Receipt("read", "bob", ids, 1)
		if err := json.Unmarshal(out, &ev); err != nil || !slices.Equal(ev.IDs, ids) {
			t.Fatalf("Receipt of ids %q is %s, which does not decode to them (%v)", ids, out, err)
		}
	})
}

func FuzzParseMeta(f *testing.F) {
	f.Add("alice", "", "m-1", []byte("alice\x00\x00m-1"))
	f.Add("alice", "g1", "id\x00with\x00nuls", []byte("alice\x00g1\x00id\x00x"))
	f.Add("", "g", "m", []byte("\x00g\x00m"))
	f.Add("a\x00b", "g", "m", []byte("alice"))
	f.Fuzz(func(t *testing.T, from, group, id string, raw []byte) {
		// Round trip: Meta's output for a sender (never empty, never
		// holding a NUL: a validated user ID) and a group without NUL.
		if from != "" && !strings.Contains(from, "\x00") && !strings.Contains(group, "\x00") {
			f2, g2, id2, ok := ParseMeta(Meta(from, group, id))
			if !ok || f2 != from || g2 != group || id2 != id {
				t.Fatalf("ParseMeta(Meta(%q, %q, %q)) = %q, %q, %q, %v", from, group, id, f2, g2, id2, ok)
			}
		}
		// Arbitrary stored bytes (a corrupt or foreign value) never panic,
		// and whatever is accepted is exactly what Meta would have written.
		f2, g2, id2, ok := ParseMeta(raw)
		if !ok {
			return
		}
		if f2 == "" || strings.Contains(f2, "\x00") || strings.Contains(g2, "\x00") {
			t.Fatalf("ParseMeta(%q) accepted sender %q, group %q", raw, f2, g2)
		}
		if again := Meta(f2, g2, id2); !bytes.Equal(again, raw) {
			t.Fatalf("ParseMeta(%q) = %q, %q, %q; Meta of those is %q", raw, f2, g2, id2, again)
		}
	})
}

// exactID fails the test unless id, accepted from payload, is what its
// sender wrote: valid UTF-8, and a replacement character in it was in the
// payload, literally or escaped, rather than made by decoding.
func exactID(t *testing.T, payload []byte, id string) {
	t.Helper()
	if !utf8.ValidString(id) {
		t.Fatalf("accepted %q with id %q, which is not valid UTF-8", payload, id)
	}
	if strings.ContainsRune(id, utf8.RuneError) && !bytes.Contains(payload, []byte("\uFFFD")) &&
		!bytes.Contains(bytes.ToLower(payload), []byte(`\ufffd`)) {
		t.Fatalf("accepted %q with id %q: a replacement character the payload does not hold", payload, id)
	}
}

// FuzzDecodeString checks decodeString, which skips json.Unmarshal for
// plain tokens, against json.Unmarshal on every valid string token.
func FuzzDecodeString(f *testing.F) {
	for _, s := range []string{`"m-1"`, `"é😀"`, `"a\"b"`, `"\u0041"`, `"\ud83d\ude00"`, `""`, "\"\xff\"", `"`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, tok []byte) {
		got, err := decodeString(tok)
		var want string
		if len(tok) == 0 || tok[0] != '"' || json.Unmarshal(tok, &want) != nil {
			return // callers pass only string tokens of valid documents
		}
		switch {
		case err == nil && got != want:
			t.Fatalf("decodeString(%q) = %q, json.Unmarshal gives %q", tok, got, want)
		case err != nil && exactString(tok):
			t.Fatalf("decodeString(%q): %v; json.Unmarshal gives %q", tok, err, want)
		}
	})
}
