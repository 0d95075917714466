package mailconv

import (
	"bytes"
	"errors"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"mime/quotedprintable"
	"strings"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
)

// DSNAction is the Action field of a per-recipient DSN block (RFC 3464
// §2.3.3).
type DSNAction string

// DSN actions.
const (
	ActionFailed    DSNAction = "failed"
	ActionDelayed   DSNAction = "delayed"
	ActionDelivered DSNAction = "delivered"
	ActionRelayed   DSNAction = "relayed"
	ActionExpanded  DSNAction = "expanded"
)

// DSNRecipient reports on one recipient.
type DSNRecipient struct {
	Addr   string    // Final-Recipient addr-spec
	Action DSNAction // "" = failed
	// Status is the enhanced status code; "" = 5.0.0, 4.0.0 or 2.0.0 by
	// action.
	Status string
	// Diagnostic is the Diagnostic-Code, "type; text"; text without a
	// type gets "smtp; " ("" = none).
	Diagnostic  string
	RemoteMTA   string    // Remote-MTA host name, "" = none
	LastAttempt time.Time // Last-Attempt-Date, zero = none
	// OriginalRecipient is the sender's ORCPT ("type;address", RFC 3461
	// §4.2), returned as Original-Recipient; "" = none.
	OriginalRecipient string
}

// DSNOptions describe a delivery status notification (spec OP 17).
type DSNOptions struct {
	ReportingMTA string // this host's name: Reporting-MTA and the From: postmaster@ReportingMTA
	To           string // the original sender's addr-spec
	Date         time.Time
	// MessageID is the DSN's Message-ID; "" = one made of the date and 64
	// random bits. A server passes one from its message counter.
	MessageID string
	// OriginalHeaders is the original message, or just its header
	// section: its header (at most 32 KiB) is returned as
	// text/rfc822-headers.
	OriginalHeaders []byte
	ArrivalDate     time.Time // Arrival-Date, zero = none
	// EnvelopeID is the sender's ENVID (RFC 3461 §4.4), returned as
	// Original-Envelope-Id; "" = none.
	EnvelopeID string
	// InReplyTo is the Message-ID of the reported message, written as
	// In-Reply-To and References so that mail readers thread the report
	// with it; "" = none.
	InReplyTo  string
	Recipients []DSNRecipient
	// Explanation is the human-readable part; "" = generated from the
	// recipients.
	Explanation string
}

const maxDSNHeaders = 32 << 10

