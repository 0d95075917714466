package emsd

import (
	"math/bits"

	"github.com/esro-emsdp/emsdp/internal/ber"
)

// Identifier octets used by EMSD (§3, §4).
const (
	tagInteger    = 0x02
	tagBitString  = 0x03
	tagOctets     = 0x04
	tagEnumerated = 0x0a
	tagSequence   = 0x30
	tagQuirk25    = 0x25 // 1.0 SubmitResult inner tag (§4)

	tagApp0     = 0x40 // rfc822 ORAddress, Extension label/value; 1.0: emsd-name, rfc822 MessageId
	tagAppFirst = 0x62 // SegmentInfo.first
	tagAppOther = 0x63 // SegmentInfo.other
	tagApp4Cons = 0x64 // 1.1 MessageId.local
	tagApp5     = 0x45 // 1.1 MessageId.rfc822
	tagCtx0     = 0x80
	tagCtx1     = 0x81
	tagCtx2     = 0x82
	tagCtx3     = 0x83
	tagCtx5     = 0x85
	tagCtx0Cons = 0xa0
	tagCtx1Cons = 0xa1
	tagCtx2Cons = 0xa2
	tagCtx4Cons = 0xa4
	tagCtx5Cons = 0xa5
)

const noLimit = -1 // no size limit for str

// tagSet holds the version-dependent parts of the encoding (§4).
type tagSet struct {
	version        Version
	msgIDLocal     byte
	msgIDRFC822    byte
	addrValue      byte // 04 BCD (1.1) or 02 INTEGER (1.0)
	addrName       byte
	credentials    byte
	submitResultID byte
	delSubmTime    byte
	delSecurity    byte
	delContentType byte
	dcrContentType byte
	svrStatus      byte
	subject        byte
	extensions     byte
	mime           [5]byte // version, content type, id, description, transfer encoding
	extAlways      bool    // 1.1 always sends [4] extensions
	headingLimits  bool    // 1.0 enforces no subject/MIME/extension-count limits
	reportWrapped  bool    // 1.1 returned-content is a [0] SEQUENCE
	probeLength    byte
}

var tags11 = tagSet{
	version:        V1_1,
	msgIDLocal:     tagApp4Cons,
	msgIDRFC822:    tagApp5,
	addrValue:      tagOctets,
	addrName:       tagCtx0,
	credentials:    tagCtx0Cons,
	submitResultID: tagSequence,
	delSubmTime:    tagCtx0,
	delSecurity:    tagCtx1Cons,
	delContentType: tagInteger,
	dcrContentType: tagInteger,
	svrStatus:      tagEnumerated,
	subject:        tagCtx3,
	extensions:     tagCtx4Cons,
	mime:           [5]byte{0x85, 0x86, 0x87, 0x88, 0x89},
	extAlways:      true,
	headingLimits:  true,
	reportWrapped:  true,
	probeLength:    tagCtx0,
}

var tags10 = tagSet{
	version:        V1_0,
	msgIDLocal:     tagSequence,
	msgIDRFC822:    tagApp0,
	addrValue:      tagInteger,
	addrName:       tagApp0,
	credentials:    tagSequence,
	submitResultID: tagQuirk25,
	delSubmTime:    tagInteger,
	delSecurity:    tagCtx0Cons,
	delContentType: tagEnumerated,
	dcrContentType: tagEnumerated,
	svrStatus:      tagInteger,
	subject:        0x84,
	extensions:     tagCtx5Cons,
	mime:           [5]byte{0x86, 0x87, 0x88, 0x89, 0x8a},
	probeLength:    tagInteger,
}

func (o Options) tags() *tagSet {
	if o.Version == V1_0 {
		return &tags10
	}
	return &tags11
}

// ---- decoding ----

type dec struct {
	r ber.Reader
	t *tagSet
}

func (d *dec) more() bool { return !d.r.Empty() }

// peek reports whether the next element has tag want (constructed bit ignored).
func (d *dec) peek(want byte) bool { return d.more() && ber.Match(d.r.PeekTag(), want) }

func (d *dec) fail(field string, off int, cause error) error {
	code := CodeProtocolViolation
	return &DecodeError{Code: code, Field: field, Offset: off, Err: cause}
}

// next reads any element.
func (d *dec) next(field string) (ber.TLV, error) {
	off := d.r.Offset()
	t, err := d.r.Next()
	if err != nil {
		return t, d.fail(field, off, err)
	}
	return t, nil
}

// take reads an element that must have tag want.
func (d *dec) take(want byte, field string) (ber.TLV, error) {
	if d.more() && !ber.Match(d.r.PeekTag(), want) {
		return ber.TLV{}, d.fail(field, d.r.Offset(), ErrUnexpectedTag)
	}
	return d.next(field)
}

