package topic

import (
	"errors"
	"strings"
	"testing"
)

// prefixes maps each publishable kind to its topic prefix, written out
// here rather than taken from Parse so the fuzz targets check Parse
// against the protocol's table instead of against itself.
var prefixes = map[Kind]string{
	Inbox:    "inbox/",
	Group:    "group/",
	Receipt:  "receipt/",
	Typing:   "typing/",
	Presence: "presence/",
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"inbox/bob", "group/g-1", "presence/+", "inbox/bob/x", "", "$SYS/x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		kind, id := Parse(name)
		if kind == Unknown {
			if id != "" {
				t.Fatalf("Parse(%q) = Unknown with name %q", name, id)
			}
			// Completeness: no protocol topic is turned away.
			for k, p := range prefixes {
				if rest, ok := strings.CutPrefix(name, p); ok && ValidUser(rest) {
					t.Fatalf("Parse(%q) = Unknown; want %v %q", name, k, rest)
				}
			}
			return
		}
		p, ok := prefixes[kind]
		if !ok {
			t.Fatalf("Parse(%q) returned kind %v, which is not a protocol topic", name, kind)
		}
		// The name is used as a queue key and written unescaped into
		// envelopes, so it must be a valid ID and exactly the topic's tail.
		if !ValidUser(id) || p+id != name {
			t.Fatalf("Parse(%q) = %v, %q", name, kind, id)
		}
	})
}

func FuzzParseClientID(f *testing.F) {
	f.Add("bob/phone", "bob")
	f.Add("bob", "bob")
	f.Add("bobby", "bob")
	f.Add("", "")
	f.Fuzz(func(t *testing.T, clientID, user string) {
		device, err := ParseClientID(clientID, user)
		if err != nil {
			if !errors.Is(err, ErrBadClientID) || device != "" {
				t.Fatalf("ParseClientID(%q, %q) = %q, %v", clientID, user, device, err)
			}
			// Completeness for the usernames OnConnect lets through: the
			// two forms of PROTOCOL.md section 1 are always accepted.
			rest, ok := strings.CutPrefix(clientID, user+"/")
			if ValidUser(user) && (clientID == user || ok && ValidDevice(rest)) {
				t.Fatalf("ParseClientID(%q, %q) refused a valid client ID: %v", clientID, user, err)
			}
			return
		}
		switch {
		case device == "" && clientID == user:
		case device != "" && ValidDevice(device) && clientID == user+"/"+device:
		default:
			t.Fatalf("ParseClientID(%q, %q) accepted device %q", clientID, user, device)
		}
	})
}

func FuzzMaySubscribe(f *testing.F) {
	f.Add("alice", "inbox/alice")
	f.Add("alice", "inbox/bob")
	f.Add("alice", "inbox/+")
	f.Add("alice", "presence/#")
	f.Add("alice", "$share/g/inbox/alice")
	f.Fuzz(func(t *testing.T, user, filter string) {
		// The ACL hook only runs for clients whose username OnConnect
		// checked with ValidUser; MaySubscribe trusts its user argument.
		if !ValidUser(user) {
			return
		}
		if !MaySubscribe(user, filter) {
			return
		}
		own := "inbox/" + user
		if strings.HasPrefix(filter, "inbox/") && filter != own {
			t.Fatalf("%q may subscribe to %q, which is not its own inbox", user, filter)
		}
		if strings.ContainsAny(filter, "+#") && filter != "presence/+" && filter != "presence/#" {
			t.Fatalf("%q may subscribe to wildcard filter %q", user, filter)
		}
		// Anything else allowed is one user's presence.
		if filter != own && filter != "presence/+" && filter != "presence/#" {
			rest, ok := strings.CutPrefix(filter, "presence/")
			if !ok || !ValidUser(rest) {
				t.Fatalf("%q may subscribe to %q, outside the protocol's table", user, filter)
			}
		}
	})
}
