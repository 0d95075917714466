package mailconv

import (
	"bytes"
	"net/mail"
	"strings"

	gomail "github.com/emersion/go-message/mail"

	"github.com/esro-emsdp/emsdp/emsd"
)

// Header fields that become heading components (§9.8) and are therefore
// never extensions, plus the priority fields mapped to per-message flags.
var consumedFields = map[string]bool{
	"From": true, "Sender": true, "To": true, "Cc": true, "Bcc": true,
	"Reply-To": true, "Date": true, "Message-Id": true, "In-Reply-To": true,
	"Subject": true, "Mime-Version": true, "Content-Type": true,
	"Content-Id": true, "Content-Description": true,
	"Content-Transfer-Encoding": true,
	"X-Emsd-Addressed-As":       true, // ours (AliasExtension), never taken from the mail
}

// traceFields are transport bookkeeping, not message content: kept out of
// the 64 extensions (OP 8 recommends keeping only non-trace headers).
var traceFields = map[string]bool{
	"Received": true, "Return-Path": true, "X-Received": true,
	"Dkim-Signature": true, "Domainkey-Signature": true,
	"X-Google-Dkim-Signature": true, "Authentication-Results": true,
	"Arc-Seal": true, "Arc-Message-Signature": true,
	"Arc-Authentication-Results": true, "Received-Spf": true,
	"X-Original-Authentication-Results": true, "Delivered-To": true,
	"X-Original-To": true, "X-Gm-Message-State": true,
	"X-Google-Smtp-Source": true, "X-Ms-Exchange-Organization-Authas": true,
	"X-Ms-Exchange-Organization-Network-Message-Id": true,
}

// addr is one address read from a header.
type addr struct {
	or    emsd.ORAddress
	spec  string // addr-spec, "" when unparseable
	local bool
	flags emsd.PerRecipientFlags
}

// addresses parses every field named key; unparseable members are kept as
// raw rfc822 text so the device still sees them.
func (p *parser) addresses(key string) []addr {
	var out []addr
	for _, v := range p.h.Values(key) {
		conv := func(a *mail.Address) addr {
			or, local := p.m.orAddress(a, &p.notes)
			if local && (key == "To" || key == "Cc") && p.m.isAlias(a.Address) {
				p.noteAlias(or.Local, a.Address)
			}
			return addr{or: or, spec: a.Address, local: local}
		}
		list, err := gomail.ParseAddressList(v)
		if err == nil {
			for _, a := range list {
				out = append(out, conv(a))
			}
			continue
		}
		for _, chunk := range splitAddressList(v) {
			if a, err := gomail.ParseAddress(chunk); err == nil {
				out = append(out, conv(a))
				continue
			}
			raw := oneLine(decodeWords(chunk))
			if raw == "" || strings.HasSuffix(raw, ":;") || strings.HasSuffix(raw, ": ;") {
				continue // an empty group such as undisclosed-recipients:;
			}
			s := cutUTF8(raw, emsd.MaxRFC822Address)
			if s != raw {
				p.note("unparseable %s address cut to %d octets", key, emsd.MaxRFC822Address)
			}
			out = append(out, addr{or: emsd.RFC822OR(s)})
		}
	}
	return out
}

// splitAddressList splits at commas outside quotes, comments and angle
// brackets, for salvaging a list the strict parser refused.
func splitAddressList(s string) []string {
	var out []string
	depth, quoted, angle, start := 0, false, false, 0
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '\\' && (quoted || depth > 0):
			i++
		case c == '"' && depth == 0:
			quoted = !quoted
		case quoted:
		case c == '(':
			depth++
		case c == ')' && depth > 0:
			depth--
		case depth > 0:
		case c == '<':
			angle = true
		case c == '>':
			angle = false
		case c == ',' && !angle:
			out = append(out, strings.TrimSpace(s[start:i]))
			start = i + 1
		}
	}
	return append(out, strings.TrimSpace(s[start:]))
}

func sameAddress(a, b addr) bool {
	if a.local || b.local {
		return a.local == b.local && a.or.Local == b.or.Local
	}
	if a.spec != "" && b.spec != "" {
		return strings.EqualFold(a.spec, b.spec)
	}
	return a.or.RFC822 == b.or.RFC822
}

