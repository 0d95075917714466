package server

import (
	"slices"
	"strings"
	"testing"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/mailconv"
)

// The Message-ID of a submitted message is <EMSD.%08x.%08x@domain> of its
// local id (Open Point 10), the same text the gateway writes into
// In-Reply-To for a reply to it, so that replies and reports correlate.
// (It once printed the hex of the time's RFC 3339 text, seen in the
// interop run against the reference UA.)
func TestRFC822MessageID(t *testing.T) {
	for _, tc := range []struct {
		id   emsd.LocalMessageID
		want string
	}{
		{emsd.LocalMessageID{SubmissionTime: 0x6b080854, Number: 0x1a}, "<EMSD.6b080854.0000001a@emsd.test>"},
		{emsd.LocalMessageID{SubmissionTime: 0x325d8221, Number: 1}, "<EMSD.325d8221.00000001@emsd.test>"},
		{emsd.LocalMessageID{SubmissionTime: 0, Number: 0xffffffff}, "<EMSD.00000000.ffffffff@emsd.test>"},
	} {
		if got := rfc822MessageID(tc.id, "emsd.test"); got != tc.want {
			t.Errorf("rfc822MessageID(%s) = %q, want %q", tc.id, got, tc.want)
		}
		reply := &emsd.IPM{Heading: emsd.Heading{Originator: emsd.LocalOR(198037, ""),
			Recipients: []emsd.RecipientData{{Recipient: emsd.LocalOR(198036, "")}},
			RepliedTo:  &emsd.MessageID{IsLocal: true, Local: tc.id}}}
		out, err := mailconv.FormatIPM(reply, mailconv.FormatOptions{Domain: "emsd.test"})
		must(t, err)
		if !containsLine(string(out.Message), "In-Reply-To: "+tc.want) {
			t.Errorf("a reply to %s does not carry In-Reply-To: %s:\n%s", tc.id, tc.want, out.Message)
		}
	}
}

func containsLine(msg, line string) bool {
	return slices.Contains(strings.Split(strings.ReplaceAll(msg, "\r\n", "\n"), "\n"), line)
}
