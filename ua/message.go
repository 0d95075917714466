package ua

import (
	"fmt"
	"net/mail"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/esro-emsdp/emsdp/emsd"
)

// Priority is a message's priority (§3 per-message flags).
type Priority uint8

// Priorities; Normal sets no flag.
const (
	PriorityNormal Priority = iota
	PriorityUrgent
	PriorityNonUrgent
)

// Importance is a message's importance (§3 per-message flags).
type Importance uint8

// Importances; Normal sets no flag.
const (
	ImportanceNormal Importance = iota
	ImportanceHigh
	ImportanceLow
)

// Message is a message to submit, in the terms of a mail user. Addresses
// are strings accepted by ParseAddress. Text is UTF-8; it travels as raw
// octets, as EMSD has no charset field (§3).
type Message struct {
	// From is the originator; empty means the device's own address, the
	// usual case. A gateway box standing in for several users sets it.
	From        string
	To, Cc, Bcc []string
	ReplyTo     []string
	// InReplyTo is the id of the message replied to: the UA form of a local
	// id (%08x.%08x) or an RFC 822 Message-ID such as "<a@b>".
	InReplyTo string
	Subject   string // at most emsd.MaxSubject octets, one line
	Body      []byte
	// ContentType is the body's MIME type. Empty: none for ASCII bodies
	// (plain text, as the reference shells send), and "text/plain;
	// charset=utf-8" for other UTF-8 bodies so that Internet recipients see
	// the right characters.
	ContentType string
	Priority    Priority
	Importance  Importance
	// DeliveryReport requests a delivery report (per-recipient bit 6) for
	// every recipient.
	DeliveryReport bool
	// NoNonDeliveryReport clears the non-delivery report request (bit 5)
	// that is otherwise set on every recipient, as the reference shells do
	// (§3 notes).
	NoNonDeliveryReport bool
	// Extensions are further header fields (label, value) carried as IPM
	// extensions; the reference UA never sends any (§10.2, Open Point 24).
	Extensions []emsd.Extension
}

// ParseAddress parses an address as users write it: an EMSD local address
// ("198.036", "198036", "1.2.3", or the shell forms "EMSD198.036",
// "EMSD=198.036", §6.1, Open Points 9 and 23) or an Internet address
// ("bob@example.com", "Bob <bob@example.com>"), which is kept verbatim as an
// rfc822 ORAddress. Internet addresses must parse as RFC 5322 mailboxes
// (UTF-8 allowed) and fit emsd.MaxRFC822Address octets.
func ParseAddress(s string) (emsd.ORAddress, error) {
	t := strings.TrimSpace(s)
	if t == "" {
		return emsd.ORAddress{}, fmt.Errorf("%w: empty address", ErrInvalidMessage)
	}
	if a, err := emsd.ParseDeviceAddress(t); err == nil {
		return emsd.LocalOR(a, ""), nil
	}
	if strings.Trim(t, "0123456789.") == "" {
		a, err := emsd.ParseAddress(t)
		if err != nil {
			return emsd.ORAddress{}, fmt.Errorf("%w: bad EMSD address %q (want NNN.NNN or a number that fits 32 bits)", ErrInvalidMessage, t)
		}
		return emsd.LocalOR(a, ""), nil
	}
	if !utf8.ValidString(t) || strings.ContainsFunc(t, unicode.IsControl) {
		return emsd.ORAddress{}, fmt.Errorf("%w: address %q has invalid characters", ErrInvalidMessage, t)
	}
	if len(t) > emsd.MaxRFC822Address {
		return emsd.ORAddress{}, fmt.Errorf("%w: address %q is %d octets, at most %d", ErrInvalidMessage, t, len(t), emsd.MaxRFC822Address)
	}
	if _, err := mail.ParseAddress(t); err != nil {
		return emsd.ORAddress{}, fmt.Errorf("%w: bad address %q (want NNN.NNN or an Internet address such as bob@example.com): %v", ErrInvalidMessage, t, err)
	}
	return emsd.RFC822OR(t), nil
}

// ParseMessageID parses a message id as the UA shows it: the UA form of a
// local id (%08x.%08x, case-insensitive, §6.3) or an RFC 822 Message-ID
// text, kept verbatim.
func ParseMessageID(s string) (emsd.MessageID, error) {
	t := strings.TrimSpace(s)
	if id, err := emsd.ParseLocalMessageID(t); err == nil {
		return emsd.MessageID{IsLocal: true, Local: id}, nil
	}
	switch {
	case t == "":
		return emsd.MessageID{}, fmt.Errorf("%w: empty message id", ErrInvalidMessage)
	case len(t) > emsd.MaxMessageID:
		return emsd.MessageID{}, fmt.Errorf("%w: message id is %d octets, at most %d", ErrInvalidMessage, len(t), emsd.MaxMessageID)
	case !utf8.ValidString(t) || strings.ContainsFunc(t, unicode.IsControl):
		return emsd.MessageID{}, fmt.Errorf("%w: message id %q has invalid characters", ErrInvalidMessage, t)
	}
	return emsd.RFC822ID(t), nil
}

