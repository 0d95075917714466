package ua

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/internal/captures"
)

// answers is an esro.ResponseWriter that records what the client answers.
type answers struct {
	results, errors int
	value           uint8
	data            []byte
}

func (a *answers) Result(_ esro.Encoding, data []byte) error {
	a.results++
	a.data = data
	return nil
}

func (a *answers) Error(_ esro.Encoding, value uint8, data []byte) error {
	a.errors++
	a.value, a.data = value, data
	return nil
}

func (a *answers) Confirmed(context.Context) error { return nil }

// FuzzReceive feeds arbitrary INVOKEs to the performer side: it never
// panics, answers every INVOKE exactly once, with an empty RESULT for a
// delivery, a decodable result for submission verify, or an EMSD ERROR 1..7
// carrying its code as ErrorParameter (§1.6).
func FuzzReceive(f *testing.F) {
	for _, s := range captures.All() {
		for _, dg := range s.Datagrams {
			if p, err := esro.ParsePDU(dg.Payload); err == nil && p.Type == esro.TypeInvoke && (p.SAP == 3 || p.SAP == 7) {
				f.Add(p.SAP, p.Operation, uint8(p.Encoding), p.Data)
			}
		}
	}
	f.Add(uint8(3), uint8(35), uint8(0), []byte{0})
	conn, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	ep, err := esro.NewEndpoint(conn, nil)
	if err != nil {
		f.Fatal(err)
	}
	defer ep.Close()
	c, err := New(ep, Config{Address: 198036, Logger: testLogger(f),
		Handler: HandlerFunc(func(_ context.Context, d *Delivery) error {
			if d.IPM == nil || d.IPM.Body == nil {
				f.Error("delivery without IPM or body")
			}
			return nil
		})})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, sap, op, enc uint8, data []byte) {
		inv := &esro.Invocation{SAP: 3 + 4*(sap&1), Operation: op % 64, Encoding: esro.Encoding(enc % 4), Data: data}
		inv.Handshake = esro.ThreeWay
		if inv.SAP == 7 {
			inv.Handshake = esro.TwoWay
		}
		var a answers
		c.serve(t.Context(), &a, inv)
		if a.results+a.errors != 1 {
			t.Fatalf("%d results and %d errors", a.results, a.errors)
		}
		switch {
		case a.errors == 1:
			if a.value < 1 || a.value > 7 || !bytes.Equal(a.data, []byte{2, 1, a.value}) {
				t.Fatalf("ERROR %d % x", a.value, a.data)
			}
		case inv.Operation == uint8(emsd.OpSubmissionVerify):
			var r emsd.SubmissionVerifyResult
			if err := r.Unmarshal(a.data, emsd.Options{}); err != nil || r.Status != emsd.DropMessage {
				t.Fatalf("verify result % x: %v", a.data, err)
			}
		default:
			if len(a.data) != 0 {
				t.Fatalf("RESULT with data % x", a.data)
			}
		}
	})
}

// FuzzParseAddress: ParseAddress never panics, and what it accepts can be
// sent: it encodes, and a local address reads back from its text form.
func FuzzParseAddress(f *testing.F) {
	for _, s := range []string{"198.036", "EMSD=198.036", "EMSD198.037", `"EMSD=1.2"`, "1.2.3", "4294967295", "bob@example.com",
		"Bob <bob@example.com>", "Jörg <jörg@example.de>", "x", "", "1..2", "a@b, c@d"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		a, err := ParseAddress(s)
		if err != nil {
			return
		}
		ipm := emsd.IPM{Heading: emsd.Heading{Originator: a, Recipients: []emsd.RecipientData{{Recipient: a}}}}
		if _, err := ipm.Marshal(emsd.Options{}); err != nil {
			t.Fatalf("%q: accepted but does not encode: %v", s, err)
		}
		if a.IsLocal {
			if b, err := ParseAddress(a.Local.String()); err != nil || b != a {
				t.Fatalf("%q: %v does not read back: %v %v", s, a, b, err)
			}
		}
	})
}

// FuzzParseMessageID: accepted ids encode in a verify argument.
func FuzzParseMessageID(f *testing.F) {
	for _, s := range []string{"325d8221.00000001", "325D8221.1", "<a@b>", "", "1.2.3", strings.Repeat("x", 200)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := ParseMessageID(s)
		if err != nil {
			return
		}
		if _, err := (&emsd.DeliveryVerifyArgument{MessageID: id}).Marshal(emsd.Options{}); err != nil {
			t.Fatalf("%q: accepted but does not encode: %v", s, err)
		}
	})
}

// FuzzFileVerifyList reads arbitrary file contents without panicking, and
// finds an id added afterwards.
func FuzzFileVerifyList(f *testing.F) {
	f.Add([]byte("325d8221.00000001\n6b07d9d0.00000007\n"))
	f.Add([]byte("\n\n\x00\xff"))
	f.Fuzz(func(t *testing.T, content []byte) {
		path := filepath.Join(t.TempDir(), "verify")
		must(t, os.WriteFile(path, content, 0o600))
		l := NewFileVerifyList(path, 5)
		id := emsd.LocalMessageID{SubmissionTime: 0x6b07d9d0, Number: 99}
		l.Contains(emsd.MessageID{IsLocal: true, Local: id})
		if err := l.Add(id); err != nil {
			t.Fatal(err)
		}
		if ok, err := l.Contains(emsd.RFC822ID(strings.ToUpper(id.String()))); !ok && err == nil {
			t.Fatal("added id not found")
		}
	})
}
