package mailconv

import (
	"bytes"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-message"
	gomail "github.com/emersion/go-message/mail"

	"github.com/esro-emsdp/emsdp/emsd"
)

// checkSMTPSafe asserts what FormatIPM promises about its output: CRLF
// only, lines of at most 998 octets, a header go-message reads, a body it
// decodes. It returns the parsed header and decoded body.
func checkSMTPSafe(t testing.TB, msg []byte) (gomail.Header, []byte) {
	t.Helper()
	for i, c := range msg {
		if c == '\n' && (i == 0 || msg[i-1] != '\r') {
			t.Fatalf("bare LF at %d", i)
		}
		if c == '\r' && (i+1 == len(msg) || msg[i+1] != '\n') {
			t.Fatalf("bare CR at %d", i)
		}
	}
	for _, line := range bytes.Split(msg, []byte("\r\n")) {
		if len(line) > 998 {
			t.Fatalf("line of %d octets", len(line))
		}
	}
	e, err := message.Read(bytes.NewReader(msg))
	if err != nil {
		t.Fatalf("go-message: %v\n%s", err, msg)
	}
	body, err := io.ReadAll(e.Body)
	if err != nil {
		t.Fatalf("body: %v", err)
	}
	return gomail.Header{Header: e.Header}, body
}

