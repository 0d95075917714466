package mailconv

import (
	"fmt"
	"net/mail"
	"strings"

	gomail "github.com/emersion/go-message/mail"

	"github.com/esro-emsdp/emsdp/emsd"
)

// Mapping decides which Internet addresses are EMSD devices (§6.2).
type Mapping struct {
	// Domains are the "EMSD hosts": without Resolve, an address at one of
	// them (case-insensitive) whose local part is an EMSD address text
	// (a, a.b or a.b.c, §6.1) maps to that local address.
	Domains []string
	// Resolve, when set, decides alone (it should cover the numeric form
	// at Domains too, checking that the subscriber exists, as §6.2
	// requires): it gets the addr-spec with the domain lower-cased and
	// returns the device address, or ok=false for an address that stays
	// rfc822 (aliases such as alice@example.net → 198.036 live here).
	Resolve func(addrSpec string) (emsd.Address, bool)
}

// lookup maps one addr-spec.
func (m Mapping) lookup(addrSpec string) (emsd.Address, bool) {
	addrSpec = normalizeAddrSpec(addrSpec)
	if m.Resolve != nil {
		return m.Resolve(addrSpec)
	}
	return m.Numeric(addrSpec)
}

// Numeric applies the Domains rule alone: addr-spec local part an EMSD
// address text, domain one of Domains. Resolve implementations use it for
// the numeric form before checking the subscriber.
func (m Mapping) Numeric(addrSpec string) (emsd.Address, bool) {
	at := strings.LastIndexByte(addrSpec, '@')
	if at <= 0 {
		return 0, false
	}
	local, domain := addrSpec[:at], addrSpec[at+1:]
	if !m.isDomain(domain) {
		return 0, false
	}
	for i := 0; i < len(local); i++ {
		if c := local[i]; (c < '0' || c > '9') && c != '.' {
			return 0, false
		}
	}
	a, err := emsd.ParseAddress(local)
	if err != nil {
		return 0, false
	}
	return a, true
}

// Device reports the device an ORAddress designates: a local address;
// rfc822 text in one of the device forms (EMSD<n>, EMSD=<n>, quoted or
// not, and the reference UA's host-less `"198.036": `, §6.1, OP 23); or
// a mailbox the Mapping maps (number@EMSD host, aliases; §6.2). These are
// the addresses FormatIPM treats as local.
func (m Mapping) Device(a emsd.ORAddress) (emsd.Address, bool) {
	if a.IsLocal {
		return a.Local, true
	}
	raw := oneLine(a.RFC822)
	if n, ok := deviceForm(raw); ok {
		return n, true
	}
	p, err := parseMailbox(raw)
	if err != nil || p.Address == "" {
		return 0, false
	}
	return m.lookup(p.Address)
}

// deviceForm parses the device forms of an rfc822 ORAddress text.
func deviceForm(raw string) (emsd.Address, bool) {
	if n, err := emsd.ParseDeviceAddress(raw); err == nil {
		return n, true
	}
	// A host-less number, as the reference UA renders one: `"198.036": `.
	bare := strings.Trim(strings.TrimRight(raw, ":; "), `"`)
	if bare != "" && strings.Trim(bare, "0123456789.") == "" {
		if n, err := emsd.ParseAddress(bare); err == nil {
			return n, true
		}
	}
	return 0, false
}

// parseMailbox parses one RFC 5322 mailbox, salvaging the common
// `Display, Name <addr>` with an unquoted special.
func parseMailbox(raw string) (*gomail.Address, error) {
	p, err := gomail.ParseAddress(raw)
	if err != nil {
		if i := strings.LastIndexByte(raw, '<'); i > 0 && strings.HasSuffix(raw, ">") {
			if q, err2 := gomail.ParseAddress(raw[i:]); err2 == nil {
				q.Name = strings.Trim(strings.TrimSpace(raw[:i]), `"`)
				p, err = q, nil
			}
		}
	}
	return p, err
}

func (m Mapping) isDomain(d string) bool {
	for _, x := range m.Domains {
		if strings.EqualFold(strings.TrimSuffix(x, "."), strings.TrimSuffix(d, ".")) {
			return true
		}
	}
	return false
}

// normalizeAddrSpec lower-cases the domain of an addr-spec (local parts are
// case-sensitive in principle).
func normalizeAddrSpec(s string) string {
	s = strings.TrimSpace(s)
	if at := strings.LastIndexByte(s, '@'); at >= 0 {
		return s[:at] + strings.ToLower(s[at:])
	}
	return s
}

// isAtext reports whether r may appear in an RFC 5322 atom (RFC 6532 adds
// every non-ASCII character).
func isAtext(r rune) bool {
	switch {
	case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
		return true
	case r >= 0x80:
		return true
	}
	return strings.ContainsRune("!#$%&'*+-/=?^_`{|}~", r)
}

// phrase renders a display name as a sequence of atoms when it can, else as
// a quoted string; non-ASCII is kept as UTF-8 (EMSD strings carry raw
// octets, and FormatIPM encodes them with RFC 2047 on the way out).
func phrase(name string) string {
	plain := name != "" && name[0] != ' ' && name[len(name)-1] != ' '
	for _, r := range name {
		if r != ' ' && !isAtext(r) {
			plain = false
			break
		}
	}
	if plain && !strings.Contains(name, "  ") {
		return name
	}
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range name {
		if r == '"' || r == '\\' {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	b.WriteByte('"')
	return b.String()
}

// printable returns the printable form of an address as the reference keeps
// it in an rfc822 ORAddress, `Personal <mbox@host>` or `mbox@host` (§6.2),
// within max octets: the name is shortened first, then dropped; an
// addr-spec that alone is too long is cut (note set).
func printable(name, addr string, max int) (s string, note string) {
	name = oneLine(name)
	if name == "" {
		if len(addr) > max {
			return cutUTF8(addr, max), fmt.Sprintf("address %q cut to %d octets", addr, max)
		}
		return addr, ""
	}
	full := phrase(name) + " <" + addr + ">"
	if len(full) <= max {
		return full, ""
	}
	room := max - len(addr) - 3 - 2 - 2 // " <>", quotes, escapes of the cut name's last rune
	if room >= 4 {
		short := phrase(cutUTF8(name, room))
		for len(short)+len(addr)+3 > max && room > 0 {
			room--
			short = phrase(strings.TrimSpace(cutUTF8(name, room)))
		}
		if short != "" && short != `""` && len(short)+len(addr)+3 <= max {
			return short + " <" + addr + ">", fmt.Sprintf("display name of %s shortened", addr)
		}
	}
	if len(addr) > max {
		return cutUTF8(addr, max), fmt.Sprintf("address %q cut to %d octets", addr, max)
	}
	return addr, fmt.Sprintf("display name of %s dropped", addr)
}

// orAddress maps one parsed Internet address to an ORAddress (§6.2): local
// (number only, no name) when the Mapping says so, else rfc822 printable.
// isAlias: addrSpec names a device other than by the number@domain form.
func (m Mapping) isAlias(addrSpec string) bool {
	_, numeric := m.Numeric(normalizeAddrSpec(addrSpec))
	return !numeric
}

func (m Mapping) orAddress(a *mail.Address, notes *[]string) (emsd.ORAddress, bool) {
	if n, ok := m.lookup(a.Address); ok {
		return emsd.LocalOR(n, ""), true
	}
	s, note := printable(a.Name, quoteLocal(a.Address), emsd.MaxRFC822Address)
	if note != "" {
		*notes = append(*notes, note)
	}
	return emsd.RFC822OR(s), false
}
