package emsd

import (
	"errors"
	"reflect"
	"strings"
	"testing"
)

// Large values and the INTEGER rules of §2.3.
func TestIntegers(t *testing.T) {
	for _, c := range []struct {
		v    uint32
		want string
	}{
		{0, "02 01 00"}, {32, "02 01 20"}, {128, "02 01 80"}, {200, "02 01 c8"},
		{0xffff, "02 02 ff ff"}, {0x10000, "02 03 01 00 00"}, {0x80000000, "02 04 80 00 00 00"},
		{0xFFFFFFFF, "02 04 ff ff ff ff"},
	} {
		r := &SubmitResult{LocalMessageID{Time(c.v), c.v}}
		b, err := r.Marshal(v11)
		if err != nil {
			t.Fatal(err)
		}
		in := hx(c.want)
		want := tlv(0x30, tlv(0x30, in, in))
		mustEqualBytes(t, "SubmitResult", b, want)
		var got SubmitResult
		if err := got.Unmarshal(want, v11); err != nil || got != *r {
			t.Fatalf("%#x: %v %+v", c.v, err, got)
		}
	}
	// Decoder leniency: sign padding and zero-octet INTEGERs (§2.3).
	var r SubmitResult
	if err := r.Unmarshal(hx("30 08 30 06 02 02 00 80 02 00"), v11); err != nil ||
		r.MessageID != (LocalMessageID{128, 0}) {
		t.Fatalf("lenient integers: %v %+v", err, r)
	}
	// 5-octet INTEGERs are rejected as by the reference.
	err := r.Unmarshal(hx("30 0c 30 0a 02 05 00 ff ff ff ff 02 01 01"), v11)
	if !errors.Is(err, ErrIntegerTooLong) || CodeOf(err) != CodeProtocolViolation {
		t.Fatalf("5-octet integer: %v", err)
	}
	var de *DecodeError
	if !errors.As(err, &de) || de.PDU != "SubmitResult" || de.Field != "local-message-id.submission-time" || de.Offset != 4 {
		t.Fatalf("error details: %#v", de)
	}
}

func TestLengthsAndTags(t *testing.T) {
	bad := []struct {
		name string
		in   string
		err  error
	}{
		{"empty", "", ErrTruncated},
		{"truncated", "30 05 02 01 20", ErrTruncated},
		{"length past end", "30 82 ff ff 02 01 20", ErrTruncated},
		{"huge length", "30 88 ff ff ff ff ff ff ff ff 02 01 20", ErrTruncated},
		{"indefinite", "30 80 02 01 20 00 00", ErrIndefiniteLength},
		{"multi-octet tag", "30 04 1f 22 01 20", ErrUnexpectedTag}, // never matches a known tag
		{"trailing octets after the PDU", "30 03 02 01 20 00", ErrTrailingData},
		{"wrong outer tag", "31 03 02 01 20", ErrUnexpectedTag},
		{"unknown component", "30 06 02 01 20", ErrUnexpectedTag},
	}
	for _, c := range bad {
		in := hx(c.in)
		if c.name == "unknown component" {
			in = hx("30 06 99 01 00 02 01 20")
		}
		err := new(SubmitArgument).Unmarshal(in, v11)
		if !errors.Is(err, c.err) || CodeOf(err) != CodeProtocolViolation {
			t.Errorf("%s: %v", c.name, err)
		}
	}
	// Non-minimal long-form lengths are accepted (§2.2).
	var a SubmitArgument
	if err := a.Unmarshal(hx("30 82 00 05 02 81 01 20 ff"), v11); err != nil || a.ContentType != ContentIPM ||
		string(a.Contents) != "\xff" {
		t.Fatalf("long form: %v %+v", err, a)
	}
	// The constructed bit is ignored when matching (§2.1).
	if err := a.Unmarshal(hx("10 03 22 01 20"), v11); err != nil || a.ContentType != ContentIPM {
		t.Fatalf("constructed bit: %v %+v", err, a)
	}
	// Encoding uses the minimal long form.
	b, err := (&SubmitArgument{ContentType: ContentIPM, Contents: make([]byte, 125)}).Marshal(v11)
	if err != nil || b[0] != 0x30 || b[1] != 0x81 || b[2] != 128 {
		t.Fatalf("long form encode: % x", b[:4])
	}
	b, _ = (&SubmitArgument{ContentType: ContentIPM, Contents: make([]byte, 300)}).Marshal(v11)
	mustEqualBytes(t, "82 form", b[:4], hx("30 82 01 2f"))
	b, _ = (&SubmitArgument{ContentType: ContentIPM, Contents: make([]byte, 70000)}).Marshal(v11)
	mustEqualBytes(t, "83 form", b[:5], hx("30 83 01 11 73"))
}

