package mailconv

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/esro-emsdp/emsdp/emsd"
)

const testDomain = "emsd.example.test"

var testMapping = Mapping{Domains: []string{testDomain}}

func hasNote(in *Parsed, sub string) bool {
	for _, n := range in.Truncated {
		if strings.Contains(n, sub) {
			return true
		}
	}
	return false
}

func TestParseMessage(t *testing.T) {
	now := time.Date(2026, 11, 26, 8, 0, 0, 0, time.UTC)
	longSubject := strings.Repeat("Grüße ", 60) // 2-octet runes straddle the limit
	var many strings.Builder
	for i := range 299 {
		fmt.Fprintf(&many, "user%03d@example.com, ", i)
	}
	many.WriteString("198.036@" + testDomain)
	var extra strings.Builder
	for i := range 100 {
		fmt.Fprintf(&extra, "X-Extra-%03d: value %d\n", i, i)
	}
	var received strings.Builder
	for i := range 40 {
		fmt.Fprintf(&received, "Received: from hop%d.example.net (hop%d [192.0.2.%d])\n\tby mx.example.com with ESMTP id %d;\n\tThu, 26 Nov 2026 07:00:%02d +0000\n", i, i, i, i, i)
	}
	report := "From: EMSD Postmaster <postmaster@emsd.example.test>\n" +
		"To: 198.036@emsd.example.test\nSubject: Delivery report\n" +
		"Message-ID: <rpt1.20261126@emsd.example.test>\n" +
		"X-EMSD-Message-Type: Report\n" +
		"X-EMSD-Original-Message-Id: <orig1.20261126@emsd.example.test>\n" +
		"X-EMSD-Intended-Recipient: bob@example.com (1/11)\n" +
		"X-EMSD-Intended-Recipient: carol@example.com (DELIVERED Thu, 26 Nov 2026 07:30:00 +0000)\n" +
		"X-EMSD-Intended-Recipient: 198.037@emsd.example.test (DELIVERED)\n" +
		"X-EMSD-Intended-Recipient: dave@example.com (garbage) mailbox on fire\n" +
		"X-EMSD-Intended-Recipient: erin@example.com (0/3) timed out\n\nReport body.\n"
	checkReport := func(t *testing.T, in *Parsed) {
		r := in.Report
		if in.ContentType != emsd.ContentDeliveryReport || r == nil || in.IPM != nil {
			t.Fatalf("not a report: %+v", in)
		}
		if r.ReportedMessageID != emsd.RFC822ID("<orig1.20261126@emsd.example.test>") {
			t.Errorf("reported id %q", r.ReportedMessageID)
		}
		if in.MessageID != "<rpt1.20261126@emsd.example.test>" {
			t.Errorf("message id %q", in.MessageID)
		}
		if len(r.Recipients) != 5 {
			t.Fatalf("%d entries", len(r.Recipients))
		}
		e := r.Recipients
		if e[0].Recipient != emsd.RFC822OR("bob@example.com") || e[0].NonDelivery == nil || e[0].NonDelivery.Reason != 1 || *e[0].NonDelivery.Diagnostic != 11 {
			t.Errorf("entry 0 %+v %+v", e[0], e[0].NonDelivery)
		}
		if e[1].Delivery == nil || e[1].Delivery.DeliveryTime != emsd.TimeOf(time.Date(2026, 11, 26, 7, 30, 0, 0, time.UTC)) {
			t.Errorf("entry 1 %+v", e[1])
		}
		// DELIVERED without a time: no Date: either, so the conversion time;
		// the address is filled and mapped to the device (OP 16).
		if e[2].Recipient != emsd.LocalOR(198037, "") || e[2].Delivery == nil || e[2].Delivery.DeliveryTime != emsd.TimeOf(now) {
			t.Errorf("entry 2 %+v %+v", e[2], e[2].Delivery)
		}
		if nd := e[3].NonDelivery; nd == nil || nd.Reason != 0 || *nd.Diagnostic != 13 || nd.Explanation != "mailbox on fire" {
			t.Errorf("entry 3 %+v", nd)
		}
		if nd := e[4].NonDelivery; nd == nil || nd.Reason != 0 || *nd.Diagnostic != 3 || nd.Explanation != "timed out" {
			t.Errorf("entry 4 %+v", nd)
		}
	}

	tests := []struct {
		name  string
		msg   string
		m     Mapping
		o     ParseOptions
		check func(t *testing.T, in *Parsed)
	}{{
		name: "plain",
		msg: "Return-Path: <alice@example.com>\nReceived: from x by y; Thu, 26 Nov 2026 07:00:01 +0000\n" +
			"From: Alice Example <alice@example.com>\nTo: 198.036@EMSD.Example.Test, \"Doe, John\" <\"john doe\"@example.org>\n" +
			"Cc: carol@example.com\nBcc: 198.037@emsd.example.test\nSubject: Hello\n" +
			"Date: Thu, 26 Nov 2026 09:00:00 +0200\nMessage-ID: <plain@example.com>\n" +
			"X-Mailer: test\n\nHello,\nworld.\n",
		check: func(t *testing.T, in *Parsed) {
			h := in.IPM.Heading
			if h.Originator != emsd.RFC822OR("Alice Example <alice@example.com>") || h.Sender != nil {
				t.Errorf("originator %v sender %v", h.Originator, h.Sender)
			}
			want := []emsd.RecipientData{
				{Recipient: emsd.LocalOR(198036, "")},
				{Recipient: emsd.RFC822OR(`"Doe, John" <"john doe"@example.org>`)},
				{Recipient: emsd.RFC822OR("carol@example.com"), Flags: emsd.RcptCopy | emsd.RcptNonDeliveryReport},
				{Recipient: emsd.LocalOR(198037, ""), Flags: emsd.RcptBlindCopy | emsd.RcptNonDeliveryReport},
			}
			if fmt.Sprint(h.Recipients) != fmt.Sprint(want) {
				t.Errorf("recipients %v, want %v", h.Recipients, want)
			}
			if h.Subject != "Hello" || string(in.IPM.Body.Text) != "Hello,\nworld.\n" {
				t.Errorf("subject %q body %q", h.Subject, in.IPM.Body.Text)
			}
			// Date to UTC (OP 14).
			if in.SubmissionTime == nil || in.SubmissionTime.UTC() != time.Date(2026, 11, 26, 7, 0, 0, 0, time.UTC) {
				t.Errorf("submission time %v", in.SubmissionTime)
			}
			if in.MessageID != "<plain@example.com>" {
				t.Errorf("id %q", in.MessageID)
			}
			if fmt.Sprint(h.Extensions) != "[{X-Mailer test}]" {
				t.Errorf("extensions %v (trace fields must not be extensions)", h.Extensions)
			}
			if h.MIMEContentType != "" || h.MIMEVersion != "" || len(in.Truncated) != 0 {
				t.Errorf("MIME %q/%q notes %v", h.MIMEVersion, h.MIMEContentType, in.Truncated)
			}
		},
	}, {
		name: "multipart/alternative takes the plain part",
		msg: "From: a@example.com\nTo: 198.036@emsd.example.test\nSubject: alt\nMIME-Version: 1.0\n" +
			"Content-Type: multipart/alternative; boundary=\"b1\"\n\nPreamble.\n--b1\n" +
			"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\n" +
			"Plain =E2=82=AC text with a soft=\n break.\n--b1\nContent-Type: text/html; charset=utf-8\n\n" +
			"<html><body><p>HTML <b>text</b></p></body></html>\n--b1--\nEpilogue.\n",
		check: func(t *testing.T, in *Parsed) {
			h := in.IPM.Heading
			if got := string(in.IPM.Body.Text); got != "Plain € text with a soft break." {
				t.Errorf("body %q", got)
			}
			if h.MIMEVersion != "1.0" || h.MIMEContentType != "text/plain; charset=utf-8" || h.MIMEContentTransferEncoding != "8bit" {
				t.Errorf("MIME %q %q %q", h.MIMEVersion, h.MIMEContentType, h.MIMEContentTransferEncoding)
			}
			if len(in.Truncated) != 0 {
				t.Errorf("alternatives are not omissions: %v", in.Truncated)
			}
		},
	}, {
		name: "HTML only",
		msg: "From: news@example.com\nTo: 198.036@emsd.example.test\nSubject: html\nMIME-Version: 1.0\n" +
			"Content-Type: text/html; charset=\"iso-8859-1\"\nContent-Transfer-Encoding: quoted-printable\n\n" +
			"<html><head><title>T</title><style>p{color:red}</style></head><body>\n<h1>Hello</h1><p>Caf=E9 &amp; " +
			"<a href=3D\"https://example.com/x\">link</a></p><ul><li>one</li><li>two</li></ul><script>alert(1)</script>" +
			"line<br>break</body></html>\n",
		check: func(t *testing.T, in *Parsed) {
			want := "Hello\n\nCafé & link <https://example.com/x>\n\n- one\n- two\n\nline\nbreak"
			if got := string(in.IPM.Body.Text); got != want {
				t.Errorf("body\n got %q\nwant %q", got, want)
			}
			if in.IPM.Heading.MIMEContentType != "text/plain; charset=utf-8" {
				t.Errorf("content type %q", in.IPM.Heading.MIMEContentType)
			}
		},
	}, {
		name: "base64 UTF-8",
		msg: "From: =?UTF-8?B?SsO8cmdlbg==?= <j@example.de>\nTo: 198.036@emsd.example.test\n" +
			"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= aus =?utf-8?b?S8O2bG4=?=\nMIME-Version: 1.0\n" +
			"Content-Type: text/plain; charset=UTF-8\nContent-Transfer-Encoding: base64\n\n" +
			"SGFsbG8gV2VsdCwgw6TDtsO8IOKCrCDwn5iACg==\n",
		check: func(t *testing.T, in *Parsed) {
			h := in.IPM.Heading
			if h.Originator != emsd.RFC822OR("Jürgen <j@example.de>") || h.Subject != "Grüße aus Köln" {
				t.Errorf("originator %q subject %q", h.Originator, h.Subject)
			}
			if string(in.IPM.Body.Text) != "Hallo Welt, äöü € 😀\n" || h.MIMEContentTransferEncoding != "8bit" {
				t.Errorf("body %q cte %q", in.IPM.Body.Text, h.MIMEContentTransferEncoding)
			}
		},
	}, {
		name: "quoted-printable us-ascii",
		msg: "From: a@example.com\nTo: 198.036@emsd.example.test\nMIME-Version: 1.0\n" +
			"Content-Type: text/plain; charset=us-ascii\nContent-Transfer-Encoding: quoted-printable\n\n" +
			"A long line that was wrapped by the sender's mail program at seventy=\n-six characters =3D ok\n",
		check: func(t *testing.T, in *Parsed) {
			h := in.IPM.Heading
			if string(in.IPM.Body.Text) != "A long line that was wrapped by the sender's mail program at seventy-six characters = ok\n" {
				t.Errorf("body %q", in.IPM.Body.Text)
			}
			// The body is no longer quoted-printable: the fields must say so.
			if h.MIMEContentTransferEncoding != "7bit" || h.MIMEContentType != "text/plain; charset=utf-8" {
				t.Errorf("MIME %q %q", h.MIMEContentType, h.MIMEContentTransferEncoding)
			}
		},
	}, {
		name: "ISO-8859-1",
		msg: "From: =?ISO-8859-1?Q?Fran=E7ois?= <f@example.fr>\nTo: 198.036@emsd.example.test\n" +
			"Subject: =?iso-8859-1?q?R=E9union?=\nContent-Type: text/plain; charset=ISO-8859-1\n" +
			"Content-Transfer-Encoding: 8bit\n\nR\xe9union \xe0 9h, caf\xe9.\n",
		check: func(t *testing.T, in *Parsed) {
			h := in.IPM.Heading
			if h.Originator.RFC822 != "François <f@example.fr>" || h.Subject != "Réunion" {
				t.Errorf("%q %q", h.Originator.RFC822, h.Subject)
			}
			if string(in.IPM.Body.Text) != "Réunion à 9h, café.\n" || h.MIMEContentType != "text/plain; charset=utf-8" || h.MIMEVersion != "1.0" {
				t.Errorf("body %q type %q", in.IPM.Body.Text, h.MIMEContentType)
			}
		},
	}, {
		name: "undeclared 8-bit text",
		msg:  "From: a@example.com\nTo: 198.036@emsd.example.test\n\nna\xefve\n",
		check: func(t *testing.T, in *Parsed) {
			if string(in.IPM.Body.Text) != "naïve\n" || !hasNote(in, "Windows-1252") {
				t.Errorf("body %q notes %v", in.IPM.Body.Text, in.Truncated)
			}
		},
	}, {
		name: "long subject",
		msg:  "From: a@example.com\nTo: 198.036@emsd.example.test\nSubject: " + longSubject + "\n\nx\n",
		check: func(t *testing.T, in *Parsed) {
			s := in.IPM.Heading.Subject
			if len(s) > emsd.MaxSubject || len(s) < emsd.MaxSubject-3 || !utf8.ValidString(s) || !strings.HasPrefix(longSubject, s) {
				t.Errorf("subject %d octets %q", len(s), s)
			}
			if !hasNote(in, "Subject") {
				t.Errorf("no note: %v", in.Truncated)
			}
		},
	}, {
		name: "300 recipients",
		msg:  "From: a@example.com\nTo: " + many.String() + "\nSubject: many\n\nx\n",
		check: func(t *testing.T, in *Parsed) {
			r := in.IPM.Heading.Recipients
			if len(r) != emsd.MaxRecipients {
				t.Fatalf("%d recipients", len(r))
			}
			// The device (last in the header) is kept.
			if !r[len(r)-1].Recipient.IsLocal || r[len(r)-1].Recipient.Local != 198036 {
				t.Errorf("last %v", r[len(r)-1])
			}
			if !hasNote(in, "300 recipients") {
				t.Errorf("notes %v", in.Truncated)
			}
		},
	}, {
		name: "100 extra headers",
		msg:  "From: a@example.com\nTo: 198.036@emsd.example.test\n" + extra.String() + "\nx\n",
		check: func(t *testing.T, in *Parsed) {
			x := in.IPM.Heading.Extensions
			if len(x) != emsd.MaxExtensions || x[0] != (emsd.Extension{Label: "X-Extra-000", Value: "value 0"}) || x[63].Label != "X-Extra-063" {
				t.Errorf("%d extensions, first %v", len(x), x[0])
			}
			if !hasNote(in, "36 header fields") {
				t.Errorf("notes %v", in.Truncated)
			}
		},
	}, {
		name: "Received lines and signatures are not extensions",
		msg: received.String() + "DKIM-Signature: v=1; a=rsa-sha256; d=example.com;\n\tb=abc\n" +
			"Authentication-Results: mx; dkim=pass\nARC-Seal: i=1; cv=none\nFrom: a@example.com\n" +
			"To: 198.036@emsd.example.test\nX-Keep: yes\nList-Id: <l.example.com>\n\nx\n",
		check: func(t *testing.T, in *Parsed) {
			if got := fmt.Sprint(in.IPM.Heading.Extensions); got != "[{X-Keep yes} {List-Id <l.example.com>}]" {
				t.Errorf("extensions %s", got)
			}
		},
	}, {
		name:  "report with LF line ends",
		msg:   report,
		o:     ParseOptions{Now: now},
		check: checkReport,
	}, {
		name:  "report with CRLF line ends",
		msg:   crlfText(report),
		o:     ParseOptions{Now: now},
		check: checkReport,
	}, {
		name: "report type matched case-insensitively",
		msg:  strings.Replace(report, "X-EMSD-Message-Type: Report", "x-emsd-message-type:   rePORT  ", 1),
		o:    ParseOptions{Now: now},
		check: func(t *testing.T, in *Parsed) {
			if in.ContentType != emsd.ContentDeliveryReport {
				t.Errorf("content type %v", in.ContentType)
			}
		},
	}, {
		name: "missing Date, Message-ID and From",
		msg:  "To: 198.036@emsd.example.test\nSubject: bare\n\nx\n",
		o:    ParseOptions{Now: now, EnvelopeFrom: "bounce@example.net", Number: 7},
		check: func(t *testing.T, in *Parsed) {
			if in.SubmissionTime != nil {
				t.Errorf("submission time %v", in.SubmissionTime)
			}
			if want := fmt.Sprintf("<EMSD.%08x.00000007@emsd.example.test>", uint32(emsd.TimeOf(now))); in.MessageID != want {
				t.Errorf("id %q want %q", in.MessageID, want)
			}
			if in.IPM.Heading.Originator != emsd.RFC822OR("bounce@example.net") {
				t.Errorf("originator %v", in.IPM.Heading.Originator)
			}
		},
	}, {
		name: "no originator at all",
		msg:  "To: 198.036@emsd.example.test\nDate: garbage\nMessage-ID: not an id\n\nx\n",
		check: func(t *testing.T, in *Parsed) {
			if in.SubmissionTime != nil || in.IPM.Heading.Originator != emsd.RFC822OR("") || !hasNote(in, "no originator") {
				t.Errorf("%+v", in)
			}
			if !regexp.MustCompile(`^<EMSD\.[0-9a-f]{8}\.[0-9a-f]{8}@emsd\.example\.test>$`).MatchString(in.MessageID) {
				t.Errorf("id %q", in.MessageID)
			}
		},
	}, {
		name: "attachments are listed, not delivered",
		msg: "From: a@example.com\nTo: 198.036@emsd.example.test\nMIME-Version: 1.0\n" +
			"Content-Type: multipart/mixed; boundary=mix\n\n--mix\nContent-Type: text/plain\n\nSee attached.\n" +
			"--mix\nContent-Type: application/pdf; name=\"r.pdf\"\nContent-Disposition: attachment; filename=\"report.pdf\"\n" +
			"Content-Transfer-Encoding: base64\n\nJVBERi0xLjQK\n--mix\nContent-Type: text/plain\n\n-- \nList footer\n--mix--\n",
		check: func(t *testing.T, in *Parsed) {
			want := "See attached.\n\n-- \nList footer\n\n[Not delivered: report.pdf (application/pdf, 9 octets)]\n"
			if got := string(in.IPM.Body.Text); got != want {
				t.Errorf("body\n got %q\nwant %q", got, want)
			}
			if !hasNote(in, "report.pdf") || in.BodyCut != "" {
				t.Errorf("notes %v, body cut %q", in.Truncated, in.BodyCut)
			}
		},
	}, {
		name: "a bounce keeps its delivery-status and header parts",
		msg: "From: MAILER-DAEMON@postfix.test (Mail Delivery System)\nTo: 198.036@emsd.example.test\n" +
			"Subject: Undelivered Mail Returned to Sender\nMIME-Version: 1.0\n" +
			"Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\n\n" +
			"--B\nContent-Description: Notification\nContent-Type: text/plain; charset=us-ascii\n\n" +
			"I'm sorry to have to inform you that your message could not\nbe delivered.\n" +
			"--B\nContent-Description: Delivery report\nContent-Type: message/delivery-status\n\n" +
			"Reporting-MTA: dns; postfix.test\n\nFinal-Recipient: rfc822; nobody@example.com\n" +
			"Action: failed\nStatus: 5.1.1\nDiagnostic-Code: smtp; 550 5.1.1 no such user\n" +
			"--B\nContent-Description: Undelivered Message Headers\nContent-Type: text/rfc822-headers\n\n" +
			"From: 198.036@emsd.example.test\nTo: nobody@example.com\nSubject: lunch\n" +
			"--B--\n",
		check: func(t *testing.T, in *Parsed) {
			b := string(in.IPM.Body.Text)
			for _, want := range []string{"could not\nbe delivered.", "Status: 5.1.1", "Final-Recipient: rfc822; nobody@example.com",
				"Subject: lunch"} {
				if !strings.Contains(b, want) {
					t.Errorf("body lacks %q:\n%s", want, b)
				}
			}
			if strings.Contains(b, "Not delivered") {
				t.Errorf("parts left out:\n%s", b)
			}
		},
	}, {
		name: "body cut to the content budget",
		msg:  "From: a@example.com\nTo: 198.036@emsd.example.test\n\n" + strings.Repeat("0123456789 abcdefghij äöü\n", 4000),
		check: func(t *testing.T, in *Parsed) {
			b := in.IPM.Body.Text
			if !utf8.Valid(b) || !strings.Contains(string(b), "[message truncated:") || !hasNote(in, "body cut") {
				t.Errorf("body end %q notes %v", b[max(0, len(b)-80):], in.Truncated)
			}
			if !strings.HasPrefix(in.BodyCut, "body cut from 116000 to ") {
				t.Errorf("BodyCut %q", in.BodyCut)
			}
			enc, _ := in.IPM.Marshal(emsd.Options{})
			if len(enc) < DefaultMaxContent-300 {
				t.Errorf("only %d octets used of %d", len(enc), DefaultMaxContent)
			}
		},
	}, {
		name: "smaller budget",
		msg:  "From: a@example.com\nTo: 198.036@emsd.example.test\n\n" + strings.Repeat("x", 20000),
		o:    ParseOptions{MaxContent: 10000},
		check: func(t *testing.T, in *Parsed) {
			mustEncode(t, in, 10000)
		},
	}, {
		name: "priority headers map to flags",
		msg: "From: a@example.com\nTo: 198.036@emsd.example.test\nX-Priority: 1 (Highest)\n" +
			"Importance: High\nX-Auto-Forwarded: True\nX-Other: kept\n\nx\n",
		check: func(t *testing.T, in *Parsed) {
			h := in.IPM.Heading
			if h.Flags != emsd.MsgPriorityUrgent|emsd.MsgImportanceHigh|emsd.MsgAutoForwarded {
				t.Errorf("flags %v", h.Flags)
			}
			if fmt.Sprint(h.Extensions) != "[{X-Other kept}]" {
				t.Errorf("extensions %v", h.Extensions)
			}
		},
	}, {
		name: "low priority and importance",
		msg:  "From: a@example.com\nTo: 198.036@emsd.example.test\nPriority: non-urgent\nX-MSMail-Priority: Low\n\nx\n",
		check: func(t *testing.T, in *Parsed) {
			if f := in.IPM.Heading.Flags; f != emsd.MsgPriorityNonUrgent|emsd.MsgImportanceLow {
				t.Errorf("flags %v", f)
			}
		},
	}, {
		name: "sender, reply-to and in-reply-to",
		msg: "From: a@example.com\nSender: list@example.com\nReply-To: a@example.com\n" +
			"To: 198.036@emsd.example.test\nIn-Reply-To: <p1@example.com> <p2@example.com>\n\nx\n",
		check: func(t *testing.T, in *Parsed) {
			h := in.IPM.Heading
			if h.Sender == nil || *h.Sender != emsd.RFC822OR("list@example.com") {
				t.Errorf("sender %v", h.Sender)
			}
			// A single Reply-To equal to From is kept when Sender differs.
			if len(h.ReplyTo) != 1 || h.RepliedTo == nil || *h.RepliedTo != emsd.RFC822ID("<p1@example.com>") {
				t.Errorf("reply-to %v replied-to %v", h.ReplyTo, h.RepliedTo)
			}
		},
	}, {
		name: "redundant reply-to and sender are dropped",
		msg:  "From: a@example.com\nSender: A@Example.com\nReply-To: a@example.com\nTo: 198.036@emsd.example.test\n\nx\n",
		check: func(t *testing.T, in *Parsed) {
			if h := in.IPM.Heading; h.Sender != nil || h.ReplyTo != nil {
				t.Errorf("sender %v reply-to %v", h.Sender, h.ReplyTo)
			}
		},
	}, {
		name: "envelope recipient missing from headers becomes Bcc",
		msg:  "From: a@example.com\nTo: list@example.com\n\nx\n",
		o:    ParseOptions{EnvelopeTo: []string{"alice@example.net", "198.036@emsd.example.test"}},
		m: Mapping{Resolve: func(a string) (emsd.Address, bool) {
			if a == "alice@example.net" {
				return 198036, true
			}
			return 0, false
		}},
		check: func(t *testing.T, in *Parsed) {
			r := in.IPM.Heading.Recipients
			want := []emsd.RecipientData{{Recipient: emsd.RFC822OR("list@example.com")},
				{Recipient: emsd.LocalOR(198036, ""), Flags: emsd.RcptBlindCopy | emsd.RcptNonDeliveryReport}}
			if fmt.Sprint(r) != fmt.Sprint(want) {
				t.Errorf("recipients %v", r)
			}
		},
	}, {
		name: "Resolve decides, not Domains",
		msg:  "From: 198.037@emsd.example.test\nTo: 198.036@emsd.example.test, Alice <Alice@EXAMPLE.net>\n\nx\n",
		m: Mapping{Domains: []string{testDomain}, Resolve: func(a string) (emsd.Address, bool) {
			if a == "Alice@example.net" {
				return 198036, true
			}
			return 0, false // 198.037 has no subscriber
		}},
		check: func(t *testing.T, in *Parsed) {
			h := in.IPM.Heading
			if h.Originator != emsd.RFC822OR("198.037@emsd.example.test") {
				t.Errorf("originator %v", h.Originator)
			}
			if fmt.Sprint(h.Recipients) != "[{198.036@emsd.example.test none} {198.036 none}]" {
				t.Errorf("recipients %v", h.Recipients)
			}
		},
	}, {
		name: "an alias in To: is recorded as addressed; a forged record is dropped",
		msg: "From: carol@example.com\nTo: Alice <Alice@Example.NET>, 198.037@emsd.example.test\nCc: alice@example.net\n" +
			"X-EMSD-Addressed-As: 198.037 ceo@example.com\n\nx\n",
		m: Mapping{Domains: []string{testDomain}, Resolve: func(a string) (emsd.Address, bool) {
			switch a {
			case "Alice@example.net", "alice@example.net":
				return 198036, true
			case "198.037@emsd.example.test":
				return 198037, true
			}
			return 0, false
		}},
		check: func(t *testing.T, in *Parsed) {
			h := in.IPM.Heading
			if fmt.Sprint(h.Recipients) != "[{198.036 none} {198.037 none} {198.036 copy-recipient|non-delivery-report}]" {
				t.Errorf("recipients %v", h.Recipients)
			}
			al, rest := Aliases(in.IPM)
			if fmt.Sprint(al) != "map[198.036:Alice@Example.NET]" || len(rest) != 0 {
				t.Errorf("aliases %v, other extensions %v", al, rest)
			}
		},
	}, {
		name: "mbox line, malformed header line ends the header",
		msg:  "From alice@example.com Thu Nov 26 07:00:00 2026\nFrom: alice@example.com\nTo: 198.036@emsd.example.test\nthis is no header\nbody line\n",
		check: func(t *testing.T, in *Parsed) {
			if string(in.IPM.Body.Text) != "this is no header\nbody line\n" || len(in.IPM.Heading.Extensions) != 0 {
				t.Errorf("body %q ext %v", in.IPM.Body.Text, in.IPM.Heading.Extensions)
			}
		},
	}, {
		name: "header injection through encoded words",
		msg:  "From: a@example.com\nTo: 198.036@emsd.example.test\nSubject: =?utf-8?q?a=0D=0ABcc:_evil@example.com?=\nX-A: =?utf-8?q?b=0Ac?=\n\nx\n",
		check: func(t *testing.T, in *Parsed) {
			h := in.IPM.Heading
			if h.Subject != "a Bcc: evil@example.com" || h.Extensions[0].Value != "b c" {
				t.Errorf("subject %q ext %v", h.Subject, h.Extensions)
			}
		},
	}, {
		name: "unparseable addresses are kept as text, empty groups vanish",
		msg:  "From: Broken <a@>\nTo: undisclosed-recipients:;, 198.036@emsd.example.test, <<weird>>\n\nx\n",
		check: func(t *testing.T, in *Parsed) {
			h := in.IPM.Heading
			if h.Originator != emsd.RFC822OR("Broken <a@>") {
				t.Errorf("originator %v", h.Originator)
			}
			if fmt.Sprint(h.Recipients) != "[{198.036 none} {<<weird>> none}]" {
				t.Errorf("recipients %v", h.Recipients)
			}
		},
	}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := tc.m
			if m.Domains == nil && m.Resolve == nil {
				m = testMapping
			}
			in, err := ParseMessage([]byte(tc.msg), m, tc.o)
			if err != nil {
				t.Fatal(err)
			}
			mustEncode(t, in, tc.o.MaxContent)
			tc.check(t, in)
		})
	}
}