func TestFormatIPM(t *testing.T) {
	date := time.Date(2026, 11, 26, 7, 0, 0, 0, time.UTC)
	base := func() *emsd.IPM {
		return &emsd.IPM{Heading: emsd.Heading{
			Originator: emsd.LocalOR(198036, ""),
			Recipients: []emsd.RecipientData{{Recipient: emsd.RFC822OR("bob@example.com")}},
		}, Body: &emsd.Body{Text: []byte("hi\n")}}
	}
	tests := []struct {
		name  string
		ipm   func() *emsd.IPM
		o     FormatOptions
		check func(t *testing.T, out *Formatted, h gomail.Header, body []byte)
	}{{
		name: "header injection attempts",
		ipm: func() *emsd.IPM {
			m := base()
			h := &m.Heading
			h.Subject = "hello\r\nBcc: evil@example.com"
			h.Originator = emsd.LocalOR(198036, "Eve\r\nBcc: evil@example.com")
			h.Recipients = append(h.Recipients, emsd.RecipientData{Recipient: emsd.RFC822OR("carol@example.com\r\nBcc: evil@example.com")})
			h.Extensions = []emsd.Extension{
				{Label: "X-Ok", Value: "1\r\nBcc: evil@example.com"},
				{Label: "Bcc", Value: "evil@example.com"},
				{Label: "bcc", Value: "evil@example.com"},
				{Label: "X-Bad\r\nBcc", Value: "evil@example.com"},
				{Label: "X Space", Value: "v"},
				{Label: "Content-Type", Value: "text/html"},
				{Label: "From", Value: "ceo@example.com"},
			}
			return m
		},
		check: func(t *testing.T, out *Formatted, h gomail.Header, body []byte) {
			if h.Has("Bcc") || len(h.Values("From")) != 1 || len(h.Values("Content-Type")) != 0 || h.Has("X Space") {
				t.Errorf("injected fields:\n%s", out.Message)
			}
			if s, _ := h.Subject(); s != "hello Bcc: evil@example.com" {
				t.Errorf("subject %q", s)
			}
			if h.Get("X-Ok") != "1 Bcc: evil@example.com" {
				t.Errorf("X-Ok %q", h.Get("X-Ok"))
			}
			for _, r := range out.Recipients {
				if strings.Contains(r.Addr, "evil") && r.Err == nil {
					t.Errorf("recipient %+v", r)
				}
			}
		},
	}, {
		name: "UTF-8 subject, names and body with a long line",
		ipm: func() *emsd.IPM {
			m := base()
			m.Heading.Subject = "Grüße aus Köln 😀"
			m.Heading.Originator = emsd.LocalOR(198036, "Jürgen Müller, Köln")
			m.Heading.Recipients = []emsd.RecipientData{{Recipient: emsd.RFC822OR("Zoë <zoe@example.com>")}}
			m.Body.Text = []byte("Héllo wörld\n" + strings.Repeat("long line ", 300) + "\nend")
			return m
		},
		check: func(t *testing.T, out *Formatted, h gomail.Header, body []byte) {
			if s, _ := h.Subject(); s != "Grüße aus Köln 😀" {
				t.Errorf("subject %q", s)
			}
			from, err := h.AddressList("From")
			if err != nil || len(from) != 1 || from[0].Name != "Jürgen Müller, Köln" || from[0].Address != "198.036@emsd.example.test" {
				t.Errorf("from %v %v", from, err)
			}
			to, err := h.AddressList("To")
			if err != nil || len(to) != 1 || to[0].Name != "Zoë" {
				t.Errorf("to %v %v", to, err)
			}
			if ct := h.Get("Content-Type"); ct != "text/plain; charset=utf-8" || h.Get("Content-Transfer-Encoding") != "quoted-printable" {
				t.Errorf("MIME %q %q", ct, h.Get("Content-Transfer-Encoding"))
			}
			if want := "Héllo wörld\r\n" + strings.Repeat("long line ", 300) + "\r\nend\r\n"; string(body) != want {
				t.Errorf("body %q", body)
			}
			if !IsASCII(string(out.Message)) {
				t.Errorf("output is not 7-bit")
			}
		},
	}, {
		name: "flags both ways and extensions",
		ipm: func() *emsd.IPM {
			m := base()
			m.Heading.Flags = emsd.MsgPriorityNonUrgent | emsd.MsgImportanceHigh | emsd.MsgAutoForwarded
			m.Heading.Extensions = []emsd.Extension{{Label: "X-First", Value: "one"}, {Label: "X-Long", Value: strings.Repeat("x", 1500)}}
			return m
		},
		check: func(t *testing.T, out *Formatted, h gomail.Header, body []byte) {
			if h.Get("X-Priority") != "Non-Urgent" || h.Get("Priority") != "non-urgent" || h.Get("X-Importance") != "High" ||
				h.Get("Importance") != "high" || h.Get("X-Auto-Forwarded") != "True" || h.Get("X-First") != "one" {
				t.Errorf("fields:\n%s", out.Message)
			}
			if v, _ := h.Text("X-Long"); v != strings.Repeat("x", 1500) {
				t.Errorf("X-Long %d octets", len(v))
			}
		},
	}, {
		name: "reply-to, sender, replied-to local id, message id, MTS",
		ipm: func() *emsd.IPM {
			m := base()
			id := emsd.LocalID(0x6b07d86a, 1)
			m.Heading.RepliedTo = &id
			m.Heading.Sender = &emsd.ORAddress{IsLocal: true, Local: 1234, Name: "Bob"}
			m.Heading.ReplyTo = []emsd.ORAddress{emsd.LocalOR(198037, ""), emsd.RFC822OR("r@example.com")}
			return m
		},
		o: FormatOptions{MessageID: "EMSD.6b07d9aa.00000002@emsd.example.test", MTS: "emsd.example.test (127.0.0.10)"},
		check: func(t *testing.T, out *Formatted, h gomail.Header, body []byte) {
			for k, v := range map[string]string{
				"In-Reply-To": "<EMSD.6b07d86a.00000001@emsd.example.test>",
				"Message-Id":  "<EMSD.6b07d9aa.00000002@emsd.example.test>",
				"Sender":      "Bob <001.234@emsd.example.test>",
				"Reply-To":    "198.037@emsd.example.test, r@example.com",
				"X-Emsd-Mts":  "emsd.example.test (127.0.0.10)",
				"Date":        "Thu, 26 Nov 2026 07:00:00 +0000",
			} {
				if h.Get(k) != v {
					t.Errorf("%s: %q, want %q", k, h.Get(k), v)
				}
			}
		},
	}, {
		name: "only Bcc recipients; unusable and mapped addresses",
		ipm: func() *emsd.IPM {
			m := base()
			m.Heading.Recipients = []emsd.RecipientData{
				{Recipient: emsd.RFC822OR("alice@example.net"), Flags: emsd.RcptBlindCopy},
				{Recipient: emsd.RFC822OR("EMSD198.037"), Flags: emsd.RcptBlindCopy | emsd.RcptCopy},
				{Recipient: emsd.RFC822OR("not an address @@"), Flags: emsd.RcptBlindCopy},
				{Recipient: emsd.RFC822OR("postmaster"), Flags: emsd.RcptBlindCopy},
				{Recipient: emsd.RFC822OR("ALICE@example.net"), Flags: emsd.RcptBlindCopy},
				{Recipient: emsd.RFC822OR(`John <"john doe"@example.com>`), Flags: emsd.RcptBlindCopy},
			}
			return m
		},
		o: FormatOptions{Mapping: Mapping{Resolve: func(a string) (emsd.Address, bool) {
			return 198036, strings.EqualFold(a, "alice@example.net")
		}}},
		check: func(t *testing.T, out *Formatted, h gomail.Header, body []byte) {
			if h.Get("To") != "undisclosed-recipients:;" || h.Has("Cc") {
				t.Errorf("To %q", h.Get("To"))
			}
			r := out.Recipients
			if len(r) != 5 {
				t.Fatalf("recipients %+v", r)
			}
			if r[4].Addr != `"john doe"@example.com` || r[4].Err != nil {
				t.Errorf("quoted local part %+v", r[4])
			}
			if !r[0].Local || r[0].Device != 198036 || r[0].Addr != "alice@example.net" {
				t.Errorf("alias %+v", r[0])
			}
			if !r[1].Local || r[1].Device != 198037 || r[1].Kind != KindBcc {
				t.Errorf("EMSD form %+v", r[1])
			}
			if !errors.Is(r[2].Err, ErrBadAddress) || r[2].Addr != "not an address @@" {
				t.Errorf("bad %+v", r[2])
			}
			if r[3].Addr != "postmaster@emsd.example.test" || r[3].Err != nil {
				t.Errorf("bare local part %+v", r[3])
			}
		},
	}, {
		name: "encoded body passes through with its fields",
		ipm: func() *emsd.IPM {
			m := base()
			m.Heading.MIMEVersion = "1.0"
			m.Heading.MIMEContentType = "text/plain; charset=iso-8859-1"
			m.Heading.MIMEContentTransferEncoding = "quoted-printable"
			m.Body.Text = []byte("caf=E9\n")
			return m
		},
		check: func(t *testing.T, out *Formatted, h gomail.Header, body []byte) {
			if string(body) != "café\r\n" {
				t.Errorf("body %q", body)
			}
		},
	}, {
		name: "declared 8-bit charset is kept",
		ipm: func() *emsd.IPM {
			m := base()
			m.Heading.MIMEContentType = "text/plain; charset=iso-8859-1"
			m.Body.Text = []byte("caf\xe9\n")
			return m
		},
		check: func(t *testing.T, out *Formatted, h gomail.Header, body []byte) {
			if h.Get("Content-Type") != "text/plain; charset=iso-8859-1" || string(body) != "café\r\n" {
				t.Errorf("type %q body %q", h.Get("Content-Type"), body)
			}
		},
	}, {
		name: "binary single part is base64-encoded",
		ipm: func() *emsd.IPM {
			m := base()
			m.Heading.MIMEContentType = "application/octet-stream"
			m.Body.Text = append([]byte{0, 1, 2, '\r', '\n', 0xff}, strings.Repeat("z", 2000)...)
			return m
		},
		check: func(t *testing.T, out *Formatted, h gomail.Header, body []byte) {
			want := append([]byte{0, 1, 2, '\r', '\n', 0xff}, strings.Repeat("z", 2000)...)
			if h.Get("Content-Transfer-Encoding") != "base64" || !bytes.Equal(body, want) {
				t.Errorf("cte %q body %q", h.Get("Content-Transfer-Encoding"), body)
			}
		},
	}, {
		name: "multipart body passes through",
		ipm: func() *emsd.IPM {
			m := base()
			m.Heading.MIMEVersion = "1.0"
			m.Heading.MIMEContentType = `multipart/mixed; boundary="b"`
			m.Body.Text = []byte("--b\nContent-Type: text/plain\n\npart one\n--b--\n")
			return m
		},
		check: func(t *testing.T, out *Formatted, h gomail.Header, body []byte) {
			if h.Get("Content-Type") != `multipart/mixed; boundary="b"` || !bytes.Contains(out.Message, []byte("\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\npart one\r\n--b--\r\n")) {
				t.Errorf("message\n%s", out.Message)
			}
		},
	}, {
		name: "missing body and CR in body",
		ipm: func() *emsd.IPM {
			m := base()
			m.Body = nil
			return m
		},
		check: func(t *testing.T, out *Formatted, h gomail.Header, body []byte) {
			if len(body) != 0 {
				t.Errorf("body %q", body)
			}
		},
	}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := tc.o
			o.Domain, o.Date = testDomain, date
			out, err := FormatIPM(tc.ipm(), o)
			if err != nil {
				t.Fatal(err)
			}
			h, body := checkSMTPSafe(t, out.Message)
			tc.check(t, out, h, body)
			// Routing alone decides what formatting does.
			routed, err := Route(tc.ipm(), o.Domain, o.Mapping)
			if err != nil || !reflect.DeepEqual(routed, out.Recipients) {
				t.Errorf("Route: %+v, %v; FormatIPM's recipients %+v", routed, err, out.Recipients)
			}
		})
	}
	if _, err := FormatIPM(base(), FormatOptions{}); err == nil {
		t.Error("no domain accepted")
	}
	if _, err := FormatIPM(nil, FormatOptions{Domain: testDomain}); err == nil {
		t.Error("nil IPM accepted")
	}
	if _, err := Route(base(), "", Mapping{}); err == nil {
		t.Error("Route: no domain accepted")
	}
	if _, err := Route(nil, testDomain, Mapping{}); err == nil {
		t.Error("Route: nil IPM accepted")
	}
}

