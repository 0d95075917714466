// Package ber implements the subset of the Basic Encoding Rules used by the
// EMSD reference implementation (docs/protocol.md EMSD §2): one-octet tags, definite
// lengths (minimal long form on output), unsigned 1–4 octet INTEGERs and
// BIT STRINGs read as bit masks.
//
// The package knows nothing about EMSD types; package emsd builds its schema
// on top of it.
package ber

import "errors"

// Errors returned by the Reader and the content parsers.
var (
	ErrTruncated        = errors.New("ber: truncated element")
	ErrIndefiniteLength = errors.New("ber: indefinite length")
	ErrLongTag          = errors.New("ber: multi-octet tag")
	ErrIntegerTooLong   = errors.New("ber: INTEGER longer than 4 octets")
	ErrBitString        = errors.New("ber: malformed BIT STRING")
)

// Constructed is the constructed bit of an identifier octet.
const Constructed = 0x20

// Match reports whether tag and want denote the same class and tag number.
// The constructed bit is ignored, as the reference decoder does (§2.1).
func Match(tag, want byte) bool { return (tag^want)&^Constructed == 0 }

// LengthSize returns the number of octets AppendLength uses for n.
func LengthSize(n int) int {
	if n < 0x80 {
		return 1
	}
	return 1 + uintSize(uint64(n))
}

func uintSize(v uint64) int {
	k := 1
	for v >>= 8; v != 0; v >>= 8 {
		k++
	}
	return k
}

// AppendLength appends a definite length in its minimal form (§2.2).
func AppendLength(b []byte, n int) []byte {
	if n < 0x80 {
		return append(b, byte(n))
	}
	k := uintSize(uint64(n))
	b = append(b, 0x80|byte(k))
	for i := k - 1; i >= 0; i-- {
		b = append(b, byte(n>>(8*i)))
	}
	return b
}

// AppendUint appends an INTEGER (or any tag carrying one) with the value as
// an unsigned big-endian number in 1–4 octets, no sign padding (§2.3).
func AppendUint(b []byte, tag byte, v uint32) []byte {
	k := uintSize(uint64(v))
	b = append(b, tag, byte(k))
	for i := k - 1; i >= 0; i-- {
		b = append(b, byte(v>>(8*i)))
	}
	return b
}

// UintSize returns the encoded size (tag, length and content) of AppendUint.
func UintSize(v uint32) int { return 2 + uintSize(uint64(v)) }

// Encoder appends BER elements to Buf. Constructed elements are written
// front to back: Begin reserves one length octet and End patches it,
// moving the content when the long form is needed.
type Encoder struct {
	Buf []byte
}

// Begin appends tag and a placeholder length and returns the content start
// to be passed to End.
func (e *Encoder) Begin(tag byte) int {
	e.Buf = append(e.Buf, tag, 0)
	return len(e.Buf)
}

// End sets the length of the element whose content starts at start.
func (e *Encoder) End(start int) {
	n := len(e.Buf) - start
	if n < 0x80 {
		e.Buf[start-1] = byte(n)
		return
	}
	k := uintSize(uint64(n))
	e.Buf = append(e.Buf, make([]byte, k)...)
	copy(e.Buf[start+k:], e.Buf[start:start+n])
	e.Buf[start-1] = 0x80 | byte(k)
	for i := k - 1; i >= 0; i-- {
		e.Buf[start+i] = byte(n)
		n >>= 8
	}
}

// Uint appends an unsigned INTEGER-like element.
func (e *Encoder) Uint(tag byte, v uint32) { e.Buf = AppendUint(e.Buf, tag, v) }

// Bytes appends a primitive element with content p.
func (e *Encoder) Bytes(tag byte, p []byte) {
	e.Buf = append(AppendLength(append(e.Buf, tag), len(p)), p...)
}

// String appends a primitive element with content s.
func (e *Encoder) String(tag byte, s string) {
	e.Buf = append(AppendLength(append(e.Buf, tag), len(s)), s...)
}

// BitString appends a BIT STRING whose data octets are given in wire order,
// with "unused bits" 0 (§2.5).
func (e *Encoder) BitString(tag byte, octets []byte) {
	e.Buf = append(AppendLength(append(e.Buf, tag), len(octets)+1), 0)
	e.Buf = append(e.Buf, octets...)
}

