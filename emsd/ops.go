package emsd

import (
	"github.com/esro-emsdp/emsdp/internal/ber"
)

// SubmitArgument is the argument of Submission (op 33, §3).
type SubmitArgument struct {
	Security    *SecurityElement // [0], optional
	Segment     *SegmentInfo     // optional (§8)
	ContentType ContentType
	// Contents are the encoded content (or, when segmented, one slice of
	// it), appended raw after the content type (§2.9).
	Contents []byte
}

// AppendMarshal appends the encoding of a to b.
func (a *SubmitArgument) AppendMarshal(b []byte, o Options) ([]byte, error) {
	return encodeTop(b, o, "SubmitArgument", func(e *enc) error {
		s := e.Begin(tagSequence)
		if a.Security != nil {
			if err := e.security(tagCtx0Cons, a.Security); err != nil {
				return prefix(err, "security")
			}
		}
		if a.Segment != nil {
			e.segment(a.Segment)
		}
		e.Uint(tagInteger, uint32(a.ContentType))
		e.Raw(a.Contents)
		e.End(s)
		return nil
	})
}

// Marshal returns the encoding of a.
func (a *SubmitArgument) Marshal(o Options) ([]byte, error) { return a.AppendMarshal(nil, o) }

// Unmarshal decodes b, which must be exactly one SubmitArgument; the
// contents are everything after the content type (§2.9).
func (a *SubmitArgument) Unmarshal(b []byte, o Options) error {
	var v SubmitArgument
	err := decodeTop(b, o, "SubmitArgument", tagSequence, func(d *dec) error {
		if d.peek(tagCtx0Cons) {
			t, _ := d.next("")
			s, err := d.security(t)
			if err != nil {
				return prefix(err, "security")
			}
			v.Security = s
		}
		if d.isSegmentTag() {
			s, err := d.segment()
			if err != nil {
				return err
			}
			v.Segment = s
		}
		if !d.more() {
			return nil // content-type missing (§2.7)
		}
		ct, err := d.uint(tagInteger, "content-type")
		if err != nil {
			return err
		}
		v.ContentType = ContentType(ct)
		v.Contents = d.rest()
		return nil
	})
	if err == nil {
		*a = v
	}
	return err
}

// Content decodes the contents according to the content type.
func (a *SubmitArgument) Content(o Options) (Content, error) {
	return DecodeContents(a.ContentType, a.Contents, o)
}

// SubmitResult is the result of Submission (§3): 30 {30 {time, number}}.
// In 1.0 the inner tag is the reference's 25 (§4), accepted on decode
// together with 30.
type SubmitResult struct {
	MessageID LocalMessageID
}

// AppendMarshal appends the encoding of r to b.
func (r *SubmitResult) AppendMarshal(b []byte, o Options) ([]byte, error) {
	return encodeTop(b, o, "SubmitResult", func(e *enc) error {
		s := e.Begin(tagSequence)
		e.localMessageID(e.t.submitResultID, r.MessageID)
		e.End(s)
		return nil
	})
}

// Marshal returns the encoding of r.
func (r *SubmitResult) Marshal(o Options) ([]byte, error) { return r.AppendMarshal(nil, o) }

// Unmarshal decodes b.
func (r *SubmitResult) Unmarshal(b []byte, o Options) error {
	var v SubmitResult
	err := decodeTop(b, o, "SubmitResult", tagSequence, func(d *dec) error {
		if !d.more() {
			return nil // local-message-id missing (§2.7)
		}
		want := byte(tagSequence)
		if d.t.version == V1_0 && !d.peek(tagSequence) {
			want = tagQuirk25
		}
		t, err := d.take(want, "local-message-id")
		if err != nil {
			return err
		}
		if v.MessageID, err = d.localMessageID(t); err != nil {
			return prefix(err, "local-message-id")
		}
		return d.end("")
	})
	if err == nil {
		*r = v
	}
	return err
}

