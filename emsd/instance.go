package emsd

import (
	"errors"
	"sync/atomic"
)

// CarriesInstanceID reports whether INVOKEs of operation value op start
// with the instance-id octet: values 32..127 (§1.5), in practice 33 and 35.
// RESULT and ERROR data never carry it.
func CarriesInstanceID(op Operation) bool { return op >= 32 && op <= 127 }

// PrependInstanceID returns the ESRO user data for an INVOKE carrying id:
// the id octet followed by arg.
func PrependInstanceID(id uint8, arg []byte) []byte {
	out := make([]byte, 0, 1+len(arg))
	return append(append(out, id), arg...)
}

// StripInstanceID splits the user data of an INVOKE with operation value
// op into the instance id and the encoded argument. For operations that do
// not carry the octet, data is returned unchanged with id 0. Missing data
// is a protocol violation.
func StripInstanceID(op Operation, data []byte) (id uint8, arg []byte, err error) {
	if !CarriesInstanceID(op) {
		return 0, data, nil
	}
	if len(data) == 0 {
		return 0, nil, &DecodeError{Code: CodeProtocolViolation, PDU: "instance-id", Err: ErrTruncated}
	}
	return data[0], data[1:], nil
}

// InstanceCounter hands out instance ids for new INVOKEs, starting at 0
// and wrapping mod 256, as the reference UA does (§1.5; not persisted).
// A re-invocation of the same segment should reuse the id it was given.
// It is safe for concurrent use.
type InstanceCounter struct {
	n atomic.Uint32
}

// Next returns the next instance id.
func (c *InstanceCounter) Next() uint8 { return uint8(c.n.Add(1) - 1) }

// DuplicateWindow is the receiver's 256-bit duplicate-detection window of
// §1.5: an id whose bit is set is a duplicate (answer RESULT with no data
// and do nothing else); otherwise its bit is set and the bit of
// (id+128) mod 256 cleared. The zero value is an empty, enabled window. It
// is not safe for concurrent use.
type DuplicateWindow struct {
	bits [4]uint64
	// Disabled makes every id new and leaves the window unchanged, for
	// reference MTS peers, which always send id 0 (§1.5, Open Point 2).
	Disabled bool
}

// Observe records id and reports whether it is a duplicate.
func (w *DuplicateWindow) Observe(id uint8) (duplicate bool) {
	if w.Disabled {
		return false
	}
	if w.bits[id>>6]&(1<<(id&63)) != 0 {
		return true
	}
	w.bits[id>>6] |= 1 << (id & 63)
	o := id + 128
	w.bits[o>>6] &^= 1 << (o & 63)
	return false
}

// MarshalBinary returns the 32-octet window state for non-volatile
// storage (§10.1); bit i is bit i%8 of octet i/8.
func (w *DuplicateWindow) MarshalBinary() ([]byte, error) {
	out := make([]byte, 32)
	for i := range 256 {
		if w.bits[i>>6]&(1<<(i&63)) != 0 {
			out[i>>3] |= 1 << (i & 7)
		}
	}
	return out, nil
}

// UnmarshalBinary restores a state written by MarshalBinary. Disabled is
// not part of the state and is left unchanged.
func (w *DuplicateWindow) UnmarshalBinary(b []byte) error {
	if len(b) != 32 {
		return errors.New("emsd: duplicate window state must be 32 octets")
	}
	w.bits = [4]uint64{}
	for i := range 256 {
		if b[i>>3]&(1<<(i&7)) != 0 {
			w.bits[i>>6] |= 1 << (i & 63)
		}
	}
	return nil
}

// SequenceCounter hands out segmentation sequence ids, starting at 1 and
// skipping 0 on wrap (§8). It is safe for concurrent use.
type SequenceCounter struct {
	n atomic.Uint32
}

// Next returns the next sequence id.
func (c *SequenceCounter) Next() uint32 {
	for {
		if v := c.n.Add(1); v != 0 {
			return v
		}
	}
}
