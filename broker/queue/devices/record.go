package devices

import "encoding/binary"

// Record is what a persister holds of one device.
type Record struct {
	// Cursor is the last sequence the device acknowledged.
	Cursor uint64
	// Seen is when the device was last seen, in Unix seconds.
	Seen int64
	// Subscribed is set once the device subscribed to its inbox, so that
	// it is fed on its next connection even if it does not subscribe
	// again (its MQTT session, kept only in memory by mochi, does not
	// survive a restart).
	Subscribed bool
	// Transient marks a clean-session device. Only a shared persister
	// writes one: another node deciding what every device has
	// acknowledged must see it too.
	Transient bool
}

// Record flags, in the record's last byte.
const (
	subscribedFlag = 1
	transientFlag  = 2
)

// recordSize is the length of an encoded Record: cursor:8 BE, last seen
// Unix seconds:8 BE, flags:1.
const recordSize = 17

// Encode lays the record out as both persisters store it.
func (r Record) Encode() []byte {
	b := make([]byte, recordSize)
	binary.BigEndian.PutUint64(b, r.Cursor)
	binary.BigEndian.PutUint64(b[8:], uint64(r.Seen))
	if r.Subscribed {
		b[16] |= subscribedFlag
	}
	if r.Transient {
		b[16] |= transientFlag
	}
	return b
}

// DecodeRecord reads a record made by Encode; ok is false if v is not one.
func DecodeRecord(v []byte) (r Record, ok bool) {
	if len(v) != recordSize {
		return Record{}, false
	}
	return Record{
		Cursor:     binary.BigEndian.Uint64(v),
		Seen:       int64(binary.BigEndian.Uint64(v[8:])),
		Subscribed: v[16]&subscribedFlag != 0,
		Transient:  v[16]&transientFlag != 0,
	}, true
}
