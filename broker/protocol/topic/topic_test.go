package topic

import (
	"errors"
	"strings"
	"testing"
)

func TestParseClientID(t *testing.T) {
	cases := []struct {
		clientID, user, device string
		ok                     bool
	}{
		{"bob", "bob", "", true},
		{"bob/phone", "bob", "phone", true},
		{"bob/" + strings.Repeat("d", 32), "bob", strings.Repeat("d", 32), true},
		{"bob/" + strings.Repeat("d", 33), "bob", "", false},
		{"bob/", "bob", "", false},
		{"bob/a/b", "bob", "", false},
		{"bob/my phone", "bob", "", false},
		{"alice", "bob", "", false},
		{"bobby", "bob", "", false},
		{"", "bob", "", false},
	}
	for _, c := range cases {
		device, err := ParseClientID(c.clientID, c.user)
		if (err == nil) != c.ok || device != c.device {
			t.Errorf("ParseClientID(%q, %q) = %q, %v; want %q, ok=%v", c.clientID, c.user, device, err, c.device, c.ok)
		}
		if err != nil && !errors.Is(err, ErrBadClientID) {
			t.Errorf("error %v does not wrap ErrBadClientID", err)
		}
		if c.ok && ClientID(c.user, device) != c.clientID {
			t.Errorf("ClientID(%q, %q) = %q, want %q", c.user, device, ClientID(c.user, device), c.clientID)
		}
	}
}

func TestParse(t *testing.T) {
	cases := []struct {
		topic string
		kind  Kind
		name  string
	}{
		{"inbox/bob", Inbox, "bob"},
		{"group/g-1", Group, "g-1"},
		{"receipt/alice", Receipt, "alice"},
		{"typing/alice", Typing, "alice"},
		{"presence/alice", Presence, "alice"},
		{"inbox/", Unknown, ""},
		{"inbox/bob/x", Unknown, ""},
		{"inbox/+", Unknown, ""},
		{"inbox/" + strings.Repeat("u", 65), Unknown, ""},
		{"inbox", Unknown, ""},
		{"chat/bob", Unknown, ""},
		{"$SYS/broker", Unknown, ""},
		{"", Unknown, ""},
	}
	for _, c := range cases {
		kind, name := Parse(c.topic)
		if kind != c.kind || name != c.name {
			t.Errorf("Parse(%q) = %v, %q; want %v, %q", c.topic, kind, name, c.kind, c.name)
		}
	}
}

func TestMaySubscribe(t *testing.T) {
	cases := []struct {
		filter string
		ok     bool
	}{
		{"inbox/alice", true},
		{"inbox/bob", false},
		{"inbox/+", false},
		{"inbox/#", false},
		{"#", false},
		{"+/alice", false},
		{"presence/bob", true},
		{"presence/+", true},
		{"presence/#", true},
		{"presence/bo b", false},
		{"group/g1", false},
		{"typing/alice", false},
	}
	for _, c := range cases {
		if got := MaySubscribe("alice", c.filter); got != c.ok {
			t.Errorf("MaySubscribe(alice, %q) = %v, want %v", c.filter, got, c.ok)
		}
	}
}

func TestValidNames(t *testing.T) {
	cases := []struct {
		s            string
		user, device bool
	}{
		{"a", true, true},
		{"Alice_1.2-3", true, true},
		{strings.Repeat("x", 32), true, true},
		{strings.Repeat("x", 33), true, false},
		{strings.Repeat("x", 64), true, false},
		{strings.Repeat("x", 65), false, false},
		{"", false, false},
		{"a/b", false, false},
		{"é", false, false},
		{"a b", false, false},
		{"a\x00", false, false},
	}
	for _, c := range cases {
		if ValidUser(c.s) != c.user || ValidDevice(c.s) != c.device {
			t.Errorf("%q: user %v device %v, want %v %v", c.s, ValidUser(c.s), ValidDevice(c.s), c.user, c.device)
		}
	}
}
