package ua

import (
	"bytes"
	"errors"
	"io"
	"mime"
	"net/mail"
	"os"
	"path/filepath"
	"strings"
	"testing"

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
