package mailconv

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"mime"
	"net/textproto"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/esro-emsdp/emsdp/emsd"
)

// FormatOptions tune FormatIPM.
type FormatOptions struct {
	Domain    string    // local addresses render as hhh.lll@Domain; required
	MessageID string    // Message-ID to write, brackets optional (the server derives it from the local id, OP 10); "" = none
	Date      time.Time // Date: header (§9.6 Recommend); zero = time.Now()
	MTS       string    // X-EMSD-MTS value; "" = omit
	// Mapping, when it has Domains or Resolve, also marks rfc822
	// recipients that resolve to a device as Local (for instance an alias
	// the device typed as an Internet address).
	Mapping Mapping
	// Aliases shows these devices by the address given instead of
	// hhh.lll@Domain in the header (Aliases of an inbound IPM: how the
	// sender addressed them); the envelope forms stay numeric.
	Aliases map[emsd.Address]string
}

// Formatted is an IPM rendered as Internet mail (§9.6).
type Formatted struct {
	Message    []byte      // RFC 5322, CRLF line ends, lines ≤ 998 octets, RFC 2047 where needed
	From       string      // envelope sender addr-spec ("" = null reverse path)
	Recipients []Recipient // To, Cc, Bcc, each in heading order, duplicates removed
}

// Header fields FormatIPM writes itself (or an MTA owns); extensions with
// these labels are dropped rather than duplicated or spoofed.
var reservedLabels = map[string]bool{
	"Date": true, "From": true, "Sender": true, "Reply-To": true, "To": true,
	"Cc": true, "Bcc": true, "Subject": true, "Message-Id": true,
	"In-Reply-To": true, "Mime-Version": true, "X-Priority": true,
	"X-Importance": true, "X-Auto-Forwarded": true, "Priority": true,
	"Importance": true, "X-Emsd-Mts": true, "Received": true,
	"Return-Path": true,
}

// FormatIPM renders ipm as an Internet message (§9.6 with its
// recommendations: Date:, X-Importance: High, a Message-ID from the
// options) plus its envelope.
func FormatIPM(ipm *emsd.IPM, o FormatOptions) (*Formatted, error) {
	if err := checkIPM("FormatIPM", ipm, o.Domain); err != nil {
		return nil, err
	}
	if o.Date.IsZero() {
		o.Date = time.Now()
	}
	f := &formatter{o: o}
	h := &ipm.Heading
	out := &Formatted{}

	f.field("Date", o.Date.UTC().Format("Mon, 02 Jan 2006 15:04:05 -0700"))
	from := f.address(h.Originator)
	out.From = from.spec
	f.field("From", from.header)
	if h.Sender != nil {
		f.field("Sender", f.address(*h.Sender).header)
	}
	if len(h.ReplyTo) > 0 {
		list := make([]string, len(h.ReplyTo))
		for i, a := range h.ReplyTo {
			list[i] = f.address(a).header
		}
		f.field("Reply-To", strings.Join(list, ", "))
	}
	if h.Subject != "" {
		f.field("Subject", encodeText(oneLine(h.Subject)))
	}

	// Recipients (§9.6): bit 1 Bcc (envelope only), bit 0 Cc, else To.
	var to, cc []string
	var env envelope
	for _, rd := range h.Recipients {
		a := f.address(rd.Recipient)
		switch env.add(rd.Flags, a) {
		case KindTo:
			to = append(to, a.header)
		case KindCc:
			cc = append(cc, a.header)
		}
	}
	out.Recipients = env.recipients()
	if len(to) > 0 {
		f.field("To", strings.Join(to, ", "))
	}
	if len(cc) > 0 {
		f.field("Cc", strings.Join(cc, ", "))
	}
	if len(to) == 0 && len(cc) == 0 {
		f.field("To", "undisclosed-recipients:;")
	}

	if h.RepliedTo != nil {
		var id string
		if h.RepliedTo.IsLocal {
			id = f.localID(h.RepliedTo.Local)
		} else {
			id = msgID(h.RepliedTo.RFC822)
		}
		if id != "" {
			f.field("In-Reply-To", id)
		}
	}
	if id := msgID(o.MessageID); id != "" {
		f.field("Message-ID", id)
	}
	// Per-message flags both ways (OP 13): the spec's X- fields, which the
	// reference writes, plus the RFC 2156 fields Internet clients know.
	switch {
	case h.Flags.Has(emsd.MsgPriorityUrgent):
		f.field("X-Priority", "Urgent")
		f.field("Priority", "urgent")
	case h.Flags.Has(emsd.MsgPriorityNonUrgent):
		f.field("X-Priority", "Non-Urgent")
		f.field("Priority", "non-urgent")
	}
	switch {
	case h.Flags.Has(emsd.MsgImportanceHigh):
		f.field("X-Importance", "High")
		f.field("Importance", "high")
	case h.Flags.Has(emsd.MsgImportanceLow):
		f.field("X-Importance", "Low")
		f.field("Importance", "low")
	}
	if h.Flags.Has(emsd.MsgAutoForwarded) {
		f.field("X-Auto-Forwarded", "True")
	}
	for _, x := range h.Extensions {
		label := x.Label
		if !validLabel(label) {
			continue
		}
		canon := textproto.CanonicalMIMEHeaderKey(label)
		if reservedLabels[canon] || strings.HasPrefix(canon, "Content-") {
			continue
		}
		f.field(label, encodeText(oneLine(x.Value)))
	}
	var body []byte
	if ipm.Body != nil {
		body = ipm.Body.Text
	}
	body = f.mime(h, body)
	if o.MTS != "" {
		f.field("X-EMSD-MTS", encodeText(oneLine(o.MTS)))
	}
	f.buf.WriteString("\r\n")
	f.buf.Write(body)
	out.Message = f.buf.Bytes()
	return out, nil
}

