package mailconv

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"mime"
	"strings"
	"time"

	"github.com/emersion/go-message"
	_ "github.com/emersion/go-message/charset" // charset decoders for bodies and encoded words
	gomail "github.com/emersion/go-message/mail"
	"github.com/emersion/go-message/textproto"

	"github.com/esro-emsdp/emsdp/emsd"
)

// ErrMalformed reports input that is not a mail message at all.
var ErrMalformed = errors.New("mailconv: malformed message")

// DefaultMaxContent is the default budget for encoded content: what 32
// segments (§8) carry when every ESRO user data is at most
// emsd.DefaultMaxUserData octets and the DeliverArgument envelope is the
// largest the server sends (127-octet rfc822 message id, both times, no
// security element): 32 × 1340 octets.
const DefaultMaxContent = 42880

// MinMaxContent is the smallest content budget ParseMessage accepts: room
// for a heading of 256 device recipients plus every single-valued field at
// its §5 limit.
const MinMaxContent = 8192

// Per-field caps where §5 sets none: they keep one extension on one header
// line and leave the content budget to the body.
const (
	maxExtLabel = 76
	maxExtValue = 998
	maxTextRead = 1 << 20 // decoded octets read from one text part
	maxParts    = 256     // MIME parts examined
	maxDepth    = 16      // MIME nesting examined
)

// ParseOptions tune ParseMessage. The zero value is usable.
type ParseOptions struct {
	// Now is the conversion time (invented Message-IDs, DELIVERED report
	// entries without a time); zero = time.Now().
	Now time.Time
	// Domain names the host in invented Message-IDs (§6.3 b); "" = the
	// first Mapping domain, else "localhost".
	Domain string
	// Number is the counter part of an invented Message-ID. A server
	// passes a number from its store's message counter, which never
	// repeats for one second of Now, so that no two messages it accepts
	// get the same invented id. 0 = a random number: two conversions then
	// collide only by chance (1 in 2^32 within the same second), never
	// because they have the same octets.
	Number uint32
	// KeepMessageID carries the sender's Message-ID header as the first
	// heading extension, labelled "Message-ID", for a server that delivers
	// the message under an id of its own (so that two messages reusing
	// one Message-ID stay two). An invented id is not carried. The device
	// side (emsdp ua) writes it back as the Message-ID header.
	KeepMessageID bool
	// EnvelopeFrom (the SMTP reverse path) is the originator when the mail
	// has no usable From:, Sender: or Return-Path:.
	EnvelopeFrom string
	// EnvelopeTo lists the envelope recipients this conversion is
	// delivered to. Those that map to a device but appear in no To:/Cc:/
	// Bcc: header are added as blind-copy recipients so the device finds
	// itself among the recipients. Convert once per device to keep one
	// device's Bcc hidden from another.
	EnvelopeTo []string
	// MaxContent is the budget for the encoded IPM or report; 0 =
	// DefaultMaxContent, values under MinMaxContent are raised to it. The
	// body is cut to fit (noted in Truncated).
	MaxContent int
}

// Parsed is an Internet mail converted for delivery to devices (§9.8).
type Parsed struct {
	ContentType emsd.ContentType // emsd.ContentIPM, or emsd.ContentDeliveryReport with Report
	IPM         *emsd.IPM
	Report      *emsd.ReportDelivery
	// MessageID is the Message-ID header with its angle brackets, or an
	// invented <EMSD.%08x.%08x@domain> when it is missing, malformed or
	// longer than emsd.MaxMessageID; it fits an rfc822 MessageId.
	MessageID string
	// InventedID tells that MessageID was invented (ParseOptions.Number).
	InventedID bool
	// SubmissionTime is the Date: header in UTC (OP 14); nil when absent
	// or unparseable.
	SubmissionTime *emsd.Time
	// Truncated describes, for humans, everything cut, dropped or guessed
	// to fit the EMSD limits (§5, OP 8).
	Truncated []string
	// BodyCut, when not "", says how the body text was cut or dropped to
	// fit MaxContent: the device would get less than was sent, which the
	// sender must hear of (refused, or told by a DSN).
	BodyCut string
}

