package server

import (
	"context"
	"crypto/sha256"
	"errors"
	"log/slog"
	"net/netip"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/store"
)

// intermediateResult answers a segment that does not complete a message:
// docs/protocol.md EMSD §8 recommends zeros (the reference sends leftovers).
func intermediateResult(o emsd.Options) []byte {
	b, _ := (&emsd.SubmitResult{}).Marshal(o)
	return b
}

func (p *performer) submitResult(rec *store.Submission, o emsd.Options) ([]byte, error) {
	b, err := (&emsd.SubmitResult{MessageID: emsd.LocalMessageID{SubmissionTime: emsd.Time(rec.LocalTime), Number: rec.Number}}).Marshal(o)
	if err != nil {
		return nil, err
	}
	// 1.0: the codec writes the reference's inner tag 25 (docs/protocol.md EMSD §4);
	// without the quirk switch send the standard 30.
	if o.Version == emsd.V1_0 && !p.conf().Compat.SubmitResultTag25 && len(b) > 2 && b[2] == 0x25 {
		b[2] = 0x30
	}
	return b, nil
}

// handleSubmit performs Submission (op 33, or 0 from a 1.0 device, on SAP
// 5; docs/protocol.md EMSD §9.5): decode, identify, reassemble, commit, RESULT, and
// on confirmation release the message.
func (p *performer) handleSubmit(ctx context.Context, w esro.ResponseWriter, inv *esro.Invocation, peer netip.AddrPort, v emsd.Version, woken bool) {
	iid, arg, err := emsd.StripInstanceID(emsd.Operation(inv.Operation), inv.Data)
	if err != nil {
		p.refuse(w, "submit", emsd.CodeProtocolViolation, "no instance id")
		return
	}
	o := p.opts(v)
	var sa emsd.SubmitArgument
	if err := sa.Unmarshal(arg, o); err != nil {
		p.refuse(w, "submit", emsd.CodeOf(err), err.Error())
		return
	}
	dev, authed, err := p.devs.identify(ctx, w, peer, sa.Security, true)
	if err != nil {
		p.refuseIdentity(w, "submit", peer, err)
		return
	}
	if dev.version != v {
		p.refuse(w, "submit", emsd.CodeProtocolViolation, "credentials name a device of another protocol version")
		return
	}
	if authed {
		p.contacts.heard(dev, peer, false)
	}
	if !woken {
		p.sched.wake(dev.addr, authed)
	} else if authed {
		p.sched.touch(dev.addr, true)
	}
	now := time.Now()
	var key segKey
	var e *segEntry
	if sa.Segment != nil {
		key = segKey{from: submitter{dev.addr, peer}, id: iid, sum: sha256.Sum256(arg)}
		e = p.segs.get(key, now)
	}
	if e != nil && e.full == nil {
		p.metrics.submissions.WithLabelValues("reinvoked").Inc()
		if err := w.Result(esro.EncodingBER, e.answer); err != nil {
			return
		}
		if e.sub != nil {
			p.subs.wait(e.sub.ID, peer)
			p.afterResult(w, dev, peer, e.sub, e.ipm, key)
		} else {
			p.forgetWhenConfirmed(w, key)
		}
		return
	}
	var full *emsd.SubmitArgument
	if e != nil {
		full = e.full
	} else if full, err = p.reasm.AddSubmit(now, submitter{dev.addr, peer}, &sa); err != nil {
		p.refuse(w, "submit", emsd.CodeOf(err), err.Error())
		return
	}
	if full == nil { // more segments to come (docs/protocol.md EMSD §8)
		ans := intermediateResult(o)
		p.segs.put(key, &segEntry{answer: ans, at: now})
		if w.Result(esro.EncodingBER, ans) == nil {
			p.forgetWhenConfirmed(w, key)
		}
		return
	}
	if full.ContentType != emsd.ContentIPM { // docs/protocol.md EMSD §9.5 step 3
		p.refuse(w, "submit", emsd.CodeProtocolViolation, "content type "+full.ContentType.String())
		return
	}
	c, err := emsd.DecodeContents(emsd.ContentIPM, full.Contents, o)
	if err != nil {
		p.refuse(w, "submit", emsd.CodeOf(err), err.Error())
		return
	}
	ipm := c.(*emsd.IPM)
	if len(ipm.Heading.Recipients) == 0 {
		p.refuse(w, "submit", emsd.CodeProtocolViolation, "no recipients")
		return
	}
	content := full.Contents
	if o != (emsd.Options{}) { // the store keeps 1.1 in list order
		if content, err = ipm.Marshal(emsd.Options{}); err != nil {
			p.refuse(w, "submit", emsd.CodeProtocolViolation, err.Error())
			return
		}
	}
	sum := sha256.Sum256(content)
	rec, dup, err := p.addSubmission(ctx, peer, &store.Submission{Device: uint32(dev.addr), InstanceID: iid,
		ContentHash: sum[:], ContentType: uint32(emsd.ContentIPM), Content: content, Received: now})
	if err != nil {
		if sa.Segment != nil {
			p.segs.put(key, &segEntry{full: full, at: now})
		}
		p.log.Error("store submission", "device", dev.addr, "err", err)
		p.refuse(w, "submit", emsd.CodeResource, "store")
		return
	}
	ans, err := p.submitResult(rec, o)
	if err != nil {
		p.subs.done(rec.ID, false)
		p.subs.resolved(rec.ID) // stays pending: released or dropped at the next start
		p.log.Error("encode SubmitResult", "err", err)
		p.refuse(w, "submit", emsd.CodeResource, "encode")
		return
	}
	if sa.Segment != nil {
		p.segs.put(key, &segEntry{answer: ans, sub: rec, ipm: ipm, at: now})
	}
	if dup {
		p.metrics.submissions.WithLabelValues("duplicate").Inc()
	} else {
		p.metrics.submissions.WithLabelValues("accepted").Inc()
		p.log.Info("submission", "device", dev.addr, "id", emsd.LocalMessageID{SubmissionTime: emsd.Time(rec.LocalTime), Number: rec.Number},
			"octets", len(content), "recipients", len(ipm.Heading.Recipients))
	}
	if err := w.Result(esro.EncodingBER, ans); err != nil {
		p.log.Debug("submit result", "device", dev.addr, "err", err)
	}
	p.afterResult(w, dev, peer, rec, ipm, key)
}

