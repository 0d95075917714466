package mailconv

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
)

// Two mails with the same octets converted in the same second are two
// messages: an invented id never derives from the content.
func TestInventedIDsDiffer(t *testing.T) {
	now := time.Date(2026, 11, 26, 8, 0, 0, 0, time.UTC)
	msg := []byte("From: monitor@example.com\r\nTo: 198.036@" + testDomain + "\r\nSubject: disk full\r\n\r\nsda1 at 99%\r\n")
	tests := []struct {
		name    string
		numbers []uint32 // the server's counter; 0 = none given
	}{
		{"server counter", []uint32{1, 2, 3}},
		{"no counter", []uint32{0, 0, 0, 0, 0, 0, 0, 0}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			seen := map[string]bool{}
			for _, n := range tt.numbers {
				in, err := ParseMessage(msg, testMapping, ParseOptions{Now: now, Number: n, KeepMessageID: true})
				if err != nil {
					t.Fatal(err)
				}
				if !in.InventedID || !strings.HasPrefix(in.MessageID, fmt.Sprintf("<EMSD.%08x.", uint32(emsd.TimeOf(now)))) {
					t.Fatalf("id %q invented=%v", in.MessageID, in.InventedID)
				}
				if n != 0 && !strings.Contains(in.MessageID, fmt.Sprintf(".%08x@", n)) {
					t.Errorf("id %q does not carry the counter %d", in.MessageID, n)
				}
				if seen[in.MessageID] {
					t.Fatalf("id %q invented twice", in.MessageID)
				}
				seen[in.MessageID] = true
				// An invented id is the server's: it is not carried as the
				// sender's Message-ID.
				if id := SenderMessageID(in.IPM); id != "" {
					t.Errorf("invented id carried as the sender's: %q", id)
				}
			}
		})
	}
}

// KeepMessageID carries the sender's Message-ID as the first extension,
// and it survives a full extension list and the heading budget.
func TestKeepMessageID(t *testing.T) {
	var extra strings.Builder
	for i := range 100 {
		fmt.Fprintf(&extra, "X-Extra-%03d: %s\r\n", i, strings.Repeat("v", 200))
	}
	base := "From: a@example.com\r\nTo: 198.036@" + testDomain + "\r\nMessage-ID: <same@example.com>\r\n"
	tests := []struct {
		name, msg string
		keep      bool
		want      string
	}{
		{"kept", base + "Subject: x\r\n\r\nbody\r\n", true, "<same@example.com>"},
		{"not asked", base + "Subject: x\r\n\r\nbody\r\n", false, ""},
		{"full heading", base + extra.String() + "\r\nbody\r\n", true, "<same@example.com>"},
		{"unusable id", "From: a@example.com\r\nMessage-ID: not an id\r\n\r\nx\r\n", true, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in, err := ParseMessage([]byte(tt.msg), testMapping, ParseOptions{Number: 9, KeepMessageID: tt.keep, MaxContent: MinMaxContent})
			if err != nil {
				t.Fatal(err)
			}
			if got := SenderMessageID(in.IPM); got != tt.want {
				t.Errorf("carried %q, want %q", got, tt.want)
			}
			if len(in.IPM.Heading.Extensions) > emsd.MaxExtensions {
				t.Errorf("%d extensions", len(in.IPM.Heading.Extensions))
			}
			if _, err := in.IPM.Marshal(emsd.Options{}); err != nil {
				t.Fatal(err)
			}
			// The carried id never reaches the Internet a second time: the
			// formatter writes its own Message-ID only.
			out, err := FormatIPM(in.IPM, FormatOptions{Domain: testDomain, MessageID: "<server@x>"})
			if err != nil {
				t.Fatal(err)
			}
			if n := strings.Count(strings.ToLower(string(out.Message)), "\r\nmessage-id:"); n != 1 {
				t.Errorf("%d Message-ID fields:\n%s", n, out.Message)
			}
		})
	}
}