func TestParseMessageMalformed(t *testing.T) {
	for _, msg := range []string{"", "\n", "\r\n\r\nbody only", "no header at all\n\nbody"} {
		if _, err := ParseMessage([]byte(msg), testMapping, ParseOptions{}); !errors.Is(err, ErrMalformed) {
			t.Errorf("%q: err %v", msg, err)
		}
	}
}

// The heading may take half of the budget; past that, extensions, reply-to
// and Internet recipients are shed, never the device recipients.
func TestParseMessageHeadingBudget(t *testing.T) {
	var b strings.Builder
	b.WriteString("From: a@example.com\nTo: 198.036@emsd.example.test\n")
	for i := range 256 {
		fmt.Fprintf(&b, "Cc: %s%03d@example.com\n", strings.Repeat("c", 100), i)
	}
	for i := range 64 {
		fmt.Fprintf(&b, "X-Big-%02d: %s\n", i, strings.Repeat("v", 900))
	}
	b.WriteString("\nbody\n")
	in, err := ParseMessage([]byte(b.String()), testMapping, ParseOptions{})
	if err != nil {
		t.Fatal(err)
	}
	mustEncode(t, in, 0)
	h := in.IPM.Heading
	if len(h.Extensions) != 0 || !h.Recipients[0].Recipient.IsLocal || len(h.Recipients) >= 256 || string(in.IPM.Body.Text) != "body\n" {
		t.Errorf("%d extensions, %d recipients, body %q", len(h.Extensions), len(h.Recipients), in.IPM.Body.Text)
	}
	if !hasNote(in, "dropped 64 extensions") {
		t.Errorf("notes %v", in.Truncated)
	}
}