// DeliverArgument is the argument of Delivery (op 35, §3); its RESULT
// carries no data.
type DeliverArgument struct {
	MessageID      MessageID
	DeliveryTime   Time
	SubmissionTime *Time            // [0] (1.0: universal INTEGER), optional
	Security       *SecurityElement // [1] (1.0: [0]), optional
	Segment        *SegmentInfo     // optional (§8)
	ContentType    ContentType      // INTEGER (1.0: ENUMERATED)
	Contents       []byte           // raw, §2.9
}

// AppendMarshal appends the encoding of a to b.
func (a *DeliverArgument) AppendMarshal(b []byte, o Options) ([]byte, error) {
	return encodeTop(b, o, "DeliverArgument", func(e *enc) error {
		s := e.Begin(tagSequence)
		if err := e.messageID(&a.MessageID, "message-id"); err != nil {
			return err
		}
		e.Uint(tagInteger, uint32(a.DeliveryTime))
		if a.SubmissionTime != nil {
			e.Uint(e.t.delSubmTime, uint32(*a.SubmissionTime))
		}
		if a.Security != nil {
			if err := e.security(e.t.delSecurity, a.Security); err != nil {
				return prefix(err, "security")
			}
		}
		if a.Segment != nil {
			e.segment(a.Segment)
		}
		e.Uint(e.t.delContentType, uint32(a.ContentType))
		e.Raw(a.Contents)
		e.End(s)
		return nil
	})
}

// Marshal returns the encoding of a.
func (a *DeliverArgument) Marshal(o Options) ([]byte, error) { return a.AppendMarshal(nil, o) }

// Unmarshal decodes b, which must be exactly one DeliverArgument.
func (a *DeliverArgument) Unmarshal(b []byte, o Options) error {
	var v DeliverArgument
	err := decodeTop(b, o, "DeliverArgument", tagSequence, func(d *dec) error {
		if !d.more() {
			return nil // message-id missing (§2.7)
		}
		var err error
		if v.MessageID, err = d.messageID("message-id"); err != nil {
			return err
		}
		if !d.more() {
			return nil // delivery-time missing
		}
		dt, err := d.uint(tagInteger, "delivery-time")
		if err != nil {
			return err
		}
		v.DeliveryTime = Time(dt)
		if d.peek(d.t.delSubmTime) {
			st, err := d.uint(d.t.delSubmTime, "submission-time")
			if err != nil {
				return err
			}
			v.SubmissionTime = (*Time)(&st)
		}
		if d.peek(d.t.delSecurity) {
			t, _ := d.next("")
			if v.Security, err = d.security(t); err != nil {
				return prefix(err, "security")
			}
		}
		if d.isSegmentTag() {
			if v.Segment, err = d.segment(); err != nil {
				return err
			}
		}
		if !d.more() {
			return nil // content-type missing
		}
		ct, err := d.uint(d.t.delContentType, "content-type")
		if err != nil {
			return err
		}
		v.ContentType = ContentType(ct)
		v.Contents = d.rest()
		return nil
	})
	if err == nil {
		*a = v
	}
	return err
}

// Content decodes the contents according to the content type.
func (a *DeliverArgument) Content(o Options) (Content, error) {
	return DecodeContents(a.ContentType, a.Contents, o)
}

// DeliveryControlArgument is the argument of Delivery control (op 2, §3).
// The reference UA sends it empty (30 00).
type DeliveryControlArgument struct {
	Restrict                    *Restrict     // [0], default update
	PermissibleOperations       *OperationSet // [1]
	PermissibleMaxContentLength *uint32       // [2]
	PermissibleLowestPriority   *Priority     // [3]
	Security                    *SecurityElement
	UserFeatures                []byte // [5]; nil = absent
}

