package envelope

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

func TestValidate(t *testing.T) {
	cases := []struct {
		name    string
		payload string
		id      string
		err     error
	}{
		{"simple", `{"id":"m-1"}`, "m-1", nil},
		{"other fields first", `{"text":"a \"quoted\" } {","n":[1,{"id":"inner"}],"id":"m-2"}`, "m-2", nil},
		{"whitespace", " {\n \"id\" : \"m-3\" \t} ", "m-3", nil},
		{"escaped key", `{"\u0069d":"m-4"}`, "m-4", nil},
		{"escaped value", `{"id":"m\u002d5"}`, "m-5", nil},
		{"nested id only", `{"msg":{"id":"x"}}`, "", ErrBadPayload},
		{"ID is not id", `{"ID":"x"}`, "", ErrBadPayload},
		{"number id", `{"id":5}`, "", ErrBadPayload},
		{"null id", `{"id":null}`, "", ErrBadPayload},
		{"empty id", `{"id":""}`, "", ErrBadPayload},
		{"64-byte id", `{"id":"` + strings.Repeat("i", 64) + `"}`, strings.Repeat("i", 64), nil},
		{"65-byte id", `{"id":"` + strings.Repeat("i", 65) + `"}`, "", ErrBadPayload},
		{"array", `[{"id":"x"}]`, "", ErrBadPayload},
		{"string", `"id"`, "", ErrBadPayload},
		{"not json", `hello`, "", ErrBadPayload},
		{"truncated", `{"id":"x"`, "", ErrBadPayload},
		{"empty", ``, "", ErrBadPayload},
		{"too large", `{"id":"x","p":"` + strings.Repeat("p", 100) + `"}`, "", ErrTooLarge},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			id, err := Validate([]byte(c.payload), 64)
			if c.name != "too large" {
				id, err = Validate([]byte(c.payload), 1024)
			}
			if !errors.Is(err, c.err) || id != c.id {
				t.Fatalf("Validate(%s) = %q, %v; want %q, %v", c.payload, id, err, c.id, c.err)
			}
		})
	}
}

func TestMessageEnvelope(t *testing.T) {
	msg := []byte(`{"id":"m-1","text":"hi"}`)
	for _, group := range []string{"", "g1"} {
		b := Message("alice", "bob", group, 1764145476123, msg)
		var e struct {
			Kind, From, To, Group string
			TS                    int64
			Msg                   json.RawMessage
		}
		if err := json.Unmarshal(b, &e); err != nil {
			t.Fatalf("envelope %s: %v", b, err)
		}
		if e.Kind != "msg" || e.From != "alice" || e.To != "bob" || e.Group != group || e.TS != 1764145476123 || string(e.Msg) != string(msg) {
			t.Fatalf("envelope %s", b)
		}
	}
}

func TestErrorEvent(t *testing.T) {
	b := Error(`m"1`, "bad_topic", `cannot publish to "x"`)
	var e map[string]string
	if err := json.Unmarshal(b, &e); err != nil {
		t.Fatalf("%s: %v", b, err)
	}
	if e["kind"] != "error" || e["ref"] != `m"1` || e["code"] != "bad_topic" || e["reason"] != `cannot publish to "x"` {
		t.Fatalf("event %s", b)
	}
	if _, ok := e["ref"]; !ok {
		t.Fatal("ref missing")
	}
	var noRef map[string]string
	if err := json.Unmarshal(Error("", "bad_payload", "x"), &noRef); err != nil {
		t.Fatal(err)
	}
	if _, ok := noRef["ref"]; ok {
		t.Fatal("empty ref must be omitted")
	}
}

func FuzzValidate(f *testing.F) {
	for _, s := range []string{`{"id":"a"}`, `{"a":[{"id":1}],"id":"b"}`, `{"\u0069d":"c"}`, `[]`, `{`, `{"id":"\"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		id, err := Validate(b, 1<<16)
		if err != nil {
			return
		}
		// Whatever is accepted is a JSON object whose "id" is that string.
		var m map[string]json.RawMessage
		if json.Unmarshal(b, &m) != nil {
			t.Fatalf("accepted %q, which is not an object", b)
		}
		var want string
		if json.Unmarshal(m["id"], &want) != nil || want != id {
			t.Fatalf("accepted %q with id %q, object's id is %s", b, id, m["id"])
		}
	})
}

func TestMetaRoundTrip(t *testing.T) {
	cases := []struct{ from, group, id string }{
		{"alice", "", "m-1"},
		{"alice", "g1", "m-2"},
		{"bob", "g.x", "id\x00with\x00nuls"},
	}
	for _, c := range cases {
		from, group, id, ok := ParseMeta(Meta(c.from, c.group, c.id))
		if !ok || from != c.from || group != c.group || id != c.id {
			t.Errorf("ParseMeta(Meta(%q, %q, %q)) = %q, %q, %q, %v", c.from, c.group, c.id, from, group, id, ok)
		}
	}
	for _, bad := range []string{"", "\x00g\x00id", "alice", "alice\x00g"} {
		if _, _, _, ok := ParseMeta([]byte(bad)); ok {
			t.Errorf("ParseMeta(%q) accepted", bad)
		}
	}
}
