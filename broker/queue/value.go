package queue

import (
	"encoding/binary"
	"errors"
)

// EncodeValue lays out a stored message as both backends store it: the
// length of meta as a uvarint, meta, then the envelope.
func EncodeValue(meta, data []byte) []byte {
	v := make([]byte, 0, binary.MaxVarintLen32+len(meta)+len(data))
	v = binary.AppendUvarint(v, uint64(len(meta)))
	v = append(v, meta...)
	return append(v, data...)
}

// ErrCorruptValue is a stored message whose layout does not decode.
var ErrCorruptValue = errors.New("corrupt stored message")

// DecodeValue splits a value made by EncodeValue into meta and envelope,
// both slices of v.
func DecodeValue(v []byte) (meta, data []byte, err error) {
	n, k := binary.Uvarint(v)
	if k <= 0 || n > uint64(len(v)-k) {
		return nil, nil, ErrCorruptValue
	}
	return v[k : k+int(n)], v[k+int(n):], nil
}
