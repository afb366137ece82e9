package envelope

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
)

// MaxReceiptIDs caps the ids of one read receipt.
const MaxReceiptIDs = 1000

// Meta returns what is stored beside a message so that its delivery can
// be reported to its sender and announced by push: the sender, the group
// ("" for a direct message) and the message id. The id goes last: it is
// the only part that may hold a NUL byte.
func Meta(from, group, id string) []byte {
	b := make([]byte, 0, len(from)+len(group)+2+len(id))
	b = append(b, from...)
	b = append(b, 0)
	b = append(b, group...)
	b = append(b, 0)
	return append(b, id...)
}

// serverMark starts the sender in the Meta of a message a backend sent
// through the server API: no user ID can start with it, so delivered
// receipts, which would go to an inbox nobody reads, are never queued for
// such a sender and no client can pass for one.
const serverMark = "@"

// ServerSenderKey is how a backend's sender from is named in the store:
// in Meta, and in the dedup key, apart from any user of the same name.
func ServerSenderKey(from string) string { return serverMark + from }

// ServerMeta is Meta for a message a backend sent as from.
func ServerMeta(from, group, id string) []byte { return Meta(ServerSenderKey(from), group, id) }

// SenderName returns the name of the sender from of a Meta, and whether
// it is a backend's (ServerMeta); a user's sender is its own name.
func SenderName(from string) (name string, server bool) {
	if name, ok := strings.CutPrefix(from, serverMark); ok && name != "" {
		return name, true
	}
	return from, false
}

// ParseMeta is the inverse of Meta.
func ParseMeta(b []byte) (from, group, id string, ok bool) {
	i := bytes.IndexByte(b, 0)
	if i <= 0 {
		return "", "", "", false
	}
	j := bytes.IndexByte(b[i+1:], 0)
	if j < 0 {
		return "", "", "", false
	}
	return string(b[:i]), string(b[i+1 : i+1+j]), string(b[i+2+j:]), true
}

// CopyMeta returns the Meta of a copy for the user's own devices made
// from what device sent: that device is not sent it. It starts with a
// NUL byte, so ParseMeta refuses it: a copy is owed no delivered receipt
// and announced by no push.
func CopyMeta(device string) []byte {
	return append([]byte{0}, device...)
}

// MadeBy reports whether meta is CopyMeta(device): a copy device must not
// be sent. The device of client ID {user} is "", the NUL alone.
func MadeBy(device string, meta []byte) bool {
	return len(meta) == 1+len(device) && meta[0] == 0 && string(meta[1:]) == device
}

// Receipt returns the event telling a sender that by has received or read ids.
func Receipt(status, by string, ids []string, tsMillis int64) []byte {
	return receipt(status, by, "", ids, tsMillis)
}

// ReadCopy returns the read receipt by sent to peer, as by's other devices
// receive it: Receipt's event with the peer whose messages were read.
func ReadCopy(by, peer string, ids []string, tsMillis int64) []byte {
	return receipt("read", by, peer, ids, tsMillis)
}

func receipt(status, by, peer string, ids []string, tsMillis int64) []byte {
	ev := struct {
		Kind   string   `json:"kind"`
		Status string   `json:"status"`
		By     string   `json:"by"`
		Peer   string   `json:"peer,omitempty"`
		IDs    []string `json:"ids"`
		TS     int64    `json:"ts"`
	}{"receipt", status, by, peer, ids, tsMillis}
	b, err := json.Marshal(ev)
	if err != nil {
		// Strings and an integer always marshal; keep the type honest anyway.
		return []byte(`{"kind":"receipt","status":"` + status + `"}`)
	}
	return b
}

// ReadReceipt validates what a reader publishes to receipt/{sender}:
// {"status":"read","ids":[...]} with 1 to MaxReceiptIDs ids, each checked
// like a message's id (1-64 bytes of valid UTF-8), and returns the ids.
func ReadReceipt(payload []byte, max int) ([]string, error) {
	if len(payload) > max {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrTooLarge, len(payload), max)
	}
	// The ids are decoded one by one from their raw tokens, which
	// decodeID checks as it checks a message's id.
	var r struct {
		Status string            `json:"status"`
		IDs    []json.RawMessage `json:"ids"`
	}
	if err := json.Unmarshal(payload, &r); err != nil {
		return nil, fmt.Errorf("%w: receipt: %w", ErrBadPayload, err)
	}
	if r.Status != "read" {
		return nil, fmt.Errorf("%w: receipt status must be \"read\"", ErrBadPayload)
	}
	if len(r.IDs) == 0 || len(r.IDs) > MaxReceiptIDs {
		return nil, fmt.Errorf("%w: a receipt carries 1 to %d ids, got %d", ErrBadPayload, MaxReceiptIDs, len(r.IDs))
	}
	ids := make([]string, len(r.IDs))
	for i, tok := range r.IDs {
		id, err := decodeID(tok)
		if err != nil {
			return nil, fmt.Errorf("receipt id %d: %w", i+1, err)
		}
		ids[i] = id
	}
	return ids, nil
}

// Typing returns the ephemeral event telling a user that from is typing.
func Typing(from string, tsMillis int64) []byte {
	b := make([]byte, 0, len(from)+48)
	b = append(b, `{"kind":"typing","from":"`...)
	b = append(b, from...)
	b = append(b, `","ts":`...)
	b = strconv.AppendInt(b, tsMillis, 10)
	return append(b, '}')
}

// Presence returns the retained presence/{user} payload: online with the
// time it came online, or offline with the time it was last seen.
func Presence(user string, online bool, tsMillis int64) []byte {
	b := make([]byte, 0, len(user)+64)
	b = append(b, `{"user":"`...)
	b = append(b, user...)
	if online {
		b = append(b, `","online":true,"ts":`...)
	} else {
		b = append(b, `","online":false,"last_seen":`...)
	}
	b = strconv.AppendInt(b, tsMillis, 10)
	return append(b, '}')
}
