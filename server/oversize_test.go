package server

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-message"
	"github.com/emersion/go-message/textproto"
	"github.com/emersion/go-smtp"

	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/ua"
)

// dsnFields is a parsed message/delivery-status (or its RFC 6533 global
// form): the per-message fields, then one set per recipient.
type dsnFields struct {
	contentType string // of the status part
	message     textproto.Header
	recipients  []textproto.Header
	parts       []string // media types of the report's parts
}

// parseDSN reads a multipart/report DSN with go-message, so that the test
// checks what a mail reader sees.
func parseDSN(t *testing.T, msg []byte) dsnFields {
	t.Helper()
	e, err := message.Read(bytes.NewReader(msg))
	if err != nil {
		t.Fatalf("DSN: %v\n%s", err, msg)
	}
	if mt, ps, _ := e.Header.ContentType(); mt != "multipart/report" || ps["report-type"] != "delivery-status" {
		t.Fatalf("DSN of type %s %v", mt, ps)
	}
	var f dsnFields
	mr := e.MultipartReader()
	for {
		p, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("DSN part: %v", err)
		}
		mt, _, _ := p.Header.ContentType()
		f.parts = append(f.parts, mt)
		if mt != "message/delivery-status" && mt != "message/global-delivery-status" {
			continue
		}
		f.contentType = mt
		r := bufio.NewReader(p.Body)
		for i := 0; ; i++ {
			h, err := textproto.ReadHeader(r)
			if err != nil {
				t.Fatalf("status fields: %v", err)
			}
			if h.Len() == 0 {
				break
			}
			if i == 0 {
				f.message = h
			} else {
				f.recipients = append(f.recipients, h)
			}
			if _, err := r.Peek(1); err != nil {
				break
			}
		}
	}
	return f
}

// Mail whose text is more than a device can take is never cut silently:
// refused with 552 5.3.4 (the default), or delivered cut with a DSN to
// the sender (oversize = "truncate").
func TestInboundOversize(t *testing.T) {
	host := startSmarthost(t, "")
	c := testConfig(t)
	c.Relay.Smarthost = host.addr
	s := startServer(t, c)
	dev := newDevice(t, s, 198036, deviceOpts{})
	var body strings.Builder
	for body.Len() < 60<<10 {
		body.WriteString("A line of a long letter, more than a device can take in 32 segments.\r\n")
	}
	msg := "From: carol@example.com\r\nTo: 198.036@emsd.test\r\nSubject: long\r\nMessage-ID: <long@example.com>\r\n\r\n" + body.String()

	err := sendMail(s, "carol@example.com", []string{"198.036@emsd.test"}, msg)
	var se *smtp.SMTPError
	if !errors.As(err, &se) || se.Code != 552 || se.EnhancedCode != (smtp.EnhancedCode{5, 3, 4}) ||
		!strings.Contains(se.Message, "198.036@emsd.test") {
		t.Fatalf("refuse: %v, want 552 5.3.4 naming the recipient", err)
	}
	dev.none(t, 200*time.Millisecond)

	reconfigure(t, s, func(c *Config) { c.SMTP.Oversize = OversizeTruncate })
	must(t, sendMail(s, "carol@example.com", []string{"198.036@emsd.test"}, msg))
	del := dev.next(t)
	if text := string(del.IPM.Body.Text); !strings.Contains(text, "[message truncated:") || len(text) >= body.Len() {
		t.Errorf("delivered %d octets, ending %q", len(text), text[max(0, len(text)-60):])
	}
	m := host.next(t)
	if m.from != "" || len(m.to) != 1 || m.to[0] != "carol@example.com" {
		t.Fatalf("DSN from %q to %v", m.from, m.to)
	}
	f := parseDSN(t, m.data)
	if len(f.recipients) != 1 || f.message.Get("Reporting-Mta") != "dns; mts.emsd.test" || f.message.Get("Arrival-Date") == "" {
		t.Fatalf("DSN fields %+v", f)
	}
	r := f.recipients[0]
	if r.Get("Final-Recipient") != "rfc822; 198.036@emsd.test" || r.Get("Action") != "delivered" ||
		r.Get("Status") != "2.0.0" || !strings.Contains(r.Get("Diagnostic-Code"), "shortened: body cut from") {
		t.Errorf("recipient fields %v", r.Map())
	}
	if !bytes.Contains(m.data, []byte("Subject: long")) {
		t.Error("the DSN does not carry the original header")
	}
}