func TestUnexpectedMandatory(t *testing.T) {
	// recipient-data (30) is due after the originator; an OCTET STRING is not.
	in := tlv(0x30, tlv(0x30, tlv(0x40, txt("a")), hx("04 00 a4 00")))
	err := new(IPM).Unmarshal(in, v11)
	var de *DecodeError
	if !errors.As(err, &de) || !errors.Is(err, ErrUnexpectedTag) || de.Field != "heading.recipient-data" {
		t.Fatalf("%v", err)
	}
	// An unknown ORAddress choice.
	err = new(IPM).Unmarshal(tlv(0x30, tlv(0x30, hx("04 00"))), v11)
	if !errors.As(err, &de) || de.Field != "heading.originator" {
		t.Fatalf("%v", err)
	}
	// A report entry without a known report choice.
	err = new(ReportDelivery).Unmarshal(tlv(0x30, hx("45 00"), tlv(0x30, tlv(0x30, hx("40 00 a2 00")))), v11)
	if !errors.Is(err, ErrUnexpectedTag) {
		t.Fatalf("%v", err)
	}
}

// Missing trailing mandatory components are accepted (§2.7); see the list
// in doc.go.
func TestMissingTrailing(t *testing.T) {
	cases := []struct {
		raw  []byte
		o    Options
		want pdu
	}{
		{hx("30 00"), v11, &SubmitArgument{}},
		{hx("30 05 62 03 02 01 07"), v11, &SubmitArgument{Segment: &SegmentInfo{First: true, SequenceID: 7}}},
		{hx("30 00"), v11, &SubmitResult{}},
		{hx("30 02 30 00"), v11, &SubmitResult{}},
		{hx("30 04 30 02 02 00"), v11, &SubmitResult{}},
		{hx("30 04 45 02 3c 3e"), v11, &DeliverArgument{MessageID: RFC822ID("<>")}},
		{hx("30 07 45 02 3c 3e 02 01 05"), v11, &DeliverArgument{MessageID: RFC822ID("<>"), DeliveryTime: 5}},
		{hx("30 00"), v11, &DeliveryControlResult{}},
		{hx("30 00"), v11, &DeliveryVerifyArgument{}},
		{hx("30 00"), v11, &SubmissionVerifyResult{}},
		{hx("30 00"), v11, &IPM{}},
		{hx("30 02 30 00"), v11, &IPM{}},
		{hx("30 05 30 03 40 01 61"), v11, &IPM{Heading: Heading{Originator: RFC822OR("a")}}},
		// Heading without extensions, MIME field following (§3 Recommend).
		{tlv(0x30, tlv(0x30, hx("40 00 30 00 85 03"), txt("1.0"))), v11,
			&IPM{Heading: Heading{MIMEVersion: "1.0"}}},
		{tlv(0x30, hx("30 06 40 00 30 02 30 00 30 03 80 01 01")), v11,
			&IPM{Heading: Heading{Recipients: []RecipientData{{}}}, Body: &Body{CompressionMethod: ptr(CompressionLempelZiv)}}},
		{tlv(0x30, hx("30 08 40 00 30 00 a4 02 30 00")), v11, &IPM{Heading: Heading{Extensions: []Extension{{}}}}},
		{hx("30 02 45 00"), v11, &ReportDelivery{}},
		{hx("30 08 45 00 30 04 30 02 40 00"), v11, &ReportDelivery{Recipients: []PerRecipReportData{{}}}},
		{hx("30 0a 45 00 30 06 30 04 40 00 a1 00"), v11,
			&ReportDelivery{Recipients: []PerRecipReportData{{NonDelivery: &NonDeliveryReport{}}}}},
		{hx("30 06 45 00 30 00 a0 00"), v11, &ReportDelivery{ReturnedContent: &ReturnedContent{}}},
		{hx("30 02 40 00"), v11, &ProbeSubmission{}},
		{hx("30 06 a0 02 a0 00 02 00"), v11, &SubmitArgument{Security: &SecurityElement{}}},
		{hx("30 04 a0 02 a0 00 "), v11, &SubmitArgument{Security: &SecurityElement{}}},
		{hx("30 08 a0 04 a0 02 30 00 02 00"), v11,
			&SubmitArgument{Security: &SecurityElement{Address: &EMSDAddress{}}}},
	}
	for i, c := range cases {
		got := newLike(c.want)
		if err := got.Unmarshal(c.raw, c.o); err != nil {
			t.Errorf("#%d %T: %v", i, c.want, err)
			continue
		}
		if !reflect.DeepEqual(got, c.want) {
			t.Errorf("#%d:\n got  %s\n want %s", i, dump(got), dump(c.want))
		}
	}
	// The empty [0] sender wrapper is not a SEQUENCE and is rejected.
	if err := new(IPM).Unmarshal(hx("30 04 30 02 a0 00"), v11); !errors.Is(err, ErrTruncated) {
		t.Fatalf("empty sender: %v", err)
	}
	// A report entry without report cannot be re-encoded.
	if _, err := (&ReportDelivery{Recipients: []PerRecipReportData{{}}}).Marshal(v11); !errors.Is(err, ErrInvalid) {
		t.Fatalf("report without choice: %v", err)
	}
}

