package mailconv

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-message"
	"github.com/emersion/go-message/textproto"

	"github.com/esro-emsdp/emsdp/emsd"
)

func TestDSN(t *testing.T) {
	orig := []byte(crlfText("Received: from x by y; Thu, 26 Nov 2026 07:00:00 +0000\nFrom: Alice <alice@example.com>\n" +
		"To: 198.036@emsd.example.test, 198.037@emsd.example.test\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\n" +
		"Message-ID: <m1@example.com>\n\nsecret body\n"))
	o := DSNOptions{
		ReportingMTA:    "mx.emsd.example.test",
		To:              "alice@example.com",
		Date:            time.Date(2026, 11, 26, 8, 0, 0, 0, time.UTC),
		ArrivalDate:     time.Date(2026, 11, 26, 7, 0, 0, 0, time.UTC),
		OriginalHeaders: orig,
		Recipients: []DSNRecipient{
			{Addr: "198.036@emsd.example.test", Status: StatusFor(emsd.DiagMaximumTimeExpired),
				Diagnostic: "X-EMSD; device did not answer for 1 h", LastAttempt: time.Date(2026, 11, 26, 7, 59, 0, 0, time.UTC)},
			{Addr: "198.037@emsd.example.test", Action: ActionDelayed, Diagnostic: "451 4.4.1 no answer", RemoteMTA: "relay.example.net"},
		},
		Explanation: "Zustellung fehlgeschlagen – delivery failed.\n",
	}
	b, err := DSN(o)
	if err != nil {
		t.Fatal(err)
	}
	checkSMTPSafe(t, b)
	e, err := message.Read(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	mt, params, _ := e.Header.ContentType()
	if mt != "multipart/report" || params["report-type"] != "delivery-status" {
		t.Fatalf("type %s %v", mt, params)
	}
	for k, v := range map[string]string{
		"From": "Mail Delivery System <postmaster@mx.emsd.example.test>", "To": "alice@example.com",
		"Subject": "Undelivered Mail Returned to Sender", "Auto-Submitted": "auto-replied",
		"Date": "Thu, 26 Nov 2026 08:00:00 +0000",
	} {
		if e.Header.Get(k) != v {
			t.Errorf("%s: %q", k, e.Header.Get(k))
		}
	}
	var types []string
	var bodies [][]byte
	mr := e.MultipartReader()
	for {
		p, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		pt, _, _ := p.Header.ContentType()
		body, _ := io.ReadAll(p.Body)
		types, bodies = append(types, pt), append(bodies, body)
	}
	if fmt.Sprint(types) != "[text/plain message/delivery-status text/rfc822-headers]" {
		t.Fatalf("parts %v", types)
	}
	if string(bodies[0]) != "Zustellung fehlgeschlagen – delivery failed.\r\n" {
		t.Errorf("explanation %q", bodies[0])
	}
	// The delivery-status part is a per-message block and one block per
	// recipient, each in header syntax (RFC 3464 §2.1).
	blocks := strings.Split(string(bodies[1]), "\r\n\r\n")
	if len(blocks) != 3 {
		t.Fatalf("blocks %q", blocks)
	}
	fields := make([]textproto.Header, 3)
	for i, bl := range blocks {
		h, err := textproto.ReadHeader(bufio.NewReader(strings.NewReader(strings.TrimRight(bl, "\r\n") + "\r\n\r\n")))
		if err != nil {
			t.Fatalf("block %d: %v", i, err)
		}
		fields[i] = h
	}
	want := []map[string]string{
		{"Reporting-MTA": "dns; mx.emsd.example.test", "Arrival-Date": "Thu, 26 Nov 2026 07:00:00 +0000"},
		{"Final-Recipient": "rfc822; 198.036@emsd.example.test", "Action": "failed", "Status": "5.4.7",
			"Diagnostic-Code": "X-EMSD; device did not answer for 1 h", "Last-Attempt-Date": "Thu, 26 Nov 2026 07:59:00 +0000"},
		{"Final-Recipient": "rfc822; 198.037@emsd.example.test", "Action": "delayed", "Status": "4.0.0",
			"Diagnostic-Code": "smtp; 451 4.4.1 no answer", "Remote-MTA": "dns; relay.example.net"},
	}
	for i, w := range want {
		for k, v := range w {
			if got := fields[i].Get(k); got != v {
				t.Errorf("block %d %s: %q, want %q", i, k, got, v)
			}
		}
	}
	hdr := string(bodies[2])
	if !strings.Contains(hdr, "Message-ID: <m1@example.com>\r\n") || strings.Contains(hdr, "secret body") {
		t.Errorf("original headers %q", hdr)
	}

	// Defaults: generated explanation; a Message-ID of its own for each
	// DSN, even for two with the same text (two bounces of two identical
	// mails are two messages), and nothing else differs.
	o.Explanation, o.Recipients = "", o.Recipients[:1]
	b1, _ := DSN(o)
	b2, _ := DSN(o)
	idOf := regexp.MustCompile(`Message-ID: (<DSN\.[^>]+>)\r\n`)
	m1, m2 := idOf.FindSubmatch(b1), idOf.FindSubmatch(b2)
	if m1 == nil || m2 == nil || bytes.Equal(m1[1], m2[1]) || !bytes.Contains(b1, []byte("could not be delivered")) ||
		!bytes.Equal(bytes.Replace(b1, m1[1], m2[1], 1), b2) {
		t.Errorf("default DSNs\n%s\n%s", b1, b2)
	}
	o.MessageID = "<given@example.net>"
	if b, _ := DSN(o); !bytes.Contains(b, []byte("Message-ID: <given@example.net>\r\n")) {
		t.Errorf("DSN with a given id\n%s", b)
	}
	o.MessageID = ""
	for _, bad := range []DSNOptions{{To: "a@b"}, {ReportingMTA: "x", To: "a@b"}, {ReportingMTA: "x", Recipients: o.Recipients}} {
		if _, err := DSN(bad); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}

// A DSN to an SMTPUTF8 sender (RFC 6533): UTF-8 addresses are of type
// utf-8 in message/global-delivery-status, a UTF-8 header comes back as
// message/global-headers; ENVID and the reported message id are returned.
func TestDSNGlobal(t *testing.T) {
	b, err := DSN(DSNOptions{ReportingMTA: "mx.emsd.example.test", To: "jörg@example.de",
		OriginalHeaders: []byte("From: jörg@example.de\r\nTo: 198.036@emsd.example.test\r\nSubject: Grüße\r\n\r\n"),
		EnvelopeID:      "QQ314159", InReplyTo: "<m1@example.de>",
		Recipients: []DSNRecipient{{Addr: "zoë@example.net", Status: "5.1.1"}}})
	if err != nil {
		t.Fatal(err)
	}
	e, err := message.Read(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	if e.Header.Get("In-Reply-To") != "<m1@example.de>" || e.Header.Get("References") != "<m1@example.de>" {
		t.Errorf("threading fields %q %q", e.Header.Get("In-Reply-To"), e.Header.Get("References"))
	}
	mr := e.MultipartReader()
	var types []string
	var status string
	for {
		p, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		mt, _, _ := p.Header.ContentType()
		types = append(types, mt)
		if mt == "message/global-delivery-status" {
			raw, _ := io.ReadAll(p.Body)
			status = string(raw)
		}
	}
	if fmt.Sprint(types) != "[text/plain message/global-delivery-status message/global-headers]" {
		t.Errorf("parts %v", types)
	}
	for _, want := range []string{"Original-Envelope-Id: QQ314159\r\n", "Final-Recipient: utf-8; zoë@example.net\r\n", "Status: 5.1.1\r\n"} {
		if !strings.Contains(status, want) {
			t.Errorf("status lacks %q:\n%s", want, status)
		}
	}
}