// Raw appends p without any tag or length.
func (e *Encoder) Raw(p []byte) { e.Buf = append(e.Buf, p...) }

// TLV is one decoded element.
type TLV struct {
	Tag        byte
	Content    []byte
	Offset     int // absolute offset of the identifier octet
	ContentOff int // absolute offset of the first content octet
}

// Reader walks a sequence of elements. Offsets are absolute, relative to
// the input the outermost Reader was created for.
type Reader struct {
	b   []byte
	off int
}

// NewReader returns a Reader over b, whose first octet has offset 0.
func NewReader(b []byte) Reader { return Reader{b: b} }

// Reader returns a Reader over the element's content.
func (t TLV) Reader() Reader { return Reader{b: t.Content, off: t.ContentOff} }

// Empty reports whether all input has been consumed.
func (r *Reader) Empty() bool { return len(r.b) == 0 }

// Offset returns the absolute offset of the next unread octet.
func (r *Reader) Offset() int { return r.off }

// PeekTag returns the next identifier octet; it must not be called on an
// empty Reader.
func (r *Reader) PeekTag() byte { return r.b[0] }

// Rest consumes and returns all remaining octets.
func (r *Reader) Rest() []byte {
	p := r.b
	r.off += len(p)
	r.b = r.b[len(p):]
	return p
}

// Next reads one element. Any long-form length is accepted; the
// indefinite form and multi-octet tags are rejected (§2.1, §2.2).
func (r *Reader) Next() (TLV, error) {
	b := r.b
	if len(b) < 2 {
		return TLV{}, ErrTruncated
	}
	tag := b[0]
	if tag&0x1f == 0x1f {
		return TLV{}, ErrLongTag
	}
	n := int(b[1])
	i := 2
	if n&0x80 != 0 {
		k := n & 0x7f
		if k == 0 {
			return TLV{}, ErrIndefiniteLength
		}
		if len(b) < i+k {
			return TLV{}, ErrTruncated
		}
		n = 0
		for _, c := range b[i : i+k] {
			// Any value above the remaining input is truncated anyway;
			// stop early so n cannot overflow.
			if n > len(b) {
				return TLV{}, ErrTruncated
			}
			n = n<<8 | int(c)
		}
		i += k
	}
	if n > len(b)-i {
		return TLV{}, ErrTruncated
	}
	t := TLV{Tag: tag, Content: b[i : i+n : i+n], Offset: r.off, ContentOff: r.off + i}
	r.b = b[i+n:]
	r.off += i + n
	return t, nil
}

// Uint parses INTEGER content as unsigned: 0–4 octets, zero octets meaning 0
// as in the reference; more than 4 octets is an error (§2.3).
func Uint(c []byte) (uint32, error) {
	if len(c) > 4 {
		return 0, ErrIntegerTooLong
	}
	var v uint32
	for _, x := range c {
		v = v<<8 | uint32(x)
	}
	return v, nil
}

// BitString parses BIT STRING content into a mask in which named bit n is
// 1<<n (n < 64; later bits are ignored). Bit n is octet n/8, mask 0x80>>(n%8)
// (standard order). Unused trailing bits are ignored (§2.5).
func BitString(c []byte) (uint64, error) {
	if len(c) == 0 || c[0] > 7 {
		return 0, ErrBitString
	}
	data := c[1:]
	var m uint64
	for i, x := range data {
		if i == len(data)-1 {
			x &= 0xff << c[0]
		}
		for j := 0; j < 8; j++ {
			n := i*8 + j
			if n >= 64 {
				return m, nil
			}
			if x&(0x80>>j) != 0 {
				m |= 1 << n
			}
		}
	}
	return m, nil
}

// BitStringOctets returns the data octets for mask m (bit n = 1<<n) in
// standard order, at least minOctets long.
func BitStringOctets(m uint64, minOctets int) []byte {
	n := minOctets
	for i := 63; i >= 0; i-- {
		if m&(1<<i) != 0 {
			n = max(n, i/8+1)
			break
		}
	}
	out := make([]byte, n)
	for i := range n * 8 {
		if i < 64 && m&(1<<i) != 0 {
			out[i/8] |= 0x80 >> (i % 8)
		}
	}
	return out
}
