package mailconv

import (
	"net/mail"
	"strconv"
	"strings"
	"time"

	gomail "github.com/emersion/go-message/mail"

	"github.com/esro-emsdp/emsdp/emsd"
)

// report builds the ReportDelivery of a mail marked
// "X-EMSD-Message-Type: Report" (§9.9, OP 16): the reported id from
// X-EMSD-Original-Message-Id, one entry per X-EMSD-Intended-Recipient of
// the form `<addr> (<reason>/<diag>) [explanation]` or
// `<addr> (DELIVERED [date]) [explanation]`. Unlike the reference, ids are
// trimmed (no trailing blank or CR) and DELIVERED entries get their address
// and a time (the date in the entry, else Date:, else the conversion time).
func (p *parser) report(date *emsd.Time) *emsd.ReportDelivery {
	r := &emsd.ReportDelivery{}
	id := oneLine(p.h.Get("X-Emsd-Original-Message-Id"))
	if id == "" {
		p.note("report without X-EMSD-Original-Message-Id")
	}
	if c := cutUTF8(id, emsd.MaxMessageID); c != id {
		p.note("reported message id cut to %d octets", emsd.MaxMessageID)
		id = c
	}
	r.ReportedMessageID = emsd.RFC822ID(id)
	fallback := emsd.TimeOf(p.o.Now)
	if date != nil {
		fallback = *date
	}
	entries := p.h.Values("X-Emsd-Intended-Recipient")
	if len(entries) > emsd.MaxRecipients {
		p.note("report: %d recipients, kept %d", len(entries), emsd.MaxRecipients)
		entries = entries[:emsd.MaxRecipients]
	}
	for _, v := range entries {
		r.Recipients = append(r.Recipients, p.reportEntry(oneLine(decodeWords(v)), fallback))
	}
	// Explanations have no §5 limit; shed them, then entries, if the report
	// would not fit the content budget.
	shed := 0
	for encodedSize(r) > p.o.MaxContent && len(r.Recipients) > 0 {
		done := false
		for i := len(r.Recipients) - 1; i >= 0 && !done; i-- {
			if nd := r.Recipients[i].NonDelivery; nd != nil && nd.Explanation != "" {
				nd.Explanation = ""
				done = true
			}
		}
		if !done {
			r.Recipients = r.Recipients[:len(r.Recipients)-1]
		}
		shed++
	}
	if shed > 0 {
		p.note("report over %d octets: %d explanations or entries dropped", p.o.MaxContent, shed)
	}
	return r
}

func (p *parser) reportEntry(v string, fallback emsd.Time) emsd.PerRecipReportData {
	var e emsd.PerRecipReportData
	addrText, inside, explanation := v, "", ""
	if i := strings.LastIndexByte(v, '('); i >= 0 {
		if j := strings.IndexByte(v[i:], ')'); j >= 0 {
			addrText, inside, explanation = v[:i], strings.TrimSpace(v[i+1:i+j]), strings.TrimSpace(v[i+j+1:])
		}
	}
	addrText = strings.TrimSpace(addrText)
	if a, err := gomail.ParseAddress(addrText); err == nil {
		e.Recipient, _ = p.m.orAddress(a, &p.notes)
	} else {
		s := cutUTF8(addrText, emsd.MaxRFC822Address)
		if s != addrText {
			p.note("report recipient cut to %d octets", emsd.MaxRFC822Address)
		}
		e.Recipient = emsd.RFC822OR(s)
	}
	explanation = cutUTF8(explanation, maxExtValue)
	if rest, ok := cutPrefixFold(inside, "DELIVERED"); ok {
		e.Delivery = &emsd.DeliveryReport{DeliveryTime: reportTime(rest, fallback)}
		return e
	}
	nd := &emsd.NonDeliveryReport{Explanation: explanation}
	rs, ds, hasDiag := strings.Cut(inside, "/")
	reason, err1 := strconv.ParseUint(strings.TrimSpace(rs), 10, 32)
	diag, err2 := strconv.ParseUint(strings.TrimSpace(ds), 10, 32)
	switch {
	case err1 == nil && hasDiag && err2 == nil:
		d := emsd.Diagnostic(diag)
		nd.Reason, nd.Diagnostic = emsd.NonDeliveryReason(reason), &d
	case err1 == nil && !hasDiag:
		nd.Reason = emsd.NonDeliveryReason(reason)
	default:
		// §9.9: a malformed code is reason 0 / diagnostic 13; the text is
		// kept as the explanation.
		d := emsd.DiagUnableToCompleteTransfer
		nd.Reason, nd.Diagnostic = emsd.ReasonTransferFailure, &d
		if nd.Explanation == "" {
			nd.Explanation = cutUTF8(inside, maxExtValue)
		}
		p.note("report entry %q: malformed code", cutUTF8(v, 80))
	}
	e.NonDelivery = nd
	return e
}

func cutPrefixFold(s, prefix string) (string, bool) {
	if len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix) {
		return s[len(prefix):], true
	}
	return s, false
}

// reportTime reads the time after DELIVERED: an RFC 5322 date or Unix
// seconds, optionally introduced by "at", ":" or ";".
func reportTime(s string, fallback emsd.Time) emsd.Time {
	s = strings.TrimSpace(s)
	s = strings.TrimLeft(s, ":; ")
	if rest, ok := cutPrefixFold(s, "at "); ok {
		s = strings.TrimSpace(rest)
	}
	if s == "" {
		return fallback
	}
	if n, err := strconv.ParseUint(s, 10, 32); err == nil {
		return emsd.Time(n)
	}
	if t, err := mail.ParseDate(s); err == nil {
		return emsd.TimeOf(t.UTC())
	}
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return emsd.TimeOf(t.UTC())
	}
	return fallback
}
