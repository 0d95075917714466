package server

import (
	"context"
	"fmt"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/mailconv"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/storedid"
)

// release queues the deliveries and relays of a pending submission. ipm
// is its message decoded, nil for one read from the store (recovered at
// start), which is then decoded here.
func (p *performer) release(rec *store.Submission, ipm *emsd.IPM, verify string) {
	ctx := p.ctx
	w, err := p.submissionWork(ctx, rec, ipm)
	if err != nil {
		p.log.Error("release submission", "id", rec.ID, "err", err)
		return // stays pending: retried at the next start
	}
	ok, err := p.st.ReleaseSubmission(ctx, rec.ID, verify, w)
	if err != nil {
		p.log.Error("release submission", "id", rec.ID, "err", err)
		return
	}
	if ok {
		p.sched.noteQueued(w)
	}
}

// submissionWork converts a submitted IPM into its deliveries (local
// recipients, which never leave the server) and one relay (Internet
// recipients, the IPM formatted as Internet mail), plus immediate
// non-delivery reports for recipients that cannot be served
// (docs/protocol.md EMSD §9.5-9.7). Routing (mailconv.Route) comes first;
// formatting only when some recipient is on the Internet.
func (p *performer) submissionWork(ctx context.Context, rec *store.Submission, ipm *emsd.IPM) (store.Work, error) {
	var w store.Work
	if ipm == nil {
		ipm = new(emsd.IPM)
		if err := ipm.Unmarshal(rec.Content, emsd.Options{}); err != nil {
			return w, err
		}
	}
	lid := emsd.LocalMessageID{SubmissionTime: emsd.Time(rec.LocalTime), Number: rec.Number}
	mid := emsd.MessageID{IsLocal: true, Local: lid}
	// Route first: mail for devices only is never rendered as Internet
	// mail.
	m := p.devs.mapping()
	recipients, err := mailconv.Route(ipm, p.domain, m)
	if err != nil {
		return w, err
	}
	reg := p.devs.current()
	if p.devs.unknownAmong(reg, recipients) && p.devs.reloadIfChanged(ctx, "unknown recipient") {
		// A device added a moment ago ("emsdp device add" while the server
		// runs), before the next registry_poll: routed with it, not
		// refused as unknown or relayed to the Internet, as on the SMTP
		// side (receiver.Recipient).
		m, reg = p.devs.mapping(), p.devs.current()
		if recipients, err = mailconv.Route(ipm, p.domain, m); err != nil {
			return w, err
		}
	}
	now := time.Now()
	prio := priorityOf(ipm)
	var remote []store.RelayRecipient
	var fails []reportItem
	done := map[emsd.Address]bool{}
	for _, r := range recipients {
		rep := store.Report{Device: rec.Device, Flags: uint8(r.Flags), MessageID: storedid.MessageID(mid).String(),
			Recipient: storedid.Internet(r.Addr)}
		var fail *outcome
		switch {
		case r.Err != nil:
			o := failed(emsd.ReasonUnableToTransfer, emsd.DiagUnrecognizedAddress, r.Err.Error())
			fail = &o
		case r.Local:
			rep.Recipient = storedid.Address(emsd.LocalOR(r.Device, "")).String()
			if reg.get(r.Device) == nil {
				o := failed(emsd.ReasonUnableToTransfer, emsd.DiagRecipientUnknown, "no such EMSD address")
				fail = &o
				break
			}
			if done[r.Device] {
				break
			}
			done[r.Device] = true
			content, err := p.copyFor(ipm, rec.Content, r.Device)
			if err != nil {
				o := failed(emsd.ReasonUnableToTransfer, emsd.DiagProtocolViolation, err.Error())
				fail = &o
				break
			}
			st := uint32(lid.SubmissionTime)
			w.Deliveries = append(w.Deliveries, store.NewDelivery{Device: uint32(r.Device), MessageID: storedid.MessageID(mid).String(),
				SubmissionTime: &st, ContentType: uint32(emsd.ContentIPM), Content: content, Priority: prio,
				NextAttempt: now, Expires: now.Add(time.Duration(p.conf().Delivery.Expiry)), Report: rep})
		default:
			remote = append(remote, store.RelayRecipient{Addr: r.Addr, Report: rep})
		}
		if fail != nil {
			p.metrics.deliveries.WithLabelValues("rejected").Inc()
			fails = append(fails, reportItem{rep, *fail})
		}
	}
	// The recipients refused at submission are known together: one report.
	rw, err := p.reports.reportWork(ctx, fails)
	if err != nil {
		return w, err
	}
	w.Deliveries = append(w.Deliveries, rw.Deliveries...)
	w.Relays = append(w.Relays, rw.Relays...)
	if len(remote) > 0 {
		out, err := mailconv.FormatIPM(ipm, mailconv.FormatOptions{Domain: p.domain, MessageID: rfc822MessageID(lid, p.domain),
			Date: lid.SubmissionTime.UTC(), MTS: p.hostname, Mapping: m})
		if err != nil {
			return w, err
		}
		msg := append(p.receivedEMSD(rec, reg, rfc822MessageID(lid, p.domain)), out.Message...)
		w.Relays = append(w.Relays, store.NewRelay{From: p.deviceAddrSpec(emsd.Address(rec.Device)), Message: msg,
			Recipients: remote, NextAttempt: now, Expires: now.Add(time.Duration(p.conf().Relay.Expiry))})
	}
	return w, nil
}

