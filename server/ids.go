package server

import (
	"fmt"
	"strings"

	"github.com/esro-emsdp/emsdp/emsd"
)

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