func checkIPM(fn string, ipm *emsd.IPM, domain string) error {
	if ipm == nil {
		return fmt.Errorf("mailconv: %s: nil IPM", fn)
	}
	if domain == "" {
		return fmt.Errorf("mailconv: %s: no domain for local addresses", fn)
	}
	return nil
}

type formatter struct {
	o   FormatOptions
	buf bytes.Buffer
}

// field writes one header field folded at blanks to lines of at most 78
// octets where possible. Values are single-line and their words are short
// enough (encodeText) to keep every line under 998 octets.
func (f *formatter) field(name, value string) {
	line := name + ":"
	if value == "" {
		f.buf.WriteString(line + "\r\n")
		return
	}
	words := strings.Split(value, " ")
	n := len(line)
	for i, w := range words {
		if i > 0 && n+1+len(w) > 78 && n > len(name)+1 {
			f.buf.WriteString(line + "\r\n")
			line, n = "", 0
		}
		line += " " + w
		n += 1 + len(w)
	}
	f.buf.WriteString(line + "\r\n")
}

// validLabel: a header field name (RFC 5322 §3.6.8) short enough for one
// folded line.
func validLabel(s string) bool {
	if s == "" || len(s) > maxExtLabel {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 33 || c > 126 || c == ':' {
			return false
		}
	}
	return true
}

// encodeText prepares unstructured text (RFC 5322 §3.2.5): RFC 2047 Q
// encoding when it is not ASCII or could be mistaken for encoded words,
// and B encoding in short words when a run without blanks would make a line
// too long for SMTP.
func encodeText(s string) string {
	longRun := false
	for _, w := range strings.Split(s, " ") {
		if len(w) > 900 {
			longRun = true
			break
		}
	}
	switch {
	case longRun:
		return encodeWordsB(s)
	case !IsASCII(s) || strings.Contains(s, "=?"):
		e := mime.QEncoding.Encode("utf-8", s)
		if e == s { // the encoder thought it needed nothing
			return encodeWordsB(s)
		}
		return e
	}
	return s
}

// encodeWordsB encodes all of s as B encoded words of at most 75 octets.
func encodeWordsB(s string) string {
	var words []string
	for len(s) > 0 {
		n := min(len(s), 45)
		for n < len(s) && n > 0 && !utf8.RuneStart(s[n]) {
			n--
		}
		if n == 0 {
			n = min(len(s), 45)
		}
		words = append(words, "=?utf-8?b?"+base64.StdEncoding.EncodeToString([]byte(s[:n]))+"?=")
		s = s[n:]
	}
	return strings.Join(words, " ")
}
