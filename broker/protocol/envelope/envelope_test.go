package envelope

import (
	"encoding/json"
	"errors"
	"slices"
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
		{"invalid UTF-8 id", "{\"id\":\"m-\xff\"}", "", ErrBadPayload},
		{"truncated UTF-8 id", "{\"id\":\"m-\xc3\"}", "", ErrBadPayload},
		{"lone high surrogate", `{"id":"m-\ud800"}`, "", ErrBadPayload},
		{"lone low surrogate", `{"id":"m-\udc00"}`, "", ErrBadPayload},
		{"high surrogate before a letter", `{"id":"\ud83dx"}`, "", ErrBadPayload},
		{"high surrogate before a non-surrogate escape", `{"id":"\ud83d\u0041"}`, "", ErrBadPayload},
		{"reversed pair", `{"id":"\ude00\ud83d"}`, "", ErrBadPayload},
		{"surrogate pair", `{"id":"\ud83d\ude00"}`, "\U0001F600", nil},
		{"UTF-8 id", `{"id":"m-é-😀"}`, "m-é-😀", nil},
		{"escaped backslash then u", `{"id":"\\ud800"}`, `\ud800`, nil},
		{"replacement character written by the sender", `{"id":"\ufffd-�"}`, "\uFFFD-\uFFFD", nil},
		{"invalid UTF-8 elsewhere is the app's", "{\"id\":\"ok\",\"t\":\"\xff\"}", "ok", nil},
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
		exactID(t, b, id)
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

func TestCopies(t *testing.T) {
	for _, device := range []string{"phone", "alice", "a.b-c_d", ""} {
		meta := CopyMeta(device)
		if !MadeBy(device, meta) {
			t.Errorf("MadeBy(%q, CopyMeta(%q)) is false", device, device)
		}
		if MadeBy(device+"x", meta) || MadeBy("x"+device, meta) {
			t.Errorf("CopyMeta(%q) is taken for another device's", device)
		}
		if _, _, _, ok := ParseMeta(meta); ok {
			t.Errorf("ParseMeta accepts the copy meta of %q: it would be owed receipts", device)
		}
	}
	for _, m := range [][]byte{nil, {}, Meta("alice", "", "m-1")} {
		if MadeBy("", m) || MadeBy("alice", m) {
			t.Errorf("MadeBy takes %q for a copy", m)
		}
	}
	cases := []struct {
		name string
		got  []byte
		want string
	}{
		{"direct", Sent("alice", "bob", "", 7, []byte(`{"id":"m-1"}`)), `{"kind":"sent","from":"alice","to":"bob","ts":7,"msg":{"id":"m-1"}}`},
		{"group", Sent("alice", "bob", "g1", 7, []byte(`{"id":"m-1"}`)), `{"kind":"sent","from":"alice","to":"bob","group":"g1","ts":7,"msg":{"id":"m-1"}}`},
		{"read copy", ReadCopy("bob", "alice", []string{"m-1"}, 7), `{"kind":"receipt","status":"read","by":"bob","peer":"alice","ids":["m-1"],"ts":7}`},
		{"receipt has no peer", Receipt("read", "bob", []string{"m-1"}, 7), `{"kind":"receipt","status":"read","by":"bob","ids":["m-1"],"ts":7}`},
	}
	for _, c := range cases {
		if string(c.got) != c.want {
			t.Errorf("%s: %s\nwant %s", c.name, c.got, c.want)
		}
	}
}

func TestReadReceipt(t *testing.T) {
	many := func(n int) string {
		ids := make([]string, n)
		for i := range ids {
			ids[i] = `"m"`
		}
		return `{"status":"read","ids":[` + strings.Join(ids, ",") + `]}`
	}
	cases := []struct {
		name    string
		payload string
		ids     []string
		err     error
	}{
		{"one id", `{"status":"read","ids":["m-1"]}`, []string{"m-1"}, nil},
		{"UTF-8 and escapes", `{"status":"read","ids":["m-é","\u00e9","\ud83d\ude00"]}`, []string{"m-é", "é", "\U0001F600"}, nil},
		{"1000 ids", many(1000), slices.Repeat([]string{"m"}, 1000), nil},
		{"1001 ids", many(1001), nil, ErrBadPayload},
		{"no ids", `{"status":"read","ids":[]}`, nil, ErrBadPayload},
		{"null ids", `{"status":"read","ids":null}`, nil, ErrBadPayload},
		{"ids not an array", `{"status":"read","ids":"m-1"}`, nil, ErrBadPayload},
		{"empty id", `{"status":"read","ids":[""]}`, nil, ErrBadPayload},
		{"null id", `{"status":"read","ids":[null]}`, nil, ErrBadPayload},
		{"number id", `{"status":"read","ids":[1]}`, nil, ErrBadPayload},
		{"64-byte id", `{"status":"read","ids":["` + strings.Repeat("i", 64) + `"]}`, []string{strings.Repeat("i", 64)}, nil},
		{"65-byte id", `{"status":"read","ids":["` + strings.Repeat("i", 65) + `"]}`, nil, ErrBadPayload},
		{"invalid UTF-8 id", "{\"status\":\"read\",\"ids\":[\"ok\",\"\xff\"]}", nil, ErrBadPayload},
		{"lone surrogate id", `{"status":"read","ids":["\udfff"]}`, nil, ErrBadPayload},
		{"not read", `{"status":"delivered","ids":["m-1"]}`, nil, ErrBadPayload},
		{"too large", `{"status":"read","ids":["` + strings.Repeat("i", 60) + `"]}`, nil, ErrTooLarge},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			limit := 1 << 16
			if c.err == ErrTooLarge {
				limit = 32
			}
			ids, err := ReadReceipt([]byte(c.payload), limit)
			if !errors.Is(err, c.err) || !slices.Equal(ids, c.ids) {
				t.Fatalf("ReadReceipt(%q) = %q, %v; want %q, %v", c.payload, ids, err, c.ids, c.err)
			}
		})
	}
}
