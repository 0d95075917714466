package mailconv

import (
	"encoding/hex"
	"strings"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/internal/captures"
)

// captured decodes the first datagram of a capture section: an ESRO
// INVOKE of op 35 (DeliverArgument) or op 33 (SubmitArgument).
func captured(t *testing.T, section string) (*emsd.DeliverArgument, *emsd.SubmitArgument, emsd.Content) {
	t.Helper()
	p := captures.Get(section).Datagrams[0].Payload
	op := emsd.Operation(p[2] & 0x3f)
	_, arg, err := emsd.StripInstanceID(op, p[3:])
	if err != nil {
		t.Fatal(err)
	}
	switch op {
	case emsd.OpDelivery:
		var a emsd.DeliverArgument
		if err := a.Unmarshal(arg, emsd.Options{}); err != nil {
			t.Fatal(err)
		}
		c, err := a.Content(emsd.Options{})
		if err != nil {
			t.Fatal(err)
		}
		return &a, nil, c
	case emsd.OpSubmission:
		var a emsd.SubmitArgument
		if err := a.Unmarshal(arg, emsd.Options{}); err != nil {
			t.Fatal(err)
		}
		c, err := a.Content(emsd.Options{})
		if err != nil {
			t.Fatal(err)
		}
		return nil, &a, c
	}
	t.Fatalf("%s: operation %v", section, op)
	return nil, nil, nil
}

