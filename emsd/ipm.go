package emsd

// IPM is an interpersonal message, content type 32 (§3).
type IPM struct {
	Heading Heading
	Body    *Body // optional; a missing body should be treated as empty (Open Point 18)
}

// Heading is the IPM heading (§3). SEQUENCE OF fields are kept in wire
// order; Options.ReverseSequenceOf reverses them on encode (§2.11).
type Heading struct {
	Sender     *ORAddress // [0] EXPLICIT, optional
	Originator ORAddress
	Recipients []RecipientData // at most MaxRecipients
	Flags      PerMessageFlags // [1]; zero = absent
	// ReplyTo is [2], at most MaxReplyTo; nil = absent, non-nil empty =
	// present and empty.
	ReplyTo   []ORAddress
	RepliedTo *MessageID // replied-to-ipm, optional
	Subject   string     // [3] (1.0: [4]), at most MaxSubject (1.1)
	// Extensions are unrecognised RFC 822 headers, at most MaxExtensions
	// (1.1). 1.1 always sends the field (a4 00 when empty); 1.0 sends it
	// only when non-empty (§4).
	Extensions                  []Extension
	MIMEVersion                 string // at most MaxMIMEVersion (1.1)
	MIMEContentType             string // at most MaxMIMEField (1.1), as the other MIME fields
	MIMEContentID               string
	MIMEContentDescription      string
	MIMEContentTransferEncoding string
}

// RecipientData is one recipient of an IPM (§3).
type RecipientData struct {
	Recipient ORAddress
	Flags     PerRecipientFlags // zero = absent = primary recipient
}

// Extension is one unrecognised RFC 822 header field (§3).
type Extension struct {
	Label string
	Value string
}

// Body is the IPM body (§3).
type Body struct {
	CompressionMethod *CompressionMethod // [0], never produced by the reference
	Text              []byte
}

// ContentType returns ContentIPM.
func (*IPM) ContentType() ContentType { return ContentIPM }

// AppendMarshal appends the encoding of m to b.
func (m *IPM) AppendMarshal(b []byte, o Options) ([]byte, error) {
	return encodeTop(b, o, "IPM", func(e *enc) error {
		s := e.Begin(tagSequence)
		if err := e.heading(&m.Heading); err != nil {
			return prefix(err, "heading")
		}
		if m.Body != nil {
			bs := e.Begin(tagSequence)
			if m.Body.CompressionMethod != nil {
				e.Uint(tagCtx0, uint32(*m.Body.CompressionMethod))
			}
			e.Bytes(tagOctets, m.Body.Text)
			e.End(bs)
		}
		e.End(s)
		return nil
	})
}

// Marshal returns the encoding of m.
func (m *IPM) Marshal(o Options) ([]byte, error) { return m.AppendMarshal(nil, o) }

// Unmarshal decodes b.
func (m *IPM) Unmarshal(b []byte, o Options) error {
	var v IPM
	err := decodeTop(b, o, "IPM", tagSequence, func(d *dec) error {
		if !d.more() {
			return nil // heading missing (§2.7)
		}
		t, err := d.take(tagSequence, "heading")
		if err != nil {
			return err
		}
		hd := d.sub(t)
		if err := hd.heading(&v.Heading); err != nil {
			return prefix(err, "heading")
		}
		if d.peek(tagSequence) {
			t, _ := d.next("")
			bd := d.sub(t)
			v.Body = new(Body)
			x, err := bd.optUint(tagCtx0, "compression-method")
			if err != nil {
				return prefix(err, "body")
			}
			v.Body.CompressionMethod = (*CompressionMethod)(x)
			if bd.more() { // body-text missing is accepted (§2.7)
				if v.Body.Text, err = bd.octets(tagOctets, "body-text"); err != nil {
					return prefix(err, "body")
				}
			}
			if err := bd.end("body"); err != nil {
				return err
			}
		}
		return d.end("")
	})
	if err == nil {
		*m = v
	}
	return err
}

func (e *enc) heading(h *Heading) error {
	t := e.t
	limit := func(n int) int {
		if t.headingLimits {
			return n
		}
		return noLimit
	}
	s := e.Begin(tagSequence)
	if h.Sender != nil {
		w := e.Begin(tagCtx0Cons)
		if err := e.orAddress(h.Sender, "sender"); err != nil {
			return err
		}
		e.End(w)
	}
	if err := e.orAddress(&h.Originator, "originator"); err != nil {
		return err
	}
	err := e.seqOf(tagSequence, len(h.Recipients), MaxRecipients, "recipient-data", func(i int) error {
		r := &h.Recipients[i]
		rs := e.Begin(tagSequence)
		if err := e.orAddress(&r.Recipient, "recipient"); err != nil {
			return err
		}
		if r.Flags != 0 {
			e.flags(tagBitString, uint8(r.Flags))
		}
		e.End(rs)
		return nil
	})
	if err != nil {
		return err
	}
	if h.Flags != 0 {
		e.flags(tagCtx1, uint8(h.Flags))
	}
	if h.ReplyTo != nil {
		err := e.seqOf(tagCtx2Cons, len(h.ReplyTo), MaxReplyTo, "reply-to", func(i int) error {
			return e.orAddress(&h.ReplyTo[i], "")
		})
		if err != nil {
			return err
		}
	}
	if h.RepliedTo != nil {
		if err := e.messageID(h.RepliedTo, "replied-to-ipm"); err != nil {
			return err
		}
	}
	if err := e.optStr(t.subject, h.Subject, limit(MaxSubject), "subject"); err != nil {
		return err
	}
	if t.extAlways || len(h.Extensions) > 0 {
		maxExt := MaxExtensions
		if !t.headingLimits {
			maxExt = int(^uint(0) >> 1)
		}
		err := e.seqOf(t.extensions, len(h.Extensions), maxExt, "extensions", func(i int) error {
			x := &h.Extensions[i]
			xs := e.Begin(tagSequence)
			e.String(tagApp0, x.Label)
			e.String(tagApp0, x.Value)
			e.End(xs)
			return nil
		})
		if err != nil {
			return err
		}
	}
	mime := [5]struct {
		v    string
		max  int
		name string
	}{
		{h.MIMEVersion, MaxMIMEVersion, "mime-version"},
		{h.MIMEContentType, MaxMIMEField, "mime-content-type"},
		{h.MIMEContentID, MaxMIMEField, "mime-content-id"},
		{h.MIMEContentDescription, MaxMIMEField, "mime-content-description"},
		{h.MIMEContentTransferEncoding, MaxMIMEField, "mime-content-transfer-encoding"},
	}
	for i, f := range mime {
		if err := e.optStr(t.mime[i], f.v, limit(f.max), f.name); err != nil {
			return err
		}
	}
	e.End(s)
	return nil
}