// ParseMessage converts an RFC 5322/MIME message to EMSD content (§9.8,
// §6.2, OP 8, 14, 16). It only fails on input that has no header field at
// all; everything else is converted as well as it can be, and whatever it
// returns encodes with package emsd (versions 1.1 and 1.0) within
// o.MaxContent octets.
//
// As with the reference, any Internet sender can mark a mail as a report;
// a server that wants reports only from its own components must check the
// origin before calling ParseMessage.
func ParseMessage(msg []byte, m Mapping, o ParseOptions) (*Parsed, error) {
	hdr, body, n := scanHeader(msg)
	if n == 0 {
		return nil, fmt.Errorf("%w: no header fields", ErrMalformed)
	}
	h, err := textproto.ReadHeader(bufio.NewReader(bytes.NewReader(hdr)))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if o.Now.IsZero() {
		o.Now = time.Now()
	}
	if o.MaxContent <= 0 {
		o.MaxContent = DefaultMaxContent
	}
	o.MaxContent = max(o.MaxContent, MinMaxContent)
	p := &parser{h: gomail.Header{Header: message.Header{Header: h}}, m: m, o: o, msg: msg}
	in := &Parsed{}
	in.MessageID = p.messageID()
	in.InventedID = p.invented
	if t, err := p.h.Date(); err == nil && !t.IsZero() {
		st := emsd.TimeOf(t.UTC())
		in.SubmissionTime = &st
	}
	if p.isReport() {
		in.ContentType = emsd.ContentDeliveryReport
		in.Report = p.report(in.SubmissionTime)
	} else {
		in.ContentType = emsd.ContentIPM
		in.IPM = p.ipm(body)
	}
	in.Truncated, in.BodyCut = p.notes, p.bodyCut
	return in, nil
}

// scanHeader splits msg into a cleaned header section (valid fields only,
// CRLF ends, terminated by an empty line) and the body. Like sendmail it
// ends the header at the first line that is neither a field nor a
// continuation; mbox "From " and ">From " lines are dropped (§9.8).
func scanHeader(msg []byte) (hdr, body []byte, fields int) {
	var out bytes.Buffer
	rest := msg
	inField := false
	for len(rest) > 0 {
		line := rest
		next := []byte(nil)
		if i := bytes.IndexByte(rest, '\n'); i >= 0 {
			line, next = rest[:i], rest[i+1:]
		}
		line = bytes.TrimSuffix(line, []byte("\r"))
		switch {
		case len(line) == 0:
			if inField {
				out.WriteString("\r\n")
			}
			out.WriteString("\r\n")
			return out.Bytes(), next, fields
		case line[0] == ' ' || line[0] == '\t':
			if inField {
				out.WriteString("\r\n")
				out.Write(line)
			}
		case bytes.HasPrefix(line, []byte("From ")) || bytes.HasPrefix(line, []byte(">From ")):
		case validFieldLine(line):
			if inField {
				out.WriteString("\r\n")
			}
			out.Write(line)
			inField = true
			fields++
		default:
			if inField {
				out.WriteString("\r\n")
			}
			out.WriteString("\r\n")
			return out.Bytes(), rest, fields
		}
		rest = next
	}
	if inField {
		out.WriteString("\r\n")
	}
	out.WriteString("\r\n")
	return out.Bytes(), nil, fields
}

// validFieldLine: a non-empty name of printable ASCII other than ':', then
// optional blanks, then ':'.
func validFieldLine(line []byte) bool {
	i := 0
	for i < len(line) && line[i] >= 33 && line[i] <= 126 && line[i] != ':' {
		i++
	}
	if i == 0 {
		return false
	}
	for i < len(line) && (line[i] == ' ' || line[i] == '\t') {
		i++
	}
	return i < len(line) && line[i] == ':'
}