// RCPT: an address in another domain is relaying denied (5.7.1), an
// unknown one in ours 5.1.1; a device or alias another process added a
// moment ago (long before the next registry poll) is accepted.
func TestInboundRecipientCheck(t *testing.T) {
	c := testConfig(t)
	c.Store.RegistryPoll = Duration(time.Hour)
	s := startServer(t, c)
	msg := "From: carol@example.com\r\nSubject: hi\r\n\r\nhello\r\n"
	for _, tc := range []struct {
		rcpt string
		want smtp.EnhancedCode
	}{
		{"bob@example.org", smtp.EnhancedCode{5, 7, 1}},
		{"198.036@emsd.test", smtp.EnhancedCode{5, 1, 1}},
		{"alice@example.net", smtp.EnhancedCode{5, 7, 1}},
	} {
		var se *smtp.SMTPError
		if err := sendMail(s, "carol@example.com", []string{tc.rcpt}, msg); !errors.As(err, &se) || se.Code != 550 || se.EnhancedCode != tc.want {
			t.Errorf("%s: %v, want 550 %v", tc.rcpt, err, tc.want)
		}
	}
	// As 'emsdp device add' does from its own process: the store only.
	must(t, s.st.AddDevice(context.Background(), &store.Device{Address: 198036, IP: netip.MustParseAddr("127.0.0.1"),
		Port: 9, Version: "1.1", Mode: store.ModeComplete, Aliases: []string{"alice@example.net"}}))
	for _, rcpt := range []string{"198.036@emsd.test", "alice@example.net"} {
		if err := sendMail(s, "carol@example.com", []string{rcpt}, msg); err != nil {
			t.Errorf("%s right after device add: %v", rcpt, err)
		}
	}
	if st := queueStats(t, s); st.Deliveries[store.DeliveryQueued]+st.Deliveries[store.DeliveryInFlight] != 2 {
		t.Errorf("queue %+v", st.Deliveries)
	}
}

// sendDSN sends msg with DSN parameters: ret and envID for the message,
// one RcptOptions per recipient.
func sendDSN(t *testing.T, s *Server, from string, to []string, opts []*smtp.RcptOptions, envID string, msg string) {
	t.Helper()
	c, err := smtp.Dial(s.Addrs().SMTP.String())
	must(t, err)
	defer c.Close()
	must(t, c.Hello("client.test"))
	must(t, c.Mail(from, &smtp.MailOptions{Return: smtp.DSNReturnHeaders, EnvelopeID: envID}))
	for i, r := range to {
		must(t, c.Rcpt(r, opts[i]))
	}
	w, err := c.Data()
	must(t, err)
	_, err = w.Write([]byte(msg))
	must(t, err)
	must(t, w.Close())
	must(t, c.Quit())
}