func (d *dec) heading(h *Heading) error {
	t := d.t
	limit := func(n int) int {
		if t.headingLimits {
			return n
		}
		return noLimit
	}
	if d.peek(tagCtx0Cons) {
		w, _ := d.next("")
		wd := d.sub(w)
		if !wd.more() {
			return d.fail("sender", w.Offset, ErrTruncated)
		}
		a, err := wd.orAddress("sender")
		if err != nil {
			return err
		}
		if err := wd.end("sender"); err != nil {
			return err
		}
		h.Sender = &a
	}
	if !d.more() {
		return nil // originator and later mandatory components missing (§2.7)
	}
	var err error
	if h.Originator, err = d.orAddress("originator"); err != nil {
		return err
	}
	if !d.more() {
		return nil // recipient-data missing
	}
	rt, err := d.take(tagSequence, "recipient-data")
	if err != nil {
		return err
	}
	rd := d.sub(rt)
	for rd.more() {
		if len(h.Recipients) == MaxRecipients {
			return rd.fail("recipient-data", rd.r.Offset(), ErrTooMany)
		}
		et, err := rd.take(tagSequence, "recipient-data")
		if err != nil {
			return err
		}
		ed := rd.sub(et)
		var r RecipientData
		if ed.more() { // recipient missing is accepted (§2.7)
			if r.Recipient, err = ed.orAddress("recipient"); err != nil {
				return prefix(err, "recipient-data")
			}
		}
		if ed.peek(tagBitString) {
			m, err := ed.bits(tagBitString, "per-recipient-flags")
			if err != nil {
				return prefix(err, "recipient-data")
			}
			r.Flags = PerRecipientFlags(m)
		}
		if err := ed.end("recipient-data"); err != nil {
			return err
		}
		h.Recipients = append(h.Recipients, r)
	}
	if d.peek(tagCtx1) {
		m, err := d.bits(tagCtx1, "per-message-flags")
		if err != nil {
			return err
		}
		h.Flags = PerMessageFlags(m)
	}
	if d.peek(tagCtx2Cons) {
		w, _ := d.next("")
		wd := d.sub(w)
		h.ReplyTo = []ORAddress{}
		for wd.more() {
			if len(h.ReplyTo) == MaxReplyTo {
				return wd.fail("reply-to", wd.r.Offset(), ErrTooMany)
			}
			a, err := wd.orAddress("reply-to")
			if err != nil {
				return err
			}
			h.ReplyTo = append(h.ReplyTo, a)
		}
	}
	if d.more() && d.isMessageIDTag(d.r.PeekTag()) {
		m, err := d.messageID("replied-to-ipm")
		if err != nil {
			return err
		}
		h.RepliedTo = &m
	}
	if d.peek(t.subject) {
		if h.Subject, err = d.str(t.subject, "subject", limit(MaxSubject)); err != nil {
			return err
		}
	}
	// Extensions are mandatory in 1.1, but a missing field is accepted even
	// when MIME fields follow (§3 Recommend).
	if d.peek(t.extensions) {
		w, _ := d.next("")
		wd := d.sub(w)
		for wd.more() {
			if t.headingLimits && len(h.Extensions) == MaxExtensions {
				return wd.fail("extensions", wd.r.Offset(), ErrTooMany)
			}
			et, err := wd.take(tagSequence, "extensions")
			if err != nil {
				return err
			}
			ed := wd.sub(et)
			var x Extension
			if ed.more() {
				if x.Label, err = ed.str(tagApp0, "extensions.label", noLimit); err != nil {
					return err
				}
			}
			if ed.more() {
				if x.Value, err = ed.str(tagApp0, "extensions.value", noLimit); err != nil {
					return err
				}
			}
			if err := ed.end("extensions"); err != nil {
				return err
			}
			h.Extensions = append(h.Extensions, x)
		}
	}
	mime := [5]struct {
		p    *string
		max  int
		name string
	}{
		{&h.MIMEVersion, MaxMIMEVersion, "mime-version"},
		{&h.MIMEContentType, MaxMIMEField, "mime-content-type"},
		{&h.MIMEContentID, MaxMIMEField, "mime-content-id"},
		{&h.MIMEContentDescription, MaxMIMEField, "mime-content-description"},
		{&h.MIMEContentTransferEncoding, MaxMIMEField, "mime-content-transfer-encoding"},
	}
	for i, f := range mime {
		if d.peek(t.mime[i]) {
			if *f.p, err = d.str(t.mime[i], f.name, limit(f.max)); err != nil {
				return err
			}
		}
	}
	return d.end("")
}
