package mailconv

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"mime"
	"mime/quotedprintable"
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

// Formatted is an IPM rendered as Internet mail (§9.6).
type Formatted struct {
	Message    []byte      // RFC 5322, CRLF line ends, lines ≤ 998 octets, RFC 2047 where needed
	From       string      // envelope sender addr-spec ("" = null reverse path)
	Recipients []Recipient // To, Cc, Bcc, each in heading order, duplicates removed
}

// ErrBadAddress is the cause in Recipient.Err.
var ErrBadAddress = errors.New("mailconv: not an Internet mail address")

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

func checkIPM(fn string, ipm *emsd.IPM, domain string) error {
	if ipm == nil {
		return fmt.Errorf("mailconv: %s: nil IPM", fn)
	}
	if domain == "" {
		return fmt.Errorf("mailconv: %s: no domain for local addresses", fn)
	}
	return nil
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

// mime writes the MIME fields and returns the body to send. Text bodies
// (no content type, or text/*) are sent as UTF-8 with 7bit when every line
// allows it and quoted-printable otherwise; a body the IPM declares as
// already encoded (quoted-printable, base64) or as non-text (multipart, ...)
// is passed through with its declared fields, as the reference does.
func (f *formatter) mime(h *emsd.Heading, body []byte) []byte {
	ct := oneLine(h.MIMEContentType)
	cte := strings.ToLower(oneLine(h.MIMEContentTransferEncoding))
	mt, params, err := mime.ParseMediaType(ct)
	if ct == "" || err != nil || !IsASCII(ct) {
		mt, params = "text/plain", map[string]string{}
	}
	version := oneLine(h.MIMEVersion)
	if version == "" || !IsASCII(version) {
		version = "1.0"
	}
	idDesc := func() {
		if id := oneLine(h.MIMEContentID); id != "" && IsASCII(id) {
			f.field("Content-ID", id)
		}
		if d := oneLine(h.MIMEContentDescription); d != "" {
			f.field("Content-Description", encodeText(d))
		}
	}
	passthrough := ct != "" && err == nil && IsASCII(ct) &&
		(!strings.HasPrefix(mt, "text/") || cte == "quoted-printable" || cte == "base64")
	if passthrough {
		f.field("MIME-Version", version)
		f.field("Content-Type", ct)
		// A single non-text entity in raw octets that SMTP lines cannot
		// carry is base64-encoded (its decoded content is unchanged);
		// multipart bodies and declared encodings are the device's own.
		raw := cte == "" || cte == "7bit" || cte == "8bit" || cte == "binary"
		if raw && !strings.HasPrefix(mt, "multipart/") && !strings.HasPrefix(mt, "message/") && !lineSafe(body) {
			f.field("Content-Transfer-Encoding", "base64")
			idDesc()
			return base64Lines(body)
		}
		if cte != "" && validLabel(cte) {
			f.field("Content-Transfer-Encoding", cte)
		}
		idDesc()
		return crlf(body)
	}
	text := bytes.ReplaceAll(body, []byte("\r"), nil) // §9.6: all CR removed
	cs := strings.ToLower(params["charset"])
	// Octets declared in another charset keep that charset; everything else
	// is sent as UTF-8.
	if otherCharset := !utf8.Valid(text) && cs != "" && cs != "utf-8" && cs != "utf8" && cs != "us-ascii"; !otherCharset {
		text, _ = validUTF8(text, cs == "utf-8" || cs == "utf8")
		switch {
		case !IsASCII(string(text)):
			params["charset"] = "utf-8"
		case cs == "":
			params["charset"] = "us-ascii"
		}
	}
	sevenBit := lineSafe(text)
	if sevenBit && ct == "" && h.MIMEVersion == "" && cte == "" && h.MIMEContentID == "" && h.MIMEContentDescription == "" {
		// Plain ASCII mail without MIME, as the reference writes it.
		return crlf(text)
	}
	f.field("MIME-Version", version)
	f.field("Content-Type", mime.FormatMediaType(mt, params))
	if sevenBit {
		f.field("Content-Transfer-Encoding", "7bit")
		idDesc()
		return crlf(text)
	}
	f.field("Content-Transfer-Encoding", "quoted-printable")
	idDesc()
	var b bytes.Buffer
	w := quotedprintable.NewWriter(&b)
	w.Write(text)
	w.Close()
	return crlf(b.Bytes())
}

// crlf converts line ends to CRLF and ends the text with one.
func crlf(b []byte) []byte {
	b = toLF(b)
	out := make([]byte, 0, len(b)+len(b)/32+2)
	for _, c := range b {
		if c == '\n' {
			out = append(out, '\r')
		}
		out = append(out, c)
	}
	if len(out) > 0 && !bytes.HasSuffix(out, []byte("\r\n")) {
		out = append(out, '\r', '\n')
	}
	return out
}

// lineSafe: 7-bit text without NUL or CR whose lines fit SMTP's 998 octets.
func lineSafe(b []byte) bool {
	if !IsASCII(string(b)) || bytes.IndexByte(b, 0) >= 0 || bytes.IndexByte(b, '\r') >= 0 {
		return false
	}
	for line := range bytes.SplitSeq(b, []byte("\n")) {
		if len(line) > 998 {
			return false
		}
	}
	return true
}

// base64Lines encodes b in CRLF-terminated lines of 76 characters.
func base64Lines(b []byte) []byte {
	enc := base64.StdEncoding.EncodeToString(b)
	out := make([]byte, 0, len(enc)+len(enc)/76*2+2)
	for len(enc) > 76 {
		out = append(out, enc[:76]...)
		out = append(out, '\r', '\n')
		enc = enc[76:]
	}
	out = append(out, enc...)
	return append(out, '\r', '\n')
}