func TestBitStrings(t *testing.T) {
	rd := func(bits string) []byte {
		return tlv(0x30, tlv(0x30, hx("40 00"), tlv(0x30, tlv(0x30, hx("40 00"), hx(bits)))))
	}
	for _, c := range []struct {
		bits string
		want PerRecipientFlags
	}{
		{"03 01 00", 0}, // a lone "unused bits" octet
		{"03 02 00 84", RcptCopy | RcptNonDeliveryReport}, // Cc as captured
		{"03 02 00 44", RcptBlindCopy | RcptNonDeliveryReport},
		{"03 02 00 04", RcptNonDeliveryReport},
		{"03 02 07 81", RcptCopy},           // unused bits are ignored
		{"03 03 00 80 ff", RcptCopy},        // bits beyond the first octet do not exist
		{"23 02 00 01", RcptReplyRequested}, // constructed bit ignored
	} {
		var m IPM
		if err := m.Unmarshal(rd(c.bits), v11); err != nil {
			t.Fatalf("%s: %v", c.bits, err)
		}
		if got := m.Heading.Recipients[0].Flags; got != c.want {
			t.Fatalf("%s: %v, want %v", c.bits, got, c.want)
		}
	}
	for _, bits := range []string{"03 00", "03 02 08 00"} {
		if err := new(IPM).Unmarshal(rd(bits), v11); !errors.Is(err, ErrBitString) {
			t.Fatalf("%s: %v", bits, err)
		}
	}
	// Encoding: always one flag octet, "03 02 00 xx" (§2.5).
	b, err := (&IPM{Heading: Heading{Recipients: []RecipientData{{Flags: RcptNonDeliveryReport}},
		Flags: MsgPriorityNonUrgent}}).Marshal(v11)
	if err != nil {
		t.Fatal(err)
	}
	mustEqualBytes(t, "flags", b, hx("30 14 30 12 40 00 30 08 30 06 40 00 03 02 00 04 81 02 00 80 a4 00"))
	// Operation sets: bit index = operation value, standard order.
	ops := Operations(OpDelivery, OpDeliveryControl)
	b, err = (&DeliveryControlResult{WaitingOperations: &ops}).Marshal(v11)
	if err != nil {
		t.Fatal(err)
	}
	mustEqualBytes(t, "operation set", b, hx("30 0a 80 06 00 20 00 00 00 10 30 00"))
	var r DeliveryControlResult
	if err := r.Unmarshal(b, v11); err != nil || !r.WaitingOperations.Has(OpDelivery) ||
		!r.WaitingOperations.Has(OpDeliveryControl) || r.WaitingOperations.Has(OpSubmission) {
		t.Fatalf("%v %+v", err, r)
	}
	empty := OperationSet(0)
	b, _ = (&DeliveryControlArgument{PermissibleOperations: &empty}).Marshal(v11)
	mustEqualBytes(t, "empty operation set", b, hx("30 04 81 02 00 00"))
}

