package loadtest

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
)

func TestAppendMessage(t *testing.T) {
	tests := []struct {
		name    string
		size    int
		wantLen int // 0: the unpadded length
	}{
		{"padded to size", 256, 256},
		{"large", 4096, 4096},
		{"smaller than the fields", 10, 0},
	}
	for _, c := range []uint64{0, 5} {
		for _, tt := range tests {
			t.Run(fmt.Sprintf("%s, copy number %d", tt.name, c), func(t *testing.T) {
				msg := message{Tag: "abc", Seq: 42, SentAt: 1764145476123456789, Sender: "lt-u1", N: 7, C: c}
				b := appendMessage(nil, msg, tt.size)
				if tt.wantLen != 0 && len(b) != tt.wantLen {
					t.Errorf("len = %d, want %d", len(b), tt.wantLen)
				}
				var got struct {
					ID  string `json:"id"`
					T   int64  `json:"t"`
					S   string `json:"s"`
					N   uint64 `json:"n"`
					C   uint64 `json:"c"`
					Pad string `json:"pad"`
				}
				if err := json.Unmarshal(b, &got); err != nil {
					t.Fatalf("not JSON: %v: %s", err, b)
				}
				if got.ID != "abc-42" || got.T != msg.SentAt || got.S != "lt-u1" || got.N != 7 || got.C != c {
					t.Errorf("decoded %+v from %s", got, b)
				}
				if c == 0 && strings.Contains(string(b), `"c"`) {
					t.Errorf("a message of a one-device run has a copy number: %s", b)
				}
				if id := leadingID(b); string(id) != "abc-42" {
					t.Errorf("leadingID = %q", id)
				}
			})
		}
	}
}

func TestParseID(t *testing.T) {
	tests := []struct {
		id      string
		wantSeq uint64
		wantOK  bool
	}{
		{"run1-0", 0, true},
		{"run1-123456", 123456, true},
		{"run2-5", 0, false},
		{"run1-", 0, false},
		{"run1", 0, false},
		{"run1-12x", 0, false},
		{"run1x5", 0, false},
		{"run1-99999999999999999999999", 0, false},
		{"", 0, false},
	}
	for _, tt := range tests {
		seq, ok := parseID([]byte(tt.id), "run1")
		if seq != tt.wantSeq || ok != tt.wantOK {
			t.Errorf("parseID(%q) = %d, %v; want %d, %v", tt.id, seq, ok, tt.wantSeq, tt.wantOK)
		}
	}
}

