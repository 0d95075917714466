package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strings"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/mailconv"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/storedid"
)

// reporter makes the reports on outcomes (docs/protocol.md EMSD §9.10
// with Open Point 17): EMSD reports or notices to devices, RFC 3464 DSNs
// to Internet senders. It returns them as store work for the caller to
// commit with the outcomes; from the store it takes only message numbers.
type reporter struct {
	st       reportStore
	log      *slog.Logger
	metrics  *metrics
	conf     func() *Config // the running configuration
	devs     *registrar     // the reported device's version and limits
	domain   string         // postmaster@domain signs notices
	hostname string         // the reporting MTA of DSNs
}

// reportStore is the part of the store the reports use.
type reportStore interface {
	NextMessageNumber(ctx context.Context, t time.Time) (uint32, error)
}

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

// reportItem is the outcome of one recipient together with what its
// report is to say and to whom.
type reportItem struct {
	r store.Report
	o outcome
}

// reportWork builds the reports the items ask for (docs/protocol.md EMSD §9.10
// with Open Point 17): an EMSD report to a device originator when the
// recipient's flags request it (bit 6 delivery, bit 5 non-delivery), and
// an RFC 3464 DSN to an Internet sender on failure (an accepted SMTP
// message must be bounced, RFC 5321 §6.1) or on success when requested.
// Reports are never reported on: their own Report is empty.
//
// The items are outcomes that became known together (one relay round of a
// message, one expiry pass, one submission); nothing waits for outcomes
// still to come. Items about the same message for the same originator
// make one report listing every recipient: one DSN per (message, Internet
// sender) with a recipient block each (RFC 3464 §2.3), one ReportDelivery
// per (message, device), whose per-recipient data is a SEQUENCE OF (§3),
// split only where the device could not take it whole (packReports). The
// caller commits the work with the outcomes, in one store transaction.
//
// An item that cannot be reported (its entry does not encode) or a report
// that cannot be built is left out with an error; the rest is returned.
func (rp *reporter) reportWork(ctx context.Context, items []reportItem) (store.Work, error) {
	type devKey struct {
		dev uint32
		msg string
	}
	type mailKey struct{ mail, msg string }
	var (
		w        store.Work
		errs     []error
		devOrder []devKey
		devs     = map[devKey][]emsd.PerRecipReportData{}
		mlOrder  []mailKey
		mails    = map[mailKey][]reportItem{}
		now      = time.Now()
	)
	for _, it := range items {
		r := it.r
		if it.o.at.IsZero() {
			it.o.at = now
		}
		flags := emsd.PerRecipientFlags(r.Flags)
		want := flags.Has(emsd.RcptNonDeliveryReport)
		if it.o.delivered {
			want = flags.Has(emsd.RcptDeliveryReport)
		}
		if r.Device != 0 && want {
			k := devKey{r.Device, r.MessageID}
			if _, ok := devs[k]; !ok {
				devOrder = append(devOrder, k)
			}
			devs[k] = append(devs[k], reportEntry(r, it.o))
		}
		if r.Mail != "" && parseDSNParams(r.DSN).wants(it.o.delivered, flags.Has(emsd.RcptDeliveryReport)) {
			k := mailKey{r.Mail, r.MessageID}
			if _, ok := mails[k]; !ok {
				mlOrder = append(mlOrder, k)
			}
			mails[k] = append(mails[k], it)
		}
	}
	for _, k := range devOrder {
		ds, err := rp.deviceReports(ctx, k.dev, k.msg, devs[k])
		if err != nil {
			errs = append(errs, err)
		}
		w.Deliveries = append(w.Deliveries, ds...)
	}
	for _, k := range mlOrder {
		rel, err := rp.dsn(ctx, mails[k])
		if err != nil {
			errs = append(errs, err)
			continue
		}
		w.Relays = append(w.Relays, rel)
	}
	return w, errors.Join(errs...)
}

