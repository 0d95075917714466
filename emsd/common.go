package emsd

import "github.com/esro-emsdp/emsdp/internal/ber"

// SecurityElement carries simple credentials (§3; only "simple" exists).
type SecurityElement struct {
	Address               *EMSDAddress // credentials.emsd-address, optional
	Password              string       // credentials.password, at most MaxPassword octets; "" = absent
	ContentIntegrityCheck *uint32      // never produced by the reference
}

// SegmentInfo is the SegmentInfo CHOICE (§3, §8): first{sequence-id,
// total} when First, else other{sequence-id, segment number}.
type SegmentInfo struct {
	First      bool
	SequenceID uint32
	Value      uint32 // total number of segments (first) or this segment's number 1..n-1 (other)
}

// ---- EMSDAddress / ORAddress ----

func (e *enc) emsdAddress(a Address, name string) error {
	s := e.Begin(tagSequence)
	if e.t.addrValue == tagOctets {
		e.Buf = append(e.Buf, tagOctets, byte(bcdSize(a)))
		e.Buf = a.AppendBCD(e.Buf)
	} else {
		e.Uint(tagInteger, uint32(a))
	}
	if err := e.optStr(e.t.addrName, name, MaxEMSDName, "emsd-name"); err != nil {
		return err
	}
	e.End(s)
	return nil
}

// emsdAddress decodes EMSDAddress content.
func (d *dec) emsdAddress() (a Address, name string, err error) {
	if !d.more() {
		return 0, "", nil // trailing mandatory component missing (§2.7)
	}
	t, err := d.take(d.t.addrValue, "emsd-address")
	if err != nil {
		return 0, "", err
	}
	if d.t.addrValue == tagOctets {
		a, err = ParseBCD(t.Content)
	} else {
		var v uint32
		v, err = ber.Uint(t.Content)
		a = Address(v)
	}
	if err != nil {
		return 0, "", d.fail("emsd-address", t.Offset, err)
	}
	if d.peek(d.t.addrName) {
		if name, err = d.str(d.t.addrName, "emsd-name", MaxEMSDName); err != nil {
			return 0, "", err
		}
	}
	return a, name, d.end("")
}

func (e *enc) orAddress(o *ORAddress, field string) error {
	var err error
	if o.IsLocal {
		err = e.emsdAddress(o.Local, o.Name)
	} else {
		err = e.str(tagApp0, o.RFC822, MaxRFC822Address, "rfc822")
	}
	return prefix(err, field)
}

func isORAddressTag(tag byte) bool {
	return ber.Match(tag, tagSequence) || ber.Match(tag, tagApp0)
}

func (d *dec) orAddress(field string) (ORAddress, error) {
	if d.more() && !isORAddressTag(d.r.PeekTag()) {
		return ORAddress{}, d.fail(field, d.r.Offset(), ErrUnexpectedTag)
	}
	t, err := d.next(field)
	if err != nil {
		return ORAddress{}, err
	}
	if ber.Match(t.Tag, tagApp0) {
		if len(t.Content) > MaxRFC822Address {
			return ORAddress{}, d.fail(field, t.Offset, ErrTooLong)
		}
		return ORAddress{RFC822: string(t.Content)}, nil
	}
	sd := d.sub(t)
	a, name, err := sd.emsdAddress()
	if err != nil {
		return ORAddress{}, prefix(err, field)
	}
	return ORAddress{IsLocal: true, Local: a, Name: name}, nil
}

// ---- MessageId ----

func (e *enc) localMessageID(tag byte, id LocalMessageID) {
	s := e.Begin(tag)
	e.Uint(tagInteger, uint32(id.SubmissionTime))
	e.Uint(tagInteger, id.Number)
	e.End(s)
}

func (d *dec) localMessageID(t ber.TLV) (LocalMessageID, error) {
	sd := d.sub(t)
	var id LocalMessageID
	if !sd.more() {
		return id, nil // trailing mandatory components missing (§2.7)
	}
	v, err := sd.uint(tagInteger, "submission-time")
	if err != nil {
		return id, err
	}
	id.SubmissionTime = Time(v)
	if !sd.more() {
		return id, nil
	}
	if id.Number, err = sd.uint(tagInteger, "daily-message-number"); err != nil {
		return id, err
	}
	return id, sd.end("")
}

