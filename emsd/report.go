package emsd

// Content is a decoded content: *IPM, *ReportDelivery or *ProbeSubmission.
type Content interface {
	ContentType() ContentType
	AppendMarshal(b []byte, o Options) ([]byte, error)
	Marshal(o Options) ([]byte, error)
}

// DecodeContents decodes (reassembled) contents according to their content
// type (§3): 32 IPM, 2 ReportDelivery, 1 ProbeSubmission. Other types,
// voice (33) included, fail with ErrContentType and CodeProtocolViolation.
func DecodeContents(ct ContentType, b []byte, o Options) (Content, error) {
	var c interface {
		Content
		Unmarshal([]byte, Options) error
	}
	switch ct {
	case ContentIPM:
		c = new(IPM)
	case ContentDeliveryReport:
		c = new(ReportDelivery)
	case ContentProbe:
		c = new(ProbeSubmission)
	default:
		return nil, &DecodeError{Code: CodeProtocolViolation, PDU: ct.String(), Err: ErrContentType}
	}
	if err := c.Unmarshal(b, o); err != nil {
		return nil, err
	}
	return c, nil
}

// ReportDelivery is a delivery/non-delivery report, content type 2 (§3).
type ReportDelivery struct {
	ReportedMessageID MessageID
	Recipients        []PerRecipReportData // at most MaxRecipients
	ReturnedContent   *ReturnedContent
}

// PerRecipReportData reports on one recipient; exactly one of Delivery and
// NonDelivery must be set to encode.
type PerRecipReportData struct {
	Recipient   ORAddress
	Delivery    *DeliveryReport
	NonDelivery *NonDeliveryReport
}

// DeliveryReport is a positive report (§3).
type DeliveryReport struct {
	DeliveryTime Time
}

// NonDeliveryReport is a negative report (§3, §5).
type NonDeliveryReport struct {
	Reason      NonDeliveryReason
	Diagnostic  *Diagnostic // [0], optional
	Explanation string      // [1]; "" = absent
}

// ReturnedContent is the content returned with a report. In 1.1 it is a
// [0] SEQUENCE {content-type, raw contents}; in 1.0 the content type and
// raw contents follow the per-recipient data directly (§4).
type ReturnedContent struct {
	ContentType ContentType
	Contents    []byte // raw; nil = absent
}

// ContentType returns ContentDeliveryReport.
func (*ReportDelivery) ContentType() ContentType { return ContentDeliveryReport }

// AppendMarshal appends the encoding of r to b.
func (r *ReportDelivery) AppendMarshal(b []byte, o Options) ([]byte, error) {
	return encodeTop(b, o, "ReportDelivery", func(e *enc) error {
		s := e.Begin(tagSequence)
		if err := e.messageID(&r.ReportedMessageID, "msg-id-of-reported-msg"); err != nil {
			return err
		}
		err := e.seqOf(tagSequence, len(r.Recipients), MaxRecipients, "per-recipient-data", func(i int) error {
			return e.perRecip(&r.Recipients[i])
		})
		if err != nil {
			return err
		}
		if rc := r.ReturnedContent; rc != nil {
			if e.t.reportWrapped {
				w := e.Begin(tagCtx0Cons)
				e.Uint(tagInteger, uint32(rc.ContentType))
				e.Raw(rc.Contents)
				e.End(w)
			} else {
				e.Uint(tagInteger, uint32(rc.ContentType))
				e.Raw(rc.Contents)
			}
		}
		e.End(s)
		return nil
	})
}

func (e *enc) perRecip(p *PerRecipReportData) error {
	s := e.Begin(tagSequence)
	if err := e.orAddress(&p.Recipient, "recipient"); err != nil {
		return err
	}
	switch {
	case p.Delivery != nil && p.NonDelivery == nil:
		w := e.Begin(tagCtx0Cons)
		e.Uint(tagInteger, uint32(p.Delivery.DeliveryTime))
		e.End(w)
	case p.NonDelivery != nil && p.Delivery == nil:
		n := p.NonDelivery
		w := e.Begin(tagCtx1Cons)
		e.Uint(tagInteger, uint32(n.Reason))
		if n.Diagnostic != nil {
			e.Uint(tagCtx0, uint32(*n.Diagnostic))
		}
		if n.Explanation != "" {
			e.String(tagCtx1, n.Explanation)
		}
		e.End(w)
	default:
		return encFail("report", ErrInvalid)
	}
	e.End(s)
	return nil
}

// Marshal returns the encoding of r.
func (r *ReportDelivery) Marshal(o Options) ([]byte, error) { return r.AppendMarshal(nil, o) }

// Unmarshal decodes b.
func (r *ReportDelivery) Unmarshal(b []byte, o Options) error {
	var v ReportDelivery
	err := decodeTop(b, o, "ReportDelivery", tagSequence, func(d *dec) error {
		if !d.more() {
			return nil // msg-id missing (§2.7)
		}
		var err error
		if v.ReportedMessageID, err = d.messageID("msg-id-of-reported-msg"); err != nil {
			return err
		}
		if !d.more() {
			return nil // per-recipient-data missing
		}
		t, err := d.take(tagSequence, "per-recipient-data")
		if err != nil {
			return err
		}
		sd := d.sub(t)
		for sd.more() {
			if len(v.Recipients) == MaxRecipients {
				return sd.fail("per-recipient-data", sd.r.Offset(), ErrTooMany)
			}
			p, err := sd.perRecip()
			if err != nil {
				return prefix(err, "per-recipient-data")
			}
			v.Recipients = append(v.Recipients, p)
		}
		if d.t.reportWrapped {
			if d.peek(tagCtx0Cons) {
				w, _ := d.next("")
				wd := d.sub(w)
				v.ReturnedContent = new(ReturnedContent)
				if wd.more() { // content-type missing is accepted (§2.7)
					ct, err := wd.uint(tagInteger, "returned-content.content-type")
					if err != nil {
						return err
					}
					v.ReturnedContent.ContentType = ContentType(ct)
					v.ReturnedContent.Contents = wd.rest()
				}
			}
		} else if d.peek(tagInteger) {
			ct, err := d.uint(tagInteger, "returned-content.content-type")
			if err != nil {
				return err
			}
			v.ReturnedContent = &ReturnedContent{ContentType: ContentType(ct)}
			v.ReturnedContent.Contents = d.rest()
		}
		return d.end("")
	})
	if err == nil {
		*r = v
	}
	return err
}