// DSN writes an RFC 3464 multipart/report: a text/plain explanation, the
// message/delivery-status, and the original header as
// text/rfc822-headers; From postmaster@ReportingMTA, CRLF line ends. Send
// it with the null reverse path (gateway.Relay.Send with from "").
func DSN(o DSNOptions) ([]byte, error) {
	if o.ReportingMTA == "" || len(o.Recipients) == 0 {
		return nil, errors.New("mailconv: DSN needs a reporting MTA and at least one recipient")
	}
	mta := oneLine(o.ReportingMTA)
	to := oneLine(o.To)
	if to == "" || strings.ContainsAny(to, "<> ") {
		return nil, fmt.Errorf("mailconv: DSN: bad recipient address %q", o.To)
	}
	if o.Date.IsZero() {
		o.Date = time.Now()
	}
	rcpts := make([]DSNRecipient, len(o.Recipients))
	failed, delayed := 0, 0
	for i, r := range o.Recipients {
		r.Addr = oneLine(r.Addr)
		if r.Action == "" {
			r.Action = ActionFailed
		}
		r.Action = DSNAction(oneLine(string(r.Action)))
		if r.Status == "" {
			switch r.Action {
			case ActionFailed:
				r.Status = "5.0.0"
			case ActionDelayed:
				r.Status = "4.0.0"
			default:
				r.Status = "2.0.0"
			}
		}
		r.Status = oneLine(r.Status)
		if d := oneLine(r.Diagnostic); d != "" && !hasTypePrefix(d) {
			r.Diagnostic = "smtp; " + d
		} else {
			r.Diagnostic = d
		}
		switch r.Action {
		case ActionFailed:
			failed++
		case ActionDelayed:
			delayed++
		}
		rcpts[i] = r
	}

	// message/delivery-status (RFC 3464 §2.2, §2.3).
	var st bytes.Buffer
	if id := oneLine(o.EnvelopeID); id != "" {
		fmt.Fprintf(&st, "Original-Envelope-Id: %s\r\n", id)
	}
	fmt.Fprintf(&st, "Reporting-MTA: dns; %s\r\n", mta)
	if !o.ArrivalDate.IsZero() {
		fmt.Fprintf(&st, "Arrival-Date: %s\r\n", rfc5322Date(o.ArrivalDate))
	}
	for _, r := range rcpts {
		typ := "rfc822"
		if !IsASCII(r.Addr) {
			typ = "utf-8" // RFC 6533
		}
		st.WriteString("\r\n")
		if t, a, ok := strings.Cut(oneLine(r.OriginalRecipient), ";"); ok && t != "" && a != "" {
			fmt.Fprintf(&st, "Original-Recipient: %s;%s\r\n", strings.TrimSpace(t), strings.TrimSpace(a))
		}
		fmt.Fprintf(&st, "Final-Recipient: %s; %s\r\nAction: %s\r\nStatus: %s\r\n", typ, r.Addr, r.Action, r.Status)
		if r.RemoteMTA != "" {
			fmt.Fprintf(&st, "Remote-MTA: dns; %s\r\n", oneLine(r.RemoteMTA))
		}
		if r.Diagnostic != "" {
			fmt.Fprintf(&st, "Diagnostic-Code: %s\r\n", r.Diagnostic)
		}
		if !r.LastAttempt.IsZero() {
			fmt.Fprintf(&st, "Last-Attempt-Date: %s\r\n", rfc5322Date(r.LastAttempt))
		}
	}
	statusType := "message/delivery-status"
	if !IsASCII(st.String()) {
		statusType = "message/global-delivery-status" // RFC 6533 allows UTF-8
	}

	text := o.Explanation
	if text == "" {
		text = explain(mta, rcpts)
	}
	hdr, _, _ := scanHeader(o.OriginalHeaders)
	hdr = bytes.TrimSuffix(hdr, []byte("\r\n"))
	if len(hdr) > maxDSNHeaders {
		hdr = hdr[:bytes.LastIndex(hdr[:maxDSNHeaders], []byte("\r\n"))+2]
	}

	parts := [][]byte{
		textPart("text/plain; charset=utf-8", []byte(text)),
		append([]byte("Content-Type: "+statusType+"\r\n\r\n"), st.Bytes()...),
	}
	switch {
	case len(hdr) == 0:
		// Nothing returned (an EMSD report names no header).
	case IsASCII(string(hdr)):
		parts = append(parts, textPart("text/rfc822-headers; charset=us-ascii", hdr))
	default:
		// RFC 6533 §3.4: a header with UTF-8 in it (an SMTPUTF8 message)
		// is returned as message/global-headers.
		parts = append(parts, append([]byte("Content-Type: message/global-headers\r\n\r\n"), hdr...))
	}
	boundary := dsnBoundary(parts)

	subject := "Delivery Status Notification (Success)"
	switch {
	case failed > 0:
		subject = "Undelivered Mail Returned to Sender"
	case delayed > 0:
		subject = "Delivery Status Notification (Delay)"
	}
	id := msgID(o.MessageID)
	if id == "" {
		id = fmt.Sprintf("<DSN.%08x.%016x@%s>", uint32(emsd.TimeOf(o.Date)), rand.Uint64(), mta)
	}
	var b bytes.Buffer
	f := &formatter{}
	f.field("Date", rfc5322Date(o.Date))
	f.field("From", "Mail Delivery System <postmaster@"+mta+">")
	f.field("To", to)
	f.field("Subject", subject)
	f.field("Message-ID", id)
	if r := msgID(o.InReplyTo); r != "" {
		f.field("In-Reply-To", r)
		f.field("References", r)
	}
	f.field("Auto-Submitted", "auto-replied") // RFC 3834: no replies, no loops
	f.field("MIME-Version", "1.0")
	f.field("Content-Type", `multipart/report; report-type=delivery-status; boundary="`+boundary+`"`)
	b.Write(f.buf.Bytes())
	b.WriteString("\r\nThis is a MIME-encapsulated delivery status notification.\r\n")
	for _, p := range parts {
		b.WriteString("\r\n--" + boundary + "\r\n")
		b.Write(p)
		if !bytes.HasSuffix(p, []byte("\r\n")) {
			b.WriteString("\r\n")
		}
	}
	b.WriteString("\r\n--" + boundary + "--\r\n")
	return b.Bytes(), nil
}

