package envelope

import (
	"bytes"
	"errors"
	"fmt"
)

// ErrSyntax is malformed JSON met by a Scanner. It is no protocol error:
// the server scans only what json.Valid has accepted, so only clients of
// the protocol, such as the load tester, ever see it.
var ErrSyntax = errors.New("malformed JSON")

// Scanner reads the top-level members of one JSON object, or the elements
// of one JSON array, as raw slices of its input, because the server and
// the load tester do this for every message and must not build the
// document. It allocates only to report malformed input.
//
// It checks the structure it walks: keys are strings followed by a colon,
// members are separated by commas and closed, and every value is present,
// with its strings terminated and its brackets balanced. It does not check
// what lies inside numbers, literals and strings, nor that nested brackets
// pair up; json.Valid does that where it matters.
type Scanner struct {
	b           []byte
	i           int  // where Next goes on reading, spaces skipped
	open, close byte // '{' and '}' for an object, '[' and ']' for an array
	state       byte
	// The last member read is b[key:colon] (no key in an array) and
	// b[val:end]. Offsets rather than slices keep Next free of pointer
	// writes.
	key, colon, val, end int
	err                  error
}

// Scanner states.
const (
	atStart    = iota // the opening bracket is still to be read
	atMember          // a member or the closing bracket comes next
	afterValue        // a comma or the closing bracket comes next
	atEnd             // closed, or malformed
)

// ScanObject returns a Scanner over the members of the JSON object b.
func ScanObject(b []byte) Scanner { return Scanner{b: b, open: '{', close: '}'} }

// ScanArray returns a Scanner over the elements of the JSON array b.
func ScanArray(b []byte) Scanner { return Scanner{b: b, open: '[', close: ']'} }

// Next reads the next member; it returns false at the end of the object
// or array, or at malformed input, which Err then reports.
func (s *Scanner) Next() bool {
	b, i := s.b, s.i
	switch s.state {
	case atEnd:
		return false
	case atStart:
		i = skipSpace(b, 0)
		if i >= len(b) || b[i] != s.open {
			return s.fail("expected "+string(s.open), i)
		}
		i = skipSpace(b, i+1)
	case afterValue:
		if i < len(b) && b[i] == ',' {
			i = skipSpace(b, i+1)
			break
		}
		if i >= len(b) || b[i] != s.close {
			return s.fail("expected , or "+string(s.close), i)
		}
		s.state = atEnd
		return false
	}
	if s.state != afterValue && i < len(b) && b[i] == s.close {
		s.state = atEnd
		return false
	}
	if s.close == '}' {
		if i >= len(b) || b[i] != '"' {
			return s.fail("expected a key", i)
		}
		keyEnd := skipString(b, i)
		if keyEnd < 0 {
			return s.fail("unterminated key", i)
		}
		s.key, s.colon = i, keyEnd
		i = skipSpace(b, keyEnd)
		if i >= len(b) || b[i] != ':' {
			return s.fail("expected :", i)
		}
		i = skipSpace(b, i+1)
	}
	valEnd := skipValue(b, i)
	if valEnd < 0 {
		return s.fail("missing or unterminated value", i)
	}
	s.val, s.end = i, valEnd
	s.i = skipSpace(b, valEnd)
	s.state = afterValue
	return true
}

// Key returns the key of an object's member read by Next as its raw JSON
// string, quotes and escapes included; nil for an array.
func (s *Scanner) Key() []byte {
	if s.close != '}' || s.state != afterValue {
		return nil
	}
	return s.b[s.key:s.colon]
}

// Value returns the member or element read by Next as raw JSON.
func (s *Scanner) Value() []byte {
	if s.state != afterValue {
		return nil
	}
	return s.b[s.val:s.end]
}

// Err returns why Next stopped before the end, or nil.
func (s *Scanner) Err() error { return s.err }

// fail stops s at malformed input and returns false for Next.
func (s *Scanner) fail(what string, at int) bool {
	s.err = fmt.Errorf("%w: %s at %d", ErrSyntax, what, at)
	s.state = atEnd
	return false
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// skipString returns the index just past the string starting at b[i] == '"',
// or -1 if it is not terminated. It is inlined: keys and the strings inside
// nested values are mostly short.
func skipString(b []byte, i int) int {
	if end, ok := closeQuote(b, i+1); ok {
		return end
	}
	return -1
}

// skipStringValue is skipString for a member's value, which may be a long
// text. Most strings hold no backslash, so past a few bytes two vectorised
// searches find the end of one.
func skipStringValue(b []byte, i int) int {
	i, ok := closeQuote(b[:min(len(b), i+32)], i+1)
	if ok {
		return i
	}
	if i >= len(b) {
		return -1
	}
	if j := bytes.IndexByte(b[i:], '"'); j >= 0 && bytes.IndexByte(b[i:i+j], '\\') < 0 {
		return i + j + 1
	}
	if i, ok = closeQuote(b, i); ok {
		return i
	}
	return -1
}

// closeQuote reads string content from b[i] and returns the index just
// past its closing quote; without one, false and where it stopped, which
// is past the escapes it read.
func closeQuote(b []byte, i int) (int, bool) {
	for ; i < len(b); i++ {
		switch b[i] {
		case '\\':
			i++
		case '"':
			return i + 1, true
		}
	}
	return i, false
}

// skipValue returns the index just past the value starting at b[i], or -1
// if there is none or it is not terminated.
func skipValue(b []byte, i int) int {
	if i >= len(b) {
		return -1
	}
	switch b[i] {
	case '"':
		return skipStringValue(b, i)
	case '{', '[':
		depth := 0
		for i < len(b) {
			switch b[i] {
			case '"':
				if i = skipString(b, i); i < 0 {
					return -1
				}
				continue
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return i + 1
				}
			}
			i++
		}
		return -1
	default:
		start := i
		for i < len(b) && b[i] != ',' && b[i] != '}' && b[i] != ']' && b[i] != ' ' && b[i] != '\t' && b[i] != '\n' && b[i] != '\r' {
			i++
		}
		if i == start {
			return -1
		}
		return i
	}
}