func TestAddressValues(t *testing.T) {
	for _, c := range []struct {
		a   Address
		bcd string
	}{
		{0, "00"}, {1234, "12 34"}, {12345, "01 23 45"}, {166058, "16 60 58"},
		{4294967295, "42 94 96 72 95"}, {9, "09"}, {10, "10"},
	} {
		got := c.a.AppendBCD(nil)
		mustEqualBytes(t, c.a.String(), got, hx(c.bcd))
		if bcdSize(c.a) != len(got) {
			t.Fatalf("bcdSize(%d)", c.a)
		}
		back, err := ParseBCD(got)
		if err != nil || back != c.a {
			t.Fatalf("ParseBCD(% x) = %d, %v", got, back, err)
		}
	}
	if a, err := ParseBCD(hx("00 00 00 12 34")); err != nil || a != 1234 {
		t.Fatalf("leading zeros: %d %v", a, err)
	}
	for _, bad := range []string{"", "1a", "a0", "42 94 96 72 96", "99 99 99 99 99", "00 00 00 00 00 01"} {
		if _, err := ParseBCD(hx(bad)); !errors.Is(err, ErrBadAddress) {
			t.Fatalf("ParseBCD(%s): %v", bad, err)
		}
		in := tlv(0x30, tlv(0x30, tlv(0x30, tlv(0x04, hx(bad))), hx("30 00 a4 00")))
		if err := new(IPM).Unmarshal(in, v11); !errors.Is(err, ErrBadAddress) {
			t.Fatalf("IPM with address %s: %v", bad, err)
		}
	}
}

