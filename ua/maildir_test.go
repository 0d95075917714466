package ua

import (
	"bytes"
	"errors"
	"io"
	"mime"
	"net/mail"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/ua/uatest"
)

// maildirIDs counts the messages in dir/new by Message-ID.
func maildirIDs(t testing.TB, dir string) map[string]int {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(dir, "new"))
	must(t, err)
	ids := map[string]int{}
	for _, e := range ents {
		m := readMail(t, filepath.Join(dir, "new", e.Name()))
		ids[m.Header.Get("Message-Id")]++
	}
	if tmp, _ := os.ReadDir(filepath.Join(dir, "tmp")); len(tmp) != 0 {
		t.Fatalf("%d files left in tmp/", len(tmp))
	}
	return ids
}

func readMail(t testing.TB, path string) *mail.Message {
	t.Helper()
	b, err := os.ReadFile(path)
	must(t, err)
	m, err := mail.ReadMessage(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("%s: %v\n%s", path, err, b)
	}
	return m
}

func TestMaildir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "Maildir")
	md, err := NewMaildir(dir, "emsd.example")
	must(t, err)
	m, d := udpPair(t, Config{Handler: md})
	ipm := testIPM("Grüße, 🌍", []byte("Hällo Welt\n"))
	ipm.Heading.Originator = emsd.LocalOR(198037, "")
	ipm.Heading.MIMEContentType = "text/plain; charset=utf-8"
	if err := m.Deliver(t.Context(), d.addr, emsd.LocalID(0x6b07d9d0, 7), ipm, uatest.DeliverOptions{}); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(filepath.Join(dir, "new"))
	must(t, err)
	if len(ents) != 1 || strings.ContainsAny(ents[0].Name(), "/:") {
		t.Fatalf("new/ has %v", ents)
	}
	msg := readMail(t, filepath.Join(dir, "new", ents[0].Name()))
	subject, err := new(mime.WordDecoder).DecodeHeader(msg.Header.Get("Subject"))
	must(t, err)
	from, err := mail.ParseAddress(msg.Header.Get("From"))
	must(t, err)
	body, _ := io.ReadAll(msg.Body)
	if subject != "Grüße, 🌍" || from.Address != "198.037@emsd.example" || msg.Header.Get("Message-Id") != "<EMSD.6b07d9d0.00000007@emsd.example>" {
		t.Fatalf("header %v (subject %q)", msg.Header, subject)
	}
	if !strings.Contains(string(body), "H") || msg.Header.Get("Date") == "" {
		t.Fatalf("body %q", body)
	}

	// A store that fails (tmp/ is gone) is a transient error: the MTS
	// keeps the message; once the store works again it is delivered.
	must(t, os.RemoveAll(filepath.Join(dir, "tmp")))
	err = m.Deliver(t.Context(), d.addr, emsd.RFC822ID("<second@example.com>"), testIPM("second", []byte("x\n")), uatest.DeliverOptions{})
	var er *esro.ErrorReply
	if !errors.As(err, &er) || er.Value != uint8(emsd.CodeResource) {
		t.Fatalf("err %v, want ERROR 6", err)
	}
	must(t, os.Mkdir(filepath.Join(dir, "tmp"), 0o700))
	if err := m.Deliver(t.Context(), d.addr, emsd.RFC822ID("<second@example.com>"), testIPM("second", []byte("x\n")), uatest.DeliverOptions{}); err != nil {
		t.Fatal(err)
	}
	if ids := maildirIDs(t, dir); ids["<second@example.com>"] != 1 || len(ids) != 2 {
		t.Fatalf("maildir %v", ids)
	}
	if _, err := NewMaildir(filepath.Join(dir, "new", ents[0].Name()), "x"); err == nil {
		t.Fatal("maildir inside a file")
	}
}

// The file Store writes: LF line ends, then Return-Path, Delivered-To and
// a Received: for the EMSD hop before the message, byte for byte.
func TestMaildirBytes(t *testing.T) {
	host, err := os.Hostname()
	if err != nil || host == "" || strings.ContainsAny(host, " \t\r\n;()") {
		host = "localhost"
	}
	md := openTestMaildir(t, t.TempDir(), MaildirConfig{KeepDuplicates: true})
	ipm := testIPM("Lunch", []byte("Hello device.\nSecond line.\n"))
	ipm.Heading.Originator = emsd.RFC822OR("Carol <carol@example.com>")
	ipm.Heading.Recipients = []emsd.RecipientData{{Recipient: emsd.LocalOR(198036, "")}}
	d := &Delivery{MessageID: emsd.RFC822ID("<m1@example.com>"), DeliveryTime: t0, SubmissionTime: t0.Add(-time.Minute),
		Version: emsd.V1_1, From: netip.MustParseAddrPort("127.0.0.1:2002"), Recipient: 198036, IPM: ipm}
	path, err := md.Store(d)
	must(t, err)
	got, err := os.ReadFile(path)
	must(t, err)
	want := "Return-Path: <carol@example.com>\n" +
		"Delivered-To: 198.036@emsd.example\n" +
		"Received: from [127.0.0.1]\n\tby " + host + " (emsdp ua, EMSD 1.1) with EMSD id <m1@example.com>\n" +
		"\tfor <198.036@emsd.example>; " + t0.UTC().Format("Mon, 02 Jan 2006 15:04:05 -0700") + "\n"
	if !strings.HasPrefix(string(got), want) {
		t.Fatalf("file starts\n%s\nwant\n%s", got[:min(len(got), len(want)+40)], want)
	}
	if bytes.Contains(got, []byte("\r")) {
		t.Error("CR in a Maildir file")
	}
	if !bytes.HasSuffix(got, []byte("\n\nHello device.\nSecond line.\n")) {
		t.Errorf("file ends %q", got[max(0, len(got)-60):])
	}
	m, err := mail.ReadMessage(bytes.NewReader(got))
	must(t, err)
	if m.Header.Get("To") != "198.036@emsd.example" || m.Header.Get("Subject") != "Lunch" || m.Header.Get("Message-Id") != "<m1@example.com>" {
		t.Errorf("header %v", m.Header)
	}
}

