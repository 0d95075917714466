package emsd

import (
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
)

// Address is an EMSD (local) address: the subscriber number (§6.1).
type Address uint32

// String returns the reference's text form hhh.lll: addr/1000 and
// addr%1000, each zero-padded to 3 digits (1234 → "001.234",
// 1234567 → "1234.567"), §6.1.
func (a Address) String() string {
	var buf [16]byte
	b := appendPadded(buf[:0], uint32(a)/1000)
	b = append(b, '.')
	b = appendPadded(b, uint32(a)%1000)
	return string(b)
}

// LogValue logs a as its text form, "198.036", in text and JSON logs alike
// (JSON would otherwise show the number 198036).
func (a Address) LogValue() slog.Value { return slog.StringValue(a.String()) }

func appendPadded(b []byte, v uint32) []byte {
	switch {
	case v < 10:
		b = append(b, '0', '0')
	case v < 100:
		b = append(b, '0')
	}
	return strconv.AppendUint(b, uint64(v), 10)
}

var errAddressSyntax = errors.New("emsd: malformed EMSD address text")

// ParseAddress parses the text form of an EMSD address: "a" → a,
// "a.b" → a*1000+b (§6.1) and "a.b.c" → a*10^6+b*10^3+c (Open Point 9).
// Groups after the first must be at most 999; surrounding blanks are
// ignored; the result must fit 32 bits.
func ParseAddress(s string) (Address, error) {
	s = strings.TrimSpace(s)
	groups := strings.Split(s, ".")
	if len(groups) > 3 {
		return 0, fmt.Errorf("%w: %q", errAddressSyntax, s)
	}
	var v uint64
	for i, g := range groups {
		if g == "" || len(g) > 10 {
			return 0, fmt.Errorf("%w: %q", errAddressSyntax, s)
		}
		n := uint64(0)
		for _, c := range []byte(g) {
			if c < '0' || c > '9' {
				return 0, fmt.Errorf("%w: %q", errAddressSyntax, s)
			}
			n = n*10 + uint64(c-'0')
		}
		if i > 0 && n > 999 {
			return 0, fmt.Errorf("%w: group %q over 999 in %q", errAddressSyntax, g, s)
		}
		v = v*1000 + n
		if v > 0xFFFFFFFF {
			return 0, fmt.Errorf("%w: %q exceeds 32 bits", errAddressSyntax, s)
		}
	}
	return Address(v), nil
}

// ParseDeviceAddress parses the forms device shells use to mark a local
// address in an RFC 822 header mailbox (§6.1, Open Point 23): "EMSD"
// followed by an optional "=" and an address accepted by ParseAddress,
// optionally enclosed in double quotes, e.g. EMSD301.001, EMSD=1234,
// "EMSD=198.036". The prefix is case-insensitive. A trailing group colon
// as in the rendering `"EMSD=198.036": ;` is tolerated.
//
// Unlike the reference shells, which concatenate all digits after the
// prefix, the part after the prefix is parsed like ParseAddress, so
// EMSD198.36 is 198036 (same result for the canonical hhh.lll form).
func ParseDeviceAddress(s string) (Address, error) {
	t := strings.TrimSpace(s)
	t = strings.TrimSpace(strings.TrimSuffix(t, ";"))
	t = strings.TrimSpace(strings.TrimSuffix(t, ":"))
	if len(t) >= 2 && t[0] == '"' && t[len(t)-1] == '"' {
		t = t[1 : len(t)-1]
	}
	if len(t) < 4 || !strings.EqualFold(t[:4], "EMSD") {
		return 0, fmt.Errorf("%w: %q lacks the EMSD prefix", errAddressSyntax, s)
	}
	t = strings.TrimPrefix(t[4:], "=")
	if t == "" || t[0] < '0' || t[0] > '9' {
		return 0, fmt.Errorf("%w: %q", errAddressSyntax, s)
	}
	return ParseAddress(t)
}

// AppendBCD appends a as the 1.1 EMSDAddressValue: packed BCD, two digits
// per octet, high nibble first, with one leading zero nibble for an odd
// digit count (§2.6): 1234 → 12 34, 12345 → 01 23 45.
func (a Address) AppendBCD(b []byte) []byte {
	var d [11]byte // d[0] least significant
	n := 0
	for v := uint32(a); ; v /= 10 {
		d[n] = byte(v % 10)
		n++
		if v < 10 {
			break
		}
	}
	if n%2 == 1 {
		d[n] = 0
		n++
	}
	for i := n - 1; i > 0; i -= 2 {
		b = append(b, d[i]<<4|d[i-1])
	}
	return b
}

