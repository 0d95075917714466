package mailconv

import (
	"fmt"
	"strings"

	"github.com/esro-emsdp/emsdp/emsd"
)

// encodePhrase renders a display name: atoms or a quoted string when ASCII,
// RFC 2047 B encoding otherwise (Q would leave specials such as ',' bare,
// RFC 2047 §5(3)).
func encodePhrase(name string) string {
	name = oneLine(name)
	if IsASCII(name) && !strings.Contains(name, "=?") {
		return phrase(name)
	}
	return encodeWordsB(name)
}

type rendered struct {
	header string // for a header field
	spec   string // addr-spec for the envelope, "" when unusable
	raw    string // the original text of an unusable address
	local  bool
	device emsd.Address
	err    error
}

// address renders an ORAddress (§6.2): local as `Name <hhh.lll@Domain>` or
// `hhh.lll@Domain`; rfc822 parsed and re-rendered (the device forms
// EMSD<n>/EMSD=<n> count as local, OP 23); text that is no address becomes
// an empty group named after it, like the reference's `"198.036": ;`.
func (f *formatter) address(a emsd.ORAddress) rendered {
	if a.IsLocal {
		return f.local(a.Local, a.Name)
	}
	raw := oneLine(a.RFC822)
	if n, ok := deviceForm(raw); ok {
		return f.local(n, "")
	}
	p, err := parseMailbox(raw)
	if err == nil && p.Address != "" {
		spec := quoteLocal(p.Address)
		r := rendered{spec: spec, header: spec}
		if p.Name != "" {
			r.header = encodePhrase(p.Name) + " <" + spec + ">"
		}
		if n, ok := f.mapped(p.Address); ok {
			r.local, r.device = true, n
		}
		return r
	} else if isDotAtom(raw) {
		// A bare local part: qualify it with our domain, as sendmail would.
		return rendered{spec: raw + "@" + f.o.Domain, header: raw + "@" + f.o.Domain}
	}
	// Text that is no address: an empty group named after it, like the
	// reference's `"198.036": ;`.
	bare := strings.Trim(strings.TrimRight(raw, ":; "), `"`)
	return rendered{
		header: encodePhrase(bare) + ":;",
		raw:    a.RFC822,
		err:    fmt.Errorf("%w: %q", ErrBadAddress, raw),
	}
}

func (f *formatter) mapped(spec string) (emsd.Address, bool) {
	if len(f.o.Mapping.Domains) == 0 && f.o.Mapping.Resolve == nil {
		return 0, false
	}
	return f.o.Mapping.lookup(spec)
}

func (f *formatter) local(n emsd.Address, name string) rendered {
	spec := n.String() + "@" + f.o.Domain
	shown := spec
	if a := f.o.Aliases[n]; a != "" {
		shown = a
	}
	r := rendered{spec: spec, header: shown, local: true, device: n}
	if name = oneLine(name); name != "" {
		r.header = encodePhrase(name) + " <" + shown + ">"
	}
	return r
}

// localID renders a local message id as a Message-ID (§9.6, OP 10).
func (f *formatter) localID(id emsd.LocalMessageID) string {
	return fmt.Sprintf("<EMSD.%08x.%08x@%s>", uint32(id.SubmissionTime), id.Number, f.o.Domain)
}

// quoteLocal writes the local part of an addr-spec as a quoted string
// when it is not a dot-atom (net/mail returns it unquoted).
func quoteLocal(spec string) string {
	at := strings.LastIndexByte(spec, '@')
	if at < 0 || isDotAtom(spec[:at]) {
		return spec
	}
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range spec[:at] {
		if r == '"' || r == '\\' {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	b.WriteByte('"')
	return b.String() + spec[at:]
}

func isDotAtom(s string) bool {
	if s == "" || s[0] == '.' || s[len(s)-1] == '.' || strings.Contains(s, "..") {
		return false
	}
	for _, r := range s {
		if r != '.' && !isAtext(r) {
			return false
		}
	}
	return true
}