// Every size limit of §5 is enforced on decode (1.1) and on encode.
func TestLimits(t *testing.T) {
	s := func(n int) string { return strings.Repeat("x", n) }
	type lim struct {
		name string
		mk   func(n int) pdu
		max  int
		v10  bool // also limited in 1.0
	}
	ipm := func(f func(h *Heading, n int)) func(n int) pdu {
		return func(n int) pdu {
			m := &IPM{}
			f(&m.Heading, n)
			return m
		}
	}
	limits := []lim{
		{"subject", ipm(func(h *Heading, n int) { h.Subject = s(n) }), MaxSubject, false},
		{"mime-version", ipm(func(h *Heading, n int) { h.MIMEVersion = s(n) }), MaxMIMEVersion, false},
		{"mime-content-type", ipm(func(h *Heading, n int) { h.MIMEContentType = s(n) }), MaxMIMEField, false},
		{"mime-content-id", ipm(func(h *Heading, n int) { h.MIMEContentID = s(n) }), MaxMIMEField, false},
		{"mime-content-description", ipm(func(h *Heading, n int) { h.MIMEContentDescription = s(n) }), MaxMIMEField, false},
		{"mime-content-transfer-encoding", ipm(func(h *Heading, n int) { h.MIMEContentTransferEncoding = s(n) }), MaxMIMEField, false},
		{"extensions", ipm(func(h *Heading, n int) { h.Extensions = make([]Extension, n) }), MaxExtensions, false},
		{"recipients", ipm(func(h *Heading, n int) { h.Recipients = make([]RecipientData, n) }), MaxRecipients, true},
		{"reply-to", ipm(func(h *Heading, n int) { h.ReplyTo = make([]ORAddress, n) }), MaxReplyTo, true},
		{"rfc822 address", ipm(func(h *Heading, n int) { h.Originator = RFC822OR(s(n)) }), MaxRFC822Address, true},
		{"emsd-name", ipm(func(h *Heading, n int) { h.Originator = LocalOR(1, s(n)) }), MaxEMSDName, true},
		{"replied-to message id", ipm(func(h *Heading, n int) { h.RepliedTo = ptr(RFC822ID(s(n))) }), MaxMessageID, true},
		{"message id", func(n int) pdu { return &DeliverArgument{MessageID: RFC822ID(s(n))} }, MaxMessageID, true},
		{"password", func(n int) pdu { return &SubmitArgument{Security: &SecurityElement{Password: s(n)}} }, MaxPassword, true},
		{"waiting content types", func(n int) pdu {
			return &DeliveryControlResult{WaitingContentTypes: make([]ContentType, n)}
		}, MaxWaitingContentTypes, true},
		{"report recipients", func(n int) pdu {
			r := &ReportDelivery{Recipients: make([]PerRecipReportData, n)}
			for i := range r.Recipients {
				r.Recipients[i].Delivery = &DeliveryReport{}
			}
			return r
		}, MaxRecipients, true},
		{"probe recipients", func(n int) pdu { return &ProbeSubmission{Recipients: make([]ORAddress, n)} }, MaxRecipients, true},
	}
	for _, l := range limits {
		for _, o := range []Options{v11, v10} {
			at, over := l.mk(l.max), l.mk(l.max+1)
			b, err := at.Marshal(o)
			if err != nil {
				t.Fatalf("%s at limit (%v): %v", l.name, o.Version, err)
			}
			if err := newLike(at).Unmarshal(b, o); err != nil {
				t.Fatalf("%s at limit (%v): decode %v", l.name, o.Version, err)
			}
			limited := o.Version == V1_1 || l.v10
			_, err = over.Marshal(o)
			var ee *EncodeError
			if limited != (err != nil) || (limited && !(errors.As(err, &ee) && (errors.Is(err, ErrTooLong) || errors.Is(err, ErrTooMany)))) {
				t.Fatalf("%s over limit (%v): encode error %v", l.name, o.Version, err)
			}
			if !limited {
				continue
			}
			raw := marshalUnchecked(t, over, o)
			err = newLike(at).Unmarshal(raw, o)
			if CodeOf(err) != CodeProtocolViolation || !(errors.Is(err, ErrTooLong) || errors.Is(err, ErrTooMany)) {
				t.Fatalf("%s over limit (%v): decode %v", l.name, o.Version, err)
			}
		}
	}
}

