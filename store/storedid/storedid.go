// Package storedid is the one codec of the ids the server keeps in its
// store as text: message ids and O/R addresses, each with a kind prefix,
// so that a local id and an rfc822 id with the same text never meet.
//
//	message id  "L:%08x.%08x" (a local id)  or "R:<rfc822 text>"
//	O/R address "L:<number>"  (a device)    or "R:<rfc822 text>"
//
// Everything the server writes into a store.Report or a delivery's
// message id goes through here, and the admin commands read through it,
// so the prefixes are written in one place.
package storedid

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/esro-emsdp/emsdp/emsd"
)

const (
	local  = "L:"
	rfc822 = "R:"
)

// ErrMalformed is a stored message id that is neither form.
var ErrMalformed = errors.New("malformed stored id")

// MessageID is a message id in its stored form: String encodes it,
// ParseMessageID decodes it.
type MessageID emsd.MessageID

// String is the stored text.
func (m MessageID) String() string {
	if m.IsLocal {
		return local + m.Local.String()
	}
	return rfc822 + m.RFC822
}

// ParseMessageID decodes a stored message id; a text of neither form is
// ErrMalformed.
func ParseMessageID(s string) (emsd.MessageID, error) {
	switch {
	case strings.HasPrefix(s, local):
		id, err := emsd.ParseLocalMessageID(s[len(local):])
		if err != nil {
			return emsd.MessageID{}, fmt.Errorf("%w %q: %v", ErrMalformed, s, err)
		}
		return emsd.MessageID{IsLocal: true, Local: id}, nil
	case strings.HasPrefix(s, rfc822):
		return emsd.RFC822ID(s[len(rfc822):]), nil
	}
	return emsd.MessageID{}, fmt.Errorf("%w %q", ErrMalformed, s)
}

// Text is a stored message id as the CLI and the devices show it
// ("6b17127c.00000003" or "<a@b>"), for logs; a malformed one as it is.
func Text(stored string) string {
	if m, err := ParseMessageID(stored); err == nil {
		return m.String()
	}
	return stored
}

// Address is an O/R address in its stored form: String encodes it,
// ParseAddress decodes it.
type Address emsd.ORAddress

// String is the stored text.
func (a Address) String() string {
	if a.IsLocal {
		return local + strconv.FormatUint(uint64(a.Local), 10)
	}
	return rfc822 + a.RFC822
}

// Internet is the stored form of the Internet address spec.
func Internet(spec string) string { return rfc822 + spec }

// ParseAddress decodes a stored O/R address. It never fails: a text that
// is not a device number is an rfc822 address (the kind prefix, if any,
// removed), which is how reports name a recipient the server could not
// parse.
func ParseAddress(s string) emsd.ORAddress {
	if v, ok := strings.CutPrefix(s, local); ok {
		if n, err := strconv.ParseUint(v, 10, 32); err == nil {
			return emsd.LocalOR(emsd.Address(n), "")
		}
	}
	return emsd.RFC822OR(strings.TrimPrefix(s, rfc822))
}

// InternetSpec is the Internet address of a stored rfc822 O/R address,
// the text without its prefix.
func InternetSpec(stored string) string { return strings.TrimPrefix(stored, rfc822) }

// Shown is a stored message id or report recipient as the CLI, the
// devices and the logs show it: "L:6b17127c.00000003" is
// 6b17127c.00000003, "L:198037" the device 198.037, "R:<a@b>" <a@b>.
// A text of neither form is shown as it is.
func Shown(stored string) string {
	if v, ok := strings.CutPrefix(stored, local); ok {
		if !strings.Contains(v, ".") {
			if n, err := strconv.ParseUint(v, 10, 32); err == nil {
				return emsd.Address(n).String()
			}
		}
		return v
	}
	if v, ok := strings.CutPrefix(stored, rfc822); ok {
		return v
	}
	return stored
}