func (d *dec) sub(t ber.TLV) dec { return dec{r: t.Reader(), t: d.t} }

// end fails when components remain: there is no skipping of unknown
// components (§2.7).
func (d *dec) end(field string) error {
	if d.more() {
		return d.fail(field, d.r.Offset(), ErrTrailingData)
	}
	return nil
}

func (d *dec) uint(want byte, field string) (uint32, error) {
	t, err := d.take(want, field)
	if err != nil {
		return 0, err
	}
	v, err := ber.Uint(t.Content)
	if err != nil {
		return 0, d.fail(field, t.Offset, err)
	}
	return v, nil
}

// optUint reads an optional INTEGER-like element.
func (d *dec) optUint(want byte, field string) (*uint32, error) {
	if !d.peek(want) {
		return nil, nil
	}
	v, err := d.uint(want, field)
	if err != nil {
		return nil, err
	}
	return &v, nil
}

// str reads an OCTET STRING-like element of at most max octets (noLimit:
// unbounded).
func (d *dec) str(want byte, field string, max int) (string, error) {
	t, err := d.take(want, field)
	if err != nil {
		return "", err
	}
	if max >= 0 && len(t.Content) > max {
		return "", d.fail(field, t.Offset, ErrTooLong)
	}
	return string(t.Content), nil
}

func (d *dec) octets(want byte, field string) ([]byte, error) {
	t, err := d.take(want, field)
	if err != nil {
		return nil, err
	}
	return clone(t.Content), nil
}

func (d *dec) bits(want byte, field string) (uint64, error) {
	t, err := d.take(want, field)
	if err != nil {
		return 0, err
	}
	m, err := ber.BitString(t.Content)
	if err != nil {
		return 0, d.fail(field, t.Offset, err)
	}
	return m, nil
}

// rest returns the remaining octets of the SEQUENCE: the raw contents of
// §2.9. Empty contents are returned as nil.
func (d *dec) rest() []byte { return clone(d.r.Rest()) }

func clone(b []byte) []byte {
	if len(b) == 0 {
		return nil
	}
	return append([]byte(nil), b...)
}

// decodeTop checks the version and that b is exactly one element with tag
// want, then runs f on its content.
func decodeTop(b []byte, o Options, pdu string, want byte, f func(d *dec) error) error {
	if !o.Version.valid() {
		return &DecodeError{Code: CodeProtocolVersion, PDU: pdu, Err: ErrBadVersion}
	}
	d := dec{r: ber.NewReader(b), t: o.tags()}
	if !d.more() {
		return &DecodeError{Code: CodeProtocolViolation, PDU: pdu, Err: ErrTruncated}
	}
	t, err := d.take(want, "")
	if err == nil {
		err = d.end("")
	}
	if err == nil {
		sd := d.sub(t)
		err = f(&sd)
	}
	return topLevel(err, pdu)
}

// ---- encoding ----

type enc struct {
	ber.Encoder
	t        *tagSet
	rev      bool
	noLimits bool // Options.noLimits
}

func encodeTop(b []byte, o Options, pdu string, f func(e *enc) error) ([]byte, error) {
	if !o.Version.valid() {
		return b, &EncodeError{PDU: pdu, Err: ErrBadVersion}
	}
	e := enc{Encoder: ber.Encoder{Buf: b}, t: o.tags(), rev: o.ReverseSequenceOf, noLimits: o.noLimits}
	if err := f(&e); err != nil {
		return b, topLevel(err, pdu)
	}
	return e.Buf, nil
}

func encFail(field string, cause error) error { return &EncodeError{Field: field, Err: cause} }

// str writes an OCTET STRING-like element after checking its size.
func (e *enc) str(tag byte, s string, max int, field string) error {
	if max >= 0 && len(s) > max && !e.noLimits {
		return encFail(field, ErrTooLong)
	}
	e.String(tag, s)
	return nil
}

// optStr writes s unless it is empty.
func (e *enc) optStr(tag byte, s string, max int, field string) error {
	if s == "" {
		return nil
	}
	return e.str(tag, s, max, field)
}

// flags writes a one-octet flag BIT STRING, as the reference does (§2.5).
func (e *enc) flags(tag byte, m uint8) {
	e.Buf = append(e.Buf, tag, 2, 0, bits.Reverse8(m)) // bit n = mask 0x80>>n
}

// seqOf writes n elements inside tag, in reverse order if requested
// (§2.11), after checking n against max.
func (e *enc) seqOf(tag byte, n, max int, field string, elem func(i int) error) error {
	if n > max && !e.noLimits {
		return encFail(field, ErrTooMany)
	}
	s := e.Begin(tag)
	for i := range n {
		j := i
		if e.rev {
			j = n - 1 - i
		}
		if err := elem(j); err != nil {
			return prefix(err, field)
		}
	}
	e.End(s)
	return nil
}