// bcdSize is the number of octets appendBCD writes.
func bcdSize(a Address) int {
	n := 1
	for v := uint32(a); v >= 10; v /= 10 {
		n++
	}
	return (n + 1) / 2
}

// ParseBCD decodes a 1–5 octet BCD EMSDAddressValue; leading zero digits
// are ignored, nibbles over 9 and values over 2^32−1 are rejected (§2.6
// Recommend) with ErrBadAddress.
func ParseBCD(c []byte) (Address, error) {
	if len(c) == 0 || len(c) > MaxAddressOctets {
		return 0, ErrBadAddress
	}
	var v uint64
	for _, x := range c {
		hi, lo := x>>4, x&0x0f
		if hi > 9 || lo > 9 {
			return 0, ErrBadAddress
		}
		v = v*100 + uint64(hi)*10 + uint64(lo)
	}
	if v > 0xFFFFFFFF {
		return 0, ErrBadAddress
	}
	return Address(v), nil
}

// EMSDAddress is a local address with an optional name (§3 EMSDAddress),
// as used in credentials.
type EMSDAddress struct {
	Address Address
	Name    string // emsd-name, at most MaxEMSDName octets; "" = absent
}

// ORAddress is an originator/recipient address (§3): either a local EMSD
// address (IsLocal, with Local and optional Name) or an RFC 822 address
// text (RFC822, at most MaxRFC822Address octets).
type ORAddress struct {
	IsLocal bool
	Local   Address
	Name    string // emsd-name of a local address; "" = absent
	RFC822  string
}

// LocalOR returns a local ORAddress.
func LocalOR(a Address, name string) ORAddress {
	return ORAddress{IsLocal: true, Local: a, Name: name}
}

// RFC822OR returns an rfc822 ORAddress.
func RFC822OR(s string) ORAddress { return ORAddress{RFC822: s} }

// String returns "hhh.lll", "Name <hhh.lll>" or the RFC 822 text.
func (o ORAddress) String() string {
	if !o.IsLocal {
		return o.RFC822
	}
	if o.Name != "" {
		return o.Name + " <" + o.Local.String() + ">"
	}
	return o.Local.String()
}

// LocalMessageID is a message id assigned by the MTS (§6.3).
type LocalMessageID struct {
	SubmissionTime Time
	Number         uint32 // daily-message-number
}

// String returns the UA form %08x.%08x (§6.3).
func (id LocalMessageID) String() string {
	return fmt.Sprintf("%08x.%08x", uint32(id.SubmissionTime), id.Number)
}

// LogValue logs id in the UA form, as the CLI shows it.
func (id LocalMessageID) LogValue() slog.Value { return slog.StringValue(id.String()) }

// ParseLocalMessageID parses the UA form: two groups of 1–8 hexadecimal
// digits separated by a dot, case-insensitive.
func ParseLocalMessageID(s string) (LocalMessageID, error) {
	a, b, ok := strings.Cut(s, ".")
	if ok {
		t, err1 := parseHex32(a)
		n, err2 := parseHex32(b)
		if err1 == nil && err2 == nil {
			return LocalMessageID{SubmissionTime: Time(t), Number: n}, nil
		}
	}
	return LocalMessageID{}, fmt.Errorf("emsd: malformed local message id %q", s)
}

func parseHex32(s string) (uint32, error) {
	if s == "" || len(s) > 8 || s[0] == '+' || s[0] == '-' {
		return 0, errAddressSyntax
	}
	v, err := strconv.ParseUint(s, 16, 32)
	return uint32(v), err
}

// MessageID is a MessageId CHOICE (§3): a local id (IsLocal) or an RFC 822
// Message-ID text (at most MaxMessageID octets, kept verbatim, angle
// brackets included). It is comparable and can key maps.
type MessageID struct {
	IsLocal bool
	Local   LocalMessageID
	RFC822  string
}

// LocalID returns a local MessageID.
func LocalID(t Time, number uint32) MessageID {
	return MessageID{IsLocal: true, Local: LocalMessageID{SubmissionTime: t, Number: number}}
}

// RFC822ID returns an rfc822 MessageID.
func RFC822ID(s string) MessageID { return MessageID{RFC822: s} }

// LogValue logs m as String does.
func (m MessageID) LogValue() slog.Value { return slog.StringValue(m.String()) }

// String returns the UA form of a local id or the RFC 822 text.
func (m MessageID) String() string {
	if m.IsLocal {
		return m.Local.String()
	}
	return m.RFC822
}
