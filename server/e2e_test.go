package server

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/mail"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/mailconv"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/ua"
)

// A device submits mail for the Internet: the smarthost receives the right
// RFC 5322 message, from the device's address, with a Message-ID derived
// from the local id the device got (Open Point 10).
func TestSubmitToInternet(t *testing.T) {
	host := startSmarthost(t, "")
	c := testConfig(t)
	c.Relay.Smarthost = host.addr
	s := startServer(t, c)
	dev := newDevice(t, s, 198036, deviceOpts{password: "secret"})

	ctx := context.Background()
	id, err := dev.ua.Submit(ctx, &ua.Message{To: []string{"Bob <bob@example.com>"}, Cc: []string{"carol@example.org"},
		Bcc: []string{"dave@example.net"}, Subject: "Hello over EMSD", Body: []byte("First line.\nSecond line.\n")})
	must(t, err)
	m := host.next(t)
	if m.from != "198.036@emsd.test" {
		t.Errorf("envelope from %q", m.from)
	}
	if want := []string{"bob@example.com", "carol@example.org", "dave@example.net"}; !slices.Equal(m.to, want) {
		t.Errorf("envelope to %v, want %v", m.to, want)
	}
	msg, err := mail.ReadMessage(bytes.NewReader(m.data))
	must(t, err)
	for k, want := range map[string]string{
		"From":       "198.036@emsd.test",
		"To":         "Bob <bob@example.com>",
		"Cc":         "carol@example.org",
		"Subject":    "Hello over EMSD",
		"Message-Id": fmt.Sprintf("<EMSD.%08x.%08x@emsd.test>", uint32(id.SubmissionTime), id.Number),
		"Bcc":        "",
	} {
		if got := msg.Header.Get(k); got != want {
			t.Errorf("%s: %q, want %q", k, got, want)
		}
	}
	if d, err := msg.Header.Date(); err != nil || d.Unix() != int64(id.SubmissionTime) {
		t.Errorf("Date %v (%v), want the submission time %v", d, err, id.SubmissionTime.UTC())
	}
	body := new(bytes.Buffer)
	body.ReadFrom(msg.Body)
	if got := strings.ReplaceAll(body.String(), "\r\n", "\n"); got != "First line.\nSecond line.\n" {
		t.Errorf("body %q", got)
	}
	eventually(t, "relay recorded as sent", func() bool {
		return queueStats(t, s).Relays[store.RelaySent] == 3
	})
	host.none(t, 200*time.Millisecond)
}

// Mail between two local devices never leaves the server; Bcc recipients
// are hidden from the others; every device gets the same local message id.
func TestSubmitBetweenDevices(t *testing.T) {
	host := startSmarthost(t, "")
	c := testConfig(t)
	c.Relay.Smarthost = host.addr
	s := startServer(t, c)
	a := newDevice(t, s, 198036, deviceOpts{password: "pa"})
	b := newDevice(t, s, 198037, deviceOpts{mode: store.ModeEfficient, aliases: []string{"bob@example.net"}})
	cc := newDevice(t, s, 198038, deviceOpts{})
	bcc := newDevice(t, s, 198039, deviceOpts{})

	id, err := a.ua.Submit(context.Background(), &ua.Message{To: []string{"198.037"}, Cc: []string{"EMSD198.038"},
		Bcc: []string{"198.039@emsd.test"}, Subject: "Local", Body: []byte("between devices\n"), DeliveryReport: true})
	must(t, err)
	want := emsd.MessageID{IsLocal: true, Local: id}
	for _, d := range []*testDevice{b, cc, bcc} {
		del := d.next(t)
		if del.MessageID != want || del.IPM.Heading.Subject != "Local" || string(del.IPM.Body.Text) != "between devices\n" {
			t.Errorf("%s got %s %q", d.addr, del.MessageID, del.IPM.Heading.Subject)
		}
		if del.SubmissionTime.Unix() != int64(id.SubmissionTime) {
			t.Errorf("%s: submission time %v", d.addr, del.SubmissionTime)
		}
		var rcpts []string
		for _, r := range del.IPM.Heading.Recipients {
			rcpts = append(rcpts, r.Recipient.String())
		}
		wantR := []string{"198.037", "198.038"}
		if d == bcc {
			wantR = append(wantR, "198.039") // written as local (copyFor)
		}
		if !slices.Equal(rcpts, wantR) {
			t.Errorf("%s sees recipients %v, want %v", d.addr, rcpts, wantR)
		}
	}
	// The originator asked for delivery reports: three of them come back,
	// as notices since the UA accepts only IPMs (delivery.reports auto).
	var reported []string
	for range 3 {
		del := a.next(t)
		if !strings.Contains(string(del.IPM.Body.Text), id.String()) || del.IPM.Heading.Subject != "Delivery report" {
			t.Errorf("report %q: %q", del.IPM.Heading.Subject, del.IPM.Body.Text)
		}
		reported = append(reported, string(del.IPM.Body.Text))
	}
	for _, r := range []string{"198.037", "198.038", "198.039"} {
		if !slices.ContainsFunc(reported, func(s string) bool { return strings.Contains(s, r+": delivered") }) {
			t.Errorf("no delivery report for %s in %q", r, reported)
		}
	}
	host.none(t, 200*time.Millisecond)
	// Delivery verify answers from the recorded status of the exact id.
	st, err := b.ua.DeliveryVerify(context.Background(), want)
	must(t, err)
	if st != emsd.DeliveryReportSent {
		t.Errorf("delivery verify %d, want 2", st)
	}
	st, err = b.ua.DeliveryVerify(context.Background(), emsd.RFC822ID("<nothing@x>"))
	must(t, err)
	if st != emsd.NoReportSent {
		t.Errorf("delivery verify of an unknown id %d, want 1", st)
	}
}

