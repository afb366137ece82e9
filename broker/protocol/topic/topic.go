// Package topic parses the user IDs, client IDs and topic names of PROTOCOL.md sections 1 and 2.
package topic

import (
	"errors"
	"fmt"
	"strings"
)

// Kind is the kind of a topic a client may publish to.
type Kind int

// The publishable topic kinds.
const (
	// Unknown is any topic outside the protocol.
	Unknown Kind = iota
	// Inbox is inbox/{user}: direct messages.
	Inbox
	// Group is group/{gid}: group messages.
	Group
	// Receipt is receipt/{user}: read receipts.
	Receipt
	// Typing is typing/{user}: ephemeral typing signals.
	Typing
	// Presence is presence/{user}: published by the server only.
	Presence
)

// Prefixes of the protocol's topics.
const (
	InboxPrefix    = "inbox/"
	GroupPrefix    = "group/"
	ReceiptPrefix  = "receipt/"
	TypingPrefix   = "typing/"
	PresencePrefix = "presence/"
)

// ErrBadClientID is returned for a client ID that is neither {user} nor {user}/{device}.
var ErrBadClientID = errors.New("client identifier not valid")

// ValidUser reports whether s is a user ID: 1-64 characters of [A-Za-z0-9_.-].
func ValidUser(s string) bool { return validName(s, 64) }

// ValidDevice reports whether s is a device name: 1-32 characters of [A-Za-z0-9_.-].
func ValidDevice(s string) bool { return validName(s, 32) }

func validName(s string, max int) bool {
	if len(s) == 0 || len(s) > max {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '_', c == '.', c == '-':
		default:
			return false
		}
	}
	return true
}

// ClientID is the client ID of device of user: the bare {user} for the
// device "", {user}/{device} otherwise; ParseClientID undoes it.
func ClientID(user, device string) string {
	if device == "" {
		return user
	}
	return user + "/" + device
}

// ParseClientID splits a client ID of user into its device name: "" for the
// bare {user} form, the part after the slash for {user}/{device}.
func ParseClientID(clientID, user string) (device string, err error) {
	if clientID == user {
		return "", nil
	}
	rest, ok := strings.CutPrefix(clientID, user+"/")
	if !ok || !ValidDevice(rest) {
		return "", fmt.Errorf("%w: %q for user %q", ErrBadClientID, clientID, user)
	}
	return rest, nil
}

// Parse returns the kind of a publish topic and the user or group it names;
// Unknown when it is not one of the protocol's topics.
func Parse(name string) (Kind, string) {
	kinds := []struct {
		prefix string
		kind   Kind
	}{
		{InboxPrefix, Inbox},
		{GroupPrefix, Group},
		{ReceiptPrefix, Receipt},
		{TypingPrefix, Typing},
		{PresencePrefix, Presence},
	}
	for _, k := range kinds {
		if rest, ok := strings.CutPrefix(name, k.prefix); ok {
			if !validName(rest, 64) {
				return Unknown, ""
			}
			return k.kind, rest
		}
	}
	return Unknown, ""
}

// InboxOf returns the inbox topic of user.
func InboxOf(user string) string { return InboxPrefix + user }

// MaySubscribe reports whether user may subscribe to filter: its own inbox,
// or any presence topic (wildcards allowed there only).
func MaySubscribe(user, filter string) bool {
	if filter == InboxPrefix+user {
		return true
	}
	rest, ok := strings.CutPrefix(filter, PresencePrefix)
	if !ok {
		return false
	}
	if rest == "#" || rest == "+" {
		return true
	}
	return ValidUser(rest)
}