// addSubmission commits a submission, or finds the copy it re-invokes: the
// same device, instance id and content within the dedupe window, whose
// RESULT the device may not have got (docs/protocol.md EMSD §1.5 Recommend: a
// re-invocation after an ESRO failure reuses the instance id). An earlier
// copy the device is known to have been told about (its RESULT was
// acknowledged, or submission verify answered "send") or that was dropped
// is not re-invoked: instance ids are 8 bits, wrap, and restart at 0 with
// every start of a device (a reference UA, each run of emsdp ua send), so
// the same octets are then a new message, which must not be merged into
// the old one and lost. For the same reason a copy whose handler is still
// here matches only an INVOKE from the socket it came from and only
// before its confirmation (activeSubs.mayReinvoke): two programs of one
// device, each starting at instance id 0, are two senders.
//
// On success the caller is registered as waiting for the confirmation of
// rec (activeSubs.wait) and must end it with activeSubs.done, which
// afterResult does.
func (p *performer) addSubmission(ctx context.Context, peer netip.AddrPort, sub *store.Submission) (*store.Submission, bool, error) {
	defer p.subs.lockDevice(sub.Device)()
	since := sub.Received.Add(-time.Duration(p.conf().EMSD.DedupeWindow))
	for {
		rec, dup, err := p.st.AddSubmission(ctx, sub, since)
		if err != nil {
			return rec, dup, err
		}
		if !dup || (mayReinvoke(rec) && p.subs.mayReinvoke(rec.ID, peer)) {
			p.subs.wait(rec.ID, peer)
			return rec, dup, nil
		}
		// Look only past that copy (the store keeps milliseconds).
		since = rec.Received.Add(time.Millisecond)
	}
}

// mayReinvoke reports whether the device may re-invoke submission rec: it
// may not know that rec succeeded.
func mayReinvoke(rec *store.Submission) bool {
	switch rec.State {
	case store.SubmissionPending:
		return true
	case store.SubmissionDropped:
		return false
	}
	return rec.Verify != "confirmed" && rec.Verify != "send"
}

// forgetWhenConfirmed waits for the acknowledgement of an intermediate
// segment's RESULT and then forgets its answer (see segCache).
func (p *performer) forgetWhenConfirmed(w esro.ResponseWriter, key segKey) {
	if w.Confirmed(p.ctx) == nil {
		p.segs.del(key)
	}
}