type parser struct {
	h        gomail.Header
	m        Mapping
	o        ParseOptions
	msg      []byte
	notes    []string
	aliases  []string // AliasExtension values
	id       string   // the message's id (messageID)
	invented bool     // id was invented
	bodyCut  string
}

func (p *parser) note(format string, args ...any) {
	p.notes = append(p.notes, fmt.Sprintf(format, args...))
}

// decodeWords decodes RFC 2047 encoded words to UTF-8; on failure the raw
// text is kept.
func decodeWords(s string) string {
	d := mime.WordDecoder{CharsetReader: message.CharsetReader}
	if out, err := d.DecodeHeader(s); err == nil {
		return out
	}
	return s
}

// isReport implements OP 16: the header, whatever the line ends, with a
// value matched case-insensitively.
func (p *parser) isReport() bool {
	for _, v := range p.h.Values("X-Emsd-Message-Type") {
		if strings.EqualFold(strings.TrimSpace(v), "report") {
			return true
		}
	}
	return false
}

func (p *parser) ipm(body []byte) *emsd.IPM {
	h := &emsd.Heading{}
	from := p.addresses("From")
	sender := p.addresses("Sender")
	h.Originator = p.originator(from, sender)
	// §9.8: sender only if it differs from From:.
	if len(sender) > 0 && len(from) > 0 && !sameAddress(sender[0], from[0]) {
		s := sender[0].or
		h.Sender = &s
	}
	h.Recipients = p.recipients()
	// Reply-To: all addresses; a single one equal to the originator (or the
	// sender) says nothing and is left out (like the UA rule of §10.2, and
	// unlike the reference MTS, which drops a lone Reply-To unless Sender:
	// differs from From:).
	if rt := p.addresses("Reply-To"); len(rt) > 0 {
		redundant := len(rt) == 1 && len(from) > 0 && sameAddress(rt[0], from[0]) &&
			(len(sender) == 0 || sameAddress(sender[0], from[0]))
		if !redundant {
			if len(rt) > emsd.MaxReplyTo {
				p.note("Reply-To: %d addresses, kept %d", len(rt), emsd.MaxReplyTo)
				rt = rt[:emsd.MaxReplyTo]
			}
			h.ReplyTo = make([]emsd.ORAddress, len(rt))
			for i, a := range rt {
				h.ReplyTo[i] = a.or
			}
		}
	}
	if v := strings.TrimSpace(p.h.Get("In-Reply-To")); v != "" {
		ids, _ := p.h.MsgIDList("In-Reply-To")
		id := ""
		if len(ids) > 0 {
			id = "<" + ids[0] + ">"
		} else if IsASCII(v) {
			id = oneLine(v)
		}
		if id != "" && len(id) <= emsd.MaxMessageID && IsASCII(id) {
			r := emsd.RFC822ID(id)
			h.RepliedTo = &r
		} else {
			p.note("In-Reply-To: unusable or longer than %d octets, dropped", emsd.MaxMessageID)
		}
	}
	if p.h.Has("Subject") {
		s, _ := p.h.Subject()
		s = oneLine(s)
		h.Subject = cutUTF8(s, emsd.MaxSubject)
		if h.Subject != s {
			p.note("Subject: cut from %d to %d octets", len(s), len(h.Subject))
		}
	}
	consumed := p.flags(h)
	text, transformed := p.body(h, body)
	h.Extensions = p.extensions(consumed, transformed)
	if p.o.KeepMessageID && !p.invented {
		// First, so that fit sheds it last; the 64th extension gives way.
		h.Extensions = append([]emsd.Extension{{Label: MessageIDExtension, Value: p.id}}, h.Extensions...)
		if len(h.Extensions) > emsd.MaxExtensions {
			h.Extensions = h.Extensions[:emsd.MaxExtensions]
			p.note("the last header field dropped for the Message-ID extension")
		}
	}
	for _, al := range p.aliases {
		if len(h.Extensions) >= emsd.MaxExtensions {
			p.note("no room for the aliases as addressed")
			break
		}
		h.Extensions = append(h.Extensions, emsd.Extension{Label: AliasExtension, Value: al})
	}
	ipm := &emsd.IPM{Heading: *h, Body: &emsd.Body{Text: text}}
	p.fit(ipm)
	return ipm
}

