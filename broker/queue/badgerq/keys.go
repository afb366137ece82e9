package badgerq

import (
	"encoding/binary"
	"errors"
)

// Key layout. User IDs and device names never contain 0x00, so a user's
// prefix never matches another user's keys.
//
//	m<user>\x00<seq:8 BE>  -> envelope bytes (TTL message_ttl)
//	v<user>\x00<device>    -> device record: cursor:8 BE, last seen unix:8 BE, flags:1
//	d<sender>\x00<id>      -> empty (TTL dedup_window)
//	p<user>                -> presence record (package broker/presence)
//	g<group>               -> group record (package broker/groups)
const (
	msgTag    = 'm'
	deviceTag = 'v'
	dedupTag  = 'd'
)

func msgPrefix(user string) []byte {
	b := make([]byte, 0, len(user)+2)
	b = append(b, msgTag)
	b = append(b, user...)
	return append(b, 0)
}

func msgKey(user string, seq uint64) []byte {
	b := make([]byte, 0, len(user)+10)
	b = append(b, msgTag)
	b = append(b, user...)
	b = append(b, 0)
	return binary.BigEndian.AppendUint64(b, seq)
}

func seqOf(key []byte) uint64 {
	if len(key) < 8 {
		return 0
	}
	return binary.BigEndian.Uint64(key[len(key)-8:])
}

func devicePrefix(user string) []byte {
	b := make([]byte, 0, len(user)+2)
	b = append(b, deviceTag)
	b = append(b, user...)
	return append(b, 0)
}

func deviceKey(user, device string) []byte {
	return append(devicePrefix(user), device...)
}

func dedupKey(sender, id string) []byte {
	b := make([]byte, 0, len(sender)+len(id)+2)
	b = append(b, dedupTag)
	b = append(b, sender...)
	b = append(b, 0)
	return append(b, id...)
}

// subscribedFlag marks a device that subscribed to its inbox, so that it is
// fed on its next connection even if it does not subscribe again (its MQTT
// session, kept only in memory by mochi, does not survive a restart).
const subscribedFlag = 1

// record is what is persisted of one device.
type record struct {
	cursor     uint64
	seen       int64
	subscribed bool
}

func (r record) encode() []byte {
	b := make([]byte, 17)
	binary.BigEndian.PutUint64(b, r.cursor)
	binary.BigEndian.PutUint64(b[8:], uint64(r.seen))
	if r.subscribed {
		b[16] = subscribedFlag
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
	}, true
}

// encodeValue lays out a stored message: the length of meta as a uvarint,
// meta, then the envelope. It returns the value and its two parts.
func encodeValue(meta, data []byte) (v, m, d []byte) {
	v = make([]byte, 0, binary.MaxVarintLen32+len(meta)+len(data))
	v = binary.AppendUvarint(v, uint64(len(meta)))
	start := len(v)
	v = append(v, meta...)
	v = append(v, data...)
	return v, v[start : start+len(meta)], v[start+len(meta):]
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