// receivedEMSD is the Received: field for the EMSD hop of a submission
// going out as Internet mail (RFC 5321 §4.4): from the device, at its
// registered address, by this host, with the message's id.
func (p *performer) receivedEMSD(rec *store.Submission, reg *registry, id string) []byte {
	from := "device " + emsd.Address(rec.Device).String()
	if d := reg.get(emsd.Address(rec.Device)); d != nil && d.ap.IsValid() {
		from += " ([" + d.ap.Addr().Unmap().String() + "])"
	}
	line := fmt.Sprintf("Received: from %s\r\n\tby %s (emsdp) with EMSD", from, p.hostname)
	if id != "" {
		line += " id " + id
	}
	return fmt.Appendf(nil, "%s;\r\n\t%s\r\n", line, rec.Received.UTC().Format("Mon, 02 Jan 2006 15:04:05 -0700"))
}

// copyFor returns the IPM as delivered to device to (docs/protocol.md EMSD §9.5):
//   - blind-copy recipients other than to itself are removed (§11 T0103,
//     "Bcc hiding");
//   - every address that designates a device (EMSD=<n>, `"198.036": `,
//     number@domain, an alias) is written as a local address, as it would
//     be had the message gone out as Internet mail and come back (§6.2).
//     A device finds itself among the local recipients only (§10.3): the
//     reference UA answers ERROR 7 to a delivery that does not name it so,
//     although it stores it (seen with the tester scripts' EMSD=<n> and
//     T0104's number@domain), and the sender would get a false
//     non-delivery report.
//
// When nothing changes it is the submitted octets.
func (p *performer) copyFor(ipm *emsd.IPM, orig []byte, to emsd.Address) ([]byte, error) {
	m := p.devs.mapping()
	changed := false
	local := func(a emsd.ORAddress) emsd.ORAddress {
		if a.IsLocal {
			return a
		}
		if n, ok := m.Device(a); ok {
			changed = true
			return emsd.LocalOR(n, "")
		}
		return a
	}
	c := *ipm
	h := &c.Heading
	if h.Sender != nil {
		sender := local(*h.Sender)
		h.Sender = &sender
	}
	h.Originator = local(h.Originator)
	h.Recipients = nil
	for _, r := range ipm.Heading.Recipients {
		r.Recipient = local(r.Recipient)
		if r.Flags.Has(emsd.RcptBlindCopy) && !(r.Recipient.IsLocal && r.Recipient.Local == to) {
			changed = true
			continue
		}
		h.Recipients = append(h.Recipients, r)
	}
	if ipm.Heading.ReplyTo != nil { // nil = absent, empty = present
		h.ReplyTo = make([]emsd.ORAddress, 0, len(ipm.Heading.ReplyTo))
		for _, a := range ipm.Heading.ReplyTo {
			h.ReplyTo = append(h.ReplyTo, local(a))
		}
	}
	if !changed {
		return orig, nil
	}
	return c.Marshal(emsd.Options{})
}

// priorityOf maps the IPM's per-message flags to the delivery-control
// priority scale (docs/protocol.md EMSD §5): 0 non-urgent, 1 normal, 2 urgent.
func priorityOf(ipm *emsd.IPM) uint8 {
	switch f := ipm.Heading.Flags; {
	case f.Has(emsd.MsgPriorityUrgent):
		return 2
	case f.Has(emsd.MsgPriorityNonUrgent):
		return 0
	}
	return 1
}

// recoverSubmissions releases (or drops, per compat.verify_failure) the
// submissions received before 'before' and still pending: at start, those
// of a previous process that stopped between the RESULT and its
// confirmation; later, any whose release failed (a store error).
func (p *performer) recoverSubmissions(ctx context.Context, before time.Time) error {
	pend, err := p.st.PendingSubmissions(ctx, before)
	if err != nil {
		return err
	}
	verdict := p.conf().Compat.VerifyFailure
	for _, rec := range pend {
		if p.subs.waiting(rec.ID) > 0 {
			continue // its handler still waits for the confirmation
		}
		if verdict == "drop" {
			if _, err := p.st.DropSubmission(ctx, rec.ID, "restart"); err != nil {
				return err
			}
			continue
		}
		p.release(rec, nil, "restart")
	}
	if len(pend) > 0 {
		p.log.Info("resolved submissions left pending", "count", len(pend), "as", verdict)
	}
	return nil
}

// deviceAddrSpec is a device's Internet address.
func (p *performer) deviceAddrSpec(a emsd.Address) string { return a.String() + "@" + p.domain }