// afterResult waits for the device's acknowledgement of the RESULT and
// releases the submission, or runs submission verify when it does not
// come (docs/protocol.md EMSD §9.5 steps 7-8). key is the segment cache entry of
// the last segment of a segmented submission (zero otherwise); peer is
// where the submission came from, hence where the verify goes: behind a
// NAT the only address that reaches the device. ipm is the submitted
// message, decoded once by the handler and carried to the release.
func (p *performer) afterResult(w esro.ResponseWriter, dev *device, peer netip.AddrPort, rec *store.Submission, ipm *emsd.IPM, key segKey) {
	if rec.State != store.SubmissionPending {
		p.subs.done(rec.ID, false)
		p.subs.resolved(rec.ID)
		return
	}
	err := w.Confirmed(p.ctx)
	others := p.subs.done(rec.ID, err == nil)
	switch {
	case err == nil:
		if key != (segKey{}) {
			p.segs.del(key)
		}
		p.release(rec, ipm, "confirmed")
		p.subs.resolved(rec.ID)
	case p.ctx.Err() != nil:
		// Shutting down: the submission stays pending and is released
		// at the next start.
	case others > 0:
		// A re-invocation of the same submission is waiting for its own
		// confirmation and decides.
	default:
		p.verifySubmission(dev, peer, rec, ipm)
	}
}

// verifySubmission asks the device whether it knows the submission
// succeeded (op 6, MTS SAP 6 -> UA SAP 7, 2-way). No answer counts as
// compat.verify_failure says: "send" by default, since a possible
// duplicate is better than a loss (Open Point 25).
func (p *performer) verifySubmission(dev *device, peer netip.AddrPort, rec *store.Submission, ipm *emsd.IPM) {
	defer p.subs.resolved(rec.ID)
	id := emsd.LocalMessageID{SubmissionTime: emsd.Time(rec.LocalTime), Number: rec.Number}
	verdict := "failure"
	if dev.version == emsd.V1_1 { // 1.0 has no verify operations (docs/protocol.md EMSD §1.4)
		o := p.opts(dev.version)
		arg, err := (&emsd.SubmissionVerifyArgument{MessageID: emsd.MessageID{IsLocal: true, Local: id}}).Marshal(o)
		if err == nil {
			// First where the submission came from (the device's socket,
			// the only address that reaches it behind a NAT), then, when
			// that is gone (emsdp ua send has exited), the registered
			// address, where its receiver answers from the same verify
			// list.
			to := []netip.AddrPort{peer}
			if dev.ap.IsValid() && dev.ap != peer {
				to = append(to, dev.ap)
			}
			ep, to := p.routes.verifyRoute(dev, to)
			var res *esro.Result
			err = errNoRoute
			for _, ap := range to {
				res, err = ep.Invoke(p.ctx, &esro.Request{To: ap, SAP: uint8(emsd.SAPUAPerformer2Way),
					Operation: uint8(emsd.OpSubmissionVerify), Encoding: esro.EncodingBER, Handshake: esro.TwoWay, Data: arg})
				if !isFailure(err) {
					break
				}
			}
			if p.ctx.Err() != nil || errors.Is(err, esro.ErrClosed) {
				return // stays pending; released at the next start
			}
			var vr emsd.SubmissionVerifyResult
			if err == nil && vr.Unmarshal(res.Data, o) == nil {
				switch vr.Status {
				case emsd.SendMessage:
					verdict = "send"
				case emsd.DropMessage:
					verdict = "drop"
				}
			}
		}
	}
	p.metrics.verifies.WithLabelValues(verdict).Inc()
	lv := slog.LevelInfo
	if verdict == "failure" {
		lv = slog.LevelWarn
	}
	p.log.Log(p.ctx, lv, "submission verify", "device", dev.addr, "id", id, "verdict", verdict)
	if verdict == "drop" || (verdict == "failure" && p.conf().Compat.VerifyFailure == "drop") {
		if p.subs.waiting(rec.ID) > 0 {
			return // re-invoked meanwhile: that invocation decides
		}
		if _, err := p.st.DropSubmission(p.ctx, rec.ID, verdict); err != nil {
			p.log.Error("drop submission", "id", id, "err", err)
		}
		return
	}
	p.release(rec, ipm, verdict)
}
