package mailconv

import (
	"errors"
	"fmt"
	"strings"

	"github.com/esro-emsdp/emsdp/emsd"
)

// RecipientKind tells how a recipient was addressed (§9.6).
type RecipientKind uint8

// Recipient kinds: per-recipient flag bit 1 is Bcc, else bit 0 is Cc,
// else To.
const (
	KindTo RecipientKind = iota
	KindCc
	KindBcc
)

// String returns "To", "Cc" or "Bcc".
func (k RecipientKind) String() string {
	switch k {
	case KindTo:
		return "To"
	case KindCc:
		return "Cc"
	case KindBcc:
		return "Bcc"
	}
	return fmt.Sprintf("RecipientKind(%d)", uint8(k))
}

// Recipient is one envelope recipient of a formatted IPM.
type Recipient struct {
	Addr   string       // addr-spec for SMTP RCPT
	Local  bool         // an EMSD device (Device valid): never leaves the server
	Device emsd.Address // valid when Local
	Kind   RecipientKind
	Flags  emsd.PerRecipientFlags
	// Err is set when the address cannot be used on the Internet (it is
	// not an address): the server reports non-delivery for it
	// (diagnostic unrecognized-address) instead of relaying. Addr then
	// holds the original text.
	Err error
}

// ErrBadAddress is the cause in Recipient.Err.
var ErrBadAddress = errors.New("mailconv: not an Internet mail address")

// Route is the routing step of a submission: for every recipient of ipm,
// whether it is an EMSD device of this server (Local, with its Device: it
// never leaves the server), an Internet address, or no usable address
// (Err), in the order and with the duplicates removed as in
// FormatIPM's Recipients, which are the same. It formats nothing, so the
// server renders Internet mail only when some recipient is on the
// Internet. Local addresses are those of domain; m, when it has Domains or
// Resolve, also routes rfc822 recipients that resolve to a device to it.
func Route(ipm *emsd.IPM, domain string, m Mapping) ([]Recipient, error) {
	if err := checkIPM("Route", ipm, domain); err != nil {
		return nil, err
	}
	f := &formatter{o: FormatOptions{Domain: domain, Mapping: m}}
	var env envelope
	for _, rd := range ipm.Heading.Recipients {
		env.add(rd.Flags, f.address(rd.Recipient))
	}
	return env.recipients(), nil
}

// envelope collects the envelope recipients: To, then Cc, then Bcc, each in
// heading order, an address only once.
type envelope struct {
	kinds [3][]Recipient
	seen  map[string]bool
}

// add files the recipient rendered as a with flags and returns its kind.
func (e *envelope) add(flags emsd.PerRecipientFlags, a rendered) RecipientKind {
	kind := KindTo
	switch {
	case flags.Has(emsd.RcptBlindCopy):
		kind = KindBcc
	case flags.Has(emsd.RcptCopy):
		kind = KindCc
	}
	key := strings.ToLower(a.spec)
	if a.err != nil {
		key = "\x00" + a.raw
	}
	if e.seen[key] {
		return kind
	}
	if e.seen == nil {
		e.seen = map[string]bool{}
	}
	e.seen[key] = true
	r := Recipient{Addr: a.spec, Local: a.local, Device: a.device, Kind: kind, Flags: flags, Err: a.err}
	if a.err != nil {
		r.Addr = a.raw
	}
	e.kinds[kind] = append(e.kinds[kind], r)
	return kind
}

func (e *envelope) recipients() []Recipient {
	var out []Recipient
	for _, k := range e.kinds {
		out = append(out, k...)
	}
	return out
}
