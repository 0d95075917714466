package mailconv

import (
	"bytes"
	"net/textproto"
	"strings"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
)

var fuzzMails = []string{
	"From: Alice <alice@example.com>\nTo: 198.036@emsd.example.test\nSubject: hi\nDate: Thu, 26 Nov 2026 07:00:00 +0000\nMessage-ID: <a@b>\n\nbody\n",
	"From: a@example.com\nTo: 198.036@emsd.example.test\nMIME-Version: 1.0\nContent-Type: multipart/alternative; boundary=x\n\n--x\nContent-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: quoted-printable\n\nh=E9\n--x\nContent-Type: text/html\n\n<p>h&eacute;</p>\n--x--\n",
	"From: a@example.com\nTo: 198.036@emsd.example.test\nContent-Type: multipart/mixed; boundary=m\n\n--m\nContent-Type: multipart/related; boundary=r\n\n--r\nContent-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: base64\n\nPGI+aGk8L2I+\n--r--\n--m\nContent-Disposition: attachment; filename=a.bin\n\nxx\n--m--\n",
	"From: p@emsd.example.test\r\nX-EMSD-Message-Type: Report\r\nX-EMSD-Original-Message-Id: <o@x>\r\nX-EMSD-Intended-Recipient: bob@example.com (1/11) why\r\nX-EMSD-Intended-Recipient: 198.036@emsd.example.test (DELIVERED 1795676400)\r\n\r\n",
	"From x\n>From y\nSubject: =?utf-8?b?w6TDtsO8?= =?iso-8859-1?q?=E9?=\nTo: \"A, B\" <a@b>, undisclosed:;, <<bad\nX-Priority: 1\n\n\xff\xfe",
}

// ParseMessage never panics, and whatever it returns encodes with package
// emsd within the content budget, in 1.1 and 1.0.
func FuzzParseMessage(f *testing.F) {
	for _, m := range fuzzMails {
		f.Add([]byte(m), uint16(0))
		f.Add([]byte(crlfText(m)), uint16(9000))
	}
	f.Fuzz(func(t *testing.T, msg []byte, budget uint16) {
		o := ParseOptions{MaxContent: int(budget), Now: time.Unix(1795676400, 0), EnvelopeTo: []string{"198.037@emsd.example.test"}}
		in, err := ParseMessage(msg, testMapping, o)
		if err != nil {
			return
		}
		want := int(budget)
		if want == 0 {
			want = DefaultMaxContent
		}
		mustEncode(t, in, max(want, MinMaxContent))
	})
}

// FormatIPM's output is valid for SMTP and readable by go-message and by
// ParseMessage, and no field can be injected through the IPM.
func FuzzFormatIPM(f *testing.F) {
	f.Add("Subject ü", "Jörg", "Bob <bob@example.com>", "X-A", "v\r\nBcc: x@y", []byte("body\n"), uint8(0), uint8(0), uint8(0), uint8(0))
	f.Add(strings.Repeat("s", 1000), "\"q\"", "EMSD=198.036", "Bcc", "x", []byte(strings.Repeat("y", 3000)), uint8(0x1f), uint8(0xff), uint8(1), uint8(1))
	f.Add("=?utf-8?q?x?=", "", "\"198.036\": ", "X:Y", "", []byte{0, 0xff, '\r'}, uint8(3), uint8(2), uint8(3), uint8(2))
	types := []string{"", "text/plain; charset=iso-8859-1", "text/html", "application/octet-stream", "multipart/mixed; boundary=b", "bogus"}
	ctes := []string{"", "7bit", "8bit", "quoted-printable", "base64"}
	f.Fuzz(func(t *testing.T, subject, name, rcpt, label, value string, body []byte, flags, rflags, ti, ci uint8) {
		ct, cte := types[int(ti)%len(types)], ctes[int(ci)%len(ctes)]
		ipm := &emsd.IPM{Heading: emsd.Heading{
			Originator: emsd.LocalOR(198036, name),
			Recipients: []emsd.RecipientData{
				{Recipient: emsd.RFC822OR(rcpt), Flags: emsd.PerRecipientFlags(rflags)},
				{Recipient: emsd.LocalOR(198037, name)},
			},
			Flags:                       emsd.PerMessageFlags(flags),
			ReplyTo:                     []emsd.ORAddress{emsd.RFC822OR(rcpt)},
			Subject:                     subject,
			Extensions:                  []emsd.Extension{{Label: label, Value: value}},
			MIMEContentType:             ct,
			MIMEContentTransferEncoding: cte,
		}, Body: &emsd.Body{Text: body}}
		out, err := FormatIPM(ipm, FormatOptions{Domain: testDomain, MessageID: "<f@x>", Date: time.Unix(1795676400, 0)})
		if err != nil {
			t.Fatal(err)
		}
		msg := out.Message
		hdr := HeaderSection(msg)
		encodedBody := ct == "" || strings.HasPrefix(ct, "text/") && cte != "quoted-printable" && cte != "base64" ||
			ct == "application/octet-stream" && cte != "quoted-printable" && cte != "base64"
		if encodedBody {
			checkSMTPSafe(t, msg)
		} else {
			// The device's own MIME body passes through; the header must
			// still be perfect.
			checkSMTPSafe(t, append(append([]byte(nil), hdr...), "\r\n\r\n"...))
		}
		// Every field is one FormatIPM writes or the extension's label.
		allowed := map[string]bool{}
		for _, k := range []string{"Date", "From", "Sender", "Reply-To", "Subject", "To", "Cc", "In-Reply-To",
			"Message-Id", "X-Priority", "Priority", "X-Importance", "Importance", "X-Auto-Forwarded",
			"Mime-Version", "Content-Type", "Content-Transfer-Encoding", "Content-Id", "Content-Description"} {
			allowed[k] = true
		}
		allowed[textproto.CanonicalMIMEHeaderKey(label)] = true
		for _, line := range bytes.Split(hdr, []byte("\r\n")) {
			if len(line) == 0 || line[0] == ' ' || line[0] == '\t' {
				continue
			}
			k, _, _ := bytes.Cut(line, []byte(":"))
			if key := textproto.CanonicalMIMEHeaderKey(string(k)); !allowed[key] || key == "Bcc" {
				t.Fatalf("field %q in\n%s", k, hdr)
			}
		}
		in, err := ParseMessage(msg, testMapping, ParseOptions{})
		if err != nil {
			t.Fatalf("ParseMessage: %v\n%s", err, msg)
		}
		mustEncode(t, in, 0)
		if in.IPM != nil && (!in.IPM.Heading.Originator.IsLocal || in.IPM.Heading.Originator.Local != 198036) {
			t.Fatalf("originator lost: %+v", in)
		}
	})
}