// reportEntry is the per-recipient data of an EMSD report about o.
func reportEntry(r store.Report, o outcome) emsd.PerRecipReportData {
	e := emsd.PerRecipReportData{Recipient: storedid.ParseAddress(r.Recipient)}
	if o.delivered {
		e.Delivery = &emsd.DeliveryReport{DeliveryTime: emsd.TimeOf(o.at)}
	} else {
		d := o.diag
		e.NonDelivery = &emsd.NonDeliveryReport{Reason: o.reason, Diagnostic: &d, Explanation: clip(o.text, 127)}
	}
	return e
}

// newLocalID allocates a local message id for a message the server
// itself originates (reports, notices).
func (rp *reporter) newLocalID(ctx context.Context, now time.Time) (emsd.MessageID, error) {
	n, err := rp.st.NextMessageNumber(ctx, now)
	if err != nil {
		return emsd.MessageID{}, &reportStoreError{err}
	}
	return emsd.LocalID(emsd.TimeOf(now), n), nil
}

// reportStoreError: a report could not be made because the store refused
// a write (its message number); the outcome write that needs the report
// tries again (reportsFor), where a report that cannot be encoded is
// left out.
type reportStoreError struct{ err error }

func (e *reportStoreError) Error() string { return e.err.Error() }
func (e *reportStoreError) Unwrap() error { return e.err }

// reportForm is how a report reaches a device: as an EMSD ReportDelivery
// (content type 2) or as a notice IPM (content type 32).
type reportForm func(rep *emsd.ReportDelivery) emsd.Content

func asReport(rep *emsd.ReportDelivery) emsd.Content { return rep }

// asNotice renders reports as notices to device dev.
func (rp *reporter) asNotice(dev uint32) reportForm {
	return func(rep *emsd.ReportDelivery) emsd.Content { return rp.noticeIPM(emsd.Address(dev), rep) }
}

// deviceReports are the EMSD reports to device dev about entries, the
// recipients of its message msgID: ReportDelivery (content type 2), or
// plain-text notices when reports = "ipm".
func (rp *reporter) deviceReports(ctx context.Context, dev uint32, msgID string, entries []emsd.PerRecipReportData) ([]store.NewDelivery, error) {
	var id emsd.MessageID
	if v, err := storedid.ParseMessageID(msgID); err == nil {
		id = v
	}
	entries, err := encodableEntries(id, entries)
	form, kind := asReport, "emsd"
	if rp.conf().Delivery.Reports == "ipm" {
		form, kind = rp.asNotice(dev), "notice"
	}
	ds, err2 := rp.reportDeliveries(ctx, dev, id, entries, form, kind)
	return ds, errors.Join(err, err2)
}

// encodableEntries drops what the codec refuses: an explanation (it is
// clipped, so unlikely), else the entry, so that one bad entry does not
// cost the others their report.
func encodableEntries(id emsd.MessageID, entries []emsd.PerRecipReportData) ([]emsd.PerRecipReportData, error) {
	ok := func(e emsd.PerRecipReportData) error {
		_, err := (&emsd.ReportDelivery{ReportedMessageID: id, Recipients: []emsd.PerRecipReportData{e}}).Marshal(emsd.Options{})
		return err
	}
	out := entries[:0:0]
	var errs []error
	for _, e := range entries {
		err := ok(e)
		if err != nil && e.NonDelivery != nil && e.NonDelivery.Explanation != "" {
			nd := *e.NonDelivery
			nd.Explanation = ""
			e.NonDelivery = &nd
			err = ok(e)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("server: encode report on %s: %w", e.Recipient, err))
			continue
		}
		out = append(out, e)
	}
	return out, errors.Join(errs...)
}

