package server

import (
	"fmt"
	"strings"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/server/internal/storedid"
)

// The stored forms of message ids and O/R addresses are storedid's; these
// are its functions under the names the delivery scheduler (deliver.go)
// and the tests use.

func encodeMsgID(m emsd.MessageID) string { return storedid.MessageID(m).String() }

func decodeMsgID(s string) (emsd.MessageID, error) { return storedid.ParseMessageID(s) }

// idText is a stored id as the CLI and the devices show it, for logs.
func idText(stored string) string { return storedid.Text(stored) }

func encodeOR(a emsd.ORAddress) string { return storedid.Address(a).String() }

func decodeOR(s string) emsd.ORAddress { return storedid.ParseAddress(s) }

// rfc822MessageID is the Message-ID a submitted message gets on the
// Internet, derived from its local id (Open Point 10), so that a report or
// a reply can be matched to the submission.
func rfc822MessageID(id emsd.LocalMessageID, domain string) string {
	// emsd.Time is a fmt.Stringer: without the conversion %08x would print
	// the hex of its RFC 3339 text.
	return fmt.Sprintf("<EMSD.%08x.%08x@%s>", uint32(id.SubmissionTime), id.Number, domain)
}

// lowerDomain lower-cases the domain of an addr-spec (local parts are case
// sensitive in principle, domains never are).
func lowerDomain(spec string) string {
	i := strings.LastIndexByte(spec, '@')
	if i < 0 {
		return spec
	}
	return spec[:i+1] + strings.ToLower(spec[i+1:])
}