func (e *enc) messageID(m *MessageID, field string) error {
	if m.IsLocal {
		e.localMessageID(e.t.msgIDLocal, m.Local)
		return nil
	}
	return e.str(e.t.msgIDRFC822, m.RFC822, MaxMessageID, join(field, "rfc822"))
}

func (d *dec) isMessageIDTag(tag byte) bool {
	return ber.Match(tag, d.t.msgIDLocal) || ber.Match(tag, d.t.msgIDRFC822)
}

func (d *dec) messageID(field string) (MessageID, error) {
	if d.more() && !d.isMessageIDTag(d.r.PeekTag()) {
		return MessageID{}, d.fail(field, d.r.Offset(), ErrUnexpectedTag)
	}
	t, err := d.next(field)
	if err != nil {
		return MessageID{}, err
	}
	if ber.Match(t.Tag, d.t.msgIDRFC822) {
		if len(t.Content) > MaxMessageID {
			return MessageID{}, d.fail(field, t.Offset, ErrTooLong)
		}
		return MessageID{RFC822: string(t.Content)}, nil
	}
	id, err := d.localMessageID(t)
	if err != nil {
		return MessageID{}, prefix(err, field)
	}
	return MessageID{IsLocal: true, Local: id}, nil
}

// ---- SecurityElement ----

// security writes a SecurityElement with the implicit tag of its context.
func (e *enc) security(tag byte, s *SecurityElement) error {
	outer := e.Begin(tag)
	c := e.Begin(e.t.credentials)
	if s.Address != nil {
		if err := e.emsdAddress(s.Address.Address, s.Address.Name); err != nil {
			return prefix(err, "credentials.emsd-address")
		}
	}
	if err := e.optStr(tagCtx0, s.Password, MaxPassword, "credentials.password"); err != nil {
		return err
	}
	e.End(c)
	if s.ContentIntegrityCheck != nil {
		e.Uint(tagInteger, *s.ContentIntegrityCheck)
	}
	e.End(outer)
	return nil
}

func (d *dec) security(t ber.TLV) (*SecurityElement, error) {
	sd := d.sub(t)
	s := new(SecurityElement)
	if !sd.more() {
		return s, nil // credentials missing (§2.7)
	}
	ct, err := sd.take(d.t.credentials, "credentials")
	if err != nil {
		return nil, err
	}
	cd := sd.sub(ct)
	if cd.peek(tagSequence) {
		at, _ := cd.next("")
		ad := cd.sub(at)
		a, name, err := ad.emsdAddress()
		if err != nil {
			return nil, prefix(err, "credentials.emsd-address")
		}
		s.Address = &EMSDAddress{Address: a, Name: name}
	}
	if cd.peek(tagCtx0) {
		if s.Password, err = cd.str(tagCtx0, "credentials.password", MaxPassword); err != nil {
			return nil, err
		}
	}
	if err := cd.end("credentials"); err != nil {
		return nil, err
	}
	if s.ContentIntegrityCheck, err = sd.optUint(tagInteger, "content-integrity-check"); err != nil {
		return nil, err
	}
	return s, sd.end("")
}

// ---- SegmentInfo ----

func (e *enc) segment(s *SegmentInfo) {
	tag := byte(tagAppOther)
	if s.First {
		tag = tagAppFirst
	}
	p := e.Begin(tag)
	e.Uint(tagInteger, s.SequenceID)
	e.Uint(tagInteger, s.Value)
	e.End(p)
}

func (d *dec) isSegmentTag() bool { return d.peek(tagAppFirst) || d.peek(tagAppOther) }

func (d *dec) segment() (*SegmentInfo, error) {
	t, err := d.next("segment-info")
	if err != nil {
		return nil, err
	}
	s := &SegmentInfo{First: ber.Match(t.Tag, tagAppFirst)}
	sd := d.sub(t)
	if !sd.more() {
		return s, nil // trailing mandatory components missing (§2.7)
	}
	if s.SequenceID, err = sd.uint(tagInteger, "segment-info.sequence-id"); err != nil {
		return nil, err
	}
	if !sd.more() {
		return s, nil
	}
	if s.Value, err = sd.uint(tagInteger, "segment-info.value"); err != nil {
		return nil, err
	}
	return s, sd.end("segment-info")
}