// Internet mail over SMTP reaches the device; unknown recipients are
// refused at RCPT; oversize mail is refused.
func TestInboundSMTP(t *testing.T) {
	c := testConfig(t)
	c.SMTP.MaxMessageBytes = 64 << 10
	s := startServer(t, c)
	dev := newDevice(t, s, 198036, deviceOpts{aliases: []string{"Alice@Example.NET"}})
	other := newDevice(t, s, 198037, deviceOpts{mode: store.ModeEfficient})

	msg := "From: Carol Sender <carol@example.com>\r\nTo: alice@example.net\r\nCc: 198.037@EMSD.test\r\n" +
		"Subject: Inbound\r\nMessage-ID: <in1@example.com>\r\nDate: Thu, 26 Nov 2026 07:00:00 +0000\r\n\r\nHello device.\r\n"
	must(t, sendMail(s, "carol@example.com", []string{"alice@example.net", "198.037@emsd.test"}, msg))
	var ids []emsd.MessageID
	for _, d := range []*testDevice{dev, other} {
		del := d.next(t)
		// Delivered under the server's id for this message; the sender's
		// Message-ID rides along for the device's mail file.
		ids = append(ids, del.MessageID)
		if !del.MessageID.IsLocal || mailconv.SenderMessageID(del.IPM) != "<in1@example.com>" || del.IPM.Heading.Subject != "Inbound" ||
			!strings.Contains(string(del.IPM.Body.Text), "Hello device.") {
			t.Errorf("%s: %s %q %q", d.addr, del.MessageID, del.IPM.Heading.Subject, del.IPM.Body.Text)
		}
		if del.IPM.Heading.Originator.String() != "Carol Sender <carol@example.com>" {
			t.Errorf("originator %s", del.IPM.Heading.Originator)
		}
		if want := time.Date(2026, 11, 26, 7, 0, 0, 0, time.UTC); !del.SubmissionTime.Equal(want) {
			t.Errorf("submission time %v", del.SubmissionTime)
		}
	}
	if ids[0] != ids[1] {
		t.Errorf("one message, two ids: %v", ids)
	}
	var se *smtp.SMTPError
	err := sendMail(s, "carol@example.com", []string{"nobody@emsd.test"}, msg)
	if !errors.As(err, &se) || se.Code != 550 {
		t.Errorf("unknown recipient: %v, want 550", err)
	}
	err = sendMail(s, "carol@example.com", []string{"198.999@emsd.test"}, msg)
	if !errors.As(err, &se) || se.Code != 550 {
		t.Errorf("unregistered number: %v, want 550", err)
	}
	big := msg + strings.Repeat("x", 100<<10) + "\r\n"
	err = sendMail(s, "carol@example.com", []string{"alice@example.net"}, big)
	if !errors.As(err, &se) || se.Code != 552 {
		t.Errorf("oversize: %v, want 552", err)
	}
	dev.none(t, 200*time.Millisecond)
}

// A 10 KB message is segmented both ways: submitted in segments, stored,
// delivered in segments to another device; and inbound over SMTP.
func TestSegmentedBothWays(t *testing.T) {
	s := startServer(t, testConfig(t))
	a := newDevice(t, s, 198036, deviceOpts{})
	b := newDevice(t, s, 198037, deviceOpts{mode: store.ModeEfficient})
	var body strings.Builder
	for i := 0; body.Len() < 10<<10; i++ {
		fmt.Fprintf(&body, "Line %04d of a long EMSD test body, to force segmentation.\n", i)
	}
	before := s.ep.Stats()
	_, err := a.ua.Submit(context.Background(), &ua.Message{To: []string{"198.037"}, Subject: "Big", Body: []byte(body.String())})
	must(t, err)
	del := b.next(t)
	if string(del.IPM.Body.Text) != body.String() {
		t.Errorf("segmented delivery: body of %d octets, want %d", len(del.IPM.Body.Text), body.Len())
	}
	after := s.ep.Stats()
	if n := after.InvokesReceived - before.InvokesReceived; n < 7 {
		t.Errorf("%d INVOKEs received for a 10 KB submission, want at least 7 segments", n)
	}
	if n := after.InvokesSent - before.InvokesSent; n < 7 {
		t.Errorf("%d INVOKEs sent for a 10 KB delivery, want at least 7 segments", n)
	}

	msg := "From: carol@example.com\r\nTo: 198.036@emsd.test\r\nSubject: Big inbound\r\n\r\n" +
		strings.ReplaceAll(body.String(), "\n", "\r\n")
	must(t, sendMail(s, "carol@example.com", []string{"198.036@emsd.test"}, msg))
	del = a.next(t)
	if string(del.IPM.Body.Text) != body.String() {
		t.Errorf("segmented inbound: body of %d octets, want %d", len(del.IPM.Body.Text), body.Len())
	}
}
