package chatclient

import (
	"fmt"
	"testing"
)

// TestDedup: a delivery the server makes again (after a reconnect) is
// told once; receipts and messages without an id are always told; the
// memory of what was seen is bounded.
func TestDedup(t *testing.T) {
	s := newSeen(2)
	msg := []byte(`{"kind":"msg","from":"alice","to":"bob","ts":1,"msg":{"id":"m-1","text":"hi"}}`)
	for i, want := range []bool{true, false} {
		ev, key := decode(msg)
		if m, ok := ev.(Message); !ok || m.ID != "m-1" || m.From != "alice" || s.first(key) != want {
			t.Fatalf("delivery %d: %+v, told %v", i, ev, !want)
		}
	}
	// The same id from another sender, or as a sent copy, is another message.
	for _, p := range []string{
		`{"kind":"msg","from":"carol","msg":{"id":"m-1"}}`,
		`{"kind":"sent","from":"alice","msg":{"id":"m-1"}}`,
	} {
		if _, key := decode([]byte(p)); !s.first(key) {
			t.Fatalf("%s taken for a duplicate", p)
		}
	}
	// Bounded: m-1 of alice was pushed out by the two since.
	if _, key := decode(msg); !s.first(key) {
		t.Fatal("the memory of what was seen is not bounded")
	}
	rc := []byte(`{"kind":"receipt","status":"read","by":"bob","ids":["m-1"]}`)
	for range 2 {
		ev, key := decode(rc)
		if r, ok := ev.(Receipt); !ok || r.Status != "read" || !s.first(key) {
			t.Fatalf("receipt %+v", ev)
		}
	}
	if ev, _ := decode([]byte(`not json`)); ev != nil {
		t.Fatalf("garbage told as %+v", ev)
	}
}

// TestDecodeKinds: typing signals, queued errors and a read receipt from
// the user's own device are told as their own events.
func TestDecodeKinds(t *testing.T) {
	tests := []struct {
		payload string
		want    Event
	}{
		{`{"kind":"typing","from":"bob","ts":1}`, Typing{From: "bob"}},
		{`{"kind":"error","ref":"m-1","code":"unknown_group","reason":"no group g1"}`, Error{Ref: "m-1", Code: "unknown_group", Reason: "no group g1"}},
		{`{"kind":"receipt","status":"read","by":"bob","peer":"alice","ids":["m-1"]}`, Receipt{Status: "read", By: "bob", Peer: "alice", IDs: []string{"m-1"}}},
		{`not json`, nil},
		{`{"kind":"unknown"}`, nil},
	}
	for _, tt := range tests {
		got, _ := decode([]byte(tt.payload))
		if fmt.Sprint(got) != fmt.Sprint(tt.want) {
			t.Errorf("decode(%s) = %#v, want %#v", tt.payload, got, tt.want)
		}
	}
}