func TestParseDelivery(t *testing.T) {
	msg := `{"id":"tg-3","t":1000,"s":"alice","n":9,"pad":"xx"}`
	tests := []struct {
		name    string
		payload string
		plain   bool
		want    delivery
		wantErr bool
	}{
		{
			name:    "envelope",
			payload: `{"kind":"msg","from":"alice","to":"bob","ts":17,"msg":` + msg + `}`,
			want:    delivery{Kind: []byte("msg"), From: []byte("alice"), To: []byte("bob"), ID: []byte("tg-3"), Sender: []byte("alice"), SentAt: 1000, N: 9},
		},
		{
			name:    "envelope with spaces and a group",
			payload: " { \"kind\" : \"msg\" , \"group\":\"g1\", \"from\":\"alice\",\"to\":\"bob\",\"ts\":17,\"msg\": " + msg + " } ",
			want:    delivery{Kind: []byte("msg"), From: []byte("alice"), To: []byte("bob"), ID: []byte("tg-3"), Sender: []byte("alice"), SentAt: 1000, N: 9},
		},
		{
			name:    "plain",
			payload: msg,
			plain:   true,
			want:    delivery{Kind: []byte("msg"), ID: []byte("tg-3"), Sender: []byte("alice"), SentAt: 1000, N: 9},
		},
		{
			name:    "sent copy",
			payload: `{"kind":"sent","from":"alice","to":"bob","ts":17,"msg":{"id":"tg-3","t":1000,"s":"alice","n":9,"c":4}}`,
			want:    delivery{Kind: []byte("sent"), From: []byte("alice"), To: []byte("bob"), ID: []byte("tg-3"), Sender: []byte("alice"), SentAt: 1000, N: 9, C: 4},
		},
		{
			name:    "error event",
			payload: `{"kind":"error","ref":"tg-3","code":"queue_full","reason":"full"}`,
			want:    delivery{Kind: []byte("error"), ID: []byte("tg-3"), Code: []byte("queue_full")},
		},
		{
			name:    "receipt",
			payload: `{"kind":"receipt","status":"delivered","by":"bob","ids":["tg-1","tg-2"],"ts":5}`,
			want:    delivery{Kind: []byte("receipt"), IDs: []byte(`["tg-1","tg-2"]`)},
		},
		{
			name:    "nested objects and escaped strings are skipped",
			payload: `{"kind":"msg","x":{"a":[1,{"b":"}\"]"}]},"from":"a","to":"b","msg":{"id":"tg-1","t":1,"s":"a","n":1,"text":"a \"quoted\" }"}}`,
			want:    delivery{Kind: []byte("msg"), From: []byte("a"), To: []byte("b"), ID: []byte("tg-1"), Sender: []byte("a"), SentAt: 1, N: 1},
		},
		{name: "empty", payload: ``, wantErr: true},
		{name: "not an object", payload: `[1,2]`, wantErr: true},
		{name: "truncated", payload: `{"kind":"msg","msg":{"id":"tg-1"`, wantErr: true},
		{name: "unterminated string", payload: `{"kind":"ms`, wantErr: true},
		{name: "missing colon", payload: `{"kind" "msg"}`, wantErr: true},
		{name: "missing value", payload: `{"kind":}`, wantErr: true},
		{name: "msg kind without msg", payload: `{"kind":"msg","from":"a"}`, wantErr: true},
		{name: "sent kind without msg", payload: `{"kind":"sent","from":"a"}`, wantErr: true},
		{name: "bad c", payload: `{"id":"tg-1","c":"x"}`, plain: true, wantErr: true},
		{name: "bad t", payload: `{"id":"tg-1","t":"now"}`, plain: true, wantErr: true},
		{name: "negative n", payload: `{"id":"tg-1","n":-1}`, plain: true, wantErr: true},
		{name: "garbage after member", payload: `{"kind":"msg" x}`, wantErr: true},
		{name: "leading comma", payload: `{,"kind":"error"}`, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var d delivery
			err := parseDelivery([]byte(tt.payload), tt.plain, &d)
			if tt.wantErr {
				if !errors.Is(err, errMalformed) {
					t.Fatalf("err = %v, want errMalformed", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !sameDelivery(d, tt.want) {
				t.Errorf("got %s\nwant %s", describe(d), describe(tt.want))
			}
		})
	}
}

func sameDelivery(a, b delivery) bool {
	return string(a.Kind) == string(b.Kind) && string(a.From) == string(b.From) && string(a.To) == string(b.To) &&
		string(a.ID) == string(b.ID) && string(a.Sender) == string(b.Sender) && a.SentAt == b.SentAt &&
		a.N == b.N && a.C == b.C && string(a.Code) == string(b.Code) && string(a.IDs) == string(b.IDs)
}

func describe(d delivery) string {
	b, err := json.Marshal(map[string]any{
		"kind": string(d.Kind), "from": string(d.From), "to": string(d.To), "id": string(d.ID),
		"sender": string(d.Sender), "t": d.SentAt, "n": d.N, "c": d.C, "code": string(d.Code), "ids": string(d.IDs),
	})
	if err != nil {
		return err.Error()
	}
	return string(b)
}

func TestEachString(t *testing.T) {
	tests := []struct {
		arr     string
		want    []string
		wantErr bool
	}{
		{`[]`, nil, false},
		{` [ "a" , "b" ]`, []string{"a", "b"}, false},
		{`["a",1,{"x":"y"},"c"]`, []string{"a", "c"}, false},
		{`"a"`, nil, true},
		{`["a"`, []string{"a"}, true},
		{`["a" "b"]`, []string{"a"}, true},
	}
	for _, tt := range tests {
		var got []string
		err := eachString([]byte(tt.arr), func(b []byte) { got = append(got, string(b)) })
		if (err != nil) != tt.wantErr {
			t.Errorf("eachString(%s) err = %v, wantErr %v", tt.arr, err, tt.wantErr)
		}
		if len(got) != len(tt.want) {
			t.Errorf("eachString(%s) = %q, want %q", tt.arr, got, tt.want)
			continue
		}
		for i := range got {
			if got[i] != tt.want[i] {
				t.Errorf("eachString(%s) = %q, want %q", tt.arr, got, tt.want)
			}
		}
	}
}

// FuzzParseDelivery checks that no payload makes the parser panic or read
// out of bounds; the seeds run with every go test.
func FuzzParseDelivery(f *testing.F) {
	f.Add([]byte(`{"kind":"msg","from":"a","to":"b","ts":1,"msg":{"id":"t-1","t":1,"s":"a","n":1}}`), false)
	f.Add([]byte(`{"id":"t-1","t":1,"s":"a","n":1,"pad":"xxx"}`), true)
	f.Add([]byte(`{"kind":"receipt","ids":["t-1",`), false)
	f.Add([]byte(`{"a":[{"b":"\\"}]}`), false)
	f.Add([]byte(`{`), true)
	f.Fuzz(func(t *testing.T, b []byte, plain bool) {
		var d delivery
		if err := parseDelivery(b, plain, &d); err == nil && d.IDs != nil {
			if err := eachString(d.IDs, func([]byte) {}); err != nil && !errors.Is(err, errMalformed) {
				t.Fatalf("unexpected error kind: %v", err)
			}
		}
	})
}

// BenchmarkParseDelivery measures parsing alone, for every envelope kind a
// receiver gets; it must not allocate.
func BenchmarkParseDelivery(b *testing.B) {
	obj := appendMessage(nil, message{Tag: "bench", Seq: 7, SentAt: 1764145476123456789, Sender: "alice", N: 3}, 256)
	payloads := []struct {
		name    string
		payload []byte
	}{
		{"msg", []byte(`{"kind":"msg","from":"alice","to":"bob","ts":1,"msg":` + string(obj) + `}`)},
		{"receipt", []byte(`{"kind":"receipt","status":"read","by":"bob","ids":["bench-1","bench-2","bench-3"],"ts":5}`)},
		{"error", []byte(`{"kind":"error","ref":"bench-7","code":"queue_full","reason":"the recipient's queue is full"}`)},
	}
	for _, p := range payloads {
		b.Run(p.name, func(b *testing.B) {
			b.SetBytes(int64(len(p.payload)))
			b.ReportAllocs()
			var d delivery
			for b.Loop() {
				if err := parseDelivery(p.payload, false, &d); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
