package emsd

import (
	"crypto/sha256"
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

// DuplicateWindow is the receiver's duplicate-detection window of §1.5:
// an id is set when its INVOKE is performed, and setting it clears the id
// (id+128) mod 256, so the window is half the id space. It also keeps the
// digest of the argument each id was performed with, and an INVOKE is a
// duplicate (answer RESULT with no data and do nothing else) only when its
// id is set and its argument is the same. A re-invocation after an ESRO
// failure repeats its segment octet for octet (§9.9), so it is still
// caught; but a sender that reuses ids for new operations (the reference
// MTS sends id 0 on every delivery, segment and re-invocation, §1.5, Open
// Point 2) does not get its new messages acknowledged and dropped (seen
// against the reference MTS with the window left on: two of three
// messages lost). The zero value is an empty, enabled window. It is not
// safe for concurrent use.
type DuplicateWindow struct {
	// Disabled makes every INVOKE new and leaves the window unchanged, for
	// reference MTS peers, which always send id 0 (§1.5, Open Point 2).
	Disabled bool
	seen     [256]*[sha256.Size]byte // nil: id not set
}

// Duplicate reports whether id is set with the same argument arg (the
// operation argument without its instance-id octet).
func (w *DuplicateWindow) Duplicate(id uint8, arg []byte) bool {
	if w.Disabled || w.seen[id] == nil {
		return false
	}
	return *w.seen[id] == sha256.Sum256(arg)
}

// Record sets id as performed with arg and clears (id+128) mod 256. A
// receiver records an INVOKE only once it is performed: one answered with
// an ERROR must be performed again if re-sent (§1.5).
func (w *DuplicateWindow) Record(id uint8, arg []byte) {
	if w.Disabled {
		return
	}
	sum := sha256.Sum256(arg)
	w.seen[id] = &sum
	w.seen[id+128] = nil
}

// Observe reports whether the INVOKE (id, arg) is a duplicate, and
// records it if not.
func (w *DuplicateWindow) Observe(id uint8, arg []byte) (duplicate bool) {
	if w.Duplicate(id, arg) {
		return true
	}
	w.Record(id, arg)
	return false
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
