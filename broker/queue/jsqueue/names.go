package jsqueue

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"hash/fnv"
	"strconv"
	"strings"
)

// Naming. User IDs and device names may hold any byte, so each is written
// as one subject token: "_" and its unpadded base64url form, which never
// holds '.', '*', '>' or whitespace, and is never empty.
//
//	stream  <PREFIX>_Q<shard>                 subjects <prefix>.q.<shard>.*
//	message <prefix>.q.<shard>.<user>          body: uvarint len(meta), meta, envelope
//	bucket  <prefix>_devices (KV, history 1)   key <user>.<device> -> device record
//	        meta.shards                        the shard count the streams were made with

// token encodes s as one subject token.
func token(s string) string {
	return "_" + base64.RawURLEncoding.EncodeToString([]byte(s))
}

// untoken decodes a token made by token.
func untoken(t string) (string, error) {
	if !strings.HasPrefix(t, "_") {
		return "", errors.New("token without its prefix")
	}
	b, err := base64.RawURLEncoding.DecodeString(t[1:])
	return string(b), err
}

// shardOf places a user in one of n streams. FNV-1a is stable across
// releases and platforms, which the placement must be: a user moved to
// another shard would lose sight of its queue.
func shardOf(user string, n int) int {
	h := fnv.New32a()
	h.Write([]byte(user))
	return int(h.Sum32() % uint32(n))
}

// names derives every stream, subject and key name from the prefix.
type names struct {
	prefix string
	shards int
}

func (n names) stream(shard int) string {
	return strings.ToUpper(n.prefix) + "_Q" + strconv.Itoa(shard)
}

func (n names) streamSubjects(shard int) string {
	return n.prefix + ".q." + strconv.Itoa(shard) + ".*"
}

// subject returns the subject of user's messages and the shard it is in.
func (n names) subject(user string) (string, int) {
	shard := shardOf(user, n.shards)
	return n.prefix + ".q." + strconv.Itoa(shard) + "." + token(user), shard
}

func (n names) bucket() string { return n.prefix + "_devices" }

// kvStream is the stream JetStream keeps the bucket in.
func (n names) kvStream() string { return "KV_" + n.bucket() }

// kvSubject is the stream subject of a bucket key.
func (n names) kvSubject(key string) string { return "$KV." + n.bucket() + "." + key }

func deviceKey(user, device string) string { return token(user) + "." + token(device) }

// deviceFilter matches the keys of every device of user.
func deviceFilter(user string) string { return token(user) + ".*" }

const shardsKey = "meta.shards"

// msgID is the Nats-Msg-Id of one recipient's copy of (sender, id): a
// hash, as the stream keeps every ID of the dedup window in memory.
// Fields are length-prefixed so that no two triples collide by concatenation.
func msgID(sender, id, to string) string {
	h := sha256.New()
	var b [binary.MaxVarintLen64]byte
	for _, s := range [...]string{sender, id, to} {
		h.Write(b[:binary.PutUvarint(b[:], uint64(len(s)))])
		h.Write([]byte(s))
	}
	var sum [sha256.Size]byte
	return base64.RawURLEncoding.EncodeToString(h.Sum(sum[:0])[:16])
}

// encodeValue lays out a stored message as broker/queue does: the length
// of meta as a uvarint, meta, then the envelope.
func encodeValue(meta, data []byte) []byte {
	v := make([]byte, 0, binary.MaxVarintLen32+len(meta)+len(data))
	v = binary.AppendUvarint(v, uint64(len(meta)))
	v = append(v, meta...)
	return append(v, data...)
}

// errCorruptValue is a stored message whose layout does not decode.
var errCorruptValue = errors.New("corrupt stored message")

func decodeValue(v []byte) (meta, data []byte, err error) {
	n, k := binary.Uvarint(v)
	if k <= 0 || n > uint64(len(v)-k) {
		return nil, nil, errCorruptValue
	}
	return v[k : k+int(n)], v[k+int(n):], nil
}

// Device record flags.
const (
	// subscribedFlag marks a device that subscribed to its inbox.
	subscribedFlag = 1
	// transientFlag marks a clean-session device. Unlike broker/queue,
	// which keeps them in memory, transient devices are written to the
	// bucket: another node deciding what every device has acknowledged
	// must see them too.
	transientFlag = 2
)

// record is what the bucket holds of one device.
type record struct {
	cursor     uint64
	seen       int64
	subscribed bool
	transient  bool
}

func (r record) encode() []byte {
	b := make([]byte, 17)
	binary.BigEndian.PutUint64(b, r.cursor)
	binary.BigEndian.PutUint64(b[8:], uint64(r.seen))
	if r.subscribed {
		b[16] |= subscribedFlag
	}
	if r.transient {
		b[16] |= transientFlag
	}
	return b
}

func decodeRecord(v []byte) (record, bool) {
	if len(v) != 17 {
		return record{}, false
	}
	return record{
		cursor:     binary.BigEndian.Uint64(v),
		seen:       int64(binary.BigEndian.Uint64(v[8:])),
		subscribed: v[16]&subscribedFlag != 0,
		transient:  v[16]&transientFlag != 0,
	}, true
}
