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
//	message <prefix>.q.<shard>.<user>          body: queue.EncodeValue(meta, envelope)
//	bucket  <prefix>_devices (KV, history 1)   key <user>.<device> -> devices.Record.Encode()
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
