package server

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/gateway"
	"github.com/esro-emsdp/emsdp/store"
)

// outcome is what happened to one recipient of a message, for a report.
type outcome struct {
	delivered bool
	at        time.Time
	reason    emsd.NonDeliveryReason
	diag      emsd.Diagnostic
	text      string // explanation (e.g. the smarthost's reply)
}

func failed(reason emsd.NonDeliveryReason, diag emsd.Diagnostic, text string) outcome {
	return outcome{reason: reason, diag: diag, text: text}
}

// reportWork builds the reports r asks for about o (spec emsd.md §9.10
// with Open Point 17): an EMSD report to a device originator when the
// recipient's flags request it (bit 6 delivery, bit 5 non-delivery), and
// an RFC 3464 DSN to an Internet sender on failure (an accepted SMTP
// message must be bounced, RFC 5321 §6.1) or on success when requested.
// Reports are never reported on: their own Report is empty.
func (s *Server) reportWork(ctx context.Context, r store.Report, o outcome) (store.Work, error) {
	var w store.Work
	flags := emsd.PerRecipientFlags(r.Flags)
	if o.at.IsZero() {
		o.at = time.Now()
	}
	want := flags.Has(emsd.RcptNonDeliveryReport)
	if o.delivered {
		want = flags.Has(emsd.RcptDeliveryReport)
	}
	if r.Device != 0 && want {
		d, err := s.deviceReport(ctx, r, o)
		if err != nil {
			return w, err
		}
		w.Deliveries = append(w.Deliveries, d)
	}
	if r.Mail != "" && (!o.delivered || flags.Has(emsd.RcptDeliveryReport)) {
		rel, err := s.dsn(r, o)
		if err != nil {
			return w, err
		}
		w.Relays = append(w.Relays, rel)
	}
	return w, nil
}

// newLocalID allocates a local message id for a message the server
// itself originates (reports, notices).
func (s *Server) newLocalID(ctx context.Context, now time.Time) (emsd.MessageID, error) {
	n, err := s.st.NextMessageNumber(ctx, now)
	if err != nil {
		return emsd.MessageID{}, err
	}
	return emsd.LocalID(emsd.TimeOf(now), n), nil
}

// deviceReport is an EMSD ReportDelivery (content type 2) for the
// originator device, or a plain-text notice when reports = "ipm".
func (s *Server) deviceReport(ctx context.Context, r store.Report, o outcome) (store.NewDelivery, error) {
	rep := &emsd.ReportDelivery{Recipients: []emsd.PerRecipReportData{{Recipient: decodeOR(r.Recipient)}}}
	if id, err := decodeMsgID(r.MessageID); err == nil {
		rep.ReportedMessageID = id
	}
	if o.delivered {
		rep.Recipients[0].Delivery = &emsd.DeliveryReport{DeliveryTime: emsd.TimeOf(o.at)}
	} else {
		d := o.diag
		rep.Recipients[0].NonDelivery = &emsd.NonDeliveryReport{Reason: o.reason, Diagnostic: &d,
			Explanation: clip(o.text, 127)}
	}
	if s.conf().Delivery.Reports == "ipm" {
		return s.noticeDelivery(ctx, r.Device, rep)
	}
	content, err := rep.Marshal(emsd.Options{})
	if err != nil {
		// An explanation the codec refuses (it is clipped, so unlikely):
		// send the report without it.
		if rep.Recipients[0].NonDelivery != nil {
			rep.Recipients[0].NonDelivery.Explanation = ""
		}
		if content, err = rep.Marshal(emsd.Options{}); err != nil {
			return store.NewDelivery{}, fmt.Errorf("server: encode report: %w", err)
		}
	}
	now := time.Now()
	id, err := s.newLocalID(ctx, now)
	if err != nil {
		return store.NewDelivery{}, err
	}
	s.metrics.reports.WithLabelValues("emsd").Inc()
	return store.NewDelivery{Device: r.Device, MessageID: encodeMsgID(id), ContentType: uint32(emsd.ContentDeliveryReport),
		Content: content, Priority: 1, NextAttempt: now, Expires: now.Add(time.Duration(s.conf().Delivery.Expiry))}, nil
}