// IPM builds the interpersonal message for m as submitted by the device
// with address self (§3, §10.2). It reports ErrInvalidMessage for input
// that cannot be carried.
func (m *Message) IPM(self emsd.Address) (*emsd.IPM, error) {
	h := emsd.Heading{Originator: emsd.LocalOR(self, "")}
	if m.From != "" {
		o, err := ParseAddress(m.From)
		if err != nil {
			return nil, fmt.Errorf("from: %w", err)
		}
		h.Originator = o
	}
	var base emsd.PerRecipientFlags
	if !m.NoNonDeliveryReport {
		base |= emsd.RcptNonDeliveryReport
	}
	if m.DeliveryReport {
		base |= emsd.RcptDeliveryReport
	}
	for _, g := range []struct {
		name  string
		addrs []string
		flags emsd.PerRecipientFlags
	}{{"to", m.To, 0}, {"cc", m.Cc, emsd.RcptCopy}, {"bcc", m.Bcc, emsd.RcptBlindCopy}} {
		for _, s := range g.addrs {
			a, err := ParseAddress(s)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", g.name, err)
			}
			h.Recipients = append(h.Recipients, emsd.RecipientData{Recipient: a, Flags: base | g.flags})
		}
	}
	switch n := len(h.Recipients); {
	case n == 0:
		return nil, fmt.Errorf("%w: no recipients", ErrInvalidMessage)
	case n > emsd.MaxRecipients:
		return nil, fmt.Errorf("%w: %d recipients, at most %d", ErrInvalidMessage, n, emsd.MaxRecipients)
	}
	for _, s := range m.ReplyTo {
		a, err := ParseAddress(s)
		if err != nil {
			return nil, fmt.Errorf("reply-to: %w", err)
		}
		h.ReplyTo = append(h.ReplyTo, a)
	}
	// A single reply-to equal to the originator says nothing (§10.2).
	if len(h.ReplyTo) == 1 && h.ReplyTo[0] == h.Originator {
		h.ReplyTo = nil
	}
	if len(h.ReplyTo) > emsd.MaxReplyTo {
		return nil, fmt.Errorf("%w: %d reply-to addresses, at most %d", ErrInvalidMessage, len(h.ReplyTo), emsd.MaxReplyTo)
	}
	if m.InReplyTo != "" {
		id, err := ParseMessageID(m.InReplyTo)
		if err != nil {
			return nil, fmt.Errorf("in-reply-to: %w", err)
		}
		h.RepliedTo = &id
	}
	if err := checkText("subject", m.Subject, emsd.MaxSubject); err != nil {
		return nil, err
	}
	h.Subject = m.Subject
	switch m.Priority {
	case PriorityUrgent:
		h.Flags |= emsd.MsgPriorityUrgent
	case PriorityNonUrgent:
		h.Flags |= emsd.MsgPriorityNonUrgent
	}
	switch m.Importance {
	case ImportanceHigh:
		h.Flags |= emsd.MsgImportanceHigh
	case ImportanceLow:
		h.Flags |= emsd.MsgImportanceLow
	}
	if len(m.Extensions) > emsd.MaxExtensions {
		return nil, fmt.Errorf("%w: %d extensions, at most %d", ErrInvalidMessage, len(m.Extensions), emsd.MaxExtensions)
	}
	for _, e := range m.Extensions {
		if e.Label == "" || strings.ContainsAny(e.Label, ": \t") {
			return nil, fmt.Errorf("%w: bad header field name %q", ErrInvalidMessage, e.Label)
		}
		if err := checkText("header "+e.Label, e.Value, 0); err != nil {
			return nil, err
		}
	}
	h.Extensions = m.Extensions
	h.MIMEContentType = m.ContentType
	if h.MIMEContentType == "" && !isASCII(m.Body) && utf8.Valid(m.Body) {
		h.MIMEContentType = "text/plain; charset=utf-8"
		h.MIMEContentTransferEncoding = "8bit"
	}
	if err := checkText("content type", h.MIMEContentType, emsd.MaxMIMEField); err != nil {
		return nil, err
	}
	return &emsd.IPM{Heading: h, Body: &emsd.Body{Text: m.Body}}, nil
}

// checkText accepts one line of UTF-8 of at most limit octets (0: no limit).
func checkText(what, s string, limit int) error {
	switch {
	case limit > 0 && len(s) > limit:
		return fmt.Errorf("%w: %s is %d octets, at most %d", ErrInvalidMessage, what, len(s), limit)
	case !utf8.ValidString(s):
		return fmt.Errorf("%w: %s is not valid UTF-8", ErrInvalidMessage, what)
	case strings.ContainsFunc(s, func(r rune) bool { return r != '\t' && unicode.IsControl(r) }):
		return fmt.Errorf("%w: %s contains control characters", ErrInvalidMessage, what)
	}
	return nil
}

func isASCII(b []byte) bool {
	for _, c := range b {
		if c >= 0x80 {
			return false
		}
	}
	return true
}