// FormatIPM then ParseMessage keeps the heading fields and the body: what
// a device submits to another device through the Internet side arrives
// the same (local names and per-recipient flags beyond Cc/Bcc/NDR are not
// carried by RFC 5322 and are not compared).
func TestRoundTrip(t *testing.T) {
	replied := emsd.RFC822ID("<prev@example.com>")
	sender := emsd.RFC822OR("Secretary <sec@example.com>")
	in := &emsd.IPM{Heading: emsd.Heading{
		Sender:     &sender,
		Originator: emsd.LocalOR(198036, ""),
		Recipients: []emsd.RecipientData{
			{Recipient: emsd.LocalOR(198037, "")},
			{Recipient: emsd.RFC822OR("Zoë Ünicode <zoe@example.com>")},
			{Recipient: emsd.RFC822OR(`"Doe, John" <john@example.org>`), Flags: emsd.RcptCopy | emsd.RcptNonDeliveryReport},
			{Recipient: emsd.LocalOR(301001, ""), Flags: emsd.RcptBlindCopy | emsd.RcptNonDeliveryReport},
		},
		Flags:      emsd.MsgPriorityUrgent | emsd.MsgImportanceLow | emsd.MsgAutoForwarded,
		ReplyTo:    []emsd.ORAddress{emsd.RFC822OR("r1@example.com"), emsd.LocalOR(198037, "")},
		RepliedTo:  &replied,
		Subject:    "Round trip: äöü € and a rather long subject line that needs folding somewhere",
		Extensions: []emsd.Extension{{Label: "X-First", Value: "one"}, {Label: "X-Unicode", Value: "ünï"}, {Label: "X-Empty", Value: ""}},
	}, Body: &emsd.Body{Text: []byte("Line one\n\tindented ü\n" + strings.Repeat("w", 1200) + "\nlast line\n")}}

	out, err := FormatIPM(in, FormatOptions{Domain: testDomain, MessageID: "<rt@emsd.example.test>", Date: time.Unix(1795676400, 0)})
	if err != nil {
		t.Fatal(err)
	}
	checkSMTPSafe(t, out.Message)
	var bcc []string
	for _, r := range out.Recipients {
		if r.Kind == KindBcc {
			bcc = append(bcc, r.Addr)
		}
	}
	back, err := ParseMessage(out.Message, testMapping, ParseOptions{EnvelopeTo: bcc})
	if err != nil {
		t.Fatal(err)
	}
	mustEncode(t, back, 0)
	if back.MessageID != "<rt@emsd.example.test>" || back.SubmissionTime == nil || *back.SubmissionTime != 1795676400 {
		t.Errorf("id %q time %v", back.MessageID, back.SubmissionTime)
	}
	want := *in
	want.Heading.MIMEVersion = "1.0"
	want.Heading.MIMEContentType = "text/plain; charset=utf-8"
	want.Heading.MIMEContentTransferEncoding = "8bit"
	diffIPM(t, back.IPM, &want)
}