// The inbound mails behind the captured deliveries (spec §7.3), rebuilt
// from their annotations, converted by ParseMessage and compared with what
// the reference MTS delivered.
//
// Differences from the reference, all intended:
//   - SEQUENCE OF order: the reference reverses recipients, reply-to and
//     extensions (§2.11); we keep header order (compared sorted).
//   - TV11: the reference keeps a trailing blank in the DeliverArgument
//     message id and a trailing CR in the reported id when the mail has
//     CRLF ends (§9.9); we trim both.
//   - TV11 with LF ends: the reference does not see the report and
//     delivers an IPM with the X-EMSD-* headers as extensions; we deliver
//     the same report as with CRLF (OP 16).
func TestParseMessageReferenceCaptures(t *testing.T) {
	tests := []struct {
		section string
		mail    string
		// quirks turns the captured values into what we produce.
		msgID  func(string) string
		report func(*emsd.ReportDelivery)
	}{{
		section: "emsd-deliver-3way", // TV5
		mail: "From: Alice Example <alice@example.com>\nTo: 198.036@emsd.example.test\n" +
			"Subject: Inbound test, Complete mode\nDate: Thu, 26 Nov 2026 07:00:00 +0000\n" +
			"Message-ID: <in3way.20261126@example.com>\n\nHello device, this is inbound mail number one.\n",
	}, {
		section: "emsd-deliver-multi-recipient", // TV12
		mail: "From: Alice Example <alice@example.com>\nSender: Bob Sender <bob@example.com>\n" +
			"To: 198.036@emsd.example.test, carol@example.com\nCc: dave@example.com\n" +
			"Reply-To: r1@example.com, r2@example.com\nIn-Reply-To: <prev@example.com>\nSubject: Multi\n" +
			"Date: Thu, 26 Nov 2026 07:00:00 +0000\nMessage-ID: <multi.20261126@example.com>\n" +
			"X-First: one\nX-Second: two\nMIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n\nBody.\n",
	}, {
		section: "emsd-deliver-report-rejected-by-ua", // TV11
		mail: crlfText("From: EMSD Postmaster <postmaster@emsd.example.test>\nTo: 198.036@emsd.example.test\n" +
			"Subject: Delivery report\nMessage-ID: <rpt1.20261126@emsd.example.test>\n" +
			"X-EMSD-Message-Type: Report\nX-EMSD-Original-Message-Id: <orig1.20261126@emsd.example.test>\n" +
			"X-EMSD-Intended-Recipient: bob@example.com (1/11)\n\nReport body.\n"),
		msgID: strings.TrimSpace,
		report: func(r *emsd.ReportDelivery) {
			r.ReportedMessageID.RFC822 = strings.TrimSpace(r.ReportedMessageID.RFC822)
		},
	}}
	for _, tc := range tests {
		t.Run(tc.section, func(t *testing.T) {
			arg, _, content := captured(t, tc.section)
			in, err := ParseMessage([]byte(tc.mail), testMapping, ParseOptions{})
			if err != nil {
				t.Fatal(err)
			}
			mustEncode(t, in, 0)
			wantID := arg.MessageID.RFC822
			if tc.msgID != nil {
				wantID = tc.msgID(wantID)
			}
			if in.MessageID != wantID {
				t.Errorf("message id %q, captured %q", in.MessageID, wantID)
			}
			if (in.SubmissionTime == nil) != (arg.SubmissionTime == nil) ||
				(in.SubmissionTime != nil && *in.SubmissionTime != *arg.SubmissionTime) {
				t.Errorf("submission time %v, captured %v", in.SubmissionTime, arg.SubmissionTime)
			}
			if in.ContentType != arg.ContentType {
				t.Fatalf("content type %v, captured %v", in.ContentType, arg.ContentType)
			}
			if len(in.Truncated) != 0 {
				t.Errorf("notes %v", in.Truncated)
			}
			switch want := content.(type) {
			case *emsd.IPM:
				diffIPM(t, in.IPM, want)
			case *emsd.ReportDelivery:
				tc.report(want)
				if g, w := in.Report, want; g.ReportedMessageID != w.ReportedMessageID || len(g.Recipients) != len(w.Recipients) ||
					g.Recipients[0].Recipient != w.Recipients[0].Recipient ||
					g.Recipients[0].NonDelivery.Reason != w.Recipients[0].NonDelivery.Reason ||
					*g.Recipients[0].NonDelivery.Diagnostic != *w.Recipients[0].NonDelivery.Diagnostic ||
					g.Recipients[0].NonDelivery.Explanation != w.Recipients[0].NonDelivery.Explanation || g.ReturnedContent != nil {
					t.Errorf("report %+v, captured %+v", g, w)
				}
				// Byte-exact with the reference's order once its quirks are
				// undone.
				gb, _ := in.Report.Marshal(emsd.Options{ReverseSequenceOf: true})
				wb, _ := want.Marshal(emsd.Options{ReverseSequenceOf: true})
				if string(gb) != string(wb) {
					t.Errorf("report encoding\n got % x\nwant % x", gb, wb)
				}
			}
		})
	}

	// TV11 with LF ends: the reference delivered an IPM, we a report.
	t.Run("emsd-deliver-report-lf-becomes-ipm", func(t *testing.T) {
		_, _, content := captured(t, "emsd-deliver-report-lf-becomes-ipm")
		ref := content.(*emsd.IPM)
		if len(ref.Heading.Extensions) != 3 {
			t.Fatalf("captured extensions %v", ref.Heading.Extensions)
		}
		in, err := ParseMessage([]byte(strings.ReplaceAll(tests[2].mail, "\r\n", "\n")), testMapping, ParseOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if in.ContentType != emsd.ContentDeliveryReport || in.Report.ReportedMessageID.RFC822 != "<orig1.20261126@emsd.example.test>" {
			t.Errorf("%+v", in)
		}
	})

	// TV12 byte for byte: our IPM encoded with the reference's reversal
	// equals the captured contents.
	t.Run("TV12 bytes", func(t *testing.T) {
		arg, _, _ := captured(t, "emsd-deliver-multi-recipient")
		in, err := ParseMessage([]byte(tests[1].mail), testMapping, ParseOptions{})
		if err != nil {
			t.Fatal(err)
		}
		b, err := in.IPM.Marshal(emsd.Options{ReverseSequenceOf: true})
		if err != nil {
			t.Fatal(err)
		}
		if string(b) != string(arg.Contents) {
			t.Errorf("\n got % x\nwant % x", b, arg.Contents)
		}
	})
}

// Captured submissions (TV1, TV13) rendered as Internet mail (§9.6).
func TestFormatIPMReferenceCaptures(t *testing.T) {
	date := time.Unix(0x325d8221, 0)
	t.Run("TV1", func(t *testing.T) {
		// Spec §7.1 TV1 (esrosLog #2, not in the capture file): the
		// SubmitArgument after the ESRO header and instance id.
		arg, err := hex.DecodeString(strings.Join(strings.Fields(`
			30 7d 02 01 20 30 78 30 2d 30 05 04 03 16 60 58 30 16 30 14 40 12 61 6d 69 6e 69 40 6c 73 6d
			2e 6e 65 64 61 2e 63 6f 6d 83 0a 70 61 67 65 72 20 74 65 73 74 a4 00 30 47 04 45 54 68 65 20
			72 65 73 70 6f 6e 73 65 20 74 6f 20 79 6f 75 72 20 71 75 65 72 79 3a 0a 09 70 61 67 65 72 20
			74 65 73 74 0a 69 73 3a 0a 09 74 68 69 73 20 69 73 20 61 20 74 65 73 74 20 74 6f 20 70 61 67
			65 72 0a`), ""))
		if err != nil {
			t.Fatal(err)
		}
		var a emsd.SubmitArgument
		if err := a.Unmarshal(arg, emsd.Options{}); err != nil {
			t.Fatal(err)
		}
		c, err := a.Content(emsd.Options{})
		if err != nil {
			t.Fatal(err)
		}
		out, err := FormatIPM(c.(*emsd.IPM), FormatOptions{Domain: testDomain, Date: date,
			MessageID: "<EMSD.325d8221.00000001@emsd.example.test>", MTS: "emsd.example.test (127.0.0.10)"})
		if err != nil {
			t.Fatal(err)
		}
		want := crlfText("Date: Thu, 10 Oct 1996 23:09:21 +0000\nFrom: 166.058@emsd.example.test\nSubject: pager test\n" +
			"To: amini@lsm.neda.com\nMessage-ID: <EMSD.325d8221.00000001@emsd.example.test>\n" +
			"X-EMSD-MTS: emsd.example.test (127.0.0.10)\n\n" +
			"The response to your query:\n\tpager test\nis:\n\tthis is a test to pager\n")
		if string(out.Message) != want {
			t.Errorf("message\n%s\nwant\n%s", out.Message, want)
		}
		if out.From != "166.058@emsd.example.test" ||
			len(out.Recipients) != 1 || out.Recipients[0] != (Recipient{Addr: "amini@lsm.neda.com", Kind: KindTo}) {
			t.Errorf("envelope %q %+v", out.From, out.Recipients)
		}
	})
	t.Run("emsd-submit-1", func(t *testing.T) {
		// The reference UA renders a host-less From: 198.036 as the rfc822
		// text `"198.036": `; it is read back as the local address.
		_, _, c := captured(t, "emsd-submit-1")
		if o := c.(*emsd.IPM).Heading.Originator; o.IsLocal || o.RFC822 != `"198.036": ` {
			t.Fatalf("captured originator %+v", o)
		}
		out, err := FormatIPM(c.(*emsd.IPM), FormatOptions{Domain: testDomain, Date: date})
		if err != nil {
			t.Fatal(err)
		}
		msg := string(out.Message)
		for _, line := range []string{
			"From: 198.036@emsd.example.test\r\n", "Subject: Hello over EMSD\r\n", "To: someone@example.com\r\n",
			"\r\n\r\nThis is a test message submitted via EMSD (RFC 2524) over ESRO on loopback.\r\n",
		} {
			if !strings.Contains(msg, line) {
				t.Errorf("missing %q in\n%s", line, msg)
			}
		}
		if out.From != "198.036@emsd.example.test" || len(out.Recipients) != 1 ||
			out.Recipients[0] != (Recipient{Addr: "someone@example.com", Kind: KindTo, Flags: emsd.RcptNonDeliveryReport}) {
			t.Errorf("envelope %q %+v", out.From, out.Recipients)
		}
	})
	t.Run("TV13", func(t *testing.T) {
		_, _, c := captured(t, "emsd-submit-multi-recipient-local")
		out, err := FormatIPM(c.(*emsd.IPM), FormatOptions{Domain: testDomain, Date: date})
		if err != nil {
			t.Fatal(err)
		}
		msg := string(out.Message)
		// Header order follows the wire order, which the reference reversed:
		// it wrote `To: B, A` too (§2.11).
		for _, line := range []string{
			"From: 198.036@emsd.example.test\r\n", "Reply-To: 198.037@emsd.example.test\r\n",
			"Subject: Multi submit\r\n", "To: someone@example.com, 198.037@emsd.example.test\r\n",
			"Cc: other@example.org\r\n", "In-Reply-To: <prev@example.com>\r\n",
		} {
			if !strings.Contains(msg, line) {
				t.Errorf("missing %q in\n%s", line, msg)
			}
		}
		if strings.Contains(strings.ToLower(msg), "bcc") {
			t.Errorf("Bcc leaked:\n%s", msg)
		}
		want := []Recipient{
			{Addr: "someone@example.com", Kind: KindTo, Flags: emsd.RcptNonDeliveryReport},
			{Addr: "198.037@emsd.example.test", Local: true, Device: 198037, Kind: KindTo, Flags: emsd.RcptNonDeliveryReport},
			{Addr: "other@example.org", Kind: KindCc, Flags: emsd.RcptCopy | emsd.RcptNonDeliveryReport},
			{Addr: "198.036@emsd.example.test", Local: true, Device: 198036, Kind: KindBcc, Flags: emsd.RcptBlindCopy | emsd.RcptNonDeliveryReport},
		}
		if len(out.Recipients) != len(want) {
			t.Fatalf("recipients %+v", out.Recipients)
		}
		for i := range want {
			if out.Recipients[i] != want[i] {
				t.Errorf("recipient %d: %+v, want %+v", i, out.Recipients[i], want[i])
			}
		}
	})
}