// fit keeps the encoded IPM within the content budget: the heading may use
// half of it (extensions, then reply-to, then non-device recipients are
// shed from the end), the body the rest (cut with a visible marker).
func (p *parser) fit(ipm *emsd.IPM) {
	h := &ipm.Heading
	text := ipm.Body.Text
	ipm.Body.Text = nil
	shedExt, shedRT, shedRcpt := 0, 0, 0
	for encodedSize(ipm) > p.o.MaxContent/2 {
		switch {
		case len(h.Extensions) > 0:
			h.Extensions = h.Extensions[:len(h.Extensions)-1]
			shedExt++
		case len(h.ReplyTo) > 1:
			h.ReplyTo = h.ReplyTo[:len(h.ReplyTo)-1]
			shedRT++
		default:
			i := len(h.Recipients) - 1
			for i >= 0 && h.Recipients[i].Recipient.IsLocal {
				i--
			}
			if i < 0 {
				// Only devices left: the heading is what it is.
				goto body
			}
			h.Recipients = append(h.Recipients[:i], h.Recipients[i+1:]...)
			shedRcpt++
		}
	}
body:
	if shedExt+shedRT+shedRcpt > 0 {
		p.note("heading over %d octets: dropped %d extensions, %d reply-to and %d recipient addresses",
			p.o.MaxContent/2, shedExt, shedRT, shedRcpt)
	}
	ipm.Body.Text = text
	over := encodedSize(ipm) - p.o.MaxContent
	if over <= 0 {
		return
	}
	total := len(text)
	marker := func(n int) string {
		return fmt.Sprintf("\n[message truncated: %d of %d octets]\n", n, total)
	}
	// Shrinking the body also shrinks its length octets, so this converges
	// in a few rounds.
	room := len(text) - over
	for {
		n := max(room-len(marker(total)), 0)
		cut := cutUTF8Bytes(text, n)
		// End at a line boundary when one is close.
		if i := bytes.LastIndexByte(cut, '\n'); i >= 0 && len(cut)-i < 200 {
			cut = cut[:i+1]
		}
		ipm.Body.Text = append(append([]byte(nil), cut...), marker(len(cut))...)
		over = encodedSize(ipm) - p.o.MaxContent
		if over <= 0 {
			p.bodyCut = fmt.Sprintf("body cut from %d to %d octets to fit %d octets of content (32 segments)", total, len(cut), p.o.MaxContent)
			p.note("%s", p.bodyCut)
			return
		}
		if n == 0 {
			ipm.Body.Text = nil
			p.bodyCut = fmt.Sprintf("body of %d octets dropped: no room in %d octets of content", total, p.o.MaxContent)
			p.note("%s", p.bodyCut)
			return
		}
		room -= over
	}
}

// encodedSize is the larger of the 1.1 and 1.0 encodings (the server may
// deliver either, §4); a content the codec refuses counts as too big.
func encodedSize(c emsd.Content) int {
	n := 0
	for _, v := range []emsd.Version{emsd.V1_1, emsd.V1_0} {
		b, err := c.Marshal(emsd.Options{Version: v})
		if err != nil {
			return 1 << 30
		}
		n = max(n, len(b))
	}
	return n
}

// readAll reads at most limit octets of r and drains the rest so that the
// size is known; errors are reported, what was read is kept.
func readAll(r io.Reader, limit int) (data []byte, size int64, err error) {
	var buf bytes.Buffer
	n, err := io.Copy(&buf, io.LimitReader(r, int64(limit)))
	size = n
	if err == nil {
		var m int64
		m, err = io.Copy(io.Discard, r)
		size += m
	}
	if errors.Is(err, io.ErrUnexpectedEOF) {
		err = nil
	}
	return buf.Bytes(), size, err
}
