package loadtest

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
)

// errMalformed is wrapped by every payload that cannot be parsed.
var errMalformed = errors.New("malformed JSON payload")

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
	// N is the per sender->receiver pair sequence number, starting at 1.
	N uint64
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
	// Kind is the envelope kind: msg, receipt, error, typing...; "msg" in plain mode.
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
	// Code is an error event's code.
	Code []byte
	// IDs is the raw JSON array of a receipt's ids.
	IDs []byte
	// Status is a receipt's status: delivered or read.
	Status []byte
}

var kindMsg = []byte("msg")

// parseDelivery parses a received payload: an envelope, or in plain mode the
// bare message object.
func parseDelivery(payload []byte, plain bool, d *delivery) error {
	*d = delivery{}
	if plain {
		d.Kind = kindMsg
		return parseMessage(payload, d)
	}
	var msg []byte
	it := objIter{b: payload}
	if err := it.open(); err != nil {
		return err
	}
	for {
		key, val, ok, err := it.next()
		if err != nil {
			return err
		}
		if !ok {
			break
		}
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
	}
	if !bytes.Equal(d.Kind, kindMsg) {
		return nil
	}
	if msg == nil {
		return fmt.Errorf("%w: envelope of kind msg has no msg", errMalformed)
	}
	return parseMessage(msg, d)
}

// parseMessage reads the fields a load-test sender writes into d.
func parseMessage(b []byte, d *delivery) error {
	it := objIter{b: b}
	if err := it.open(); err != nil {
		return err
	}
	for {
		key, val, ok, err := it.next()
		if err != nil {
			return err
		}
		if !ok {
			return nil
		}
		switch string(key) {
		case "id":
			d.ID = unquote(val)
		case "s":
			d.Sender = unquote(val)
		case "t":
			v, err := strconv.ParseInt(string(val), 10, 64)
			if err != nil {
				return fmt.Errorf("%w: t: %w", errMalformed, err)
			}
			d.SentAt = v
		case "n":
			v, err := strconv.ParseUint(string(val), 10, 64)
			if err != nil {
				return fmt.Errorf("%w: n: %w", errMalformed, err)
			}
			d.N = v
		}
	}
}

// eachString calls fn with every string element of the raw JSON array arr,
// unquoted; other elements are skipped.
func eachString(arr []byte, fn func([]byte)) error {
	i := skipSpace(arr, 0)
	if i >= len(arr) || arr[i] != '[' {
		return fmt.Errorf("%w: not an array", errMalformed)
	}
	i = skipSpace(arr, i+1)
	if i < len(arr) && arr[i] == ']' {
		return nil
	}
	for i < len(arr) {
		end, err := skipValue(arr, i)
		if err != nil {
			return err
		}
		if arr[i] == '"' {
			fn(unquote(arr[i:end]))
		}
		i = skipSpace(arr, end)
		if i >= len(arr) {
			break
		}
		switch arr[i] {
		case ']':
			return nil
		case ',':
			i = skipSpace(arr, i+1)
		default:
			return fmt.Errorf("%w: expected , or ] at %d", errMalformed, i)
		}
	}
	return fmt.Errorf("%w: unterminated array", errMalformed)
}

// objIter walks the top-level members of a JSON object without building it,
// because it runs for every delivered message.
type objIter struct {
	b []byte
	i int
}

func (it *objIter) open() error {
	it.i = skipSpace(it.b, 0)
	if it.i >= len(it.b) || it.b[it.i] != '{' {
		return fmt.Errorf("%w: not an object", errMalformed)
	}
	it.i = skipSpace(it.b, it.i+1)
	return nil
}

// next returns the next key (without quotes) and raw value; ok is false at
// the closing brace.
func (it *objIter) next() (key, val []byte, ok bool, err error) {
	b, i := it.b, it.i
	if i < len(b) && b[i] == ',' {
		i = skipSpace(b, i+1)
	} else if i < len(b) && b[i] == '}' {
		return nil, nil, false, nil
	}
	if i >= len(b) || b[i] != '"' {
		return nil, nil, false, fmt.Errorf("%w: expected a key at %d", errMalformed, i)
	}
	keyEnd, err := skipString(b, i)
	if err != nil {
		return nil, nil, false, err
	}
	key = b[i+1 : keyEnd-1]
	i = skipSpace(b, keyEnd)
	if i >= len(b) || b[i] != ':' {
		return nil, nil, false, fmt.Errorf("%w: expected : at %d", errMalformed, i)
	}
	i = skipSpace(b, i+1)
	valEnd, err := skipValue(b, i)
	if err != nil {
		return nil, nil, false, err
	}
	val = b[i:valEnd]
	it.i = skipSpace(b, valEnd)
	if it.i >= len(b) || (b[it.i] != ',' && b[it.i] != '}') {
		return nil, nil, false, fmt.Errorf("%w: expected , or } at %d", errMalformed, it.i)
	}
	return key, val, true, nil
}

// unquote strips the quotes of a raw JSON string. Escapes are left as they
// are: the identifiers the load tester compares never contain any.
func unquote(v []byte) []byte {
	if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
		return v[1 : len(v)-1]
	}
	return v
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// skipString returns the index just past the string starting at b[i] == '"'.
func skipString(b []byte, i int) (int, error) {
	for i++; i < len(b); i++ {
		switch b[i] {
		case '\\':
			i++
		case '"':
			return i + 1, nil
		}
	}
	return 0, fmt.Errorf("%w: unterminated string", errMalformed)
}

// skipValue returns the index just past the value starting at b[i].
func skipValue(b []byte, i int) (int, error) {
	if i >= len(b) {
		return 0, fmt.Errorf("%w: missing value", errMalformed)
	}
	switch b[i] {
	case '"':
		return skipString(b, i)
	case '{', '[':
		depth := 0
		for i < len(b) {
			switch b[i] {
			case '"':
				end, err := skipString(b, i)
				if err != nil {
					return 0, err
				}
				i = end
				continue
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return i + 1, nil
				}
			}
			i++
		}
		return 0, fmt.Errorf("%w: unterminated container", errMalformed)
	default:
		start := i
		for i < len(b) && b[i] != ',' && b[i] != '}' && b[i] != ']' && b[i] != ' ' && b[i] != '\t' && b[i] != '\n' && b[i] != '\r' {
			i++
		}
		if i == start {
			return 0, fmt.Errorf("%w: empty value at %d", errMalformed, i)
		}
		return i, nil
	}
}