// A device the sender addressed by an alias is shown by it, as addressed;
// the extension recording it is not shown.
func TestMaildirAlias(t *testing.T) {
	md := openTestMaildir(t, t.TempDir(), MaildirConfig{KeepDuplicates: true})
	ipm := testIPM("hi", []byte("x\n"))
	ipm.Heading.Originator = emsd.RFC822OR("carol@example.com")
	ipm.Heading.Recipients = []emsd.RecipientData{{Recipient: emsd.LocalOR(198036, "")}, {Recipient: emsd.LocalOR(198037, "")}}
	ipm.Heading.Extensions = []emsd.Extension{{Label: "X-EMSD-Addressed-As", Value: "198.036 Alice@Example.NET"}}
	d := &Delivery{MessageID: emsd.RFC822ID("<a1@example.com>"), DeliveryTime: t0, Version: emsd.V1_1, Recipient: 198036, IPM: ipm}
	path, err := md.Store(d)
	must(t, err)
	b, err := os.ReadFile(path)
	must(t, err)
	m, err := mail.ReadMessage(bytes.NewReader(b))
	must(t, err)
	if m.Header.Get("To") != "Alice@Example.NET, 198.037@emsd.example" || m.Header.Get("X-Emsd-Addressed-As") != "" ||
		m.Header.Get("Delivered-To") != "198.036@emsd.example" {
		t.Errorf("header %v", m.Header)
	}
}

// An EMSD report (content type 2) is stored as a multipart/report a mail
// reader shows as a delivery status notification.
func TestMaildirReport(t *testing.T) {
	dir := t.TempDir()
	md := openTestMaildir(t, dir, MaildirConfig{})
	diag := emsd.DiagRecipientUnknown
	d := &Delivery{MessageID: emsd.LocalID(0x6b07d9e0, 9), DeliveryTime: t0, Version: emsd.V1_1,
		From: netip.MustParseAddrPort("127.0.0.1:2002"), Recipient: 198036,
		Report: &emsd.ReportDelivery{ReportedMessageID: emsd.LocalID(0x6b07d9d0, 7), Recipients: []emsd.PerRecipReportData{
			{Recipient: emsd.LocalOR(198037, ""), Delivery: &emsd.DeliveryReport{DeliveryTime: emsd.TimeOf(t0)}},
			{Recipient: emsd.RFC822OR("bob@example.com"), NonDelivery: &emsd.NonDeliveryReport{Reason: emsd.ReasonUnableToTransfer,
				Diagnostic: &diag, Explanation: "550 5.1.1 no such user"}},
			{Recipient: emsd.RFC822OR("Dave <dave@example.org>"), Delivery: &emsd.DeliveryReport{DeliveryTime: emsd.TimeOf(t0)}},
		}}}
	path, err := md.Store(d)
	must(t, err)
	if again, err := md.Store(d); again != "" || err != nil {
		t.Errorf("a re-delivered report stored again: %q %v", again, err)
	}
	b, err := os.ReadFile(path)
	must(t, err)
	if bytes.Contains(b, []byte("\r")) {
		t.Error("CR in a Maildir file")
	}
	m, err := mail.ReadMessage(bytes.NewReader(b))
	must(t, err)
	mt, params, err := mime.ParseMediaType(m.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/report" || params["report-type"] != "delivery-status" ||
		m.Header.Get("Return-Path") != "<>" || m.Header.Get("In-Reply-To") != "<EMSD.6b07d9d0.00000007@emsd.example>" ||
		m.Header.Get("To") != "198.036@emsd.example" {
		t.Fatalf("header %v", m.Header)
	}
	body, _ := io.ReadAll(m.Body)
	for _, want := range []string{
		"Final-Recipient: rfc822; 198.037@emsd.example\nAction: delivered\nStatus: 2.0.0\n",
		"Final-Recipient: rfc822; dave@example.org\nAction: relayed\nStatus: 2.0.0\n",
		"Final-Recipient: rfc822; bob@example.com\nAction: failed\nStatus: 5.1.1\n" +
			"Diagnostic-Code: x-emsd; unable-to-transfer (reason 1), recipient-unknown (diagnostic 11): 550 5.1.1 no such user\n",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("report lacks %q:\n%s", want, body)
		}
	}
}