// reportDeliveries queues entries for device dev as reports about message
// id in the given form, as few as fit (packReports).
func (rp *reporter) reportDeliveries(ctx context.Context, dev uint32, id emsd.MessageID, entries []emsd.PerRecipReportData,
	form reportForm, kind string) ([]store.NewDelivery, error) {
	if len(entries) == 0 {
		return nil, nil
	}
	contents, ct, err := rp.packReports(dev, id, entries, form)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	expires := now.Add(time.Duration(rp.conf().Delivery.Expiry))
	out := make([]store.NewDelivery, 0, len(contents))
	for _, c := range contents {
		mid, err := rp.newLocalID(ctx, now)
		if err != nil {
			return out, err
		}
		rp.metrics.reports.WithLabelValues(kind).Inc()
		out = append(out, store.NewDelivery{Device: dev, MessageID: storedid.MessageID(mid).String(), ContentType: uint32(ct),
			Content: c, Priority: 1, NextAttempt: now, Expires: expires})
	}
	return out, nil
}

// packReports cuts entries, in order, into as few reports as the device
// takes, each encoded (protocol 1.1, as stored) in the given form:
//   - at most MaxRecipients entries (per-recipient-data is SIZE (0..256),
//     §3);
//   - delivered in one segment at the configured PDU size, as the device's
//     protocol version encodes it: a report never depends on segment
//     reassembly (§8), and a lost datagram costs one report only;
//   - not longer than the device's max-content-length when delivery
//     control set one (§9.12), so that it is not held back.
//
// A single entry that fits none of these goes alone; it is then segmented
// or held like any other message.
func (rp *reporter) packReports(dev uint32, id emsd.MessageID, entries []emsd.PerRecipReportData,
	form reportForm) ([][]byte, emsd.ContentType, error) {
	var o emsd.Options
	var maxLen *uint32
	if d := rp.devs.current().get(emsd.Address(dev)); d != nil {
		o, maxLen = rp.conf().emsdOptions(d.version), d.Control.MaxContentLength
	}
	sp := emsd.Splitter{Options: o, MaxUserData: rp.conf().EMSD.PDUSize}
	// The largest envelope the delivery can have: a server-made local id,
	// no submission time (deliverOne sends none for reports).
	env := &emsd.DeliverArgument{MessageID: emsd.LocalID(math.MaxUint32, math.MaxUint32), DeliveryTime: math.MaxUint32}
	var ct emsd.ContentType
	encode := func(part []emsd.PerRecipReportData) ([]byte, bool, error) {
		if len(part) > emsd.MaxRecipients {
			return nil, false, nil
		}
		c := form(&emsd.ReportDelivery{ReportedMessageID: id, Recipients: part})
		ct = c.ContentType()
		stored, err := c.Marshal(emsd.Options{})
		if err != nil {
			return nil, false, fmt.Errorf("server: encode report: %w", err)
		}
		if maxLen != nil && len(stored) > int(*maxLen) {
			return stored, false, nil
		}
		wire := stored
		if o != (emsd.Options{}) {
			if wire, err = c.Marshal(o); err != nil {
				return stored, false, nil // see how it goes at delivery
			}
		}
		env.ContentType = ct
		segs, err := sp.SplitDeliver(env, wire, 0)
		return stored, err == nil && len(segs) == 1, nil
	}
	var out [][]byte
	var last []byte // the encoding of entries[start:i]
	start := 0
	for i := range entries {
		c, fits, err := encode(entries[start : i+1])
		if err != nil {
			return nil, 0, err
		}
		if !fits && i > start {
			out = append(out, last)
			start = i
			if c, _, err = encode(entries[i : i+1]); err != nil {
				return nil, 0, err
			}
		}
		last = c
	}
	return append(out, last), ct, nil
}

