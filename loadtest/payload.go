package loadtest

import (
	"bytes"
	"fmt"
	"strconv"

	"github.com/chatd/chatd/broker/protocol/envelope"
)

// errMalformed is wrapped by every payload that cannot be parsed: by the
// protocol's JSON scanner, and by the checks below of what it returns.
var errMalformed = envelope.ErrSyntax

// message is what a load-test sender puts in each message object.
type message struct {
	// Tag is the run tag; the protocol's message id is Tag-Seq.
	Tag string
	// Seq is the run-wide sequence number of the message.
	Seq uint64
	// SentAt is the send time in Unix nanoseconds.
	SentAt int64
	// Sender is the sending user.
	Sender string
	// N is the per sender->receiver pair sequence number, starting at 1;
	// with several devices per user, the sender is the sending device.
	N uint64
	// C numbers the sending device's messages from 1, to whatever user, so
	// that its other devices can check the order of its sent copies; 0
	// (and no "c" field) when users have one device.
	C uint64
}

// appendMessage appends msg as a JSON object padded with a "pad" field to
// at least size bytes. User IDs and run tags are restricted to
// [A-Za-z0-9_.-], so nothing needs escaping.
func appendMessage(b []byte, msg message, size int) []byte {
	start := len(b)
	b = append(b, `{"id":"`...)
	b = appendID(b, msg.Tag, msg.Seq)
	b = append(b, `","t":`...)
	b = strconv.AppendInt(b, msg.SentAt, 10)
	b = append(b, `,"s":"`...)
	b = append(b, msg.Sender...)
	b = append(b, `","n":`...)
	b = strconv.AppendUint(b, msg.N, 10)
	if msg.C > 0 {
		b = append(b, `,"c":`...)
		b = strconv.AppendUint(b, msg.C, 10)
	}
	const padField = `,"pad":""}`
	pad := size - (len(b) - start) - len(padField)
	if pad <= 0 {
		return append(b, '}')
	}
	b = append(b, `,"pad":"`...)
	for range pad {
		b = append(b, 'x')
	}
	return append(b, `"}`...)
}

// appendID appends the message id of sequence number seq in run tag.
func appendID(b []byte, tag string, seq uint64) []byte {
	b = append(b, tag...)
	b = append(b, '-')
	return strconv.AppendUint(b, seq, 10)
}

// parseID returns the sequence number of id when it belongs to run tag.
func parseID(id []byte, tag string) (uint64, bool) {
	if len(id) <= len(tag)+1 || string(id[:len(tag)]) != tag || id[len(tag)] != '-' {
		return 0, false
	}
	var seq uint64
	for _, c := range id[len(tag)+1:] {
		if c < '0' || c > '9' || seq > (1<<63)/10 {
			return 0, false
		}
		seq = seq*10 + uint64(c-'0')
	}
	return seq, true
}

// delivery is what a subscriber learns from one received payload. Its byte
// slices alias the payload, so parsing allocates nothing.
type delivery struct {
	// Kind is the envelope kind: msg, sent, receipt, error, typing...; "msg" in plain mode.
	Kind []byte
	// From is the envelope's authenticated sender (empty in plain mode).
	From []byte
	// To is the envelope's recipient (empty in plain mode).
	To []byte
	// ID is the message id, or for an error event its ref.
	ID []byte
	// Sender is the "s" field the sender wrote.
	Sender []byte
	// SentAt is the "t" field the sender wrote, Unix nanoseconds.
	SentAt int64
	// N is the "n" field the sender wrote.
	N uint64
	// C is the "c" field the sender wrote, 0 when absent.
	C uint64
	// Code is an error event's code.
	Code []byte
	// IDs is the raw JSON array of a receipt's ids.
	IDs []byte
	// Status is a receipt's status: delivered or read.
	Status []byte
}

var (
	kindMsg  = []byte("msg")
	kindSent = []byte("sent")
)

// parseDelivery parses a received payload: an envelope, or in plain mode the
// bare message object.
func parseDelivery(payload []byte, plain bool, d *delivery) error {
	*d = delivery{}
	if plain {
		d.Kind = kindMsg
		return parseMessage(payload, d)
	}
	var msg []byte
	err := eachMember(payload, func(key, val []byte) error {
		switch string(key) {
		case "kind":
			d.Kind = unquote(val)
		case "from":
			d.From = unquote(val)
		case "to":
			d.To = unquote(val)
		case "msg":
			msg = val
		case "ref":
			d.ID = unquote(val)
		case "code":
			d.Code = unquote(val)
		case "ids":
			d.IDs = val
		case "status":
			d.Status = unquote(val)
		}
		return nil
	})
	if err != nil || !bytes.Equal(d.Kind, kindMsg) && !bytes.Equal(d.Kind, kindSent) {
		return err
	}
	if msg == nil {
		return fmt.Errorf("%w: envelope of kind %s has no msg", errMalformed, d.Kind)
	}
	return parseMessage(msg, d)
}

// parseMessage reads the fields a load-test sender writes into d.
func parseMessage(b []byte, d *delivery) error {
	return eachMember(b, func(key, val []byte) error {
		var err error
		switch string(key) {
		case "id":
			d.ID = unquote(val)
		case "s":
			d.Sender = unquote(val)
		case "t":
			d.SentAt, err = strconv.ParseInt(string(val), 10, 64)
		case "n":
			d.N, err = strconv.ParseUint(string(val), 10, 64)
		case "c":
			d.C, err = strconv.ParseUint(string(val), 10, 64)
		}
		if err != nil {
			return fmt.Errorf("%w: %s: %w", errMalformed, key, err)
		}
		return nil
	})
}

// eachMember calls fn with the key, unquoted, and the raw value of every
// top-level member of the JSON object b, until fn fails.
func eachMember(b []byte, fn func(key, val []byte) error) error {
	s := envelope.ScanObject(b)
	for s.Next() {
		if err := fn(unquote(s.Key()), s.Value()); err != nil {
			return err
		}
	}
	return s.Err()
}

// eachString calls fn with every string element of the raw JSON array arr,
// unquoted; other elements are skipped.
func eachString(arr []byte, fn func([]byte)) error {
	s := envelope.ScanArray(arr)
	for s.Next() {
		if v := s.Value(); v[0] == '"' {
			fn(unquote(v))
		}
	}
	return s.Err()
}

// unquote strips the quotes of a raw JSON string. Escapes are left as they
// are: the identifiers the load tester compares never contain any.
func unquote(v []byte) []byte {
	if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
		return v[1 : len(v)-1]
	}
	return v
}