// originator picks From:, then Sender:, Return-Path:, the envelope sender.
func (p *parser) originator(from, sender []addr) emsd.ORAddress {
	if len(from) > 1 {
		p.note("From: has %d addresses; the first is the originator", len(from))
	}
	switch {
	case len(from) > 0:
		return from[0].or
	case len(sender) > 0:
		p.note("no usable From:; originator taken from Sender:")
		return sender[0].or
	}
	for _, cand := range []struct{ what, v string }{
		{"Return-Path:", p.h.Get("Return-Path")}, {"the envelope sender", p.o.EnvelopeFrom},
	} {
		v := strings.Trim(strings.TrimSpace(cand.v), "<>")
		if v == "" {
			continue
		}
		if a, err := mail.ParseAddress("<" + v + ">"); err == nil {
			p.note("no usable From:; originator taken from %s", cand.what)
			or, _ := p.m.orAddress(a, &p.notes)
			return or
		}
	}
	p.note("no originator in the message")
	return emsd.RFC822OR("")
}

// AliasExtension is the heading extension that records how a device was
// addressed when To: or Cc: named it by an alias: "hhh.lll addr-spec".
// The device's recipient entry is its number (a device finds itself among
// the local recipients only, docs/protocol.md EMSD §10.3); a mail reader's
// rendering (ua's Maildir) shows the alias instead. A field of this name
// in the incoming mail is dropped.
const AliasExtension = "X-EMSD-Addressed-As"

// noteAlias records that device n was addressed as alias (first one
// wins), for AliasExtension.
func (p *parser) noteAlias(n emsd.Address, alias string) {
	v := n.String() + " " + alias
	if len(v) > maxExtValue || !IsASCII(v) {
		return
	}
	for _, a := range p.aliases {
		if strings.HasPrefix(a, n.String()+" ") {
			return
		}
	}
	p.aliases = append(p.aliases, v)
}

// Aliases returns the aliases ipm's AliasExtension fields record, by
// device, and the heading's other extensions.
func Aliases(ipm *emsd.IPM) (aliases map[emsd.Address]string, rest []emsd.Extension) {
	for _, x := range ipm.Heading.Extensions {
		if !strings.EqualFold(x.Label, AliasExtension) {
			rest = append(rest, x)
			continue
		}
		num, spec, ok := strings.Cut(strings.TrimSpace(x.Value), " ")
		n, err := emsd.ParseAddress(num)
		if !ok || err != nil || spec == "" || strings.ContainsAny(spec, " <>\r\n") {
			continue
		}
		if aliases == nil {
			aliases = map[emsd.Address]string{}
		}
		aliases[n] = spec
	}
	return aliases, rest
}

// recipients reads To (no flags), Cc (bits 0+5), Bcc (bits 1+5) as §9.8
// prescribes, adds devices of EnvelopeTo missing from the headers as Bcc,
// and caps the list at 256 keeping devices first.
func (p *parser) recipients() []emsd.RecipientData {
	var all []addr
	for _, k := range []struct {
		key   string
		flags emsd.PerRecipientFlags
	}{
		{"To", 0},
		{"Cc", emsd.RcptCopy | emsd.RcptNonDeliveryReport},
		{"Bcc", emsd.RcptBlindCopy | emsd.RcptNonDeliveryReport},
	} {
		for _, a := range p.addresses(k.key) {
			a.flags = k.flags
			all = append(all, a)
		}
	}
	for _, spec := range p.o.EnvelopeTo {
		n, ok := p.m.lookup(spec)
		if !ok {
			continue
		}
		a := addr{or: emsd.LocalOR(n, ""), local: true, flags: emsd.RcptBlindCopy | emsd.RcptNonDeliveryReport}
		found := false
		for _, b := range all {
			if sameAddress(a, b) {
				found = true
				break
			}
		}
		if !found {
			all = append(all, a)
		}
	}
	if len(all) > emsd.MaxRecipients {
		p.note("%d recipients, kept %d (devices first)", len(all), emsd.MaxRecipients)
		keep := make([]bool, len(all))
		n := 0
		for i, a := range all {
			if a.local && n < emsd.MaxRecipients {
				keep[i] = true
				n++
			}
		}
		for i := range all {
			if !keep[i] && n < emsd.MaxRecipients {
				keep[i] = true
				n++
			}
		}
		kept := all[:0]
		for i, a := range all {
			if keep[i] {
				kept = append(kept, a)
			}
		}
		all = kept
	}
	out := make([]emsd.RecipientData, len(all))
	for i, a := range all {
		out[i] = emsd.RecipientData{Recipient: a.or, Flags: a.flags}
	}
	return out
}

