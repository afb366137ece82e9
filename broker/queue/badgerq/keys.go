package badgerq

import "encoding/binary"

// Key layout. User IDs and device names never contain 0x00, so a user's
// prefix never matches another user's keys.
//
//	m<user>\x00<seq:8 BE>  -> queue.EncodeValue(meta, envelope) (TTL message_ttl)
//	v<user>\x00<device>    -> devices.Record.Encode()
//	d<sender>\x00<id>      -> empty (TTL dedup_window)
//	p<user>                -> presence record (package broker/presence)
//	g<group>               -> group record (package broker/service/groups)
//	b<user>                -> ban record (package broker/service/bans)
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