// AppendMarshal appends the encoding of a to b.
func (a *DeliveryControlArgument) AppendMarshal(b []byte, o Options) ([]byte, error) {
	return encodeTop(b, o, "DeliveryControlArgument", func(e *enc) error {
		s := e.Begin(tagSequence)
		if a.Restrict != nil {
			e.Uint(tagCtx0, uint32(*a.Restrict))
		}
		if a.PermissibleOperations != nil {
			e.BitString(tagCtx1, ber.BitStringOctets(uint64(*a.PermissibleOperations), 1))
		}
		if a.PermissibleMaxContentLength != nil {
			e.Uint(tagCtx2, *a.PermissibleMaxContentLength)
		}
		if a.PermissibleLowestPriority != nil {
			e.Uint(tagCtx3, uint32(*a.PermissibleLowestPriority))
		}
		if a.Security != nil {
			if err := e.security(tagCtx4Cons, a.Security); err != nil {
				return prefix(err, "security")
			}
		}
		if a.UserFeatures != nil {
			e.Bytes(tagCtx5, a.UserFeatures)
		}
		e.End(s)
		return nil
	})
}

// Marshal returns the encoding of a.
func (a *DeliveryControlArgument) Marshal(o Options) ([]byte, error) {
	return a.AppendMarshal(nil, o)
}

// Unmarshal decodes b.
func (a *DeliveryControlArgument) Unmarshal(b []byte, o Options) error {
	var v DeliveryControlArgument
	err := decodeTop(b, o, "DeliveryControlArgument", tagSequence, func(d *dec) error {
		x, err := d.optUint(tagCtx0, "restrict")
		if err != nil {
			return err
		}
		v.Restrict = (*Restrict)(x)
		if d.peek(tagCtx1) {
			m, err := d.bits(tagCtx1, "permissible-operations")
			if err != nil {
				return err
			}
			v.PermissibleOperations = (*OperationSet)(&m)
		}
		if v.PermissibleMaxContentLength, err = d.optUint(tagCtx2, "permissible-max-content-length"); err != nil {
			return err
		}
		if x, err = d.optUint(tagCtx3, "permissible-lowest-priority"); err != nil {
			return err
		}
		v.PermissibleLowestPriority = (*Priority)(x)
		if d.peek(tagCtx4Cons) {
			t, _ := d.next("")
			if v.Security, err = d.security(t); err != nil {
				return prefix(err, "security")
			}
		}
		if d.peek(tagCtx5) {
			if v.UserFeatures, err = d.octets(tagCtx5, "user-features"); err != nil {
				return err
			}
			if v.UserFeatures == nil {
				v.UserFeatures = []byte{}
			}
		}
		return d.end("")
	})
	if err == nil {
		*a = v
	}
	return err
}

// DeliveryControlResult is the result of Delivery control (§3, §9.12). An
// encoding is at least 30 02 30 00, which the reference UA requires.
type DeliveryControlResult struct {
	WaitingOperations   *OperationSet    // [0]
	WaitingMessages     *WaitingMessages // [1]
	WaitingContentTypes []ContentType    // at most MaxWaitingContentTypes
}

// AppendMarshal appends the encoding of r to b.
func (r *DeliveryControlResult) AppendMarshal(b []byte, o Options) ([]byte, error) {
	return encodeTop(b, o, "DeliveryControlResult", func(e *enc) error {
		s := e.Begin(tagSequence)
		if r.WaitingOperations != nil {
			e.BitString(tagCtx0, ber.BitStringOctets(uint64(*r.WaitingOperations), 1))
		}
		if r.WaitingMessages != nil {
			e.flags(tagCtx1, uint8(*r.WaitingMessages))
		}
		err := e.seqOf(tagSequence, len(r.WaitingContentTypes), MaxWaitingContentTypes,
			"waiting-content-types", func(i int) error {
				e.Uint(e.t.dcrContentType, uint32(r.WaitingContentTypes[i]))
				return nil
			})
		if err != nil {
			return err
		}
		e.End(s)
		return nil
	})
}

