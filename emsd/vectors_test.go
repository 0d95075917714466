package emsd

import (
	"errors"
	"fmt"
	"reflect"
	"testing"
)

// vector is one encoding to decode to want and re-encode byte for byte.
type vector struct {
	name string
	o    Options
	raw  []byte
	want pdu
}

func newLike(p pdu) pdu { return reflect.New(reflect.TypeOf(p).Elem()).Interface().(pdu) }

func checkVector(t *testing.T, v vector) {
	t.Helper()
	got := newLike(v.want)
	if err := got.Unmarshal(v.raw, v.o); err != nil {
		t.Fatalf("decode: %v", err)
	}
	if !reflect.DeepEqual(got, v.want) {
		t.Fatalf("decoded value:\n got  %s\n want %s", dump(got), dump(v.want))
	}
	enc, err := v.want.Marshal(v.o)
	if err != nil {
		t.Fatalf("encode: %v", err)
	}
	mustEqualBytes(t, "re-encoding", enc, v.raw)
	// AppendMarshal must append after existing octets.
	app, err := v.want.AppendMarshal([]byte{0xee}, v.o)
	if err != nil || app[0] != 0xee {
		t.Fatalf("AppendMarshal: %v % x", err, app[:1])
	}
	mustEqualBytes(t, "AppendMarshal", app[1:], v.raw)
}

func dump(v any) string { return fmt.Sprintf("%#v", deref(v)) }

func deref(v any) any {
	r := reflect.ValueOf(v)
	for r.Kind() == reflect.Pointer && !r.IsNil() {
		r = r.Elem()
	}
	return r.Interface()
}

// Spec §7.1 TV1: submission from 166.058 (esrosLog #2).
var tv1 = hx(`50 00 21 00 30 7d 02 01 20 30 78 30 2d 30 05 04 03 16 60 58 30 16 30 14 40 12
	61 6d 69 6e 69 40 6c 73 6d 2e 6e 65 64 61 2e 63 6f 6d 83 0a 70 61 67 65 72 20 74 65 73 74
	a4 00 30 47 04 45 54 68 65 20 72 65 73 70 6f 6e 73 65 20 74 6f 20 79 6f 75 72 20 71 75 65
	72 79 3a 0a 09 70 61 67 65 72 20 74 65 73 74 0a 69 73 3a 0a 09 74 68 69 73
	20 69 73 20 61 20 74 65 73 74 20 74 6f 20 70 61 67 65 72 0a`)

var tv1IPM = &IPM{
	Heading: Heading{
		Originator: LocalOR(166058, ""),
		Recipients: []RecipientData{{Recipient: RFC822OR("amini@lsm.neda.com")}},
		Subject:    "pager test",
	},
	Body: &Body{Text: []byte("The response to your query:\n\tpager test\nis:\n\tthis is a test to pager\n")},
}

// Spec §7.1 TV3: delivery (esrosLog #0).
var tv3 = hx(`30 00 23 00 30 81 9b 45 28 3c 31 39 39 36 31 30 31 30 32 33 30 38 2e 51 41 41 30 35
	30 37 38 40 6d 61 6a 6e 6f 6f 6e 2e 6e 65 64 61 2e 63 6f 6d 3e 02 04 32 5d 81 f0 80 04 32 5d
	f2 68 02 01 20 30 60 30 44 40 12 61 6d 69 6e 69 40 6c 73 6d 2e 6e 65 64 61 2e 63 6f 6d
	30 20 30 1e 40 1c 31 36 36 2e 30 35 38 40 6c 73 6d 2d 6d 61 6a 6e 6f 6f 6e 2e
	6e 65 64 61 2e 63 6f 6d 83 0a 70 61 67 65 72 20 74 65 73 74 a4 00
	30 18 04 16 73 65 63 6f 6e 64 20 74 65 73 74 20 74 6f 20 70 61 67 65 72 20 0a`)

var tv3IPM = &IPM{
	Heading: Heading{
		Originator: RFC822OR("amini@lsm.neda.com"),
		Recipients: []RecipientData{{Recipient: RFC822OR("166.058@lsm-majnoon.neda.com")}},
		Subject:    "pager test",
	},
	Body: &Body{Text: []byte("second test to pager \n")},
}

// Spec §7.1 TV4: delivery received by a device (sample.log #0).
var tv4 = cat("30 06 23 00 30 81 8d 45 22", `"<199609181512.LAA09597@vis-av.com>"`,
	"02 04 32 40 11 3d 80 04 32 40 81 db 02 01 20 30 58 30 4b 40 27",
	`"Derrell Jeffrey Lipman <djl@vis-av.com>"`, "30 09 30 07 30 05 04 03 30 10 01 83 13",
	`"!>>Home for dinner?"`, "a4 00 30 09 04 07 59 65 73 0a 4e 6f 0a")