func hasTypePrefix(s string) bool {
	t, _, ok := strings.Cut(s, ";")
	return ok && t != "" && !strings.ContainsAny(t, " \t")
}

func rfc5322Date(t time.Time) string {
	return t.UTC().Format("Mon, 02 Jan 2006 15:04:05 -0700")
}

// textPart is a MIME part with the content transfer encoding its text
// needs to be 7-bit clean.
func textPart(ct string, data []byte) []byte {
	var b bytes.Buffer
	b.WriteString("Content-Type: " + ct + "\r\n")
	long := false
	for line := range bytes.SplitSeq(data, []byte("\n")) {
		if len(line) > 998 {
			long = true
		}
	}
	if IsASCII(string(data)) && !long {
		b.WriteString("Content-Transfer-Encoding: 7bit\r\n\r\n")
		b.Write(crlf(data))
		return b.Bytes()
	}
	b.WriteString("Content-Transfer-Encoding: quoted-printable\r\n\r\n")
	w := quotedprintable.NewWriter(&b)
	w.Write(toLF(data))
	w.Close()
	return crlf(b.Bytes())
}

// dsnBoundary derives a boundary that occurs in none of the parts.
func dsnBoundary(parts [][]byte) string {
	f := fnv.New64a()
	for _, p := range parts {
		f.Write(p)
	}
	for i := uint64(0); ; i++ {
		b := fmt.Sprintf("=_emsdp_%016x", f.Sum64()+i)
		found := false
		for _, p := range parts {
			found = found || bytes.Contains(p, []byte(b))
		}
		if !found {
			return b
		}
	}
}

func explain(mta string, rcpts []DSNRecipient) string {
	var b strings.Builder
	fmt.Fprintf(&b, "This is the mail system at host %s.\n\n", mta)
	groups := []struct {
		action DSNAction
		head   string
	}{
		{ActionFailed, "Your message could not be delivered to the following recipients:"},
		{ActionDelayed, "Your message has not yet been delivered to the following recipients; delivery will be retried:"},
		{ActionDelivered, "Your message was delivered to the following recipients:"},
		{ActionRelayed, "Your message was relayed to the following recipients:"},
		{ActionExpanded, "Your message was expanded for the following recipients:"},
	}
	for _, g := range groups {
		first := true
		for _, r := range rcpts {
			if r.Action != g.action {
				continue
			}
			if first {
				b.WriteString(g.head + "\n\n")
				first = false
			}
			fmt.Fprintf(&b, "  <%s>", r.Addr)
			if r.Diagnostic != "" {
				_, d, _ := strings.Cut(r.Diagnostic, ";")
				fmt.Fprintf(&b, ": %s", strings.TrimSpace(d))
			}
			b.WriteString("\n")
		}
		if !first {
			b.WriteString("\n")
		}
	}
	return b.String()
}

// StatusFor returns the enhanced status code (RFC 3463) for a DSN that
// reports an EMSD non-delivery diagnostic (§5).
func StatusFor(d emsd.Diagnostic) string {
	switch d {
	case emsd.DiagCongestion:
		return "5.4.5"
	case emsd.DiagLoopDetected:
		return "5.4.6"
	case emsd.DiagRecipientUnavailable:
		return "5.2.1"
	case emsd.DiagMaximumTimeExpired, emsd.DiagTransferAttemptsLimit:
		return "5.4.7"
	case emsd.DiagContentTooLong:
		return "5.3.4"
	case emsd.DiagSizeConstraintViolated:
		return "5.2.3"
	case emsd.DiagProtocolViolation:
		return "5.5.0"
	case emsd.DiagContentTypeNotSupported:
		return "5.6.1"
	case emsd.DiagTooManyRecipients:
		return "5.5.3"
	case emsd.DiagLineTooLong:
		return "5.6.0"
	case emsd.DiagUnrecognizedAddress:
		return "5.1.3"
	case emsd.DiagRecipientUnknown:
		return "5.1.1"
	case emsd.DiagRecipientRefused:
		return "5.7.1"
	case emsd.DiagUnableToCompleteTransfer:
		return "5.4.0"
	}
	return "5.0.0"
}