// Marshal returns the encoding of r.
func (r *DeliveryControlResult) Marshal(o Options) ([]byte, error) { return r.AppendMarshal(nil, o) }

// Unmarshal decodes b.
func (r *DeliveryControlResult) Unmarshal(b []byte, o Options) error {
	var v DeliveryControlResult
	err := decodeTop(b, o, "DeliveryControlResult", tagSequence, func(d *dec) error {
		if d.peek(tagCtx0) {
			m, err := d.bits(tagCtx0, "waiting-operations")
			if err != nil {
				return err
			}
			v.WaitingOperations = (*OperationSet)(&m)
		}
		if d.peek(tagCtx1) {
			m, err := d.bits(tagCtx1, "waiting-messages")
			if err != nil {
				return err
			}
			w := WaitingMessages(m)
			v.WaitingMessages = &w
		}
		if !d.more() {
			return nil // waiting-content-types missing (§2.7)
		}
		t, err := d.take(tagSequence, "waiting-content-types")
		if err != nil {
			return err
		}
		sd := d.sub(t)
		for sd.more() {
			if len(v.WaitingContentTypes) == MaxWaitingContentTypes {
				return sd.fail("waiting-content-types", sd.r.Offset(), ErrTooMany)
			}
			ct, err := sd.uint(d.t.dcrContentType, "waiting-content-types")
			if err != nil {
				return err
			}
			v.WaitingContentTypes = append(v.WaitingContentTypes, ContentType(ct))
		}
		return d.end("")
	})
	if err == nil {
		*r = v
	}
	return err
}

// DeliveryVerifyArgument is the argument of Delivery verify (op 5, §3).
type DeliveryVerifyArgument struct {
	MessageID MessageID
}

// AppendMarshal appends the encoding of a to b.
func (a *DeliveryVerifyArgument) AppendMarshal(b []byte, o Options) ([]byte, error) {
	return appendMessageIDArg(b, o, "DeliveryVerifyArgument", &a.MessageID)
}

// Marshal returns the encoding of a.
func (a *DeliveryVerifyArgument) Marshal(o Options) ([]byte, error) {
	return a.AppendMarshal(nil, o)
}

// Unmarshal decodes b.
func (a *DeliveryVerifyArgument) Unmarshal(b []byte, o Options) error {
	return decodeMessageIDArg(b, o, "DeliveryVerifyArgument", &a.MessageID)
}

// SubmissionVerifyArgument is the argument of Submission verify (op 6, §3).
type SubmissionVerifyArgument struct {
	MessageID MessageID
}

// AppendMarshal appends the encoding of a to b.
func (a *SubmissionVerifyArgument) AppendMarshal(b []byte, o Options) ([]byte, error) {
	return appendMessageIDArg(b, o, "SubmissionVerifyArgument", &a.MessageID)
}

// Marshal returns the encoding of a.
func (a *SubmissionVerifyArgument) Marshal(o Options) ([]byte, error) {
	return a.AppendMarshal(nil, o)
}

// Unmarshal decodes b.
func (a *SubmissionVerifyArgument) Unmarshal(b []byte, o Options) error {
	return decodeMessageIDArg(b, o, "SubmissionVerifyArgument", &a.MessageID)
}

func appendMessageIDArg(b []byte, o Options, pdu string, m *MessageID) ([]byte, error) {
	return encodeTop(b, o, pdu, func(e *enc) error {
		s := e.Begin(tagSequence)
		if err := e.messageID(m, "message-id"); err != nil {
			return err
		}
		e.End(s)
		return nil
	})
}

func decodeMessageIDArg(b []byte, o Options, pdu string, m *MessageID) error {
	var v MessageID
	err := decodeTop(b, o, pdu, tagSequence, func(d *dec) error {
		if !d.more() {
			return nil // message-id missing (§2.7)
		}
		var err error
		if v, err = d.messageID("message-id"); err != nil {
			return err
		}
		return d.end("")
	})
	if err == nil {
		*m = v
	}
	return err
}

