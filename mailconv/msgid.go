package mailconv

import (
	"fmt"
	"math/rand/v2"
	"strings"

	"github.com/esro-emsdp/emsdp/emsd"
)

// messageID returns the Message-ID with brackets or an invented one, and
// remembers it in p.
func (p *parser) messageID() string {
	p.id, p.invented = p.senderID(), false
	if p.id == "" {
		why := ""
		if strings.TrimSpace(p.h.Get("Message-Id")) != "" {
			why = "Message-ID unusable"
		}
		p.id, p.invented = p.inventID(why), true
	}
	return p.id
}

// senderID returns the usable Message-ID of the message, or "".
func (p *parser) senderID() string {
	raw := strings.TrimSpace(p.h.Get("Message-Id"))
	if raw == "" {
		return ""
	}
	if id, err := p.h.MessageID(); err == nil && id != "" {
		if s := "<" + id + ">"; len(s) <= emsd.MaxMessageID && IsASCII(s) {
			return s
		}
	} else if len(raw) <= emsd.MaxMessageID && IsASCII(raw) && !strings.ContainsAny(raw, " \t") && raw == oneLine(raw) {
		return raw // odd but usable as an opaque id
	}
	return ""
}

// inventID writes §6.3 (b): <EMSD.<time>.<counter>@<host>>; why, if set,
// is noted.
func (p *parser) inventID(why string) string {
	n := p.o.Number
	for n == 0 {
		n = rand.Uint32()
	}
	domain := p.o.Domain
	if domain == "" && len(p.m.Domains) > 0 {
		domain = p.m.Domains[0]
	}
	domain = strings.Map(func(r rune) rune {
		if r > ' ' && r < 0x7f && r != '<' && r != '>' && r != '@' {
			return r
		}
		return -1
	}, domain)
	if domain == "" {
		domain = "localhost"
	}
	id := fmt.Sprintf("<EMSD.%08x.%08x@", uint32(emsd.TimeOf(p.o.Now)), n)
	domain = cutUTF8(domain, emsd.MaxMessageID-len(id)-1)
	if why != "" {
		p.note("%s: invented Message-ID", why)
	}
	return id + domain + ">"
}

// MessageIDExtension labels the heading extension that carries an
// Internet sender's Message-ID when the server delivers the message under
// an id of its own (ParseOptions.KeepMessageID).
const MessageIDExtension = "Message-ID"

// SenderMessageID returns the Message-ID an Internet sender gave ipm, as
// carried in its MessageIDExtension, or "" when it has none usable.
func SenderMessageID(ipm *emsd.IPM) string {
	if ipm == nil {
		return ""
	}
	for _, x := range ipm.Heading.Extensions {
		if strings.EqualFold(x.Label, MessageIDExtension) {
			return msgID(x.Value)
		}
	}
	return ""
}

// msgID returns s as a bracketed msg-id, or "" when it cannot be one.
func msgID(s string) string {
	s = strings.TrimSpace(s)
	if s == "" || !IsASCII(s) || strings.ContainsAny(s, " \t\r\n\x00") {
		return ""
	}
	if !strings.HasPrefix(s, "<") {
		s = "<" + s
	}
	if !strings.HasSuffix(s, ">") {
		s += ">"
	}
	if strings.Count(s, "<") != 1 || strings.Count(s, ">") != 1 || len(s) > 990 {
		return ""
	}
	return s
}