func (rp *reporter) noticeIPM(to emsd.Address, rep *emsd.ReportDelivery) *emsd.IPM {
	var b strings.Builder
	subject := "Delivery report"
	fmt.Fprintf(&b, "Your message %s:\n", rep.ReportedMessageID)
	for _, e := range rep.Recipients {
		switch {
		case e.Delivery != nil && !e.Recipient.IsLocal:
			// This server delivers only to devices: a positive report on an
			// Internet address means the smarthost took it (RFC 3464
			// "relayed"), not that it reached the mailbox.
			fmt.Fprintf(&b, "  %s: relayed to the Internet at %s (its delivery there is not reported)\n",
				e.Recipient, e.Delivery.DeliveryTime.UTC().Format(time.RFC1123Z))
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
			Originator: emsd.RFC822OR("postmaster@" + rp.domain),
			Recipients: []emsd.RecipientData{{Recipient: emsd.LocalOR(to, "")}},
			Subject:    subject,
		},
		Body: &emsd.Body{Text: []byte(b.String())},
	}
}

// noticeFromReport turns a report delivery the device refused into
// notices (reports = "auto"), as many as the device takes
// (packReports): devices that accept only content type 32, as the
// reference UA (docs/protocol.md EMSD §9.10).
func (rp *reporter) noticeFromReport(ctx context.Context, d *store.Delivery) []store.NewDelivery {
	if d.ContentType != uint32(emsd.ContentDeliveryReport) || rp.conf().Delivery.Reports != "auto" {
		return nil
	}
	var rep emsd.ReportDelivery
	if err := rep.Unmarshal(d.Content, emsd.Options{}); err != nil {
		return nil
	}
	nds, err := rp.reportDeliveries(ctx, d.Device, rep.ReportedMessageID, rep.Recipients, rp.asNotice(d.Device), "notice")
	if err != nil {
		rp.log.Warn("report notice", "device", emsd.Address(d.Device), "err", err)
		return nil
	}
	return nds
}

// dsn is an RFC 3464 bounce (or success notice) to an Internet sender
// about the items, recipients of one message: one recipient block each
// (§2.3). It is relayed with the null reverse path.
func (rp *reporter) dsn(ctx context.Context, items []reportItem) (store.NewRelay, error) {
	first := items[0].r
	rcpts := make([]mailconv.DSNRecipient, 0, len(items))
	for _, it := range items {
		rc := mailconv.DSNRecipient{Addr: storedid.InternetSpec(it.r.Recipient), Action: mailconv.ActionDelivered,
			LastAttempt: it.o.at, OriginalRecipient: parseDSNParams(it.r.DSN).orcpt}
		if !it.o.delivered {
			rc.Action = mailconv.ActionFailed
			rc.Status = mailconv.StatusFor(it.o.diag)
			if it.o.text != "" {
				rc.Diagnostic = "x-emsd; " + oneLine(it.o.text)
			}
		}
		rcpts = append(rcpts, rc)
	}
	// An id from the message counter: two DSNs with the same text (the
	// same mail bounced twice) are still two messages to their reader.
	id, err := rp.newLocalID(ctx, time.Now())
	if err != nil {
		return store.NewRelay{}, fmt.Errorf("server: DSN id: %w", err)
	}
	// RET=FULL cannot be honoured beyond the header: the message was
	// converted for the device and only its header kept (RFC 3461 §4.3
	// lets an MTA return less than asked).
	msg, err := mailconv.DSN(mailconv.DSNOptions{ReportingMTA: rp.hostname, To: first.Mail, Date: time.Now(),
		MessageID:       fmt.Sprintf("<DSN.%08x.%08x@%s>", uint32(id.Local.SubmissionTime), id.Local.Number, rp.hostname),
		OriginalHeaders: first.Headers, Recipients: rcpts, EnvelopeID: parseDSNParams(first.DSN).envID,
		ArrivalDate: parseDSNParams(first.DSN).arrival})
	if err != nil {
		return store.NewRelay{}, fmt.Errorf("server: DSN: %w", err)
	}
	now := time.Now()
	rp.metrics.reports.WithLabelValues("dsn").Inc()
	return store.NewRelay{From: "", Message: msg, Recipients: []store.RelayRecipient{{Addr: first.Mail}},
		NextAttempt: now, Expires: now.Add(time.Duration(rp.conf().Relay.Expiry))}, nil
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