// flags maps priority, importance and auto-forward header fields to the
// per-message flags (OP 13) and returns the fields it understood.
func (p *parser) flags(h *emsd.Heading) map[string]bool {
	consumed := map[string]bool{}
	var prio, imp emsd.PerMessageFlags
	prioSet, impSet := false, false
	for _, key := range []string{"Priority", "X-Priority", "Importance", "X-Importance", "X-Msmail-Priority", "Auto-Forwarded", "X-Auto-Forwarded"} {
		for _, v := range p.h.Values(key) {
			v = strings.ToLower(strings.TrimSpace(v))
			var f emsd.PerMessageFlags
			ok := true
			switch key {
			case "Priority", "X-Priority":
				switch {
				case v == "urgent" || v == "high" || v == "highest" || strings.HasPrefix(v, "1") || strings.HasPrefix(v, "2"):
					f = emsd.MsgPriorityUrgent
				case v == "non-urgent" || v == "nonurgent" || v == "low" || v == "lowest" || strings.HasPrefix(v, "4") || strings.HasPrefix(v, "5"):
					f = emsd.MsgPriorityNonUrgent
				case v == "normal" || strings.HasPrefix(v, "3"):
				default:
					ok = false
				}
				if ok && !prioSet {
					prio, prioSet = f, true
				}
			case "Importance", "X-Importance", "X-Msmail-Priority":
				switch v {
				case "high":
					f = emsd.MsgImportanceHigh
				case "low":
					f = emsd.MsgImportanceLow
				case "normal":
				default:
					ok = false
				}
				if ok && !impSet {
					imp, impSet = f, true
				}
			default: // auto-forwarded
				switch v {
				case "true", "yes", "1":
					h.Flags |= emsd.MsgAutoForwarded
				case "false", "no", "0":
				default:
					ok = false
				}
			}
			if ok {
				consumed[key] = true
			}
		}
	}
	h.Flags |= prio | imp
	return consumed
}

// extensions keeps the remaining header fields, in header order, as
// extensions (§9.8): not the trace fields, at most 64 (OP 8).
func (p *parser) extensions(consumed map[string]bool, transformed bool) []emsd.Extension {
	var out []emsd.Extension
	dropped, long := 0, 0
	fields := p.h.Fields()
	for fields.Next() {
		key := fields.Key()
		if consumedFields[key] || consumed[key] || traceFields[key] ||
			(transformed && strings.HasPrefix(key, "Content-")) {
			continue
		}
		// Keep the label as written, not canonicalised (reference: the
		// header name as is).
		label := key
		if raw, err := fields.Raw(); err == nil {
			if i := bytes.IndexByte(raw, ':'); i > 0 {
				label = string(bytes.TrimRight(raw[:i], " \t"))
			}
		}
		if len(label) > maxExtLabel {
			long++
			continue
		}
		if len(out) == emsd.MaxExtensions {
			dropped++
			continue
		}
		v := oneLine(decodeWords(fields.Value()))
		if c := cutUTF8(v, maxExtValue); c != v {
			p.note("header %s cut to %d octets", label, maxExtValue)
			v = c
		}
		out = append(out, emsd.Extension{Label: label, Value: v})
	}
	if dropped > 0 {
		p.note("%d header fields beyond the %d extensions dropped", dropped, emsd.MaxExtensions)
	}
	if long > 0 {
		p.note("%d header fields with names over %d octets dropped", long, maxExtLabel)
	}
	return out
}