var tv4IPM = &IPM{
	Heading: Heading{
		Originator: RFC822OR("Derrell Jeffrey Lipman <djl@vis-av.com>"),
		Recipients: []RecipientData{{Recipient: LocalOR(301001, "")}},
		Subject:    "!>>Home for dinner?",
	},
	Body: &Body{Text: []byte("Yes\nNo\n")},
}

// Spec §7.2: full-featured 1.1 IPM.
var fullIPMRaw = hx(`30 69 30 60 a0 0b 30 09 04 02 12 34 80 03 42 6f 62 30 05 04 03 16 60 58 30 1a 30 07
	30 05 04 03 30 10 01 30 0f 40 09 6a 6f 65 40 78 2e 63 6f 6d 03 02 00 84 81 02 00 50
	a2 07 30 05 04 03 16 60 58 45 05 3c 61 40 62 3e 83 02 48 69 a4 0a 30 08 40 03 58 2d
	41 40 01 31 86 0a 74 65 78 74 2f 70 6c 61 69 6e 30 05 04 03 6f 6b 0a`)

var fullIPM = &IPM{
	Heading: Heading{
		Sender:     ptr(LocalOR(1234, "Bob")),
		Originator: LocalOR(166058, ""),
		Recipients: []RecipientData{
			{Recipient: LocalOR(301001, "")},
			{Recipient: RFC822OR("joe@x.com"), Flags: RcptCopy | RcptNonDeliveryReport},
		},
		Flags:           MsgPriorityUrgent | MsgImportanceHigh,
		ReplyTo:         []ORAddress{LocalOR(166058, "")},
		RepliedTo:       ptr(RFC822ID("<a@b>")),
		Subject:         "Hi",
		Extensions:      []Extension{{"X-A", "1"}},
		MIMEContentType: "text/plain",
	},
	Body: &Body{Text: []byte("ok\n")},
}

