package envelope

import (
	"bytes"
	"encoding/json"
	"errors"
	"slices"
	"strings"
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

func TestScan(t *testing.T) {
	obj, arr := ScanObject, ScanArray
	cases := []struct {
		name    string
		scan    func([]byte) Scanner
		in      string
		want    []string
		wantErr bool
	}{
		{"empty", obj, `{}`, nil, false},
		{"spaces", obj, " {\n\t\"a\" : 1 ,\r\"b\":\"x\" } ", []string{`"a"`, `1`, `"b"`, `"x"`}, false},
		{"nested and escaped", obj, `{"a\"b":{"c":["}",{"d":"\\"}]},"e":[]}`, []string{`"a\"b"`, `{"c":["}",{"d":"\\"}]}`, `"e"`, `[]`}, false},
		{"backslashes before a quote", obj, `{"a":"x\\\"y\\\\","b":null}`, []string{`"a"`, `"x\\\"y\\\\"`, `"b"`, `null`}, false},
		{"long strings", obj, `{"a":"` + strings.Repeat("x", 100) + `","b":"` + strings.Repeat(`x\"`, 40) + `"}`,
			[]string{`"a"`, `"` + strings.Repeat("x", 100) + `"`, `"b"`, `"` + strings.Repeat(`x\"`, 40) + `"`}, false},
		{"an escape across the first 32 bytes", obj, `{"a":"` + strings.Repeat("x", 30) + `\"` + strings.Repeat("y", 10) + `"}`,
			[]string{`"a"`, `"` + strings.Repeat("x", 30) + `\"` + strings.Repeat("y", 10) + `"`}, false},
		{"a string of exactly 32 bytes", obj, `{"a":"` + strings.Repeat("x", 30) + `"}`, []string{`"a"`, `"` + strings.Repeat("x", 30) + `"`}, false},
		{"a string of 33 bytes", obj, `{"a":"` + strings.Repeat("x", 31) + `"}`, []string{`"a"`, `"` + strings.Repeat("x", 31) + `"`}, false},
		{"literals", obj, `{"t":true,"f":false,"n":-1.5e3}`, []string{`"t"`, `true`, `"f"`, `false`, `"n"`, `-1.5e3`}, false},
		{"duplicate keys are all read", obj, `{"id":"a","id":"b"}`, []string{`"id"`, `"a"`, `"id"`, `"b"`}, false},
		{"nothing", obj, ``, nil, true},
		{"array for an object", obj, `[1]`, nil, true},
		{"unclosed", obj, `{"a":1`, []string{`"a"`, `1`}, true},
		{"unterminated key", obj, `{"a`, nil, true},
		{"unterminated string value", obj, `{"a":"x\"}`, nil, true},
		{"unterminated long string value", obj, `{"a":"` + strings.Repeat("x", 100), nil, true},
		{"unterminated nested value", obj, `{"a":{"b":[1}`, nil, true},
		{"key not a string", obj, `{a:1}`, nil, true},
		{"missing colon", obj, `{"a" 1}`, nil, true},
		{"missing value", obj, `{"a":}`, nil, true},
		{"value at the end", obj, `{"a":`, nil, true},
		{"leading comma", obj, `{,"a":1}`, nil, true},
		{"trailing comma", obj, `{"a":1,}`, []string{`"a"`, `1`}, true},
		{"missing comma", obj, `{"a":1 "b":2}`, []string{`"a"`, `1`}, true},
		{"empty array", arr, ` [ ] `, nil, false},
		{"mixed array", arr, `["a", 1,{"x":"]"} ,[2]]`, []string{`"a"`, `1`, `{"x":"]"}`, `[2]`}, false},
		{"object for an array", arr, `{"a":1}`, nil, true},
		{"unclosed array", arr, `["a"`, []string{`"a"`}, true},
		{"trailing comma in an array", arr, `["a",]`, []string{`"a"`}, true},
		{"missing comma in an array", arr, `["a" "b"]`, []string{`"a"`}, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := members(c.scan([]byte(c.in)))
			if (err != nil) != c.wantErr || (err != nil && !errors.Is(err, ErrSyntax)) {
				t.Errorf("scanning %q: err = %v, wantErr %v", c.in, err, c.wantErr)
			}
			if !slices.Equal(got, c.want) {
				t.Errorf("scanning %q read %q, want %q", c.in, got, c.want)
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
