package server

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/esro-emsdp/emsdp/emsd"
)

// Message ids and addresses are kept in the store as text with a kind
// prefix, so that a local id and an rfc822 id with the same text never
// meet: "L:%08x.%08x" or "R:<rfc822 text>"; "L:<number>" or "R:<text>" for
// an ORAddress.

func encodeMsgID(m emsd.MessageID) string {
	if m.IsLocal {
		return "L:" + m.Local.String()
	}
	return "R:" + m.RFC822
}

// idText is a stored id as the CLI and the devices show it
// ("6b17127c.00000003" or "<a@b>"), for logs.
func idText(stored string) string {
	if m, err := decodeMsgID(stored); err == nil {
		return m.String()
	}
	return stored
}

var errBadStoredID = errors.New("server: malformed stored id")

func decodeMsgID(s string) (emsd.MessageID, error) {
	switch {
	case strings.HasPrefix(s, "L:"):
		id, err := emsd.ParseLocalMessageID(s[2:])
		if err != nil {
			return emsd.MessageID{}, fmt.Errorf("%w %q: %v", errBadStoredID, s, err)
		}
		return emsd.MessageID{IsLocal: true, Local: id}, nil
	case strings.HasPrefix(s, "R:"):
		return emsd.RFC822ID(s[2:]), nil
	}
	return emsd.MessageID{}, fmt.Errorf("%w %q", errBadStoredID, s)
}

func encodeOR(a emsd.ORAddress) string {
	if a.IsLocal {
		return "L:" + strconv.FormatUint(uint64(a.Local), 10)
	}
	return "R:" + a.RFC822
}

func decodeOR(s string) emsd.ORAddress {
	if v, ok := strings.CutPrefix(s, "L:"); ok {
		if n, err := strconv.ParseUint(v, 10, 32); err == nil {
			return emsd.LocalOR(emsd.Address(n), "")
		}
	}
	return emsd.RFC822OR(strings.TrimPrefix(s, "R:"))
}

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