func TestSpecVectors(t *testing.T) {
	_, _, tv1Arg := invokeArg(t, datagram{data: tv1})
	_, _, tv3Arg := invokeArg(t, datagram{data: tv3})
	_, _, tv4Arg := invokeArg(t, datagram{data: tv4})
	if len(tv1) != 131 || len(tv3) != 162 || len(tv4) != 148 {
		t.Fatalf("vector lengths %d %d %d", len(tv1), len(tv3), len(tv4))
	}
	first1400 := make([]byte, 1400)
	for i := range first1400 {
		first1400[i] = byte(i)
	}
	segFirst := append(hx("30 82 05 8c a0 07 a0 05 80 03 61 62 63 62 06 02 01 07 02 01 02 02 01 20"), first1400...)
	segOther := hx("30 1e 45 05 3c 78 40 79 3e 02 04 3a 00 00 00 80 04 39 ff ff 00 63 06 02 01 07 02 01 01 02 01 20")
	rest200 := make([]byte, 200)
	for i := range rest200 {
		rest200[i] = 0x41 + byte(i%26)
	}
	segOther200 := append(append(hx("30 81 e6"), segOther[2:]...), rest200...)
	deliverSeg2 := func(c []byte) *DeliverArgument {
		return &DeliverArgument{MessageID: RFC822ID("<x@y>"), DeliveryTime: 0x3a000000,
			SubmissionTime: ptr(Time(0x39ffff00)), Segment: &SegmentInfo{SequenceID: 7, Value: 1},
			ContentType: ContentIPM, Contents: c}
	}
	vectors := []vector{
		{"TV1 SubmitArgument", v11, tv1Arg, &SubmitArgument{ContentType: ContentIPM, Contents: tv1Arg[5:]}},
		{"TV1 IPM", v11, tv1Arg[5:], tv1IPM},
		{"TV2 SubmitResult", v11, hx("30 0b 30 09 02 04 32 5d 82 21 02 01 01"),
			&SubmitResult{LocalMessageID{0x325d8221, 1}}},
		{"TV3 DeliverArgument", v11, tv3Arg, &DeliverArgument{
			MessageID: RFC822ID("<199610102308.QAA05078@majnoon.neda.com>"), DeliveryTime: 844988912,
			SubmissionTime: ptr(Time(845017704)), ContentType: ContentIPM, Contents: tv3Arg[len(tv3Arg)-0x62:]}},
		{"TV3 IPM", v11, tv3Arg[len(tv3Arg)-0x62:], tv3IPM},
		{"TV4 DeliverArgument", v11, tv4Arg, &DeliverArgument{
			MessageID: RFC822ID("<199609181512.LAA09597@vis-av.com>"), DeliveryTime: 0x3240113d,
			SubmissionTime: ptr(Time(0x324081db)), ContentType: ContentIPM, Contents: tv4Arg[len(tv4Arg)-0x5a:]}},
		{"TV4 IPM", v11, tv4Arg[len(tv4Arg)-0x5a:], tv4IPM},
		{"DeliveryControlArgument empty", v11, hx("30 00"), &DeliveryControlArgument{}},
		{"DeliveryControlResult minimal", v11, hx("30 02 30 00"), &DeliveryControlResult{}},
		{"DeliveryControlResult one IPM", v11, hx("30 05 30 03 02 01 20"),
			&DeliveryControlResult{WaitingContentTypes: []ContentType{ContentIPM}}},
		{"DeliveryControlResult 1.0", v10, hx("30 05 30 03 0a 01 20"),
			&DeliveryControlResult{WaitingContentTypes: []ContentType{ContentIPM}}},
		{"ErrorParameter security", v11, hx("02 01 04"), ptr(ErrorParameter(CodeSecurity))},
		{"DeliveryVerifyArgument local", v11, hx("30 0b 64 09 02 04 32 5d 82 21 02 01 01"),
			&DeliveryVerifyArgument{LocalID(0x325d8221, 1)}},
		{"SubmissionVerifyArgument local", v11, hx("30 0b 64 09 02 04 32 5d 82 21 02 01 01"),
			&SubmissionVerifyArgument{LocalID(0x325d8221, 1)}},
		{"SubmissionVerifyResult send 1.1", v11, hx("30 03 0a 01 01"), &SubmissionVerifyResult{SendMessage}},
		{"SubmissionVerifyResult send 1.0", v10, hx("30 03 02 01 01"), &SubmissionVerifyResult{SendMessage}},
		{"DeliveryVerifyResult NDR sent", v11, hx("30 03 02 01 03"), &DeliveryVerifyResult{NonDeliveryReportSent}},
		{"SubmitResult 1.0 tag 25", v10, hx("30 0b 25 09 02 04 32 5d 82 21 02 01 01"),
			&SubmitResult{LocalMessageID{0x325d8221, 1}}},
		{"first segment with password", v11, segFirst, &SubmitArgument{
			Security: &SecurityElement{Password: "abc"}, Segment: &SegmentInfo{First: true, SequenceID: 7, Value: 2},
			ContentType: ContentIPM, Contents: first1400}},
		{"second delivery segment, no content", v11, segOther, deliverSeg2(nil)},
		{"second delivery segment, 200 octets", v11, segOther200, deliverSeg2(rest200)},
		{"full-featured IPM", v11, fullIPMRaw, fullIPM},
		{"non-delivery report", v11,
			hx("30 20 45 08 3c 6f 72 69 67 40 78 3e 30 0f 30 0d 40 03 61 40 62 a1 06 02 01 01 80 01 0b a0 03 02 01 20"),
			&ReportDelivery{
				ReportedMessageID: RFC822ID("<orig@x>"),
				Recipients: []PerRecipReportData{{Recipient: RFC822OR("a@b"),
					NonDelivery: &NonDeliveryReport{Reason: ReasonUnableToTransfer, Diagnostic: ptr(DiagRecipientUnknown)}}},
				ReturnedContent: &ReturnedContent{ContentType: ContentIPM},
			}},
	}
	for _, v := range vectors {
		t.Run(v.name, func(t *testing.T) { checkVector(t, v) })
	}
}

// tlv builds one BER element independently of the codec under test.
func tlv(tag byte, parts ...[]byte) []byte {
	var c []byte
	for _, p := range parts {
		c = append(c, p...)
	}
	out := []byte{tag}
	switch {
	case len(c) < 0x80:
		out = append(out, byte(len(c)))
	case len(c) < 0x100:
		out = append(out, 0x81, byte(len(c)))
	default:
		out = append(out, 0x82, byte(len(c)>>8), byte(len(c)))
	}
	return append(out, c...)
}

func txt(s string) []byte { return []byte(s) }

