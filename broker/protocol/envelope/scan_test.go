package envelope

import (
	"bytes"
	"encoding/json"
	"errors"
	"slices"
	"testing"
)

// members returns what s reads as alternating keys and values (values
// alone for an array), and its error.
func members(s Scanner) ([]string, error) {
	var got []string
	for s.Next() {
		if s.Key() != nil {
			got = append(got, string(s.Key()))
		}
		got = append(got, string(s.Value()))
	}
	return got, s.Err()
}

func TestScanObject(t *testing.T) {
	cases := []struct {
		name    string
		in      string
		want    []string
		wantErr bool
	}{
		{"empty", `{}`, nil, false},
		{"spaces", " {\n\t\"a\" : 1 ,\r\"b\":\"x\" } ", []string{`"a"`, `1`, `"b"`, `"x"`}, false},
		{"nested and escaped", `{"a\"b":{"c":["}",{"d":"\\"}]},"e":[]}`, []string{`"a\"b"`, `{"c":["}",{"d":"\\"}]}`, `"e"`, `[]`}, false},
		{"backslashes before a quote", `{"a":"x\\\"y\\\\","b":null}`, []string{`"a"`, `"x\\\"y\\\\"`, `"b"`, `null`}, false},
		{"literals", `{"t":true,"f":false,"n":-1.5e3}`, []string{`"t"`, `true`, `"f"`, `false`, `"n"`, `-1.5e3`}, false},
		{"duplicate keys are all read", `{"id":"a","id":"b"}`, []string{`"id"`, `"a"`, `"id"`, `"b"`}, false},
		{"nothing", ``, nil, true},
		{"array", `[1]`, nil, true},
		{"unclosed", `{"a":1`, []string{`"a"`, `1`}, true},
		{"unterminated key", `{"a`, nil, true},
		{"unterminated string value", `{"a":"x\"}`, nil, true},
		{"unterminated nested value", `{"a":{"b":[1}`, nil, true},
		{"key not a string", `{a:1}`, nil, true},
		{"missing colon", `{"a" 1}`, nil, true},
		{"missing value", `{"a":}`, nil, true},
		{"value at the end", `{"a":`, nil, true},
		{"leading comma", `{,"a":1}`, nil, true},
		{"trailing comma", `{"a":1,}`, []string{`"a"`, `1`}, true},
		{"missing comma", `{"a":1 "b":2}`, []string{`"a"`, `1`}, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := members(ScanObject([]byte(c.in)))
			if (err != nil) != c.wantErr || (err != nil && !errors.Is(err, ErrSyntax)) {
				t.Errorf("ScanObject(%q): err = %v, wantErr %v", c.in, err, c.wantErr)
			}
			if !slices.Equal(got, c.want) {
				t.Errorf("ScanObject(%q) read %q, want %q", c.in, got, c.want)
			}
		})
	}
}

func TestScanArray(t *testing.T) {
	cases := []struct {
		name    string
		in      string
		want    []string
		wantErr bool
	}{
		{"empty", ` [ ] `, nil, false},
		{"mixed", `["a", 1,{"x":"]"} ,[2]]`, []string{`"a"`, `1`, `{"x":"]"}`, `[2]`}, false},
		{"object", `{"a":1}`, nil, true},
		{"unclosed", `["a"`, []string{`"a"`}, true},
		{"trailing comma", `["a",]`, []string{`"a"`}, true},
		{"missing comma", `["a" "b"]`, []string{`"a"`}, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := members(ScanArray([]byte(c.in)))
			if (err != nil) != c.wantErr || (err != nil && !errors.Is(err, ErrSyntax)) {
				t.Errorf("ScanArray(%q): err = %v, wantErr %v", c.in, err, c.wantErr)
			}
			if !slices.Equal(got, c.want) {
				t.Errorf("ScanArray(%q) read %q, want %q", c.in, got, c.want)
			}
		})
	}
}

func TestScanAllocatesNothing(t *testing.T) {
	obj := []byte(`{"kind":"msg","ids":["a","b"],"msg":{"id":"x","text":"a \"b\" c"}}`)
	arr := []byte(`["a","b"]`)
	allocs := testing.AllocsPerRun(100, func() {
		s := ScanObject(obj)
		for s.Next() {
		}
		a := ScanArray(arr)
		for a.Next() {
		}
	})
	if allocs != 0 {
		t.Errorf("scanning allocates %.0f times", allocs)
	}
}

// FuzzScan checks the scanners against encoding/json: on a valid document
// they read exactly its members, whose compacted form is the document's;
// on any other input they end without panicking, and any error is
// ErrSyntax.
func FuzzScan(f *testing.F) {
	for _, s := range []string{`{"a":1,"b":[{"c":"}"}]}`, `["x",{"y":[]},null]`, `{"\\":"\"\\"}`, `{`, `[1,]`, ` {} `} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, scan := range []func([]byte) Scanner{ScanObject, ScanArray} {
			s := scan(b)
			var rebuilt bytes.Buffer
			for s.Next() {
				if rebuilt.Len() > 0 {
					rebuilt.WriteByte(',')
				}
				if s.Key() != nil {
					rebuilt.Write(s.Key())
					rebuilt.WriteByte(':')
				}
				rebuilt.Write(s.Value())
			}
			err := s.Err()
			if err != nil && !errors.Is(err, ErrSyntax) {
				t.Fatalf("%q: error %v is not ErrSyntax", b, err)
			}
			var want bytes.Buffer
			if !json.Valid(b) || json.Compact(&want, b) != nil {
				continue
			}
			open, close := byte('{'), byte('}')
			if s.close == ']' {
				open, close = '[', ']'
			}
			if want.Bytes()[0] != open {
				if err == nil {
					t.Fatalf("%q: no error on a document that is not %c", b, open)
				}
				continue
			}
			if err != nil {
				t.Fatalf("%q: error %v on a valid document", b, err)
			}
			var got bytes.Buffer
			rebuilt.WriteByte(close)
			if err := json.Compact(&got, append([]byte{open}, rebuilt.Bytes()...)); err != nil || !bytes.Equal(got.Bytes(), want.Bytes()) {
				t.Fatalf("%q: read %s, want %s (%v)", b, got.Bytes(), want.Bytes(), err)
			}
		}
	})
}