func (d *dec) perRecip() (PerRecipReportData, error) {
	var p PerRecipReportData
	t, err := d.take(tagSequence, "")
	if err != nil {
		return p, err
	}
	sd := d.sub(t)
	if !sd.more() {
		return p, nil // recipient and report missing (§2.7)
	}
	if p.Recipient, err = sd.orAddress("recipient"); err != nil {
		return p, err
	}
	if !sd.more() {
		return p, nil // report missing
	}
	switch {
	case sd.peek(tagCtx0Cons):
		w, _ := sd.next("")
		wd := sd.sub(w)
		p.Delivery = new(DeliveryReport)
		if wd.more() {
			dt, err := wd.uint(tagInteger, "delivery.message-delivery-time")
			if err != nil {
				return p, err
			}
			p.Delivery.DeliveryTime = Time(dt)
		}
		if err := wd.end("delivery"); err != nil {
			return p, err
		}
	case sd.peek(tagCtx1Cons):
		w, _ := sd.next("")
		wd := sd.sub(w)
		n := new(NonDeliveryReport)
		p.NonDelivery = n
		if wd.more() {
			x, err := wd.uint(tagInteger, "non-delivery.reason")
			if err != nil {
				return p, err
			}
			n.Reason = NonDeliveryReason(x)
			dg, err := wd.optUint(tagCtx0, "non-delivery.diagnostic")
			if err != nil {
				return p, err
			}
			n.Diagnostic = (*Diagnostic)(dg)
			if wd.peek(tagCtx1) {
				if n.Explanation, err = wd.str(tagCtx1, "non-delivery.explanation", noLimit); err != nil {
					return p, err
				}
			}
		}
		if err := wd.end("non-delivery"); err != nil {
			return p, err
		}
	default:
		return p, sd.fail("report", sd.r.Offset(), ErrUnexpectedTag)
	}
	return p, sd.end("")
}

// ProbeSubmission is content type 1 (§3); the reference never uses it.
type ProbeSubmission struct {
	Sender            ORAddress
	Recipients        []ORAddress  // at most MaxRecipients
	ProbedContentType *ContentType // content-type of the probed message
	ContentLength     *uint32      // [0] (1.0: universal INTEGER, which requires ProbedContentType)
}

// ContentType returns ContentProbe.
func (*ProbeSubmission) ContentType() ContentType { return ContentProbe }

// AppendMarshal appends the encoding of p to b.
func (p *ProbeSubmission) AppendMarshal(b []byte, o Options) ([]byte, error) {
	return encodeTop(b, o, "ProbeSubmission", func(e *enc) error {
		s := e.Begin(tagSequence)
		if err := e.orAddress(&p.Sender, "sender"); err != nil {
			return err
		}
		err := e.seqOf(tagSequence, len(p.Recipients), MaxRecipients, "recipients", func(i int) error {
			return e.orAddress(&p.Recipients[i], "")
		})
		if err != nil {
			return err
		}
		if p.ProbedContentType != nil {
			e.Uint(tagInteger, uint32(*p.ProbedContentType))
		}
		if p.ContentLength != nil {
			if p.ProbedContentType == nil && e.t.probeLength == tagInteger {
				// 1.0 could not tell it from the content type (§4).
				return encFail("content-length", ErrInvalid)
			}
			e.Uint(e.t.probeLength, *p.ContentLength)
		}
		e.End(s)
		return nil
	})
}

// Marshal returns the encoding of p.
func (p *ProbeSubmission) Marshal(o Options) ([]byte, error) { return p.AppendMarshal(nil, o) }

// Unmarshal decodes b. In 1.0 a first INTEGER after the recipients is the
// content type and a second one the content length.
func (p *ProbeSubmission) Unmarshal(b []byte, o Options) error {
	var v ProbeSubmission
	err := decodeTop(b, o, "ProbeSubmission", tagSequence, func(d *dec) error {
		if !d.more() {
			return nil // sender missing (§2.7)
		}
		var err error
		if v.Sender, err = d.orAddress("sender"); err != nil {
			return err
		}
		if !d.more() {
			return nil // recipients missing
		}
		t, err := d.take(tagSequence, "recipients")
		if err != nil {
			return err
		}
		sd := d.sub(t)
		for sd.more() {
			if len(v.Recipients) == MaxRecipients {
				return sd.fail("recipients", sd.r.Offset(), ErrTooMany)
			}
			a, err := sd.orAddress("recipients")
			if err != nil {
				return err
			}
			v.Recipients = append(v.Recipients, a)
		}
		x, err := d.optUint(tagInteger, "content-type")
		if err != nil {
			return err
		}
		v.ProbedContentType = (*ContentType)(x)
		if v.ContentLength, err = d.optUint(d.t.probeLength, "content-length"); err != nil {
			return err
		}
		return d.end("")
	})
	if err == nil {
		*p = v
	}
	return err
}