// 1.0 encodings, built from the §4 table.
func TestVersion10Vectors(t *testing.T) {
	heading := func(ext bool) []byte {
		var e []byte
		if ext {
			e = tlv(0xa5, tlv(0x30, tlv(0x40, txt("A")), tlv(0x40, txt("B")))) // [5] extensions
		}
		return tlv(0x30,
			tlv(0xa0, tlv(0x30, hx("02 02 04 d2"), tlv(0x40, txt("Bob")))),           // sender: INTEGER 1234, [APPLICATION 0] name
			tlv(0x30, hx("02 03 02 88 aa")),                                          // originator 166058 as INTEGER
			tlv(0x30, tlv(0x30, tlv(0x30, hx("02 03 04 97 c9")), hx("03 02 00 80"))), // Cc 301001
			tlv(0x30, hx("02 01 01 02 01 02")),                                       // replied-to: universal SEQUENCE local id
			tlv(0x84, txt("Hi")),                                                     // [4] subject
			e,
			tlv(0x87, txt("t")), // [7] mime-content-type
		)
	}
	body := tlv(0x30, hx("80 01 00"), tlv(0x04, txt("ok\n")))
	want := &IPM{
		Heading: Heading{
			Sender:          ptr(LocalOR(1234, "Bob")),
			Originator:      LocalOR(166058, ""),
			Recipients:      []RecipientData{{Recipient: LocalOR(301001, ""), Flags: RcptCopy}},
			RepliedTo:       ptr(LocalID(1, 2)),
			Subject:         "Hi",
			Extensions:      []Extension{{"A", "B"}},
			MIMEContentType: "t",
		},
		Body: &Body{CompressionMethod: ptr(CompressionNone), Text: []byte("ok\n")},
	}
	wantNoExt := *want
	wantNoExt.Heading.Extensions = nil
	vectors := []vector{
		{"IPM 1.0", v10, tlv(0x30, heading(true), body), want},
		{"IPM 1.0 without extensions", v10, tlv(0x30, heading(false), body), &wantNoExt},
		{"DeliveryVerifyArgument 1.0 rfc822", v10, tlv(0x30, tlv(0x40, txt("<i@x.org>"))),
			&DeliveryVerifyArgument{RFC822ID("<i@x.org>")}},
		{"DeliverArgument 1.0", v10, tlv(0x30, tlv(0x30, hx("02 01 01 02 01 02")), hx("02 01 0a 02 01 09"),
			tlv(0xa0, tlv(0x30, tlv(0x30, hx("02 02 04 d2"), tlv(0x40, txt("n"))), tlv(0x80, txt("pwd")))),
			hx("62 06 02 01 05 02 01 02 0a 01 20 ff")),
			&DeliverArgument{MessageID: LocalID(1, 2), DeliveryTime: 10, SubmissionTime: ptr(Time(9)),
				Security: &SecurityElement{Address: &EMSDAddress{1234, "n"}, Password: "pwd"},
				Segment:  &SegmentInfo{First: true, SequenceID: 5, Value: 2}, ContentType: ContentIPM,
				Contents: []byte{0xff}}},
		{"SubmitArgument 1.0", v10, tlv(0x30, tlv(0xa0, tlv(0x30, tlv(0x80, txt("pwd")))), hx("02 01 20 aa")),
			&SubmitArgument{Security: &SecurityElement{Password: "pwd"}, ContentType: ContentIPM, Contents: []byte{0xaa}}},
		{"ReportDelivery 1.0 returned content", v10, tlv(0x30, tlv(0x40, txt("<o@x>")),
			tlv(0x30, tlv(0x30, tlv(0x30, hx("02 01 07")), tlv(0xa0, hx("02 02 01 00")))), hx("02 01 20 30 00")),
			&ReportDelivery{
				ReportedMessageID: RFC822ID("<o@x>"),
				Recipients: []PerRecipReportData{{Recipient: LocalOR(7, ""),
					Delivery: &DeliveryReport{DeliveryTime: 0x100}}},
				ReturnedContent: &ReturnedContent{ContentType: ContentIPM, Contents: hx("30 00")}}},
		{"ProbeSubmission 1.0", v10, hx("30 0f 40 00 30 05 30 03 02 01 00 02 01 20 02 01 64"), &ProbeSubmission{
			Recipients: []ORAddress{LocalOR(0, "")}, ProbedContentType: ptr(ContentIPM), ContentLength: ptr(uint32(100))}},
		{"ProbeSubmission 1.1", v11, hx("30 0f 40 00 30 05 30 03 04 01 00 02 01 20 80 01 64"), &ProbeSubmission{
			Recipients: []ORAddress{LocalOR(0, "")}, ProbedContentType: ptr(ContentIPM), ContentLength: ptr(uint32(100))}},
	}
	for _, v := range vectors {
		t.Run(v.name, func(t *testing.T) { checkVector(t, v) })
	}
	// A zero-octet INTEGER reads as 0, as in the reference (§2.3).
	var p ProbeSubmission
	if err := p.Unmarshal(hx("30 0e 40 00 30 04 30 02 02 00 02 01 20 02 01 64"), v10); err != nil ||
		!p.Recipients[0].IsLocal || p.Recipients[0].Local != 0 {
		t.Fatalf("zero-octet INTEGER address: %v %+v", err, p)
	}
	// 1.0 probe content length without a content type cannot be encoded.
	if _, err := (&ProbeSubmission{ContentLength: ptr(uint32(1))}).Marshal(v10); !errors.Is(err, ErrInvalid) {
		t.Fatalf("ambiguous 1.0 probe: %v", err)
	}
}