// noticeDelivery renders a report as an IPM from the postmaster, for
// devices that accept only content type 32 (the reference UA, spec
// emsd.md §9.10).
func (s *Server) noticeDelivery(ctx context.Context, dev uint32, rep *emsd.ReportDelivery) (store.NewDelivery, error) {
	ipm := s.noticeIPM(emsd.Address(dev), rep)
	content, err := ipm.Marshal(emsd.Options{})
	if err != nil {
		return store.NewDelivery{}, fmt.Errorf("server: encode notice: %w", err)
	}
	now := time.Now()
	id, err := s.newLocalID(ctx, now)
	if err != nil {
		return store.NewDelivery{}, err
	}
	s.metrics.reports.WithLabelValues("notice").Inc()
	return store.NewDelivery{Device: dev, MessageID: encodeMsgID(id), ContentType: uint32(emsd.ContentIPM),
		Content: content, Priority: 1, NextAttempt: now, Expires: now.Add(time.Duration(s.conf().Delivery.Expiry))}, nil
}

func (s *Server) noticeIPM(to emsd.Address, rep *emsd.ReportDelivery) *emsd.IPM {
	var b strings.Builder
	subject := "Delivery report"
	fmt.Fprintf(&b, "Your message %s:\n", rep.ReportedMessageID)
	for _, e := range rep.Recipients {
		switch {
		case e.Delivery != nil:
			fmt.Fprintf(&b, "  %s: delivered at %s\n", e.Recipient, e.Delivery.DeliveryTime.UTC().Format(time.RFC1123Z))
		case e.NonDelivery != nil:
			subject = "Non-delivery report"
			fmt.Fprintf(&b, "  %s: could not be delivered (%s", e.Recipient, e.NonDelivery.Reason)
			if e.NonDelivery.Diagnostic != nil {
				fmt.Fprintf(&b, ", %s", *e.NonDelivery.Diagnostic)
			}
			b.WriteString(")\n")
			if e.NonDelivery.Explanation != "" {
				fmt.Fprintf(&b, "    %s\n", e.NonDelivery.Explanation)
			}
		}
	}
	return &emsd.IPM{
		Heading: emsd.Heading{
			Originator: emsd.RFC822OR("postmaster@" + s.domain),
			Recipients: []emsd.RecipientData{{Recipient: emsd.LocalOR(to, "")}},
			Subject:    subject,
		},
		Body: &emsd.Body{Text: []byte(b.String())},
	}
}

// noticeFromReport turns a report delivery the device refused into a
// notice (reports = "auto").
func (s *Server) noticeFromReport(ctx context.Context, d *store.Delivery) (store.NewDelivery, bool) {
	if d.ContentType != uint32(emsd.ContentDeliveryReport) || s.conf().Delivery.Reports != "auto" {
		return store.NewDelivery{}, false
	}
	var rep emsd.ReportDelivery
	if err := rep.Unmarshal(d.Content, emsd.Options{}); err != nil {
		return store.NewDelivery{}, false
	}
	nd, err := s.noticeDelivery(ctx, d.Device, &rep)
	if err != nil {
		s.log.Warn("report notice", "device", emsd.Address(d.Device), "err", err)
		return store.NewDelivery{}, false
	}
	return nd, true
}

// dsn is an RFC 3464 bounce (or success notice) to an Internet sender,
// relayed with the null reverse path.
func (s *Server) dsn(r store.Report, o outcome) (store.NewRelay, error) {
	rc := gateway.DSNRecipient{Addr: strings.TrimPrefix(r.Recipient, "R:"), Action: gateway.ActionDelivered,
		LastAttempt: o.at}
	if !o.delivered {
		rc.Action = gateway.ActionFailed
		rc.Status = gateway.StatusFor(o.diag)
		if o.text != "" {
			rc.Diagnostic = "x-emsd; " + oneLine(o.text)
		}
	}
	msg, err := gateway.DSN(gateway.DSNOptions{ReportingMTA: s.hostname, To: r.Mail, Date: time.Now(),
		OriginalHeaders: r.Headers, Recipients: []gateway.DSNRecipient{rc}})
	if err != nil {
		return store.NewRelay{}, fmt.Errorf("server: DSN: %w", err)
	}
	now := time.Now()
	s.metrics.reports.WithLabelValues("dsn").Inc()
	return store.NewRelay{From: "", Message: msg, Recipients: []store.RelayRecipient{{Addr: r.Mail}},
		NextAttempt: now, Expires: now.Add(time.Duration(s.conf().Relay.Expiry))}, nil
}

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && n < len(s) && s[n]&0xc0 == 0x80 { // keep UTF-8 whole
		n--
	}
	return s[:n]
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}