// DeliveryVerifyResult is the result of Delivery verify (§3).
type DeliveryVerifyResult struct {
	Status DeliveryStatus
}

// AppendMarshal appends the encoding of r to b.
func (r *DeliveryVerifyResult) AppendMarshal(b []byte, o Options) ([]byte, error) {
	return appendStatus(b, o, "DeliveryVerifyResult", tagInteger, uint32(r.Status))
}

// Marshal returns the encoding of r.
func (r *DeliveryVerifyResult) Marshal(o Options) ([]byte, error) { return r.AppendMarshal(nil, o) }

// Unmarshal decodes b.
func (r *DeliveryVerifyResult) Unmarshal(b []byte, o Options) error {
	return decodeStatus(b, o, "DeliveryVerifyResult", func(*tagSet) byte { return tagInteger },
		(*uint32)(&r.Status))
}

// SubmissionVerifyResult is the result of Submission verify (§3): status
// ENUMERATED in 1.1, INTEGER in 1.0 (§4).
type SubmissionVerifyResult struct {
	Status SubmissionStatus
}

// AppendMarshal appends the encoding of r to b.
func (r *SubmissionVerifyResult) AppendMarshal(b []byte, o Options) ([]byte, error) {
	return appendStatus(b, o, "SubmissionVerifyResult", o.tags().svrStatus, uint32(r.Status))
}

// Marshal returns the encoding of r.
func (r *SubmissionVerifyResult) Marshal(o Options) ([]byte, error) {
	return r.AppendMarshal(nil, o)
}

// Unmarshal decodes b.
func (r *SubmissionVerifyResult) Unmarshal(b []byte, o Options) error {
	return decodeStatus(b, o, "SubmissionVerifyResult", func(t *tagSet) byte { return t.svrStatus },
		(*uint32)(&r.Status))
}

func appendStatus(b []byte, o Options, pdu string, tag byte, v uint32) ([]byte, error) {
	return encodeTop(b, o, pdu, func(e *enc) error {
		s := e.Begin(tagSequence)
		e.Uint(tag, v)
		e.End(s)
		return nil
	})
}

func decodeStatus(b []byte, o Options, pdu string, tag func(*tagSet) byte, out *uint32) error {
	var v uint32
	err := decodeTop(b, o, pdu, tagSequence, func(d *dec) error {
		if !d.more() {
			return nil // status missing (§2.7)
		}
		var err error
		if v, err = d.uint(tag(d.t), "status"); err != nil {
			return err
		}
		return d.end("")
	})
	if err == nil {
		*out = v
	}
	return err
}

// ErrorParameter is the optional user data of an EMSD ERROR: a bare
// INTEGER holding an error code (§1.6, §3). The reference MTS sends 0.
type ErrorParameter ErrorCode

// AppendMarshal appends the encoding of p to b.
func (p ErrorParameter) AppendMarshal(b []byte, o Options) ([]byte, error) {
	return encodeTop(b, o, "ErrorParameter", func(e *enc) error {
		e.Uint(tagInteger, uint32(p))
		return nil
	})
}

// Marshal returns the encoding of p.
func (p ErrorParameter) Marshal(o Options) ([]byte, error) { return p.AppendMarshal(nil, o) }

// Unmarshal decodes b; values above 255 are rejected.
func (p *ErrorParameter) Unmarshal(b []byte, o Options) error {
	var v uint32
	err := decodeTop(b, o, "ErrorParameter", tagInteger, func(d *dec) error {
		x, err := ber.Uint(d.r.Rest())
		if err == nil && x > 0xff {
			err = ErrInvalid
		}
		if err != nil {
			return d.fail("", 0, err)
		}
		v = x
		return nil
	})
	if err == nil {
		*p = ErrorParameter(v)
	}
	return err
}

// Code returns the parameter as an ErrorCode.
func (p ErrorParameter) Code() ErrorCode { return ErrorCode(p) }