// marshalUnchecked encodes v without the encoder's size checks.
func marshalUnchecked(t *testing.T, v pdu, o Options) []byte {
	t.Helper()
	o.noLimits = true
	b, err := v.Marshal(o)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestVersionOption(t *testing.T) {
	bad := Options{Version: 9}
	if _, err := (&SubmitResult{}).Marshal(bad); !errors.Is(err, ErrBadVersion) {
		t.Fatalf("encode: %v", err)
	}
	err := new(SubmitResult).Unmarshal(hx("30 00"), bad)
	if !errors.Is(err, ErrBadVersion) || CodeOf(err) != CodeProtocolVersion {
		t.Fatalf("decode: %v", err)
	}
	if v, err := ParseVersion("1.0"); err != nil || v != V1_0 || v.String() != "1.0" {
		t.Fatal(v, err)
	}
	if v, err := ParseVersion("1.1"); err != nil || v != V1_1 || v.String() != "1.1" {
		t.Fatal(v, err)
	}
	if _, err := ParseVersion("2.0"); err == nil {
		t.Fatal("2.0 accepted")
	}
}

func TestErrorParameter(t *testing.T) {
	var p ErrorParameter
	for _, c := range []struct {
		in   string
		want ErrorParameter
	}{{"02 01 00", 0}, {"02 01 07", 7}, {"02 00", 0}, {"02 02 00 06", 6}, {"02 01 ff", 255}} {
		if err := p.Unmarshal(hx(c.in), v11); err != nil || p != c.want {
			t.Fatalf("%s: %v %d", c.in, err, p)
		}
	}
	for _, in := range []string{"02 02 01 00", "04 01 07", "02 01 07 00", "02 05 00 00 00 00 07", ""} {
		if err := p.Unmarshal(hx(in), v11); err == nil || CodeOf(err) != CodeProtocolViolation {
			t.Fatalf("%s accepted: %v", in, err)
		}
	}
	if p := ErrorParameter(CodeResource); !p.Code().Transient() || CodeSecurity.Transient() {
		t.Fatal("Transient")
	}
}

func TestErrorCodes(t *testing.T) {
	for c, want := range map[ErrorCode]string{
		CodeProtocolVersion: "protocol-version-not-recognized", CodeSubmissionControl: "submission-control-violated",
		CodeMessageID: "message-identifier-invalid", CodeSecurity: "security-error",
		CodeDeliveryControl: "delivery-control-violated", CodeResource: "resource-error",
		CodeProtocolViolation: "protocol-violation", 0: "error-code(0)", 9: "error-code(9)",
	} {
		if c.String() != want || c.Error() != "emsd: "+want {
			t.Fatalf("%d: %s", c, c)
		}
	}
	var err error = CodeSecurity
	if CodeOf(err) != CodeSecurity || CodeOf(nil) != 0 || CodeOf(errors.New("x")) != CodeProtocolViolation {
		t.Fatal("CodeOf")
	}
	re := &ReassemblyError{Code: CodeResource, Err: ErrReassemblyMemory}
	if CodeOf(re) != CodeResource || !errors.Is(re, ErrReassemblyMemory) || !errors.Is(re, CodeResource) {
		t.Fatal("ReassemblyError unwrap")
	}
}

func TestErrorMessages(t *testing.T) {
	err := new(SubmitResult).Unmarshal(hx("30 0c 30 0a 02 05 00 ff ff ff ff 02 01 01"), v11)
	_, err2 := (&IPM{Heading: Heading{Subject: strings.Repeat("s", 128)}}).Marshal(v11)
	_, err3 := (&DeliverArgument{MessageID: RFC822ID(strings.Repeat("s", 128))}).Marshal(v11)
	err4 := new(SubmitArgument).Unmarshal(hx("30 03 02 01 20 00"), v11)
	for got, want := range map[string]string{
		err.Error():  "emsd: decoding SubmitResult.local-message-id.submission-time at offset 4: ber: INTEGER longer than 4 octets",
		err2.Error(): "emsd: encoding IPM.heading.subject: emsd: size limit exceeded",
		err3.Error(): "emsd: encoding DeliverArgument.message-id.rfc822: emsd: size limit exceeded",
		err4.Error(): "emsd: decoding SubmitArgument at offset 5: emsd: unexpected data after the last component",
		(&SegmentLimitError{Needed: 40, Max: 32}).Error():                                     "emsd: content needs 40 segments, limit 32",
		(&ReassemblyError{Code: 7, SequenceID: 1, Segment: 3, Err: ErrSegmentNumber}).Error(): "emsd: sequence 1 segment 3: emsd: segment number out of range",
	} {
		if got != want {
			t.Errorf("got  %s\nwant %s", got, want)
		}
	}
}