// The DSN extension end to end: NOTIFY=SUCCESS gets a success DSN once the
// device has the message, with ORCPT and ENVID returned; NOTIFY=NEVER
// gets nothing when the delivery fails; without NOTIFY a failure is
// reported.
func TestInboundDSNExtension(t *testing.T) {
	host := startSmarthost(t, "")
	c := testConfig(t)
	c.Relay.Smarthost = host.addr
	c.Delivery.Expiry = Duration(time.Second)
	s := startServer(t, c)
	dev := newDevice(t, s, 198036, deviceOpts{})
	addDevice(t, s, 198037, closedUDP(t, "127.0.0.1"), deviceOpts{}) // never answers

	sendDSN(t, s, "carol@example.com", []string{"198.036@emsd.test"}, []*smtp.RcptOptions{{
		Notify: []smtp.DSNNotify{smtp.DSNNotifySuccess}, OriginalRecipientType: smtp.DSNAddressTypeRFC822,
		OriginalRecipient: "alice@example.net"}}, "ENV-1", "From: carol@example.com\r\nSubject: one\r\n\r\nhello\r\n")
	dev.next(t)
	m := host.next(t)
	f := parseDSN(t, m.data)
	if len(f.recipients) != 1 || f.message.Get("Original-Envelope-Id") != "ENV-1" || f.message.Get("Arrival-Date") == "" {
		t.Fatalf("success DSN fields %+v", f)
	}
	if r := f.recipients[0]; r.Get("Action") != "delivered" || r.Get("Original-Recipient") != "rfc822;alice@example.net" ||
		r.Get("Final-Recipient") != "rfc822; 198.036@emsd.test" {
		t.Errorf("recipient fields %v", r.Map())
	}

	never := []*smtp.RcptOptions{{Notify: []smtp.DSNNotify{smtp.DSNNotifyNever}}}
	sendDSN(t, s, "carol@example.com", []string{"198.037@emsd.test"}, never, "ENV-2", "From: carol@example.com\r\nSubject: two\r\n\r\nx\r\n")
	sendDSN(t, s, "carol@example.com", []string{"198.037@emsd.test"}, []*smtp.RcptOptions{nil}, "ENV-3",
		"From: carol@example.com\r\nSubject: three\r\n\r\nx\r\n")
	m = host.next(t) // the expiry of "three"
	f = parseDSN(t, m.data)
	if f.message.Get("Original-Envelope-Id") != "ENV-3" || f.message.Get("Arrival-Date") == "" || len(f.recipients) != 1 ||
		f.recipients[0].Get("Action") != "failed" ||
		!bytes.Contains(m.data, []byte("Subject: three")) {
		t.Fatalf("failure DSN %+v\n%s", f, m.data)
	}
	host.none(t, 2*time.Second) // and none for "two"
}

// Mail a device sends to the Internet asks the smarthost for DSNs as the
// device's per-recipient flags ask for reports (RFC 3461), with the local
// message id as ENVID and the headers only.
func TestRelayAsksForDSNs(t *testing.T) {
	host := startSmarthostWith(t, "", func(srv *smtp.Server) { srv.EnableDSN = true })
	c := testConfig(t)
	c.Relay.Smarthost = host.addr
	s := startServer(t, c)
	dev := newDevice(t, s, 198036, deviceOpts{password: "pw"})
	for _, tc := range []struct {
		msg  ua.Message
		want string
	}{
		{ua.Message{To: []string{"bob@example.com"}, Subject: "dr", Body: []byte("x\n"), DeliveryReport: true}, "[SUCCESS FAILURE]"},
		{ua.Message{To: []string{"carol@example.com"}, Subject: "default", Body: []byte("x\n")}, "[FAILURE]"},
		{ua.Message{To: []string{"dave@example.com"}, Subject: "none", Body: []byte("x\n"), NoNonDeliveryReport: true}, "[NEVER]"},
	} {
		id, err := dev.ua.Submit(context.Background(), &tc.msg)
		must(t, err)
		m := host.next(t)
		if len(m.rcpt) != 1 || fmt.Sprint(m.rcpt[0].Notify) != tc.want || m.rcpt[0].OriginalRecipient != tc.msg.To[0] ||
			m.mail.Return != smtp.DSNReturnHeaders || m.mail.EnvelopeID != id.String() {
			t.Errorf("%s: mail %+v rcpt %+v (id %s)", tc.msg.Subject, m.mail, m.rcpt, id)
		}
	}
}
