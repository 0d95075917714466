package mailconv

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
)

func BenchmarkParseMessage(b *testing.B) {
	for _, size := range []int{1 << 10, 10 << 10, 100 << 10} {
		text := strings.Repeat("Ein Absatz mit Umlauten: äöü, und noch etwas Text.\n", size/52+1)
		msg := []byte(crlfText("From: Alice <alice@example.com>\nTo: 198.036@emsd.example.test\nSubject: bench\n" +
			"MIME-Version: 1.0\nContent-Type: multipart/alternative; boundary=b\n\n--b\n" +
			"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n" + text +
			"--b\nContent-Type: text/html; charset=utf-8\n\n<p>" + text + "</p>\n--b--\n"))
		b.Run(byteSize(size), func(b *testing.B) {
			b.SetBytes(int64(len(msg)))
			for b.Loop() {
				if _, err := ParseMessage(msg, testMapping, ParseOptions{}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkFormatIPM(b *testing.B) {
	ipm := &emsd.IPM{Heading: emsd.Heading{
		Originator: emsd.LocalOR(198036, "Jörg"),
		Recipients: []emsd.RecipientData{{Recipient: emsd.RFC822OR("bob@example.com")}, {Recipient: emsd.LocalOR(198037, "")}},
		Subject:    "Grüße",
	}, Body: &emsd.Body{Text: []byte(strings.Repeat("Zeile mit Umlaut ä.\n", 500))}}
	b.SetBytes(int64(len(ipm.Body.Text)))
	for b.Loop() {
		if _, err := FormatIPM(ipm, FormatOptions{Domain: testDomain, Date: time.Unix(0, 0)}); err != nil {
			b.Fatal(err)
		}
	}
}

func byteSize(n int) string { return strconv.Itoa(n>>10) + "KiB" }
