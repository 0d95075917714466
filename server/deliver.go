package server

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/store"
)

// scheduler state: which devices have a worker (one delivery in flight per
// device, docs/protocol.md EMSD §9.9) and which have nothing claimable right now
// (held back by delivery control, or just emptied), so that the loop does
// not spin on them.
type sched struct {
	kick chan struct{}
	mu   sync.Mutex
	busy map[emsd.Address]bool
	held map[emsd.Address]bool
	// again marks busy devices that were unheld meanwhile: their worker
	// may have claimed under old limits, so it must not hold them.
	again    map[emsd.Address]bool
	full     bool // a pass found more due devices than free workers
	draining bool
	workers  sync.WaitGroup
}

// defaultRescan is the scheduler's full-rescan period (Server.rescan):
// changes made by other processes without telling this one (emsdp queue
// retry, a server sharing the store that stopped) are seen within it.
const defaultRescan = 30 * time.Second

func (s *Server) kick() {
	select {
	case s.sched.kick <- struct{}{}:
	default:
	}
}

func (s *Server) unhold(a emsd.Address) {
	s.sched.mu.Lock()
	delete(s.sched.held, a)
	if s.sched.busy[a] {
		s.sched.again[a] = true
	}
	s.sched.mu.Unlock()
}

func (s *Server) unholdAll() {
	s.sched.mu.Lock()
	clear(s.sched.held)
	for a := range s.sched.busy {
		s.sched.again[a] = true
	}
	s.sched.mu.Unlock()
}

// wake makes a device's queued deliveries due now: any INVOKE from the
// device is its poll (docs/protocol.md EMSD §9.4).
func (s *Server) wake(a emsd.Address) {
	n, err := s.st.WakeDevice(s.ctx, uint32(a), time.Now())
	if err != nil {
		s.log.Warn("wake device", "device", a, "err", err)
		return
	}
	if n > 0 {
		s.log.Debug("device poll woke its queue", "device", a, "deliveries", n)
		s.unhold(a)
		s.kick()
	}
}

// noteQueued tells the loops about new work.
func (s *Server) noteQueued(w store.Work) {
	for _, d := range w.Deliveries {
		s.unhold(emsd.Address(d.Device))
	}
	if len(w.Deliveries) > 0 {
		s.kick()
	}
	if len(w.Relays) > 0 {
		s.kickRelay()
	}
}

// runScheduler starts a worker for every device with a due delivery,
// expires what is too old, and sleeps until the next due time or a kick.
// All state is in the store, so a restart rebuilds it.
//
// Held devices are reconsidered (unholdAll) at the planned wake-up: the
// next due time, or the full rescan at least every s.rescan. The rescan
// finds what changed without a kick here: work another process re-queued,
// such as another server sharing the store that stopped (or crashed) while
// it was delivering to a device this server found busy (store.ErrBusy).
// The wake-up counts even when kicks come first and keep the timer from
// firing, as they do on a busy server.
func (s *Server) runScheduler() {
	t := time.NewTimer(0)
	defer t.Stop()
	now := time.Now()
	purgeAt, rescanAt, wakeAt := now, now.Add(s.rescan), now
	for {
		select {
		case <-s.loopCtx.Done():
			return
		case <-s.sched.kick:
		case <-t.C:
		}
		now = time.Now()
		if !now.Before(wakeAt) {
			s.unholdAll()
			if !now.Before(rescanAt) {
				rescanAt = now.Add(s.rescan)
			}
		}
		s.expire(now)
		if !now.Before(purgeAt) {
			s.purge(now)
			purgeAt = now.Add(time.Hour)
		}
		s.startWorkers(now)
		// NextDue after the same now: whatever fell due since is found by
		// the next pass, which this wait then starts at once.
		wakeAt = rescanAt
		if next, ok, err := s.st.NextDue(s.loopCtx, now); err == nil && ok && next.Before(wakeAt) {
			wakeAt = next
		}
		t.Reset(max(time.Until(wakeAt), time.Millisecond))
	}
}

func (s *Server) startWorkers(now time.Time) {
	devs, err := s.st.DueDevices(s.loopCtx, now)
	if err != nil {
		if s.loopCtx.Err() == nil {
			s.log.Error("due devices", "err", err)
		}
		return
	}
	sc := &s.sched
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.draining {
		return
	}
	for _, d := range devs {
		a := emsd.Address(d)
		if sc.busy[a] || sc.held[a] {
			continue
		}
		if len(sc.busy) >= s.conf().Delivery.Concurrency {
			sc.full = true
			return
		}
		sc.busy[a] = true
		sc.workers.Go(func() { s.deliverDevice(a) })
	}
}

// deliverDevice delivers a device's due messages one after the other.
func (s *Server) deliverDevice(a emsd.Address) {
	did := false
	defer func() {
		sc := &s.sched
		sc.mu.Lock()
		delete(sc.busy, a)
		again := sc.again[a]
		delete(sc.again, a)
		if !did && !again {
			sc.held[a] = true
		}
		kick := did || again || sc.full
		sc.full = false
		sc.mu.Unlock()
		if kick {
			s.kick()
		}
	}()
	for {
		s.sched.mu.Lock()
		stop := s.sched.draining
		s.sched.mu.Unlock()
		if stop || s.dctx.Err() != nil {
			return
		}
		dev := s.registry().byAddr[a]
		var lim store.Limits
		var tg target
		if dev != nil {
			var why string
			if tg, why = s.targetOf(dev); why != "" {
				// Held (see contact.go) until the device is heard.
				s.log.Debug("delivery waits", "device", a, "why", why)
				return
			}
			c := dev.Control
			if c.Operations != nil && !emsd.OperationSet(*c.Operations).Has(deliveryOp(dev.version)) {
				return // delivery not permitted at all (docs/protocol.md EMSD §9.12)
			}
			lim = store.Limits{MaxContentLength: c.MaxContentLength, LowestPriority: c.LowestPriority}
		}
		d, err := s.st.ClaimDelivery(s.dctx, uint32(a), time.Now(), lim)
		if err != nil {
			if !errors.Is(err, store.ErrNotFound) && !errors.Is(err, store.ErrBusy) && s.dctx.Err() == nil {
				s.log.Error("claim delivery", "device", a, "err", err)
			}
			return
		}
		did = true
		s.deliverOne(dev, d, tg)
	}
}

// attempt outcomes.
type attemptKind int

const (
	attemptDelivered attemptKind = iota
	attemptRespool               // transient: retry later
	attemptFailed                // permanent: non-delivery
	attemptRequeue               // never reached the device (shutdown): no attempt counted
)

type attemptResult struct {
	kind    attemptKind
	o       outcome
	refused bool // the device answered an ERROR other than resource error
	err     string
}

// deliverOne runs one delivery attempt and records its outcome, reports
// and status in one store transaction.
func (s *Server) deliverOne(dev *device, d *store.Delivery, tg target) {
	start := time.Now()
	r := s.attempt(dev, d, &tg)
	ctx := s.ctx // the outcome is recorded even when deliveries are being cancelled
	res := store.DeliveryResult{Error: r.err}
	log := s.log.With("device", emsd.Address(d.Device), "id", idText(d.MessageID), "attempt", d.Attempts)
	switch r.kind {
	case attemptDelivered:
		res.State, res.Status = store.DeliveryDelivered, uint8(emsd.DeliveryReportSent)
		r.o = outcome{delivered: true, at: time.Now()}
		log.Info("delivered", "took", time.Since(start).Round(time.Millisecond))
	case attemptFailed:
		res.State, res.Status = store.DeliveryFailed, uint8(emsd.NonDeliveryReportSent)
		log.Warn("not delivered", "why", r.err)
	case attemptRespool:
		res.State = store.DeliveryQueued
		res.NextAttempt = time.Now().Add(backoff(s.conf().Delivery.Retry, d.Attempts))
		log.Info("delivery deferred", "why", r.err, "next", res.NextAttempt.Round(time.Second))
	case attemptRequeue:
		res.State, res.NextAttempt, res.Requeue = store.DeliveryQueued, time.Now(), true
	}
	if r.kind == attemptDelivered || r.kind == attemptFailed {
		// One device per delivery: its outcome is known alone, so its
		// report is about this recipient only.
		w, err := s.reportWork(ctx, []reportItem{{d.Report, r.o}})
		if err != nil {
			log.Error("reports", "err", err)
		}
		if r.kind == attemptFailed && r.refused {
			// A device that refuses a report (the reference UA accepts
			// only IPMs) gets it as a notice instead (delivery.reports auto).
			w.Deliveries = append(w.Deliveries, s.noticeFromReport(ctx, d)...)
		}
		res.Work = w
	}
	if err := s.st.FinishDelivery(ctx, d.ID, store.DeliveryInFlight, res); err != nil {
		log.Error("record delivery outcome", "err", err)
		return
	}
	label := map[attemptKind]string{attemptDelivered: "delivered", attemptFailed: "failed",
		attemptRespool: "deferred", attemptRequeue: "requeued"}[r.kind]
	s.metrics.deliveries.WithLabelValues(label).Inc()
	s.metrics.deliverTime.WithLabelValues(label).Observe(time.Since(start).Seconds())
	s.noteQueued(res.Work)
}

func backoff(schedule []Duration, attempts int) time.Duration {
	i := min(max(attempts-1, 0), len(schedule)-1)
	return time.Duration(schedule[i])
}

// attempt delivers one message (docs/protocol.md EMSD §9.9): op 35 (1.1) or op 1
// (1.0), 3-way to SAP 3 (Complete mode and 1.0) or 2-way to SAP 7
// (Efficient), segmented to the PDU size, one ESRO operation per segment
// with a new instance id, re-invoked once with the same id after an ESRO
// failure: to tg's contact, then its fallback (contact.go).
func (s *Server) attempt(dev *device, d *store.Delivery, tg *target) attemptResult {
	fail := func(reason emsd.NonDeliveryReason, diag emsd.Diagnostic, format string, a ...any) attemptResult {
		text := fmt.Sprintf(format, a...)
		return attemptResult{kind: attemptFailed, o: failed(reason, diag, text), err: text}
	}
	if dev == nil {
		return fail(emsd.ReasonUnableToTransfer, emsd.DiagRecipientUnknown, "device no longer registered")
	}
	ctx := s.dctx
	ct := emsd.ContentType(d.ContentType)
	o := s.opts(dev.version)
	content := d.Content
	if o != (emsd.Options{}) { // stored as 1.1 in list order; re-encode for this device
		c, err := emsd.DecodeContents(ct, content, emsd.Options{})
		if err == nil {
			content, err = c.Marshal(o)
		}
		if err != nil {
			return fail(emsd.ReasonUnableToTransfer, emsd.DiagContentTypeNotSupported, "cannot encode for EMSD %s: %v", dev.version, err)
		}
	}
	mid, err := decodeMsgID(d.MessageID)
	if err != nil {
		return fail(emsd.ReasonUnableToTransfer, emsd.DiagProtocolViolation, "%v", err)
	}
	env := &emsd.DeliverArgument{MessageID: mid, DeliveryTime: emsd.TimeOf(time.Now()), ContentType: ct}
	if d.SubmissionTime != nil {
		t := emsd.Time(*d.SubmissionTime)
		env.SubmissionTime = &t
	}
	sp := emsd.Splitter{Options: o, MaxUserData: s.conf().EMSD.PDUSize}
	segs, err := sp.SplitDeliver(env, content, s.seq.Next())
	if err != nil {
		var sl *emsd.SegmentLimitError
		if errors.As(err, &sl) {
			return fail(emsd.ReasonUnableToTransfer, sl.Diagnostic(), "%v", err)
		}
		return fail(emsd.ReasonUnableToTransfer, emsd.DiagSizeConstraintViolated, "%v", err)
	}
	op := deliveryOp(dev.version)
	sap, hs := emsd.SAPUAPerformer3Way, esro.ThreeWay
	if dev.version == emsd.V1_1 && dev.Mode == store.ModeEfficient {
		sap, hs = emsd.SAPUAPerformer2Way, esro.TwoWay
	}
	carries := emsd.CarriesInstanceID(op)
	refIDs := s.conf().Compat.ReferenceInstanceIDs // once: a reconfiguration must not split an attempt
	var base uint8
	if carries && !refIDs {
		if base, err = s.st.ReserveInstanceIDs(ctx, uint32(dev.addr), len(segs)); err != nil {
			if ctx.Err() != nil {
				return attemptResult{kind: attemptRequeue, err: "shutdown"}
			}
			return attemptResult{kind: attemptRespool, err: "instance ids: " + err.Error()}
		}
	}
	for k, seg := range segs {
		data := seg
		if carries {
			id := base + uint8(k)
			if refIDs {
				id = 0 // the reference MTS (docs/protocol.md EMSD §1.5)
			}
			data = emsd.PrependInstanceID(id, seg)
		}
		req := &esro.Request{SAP: uint8(sap), Operation: uint8(op), Encoding: esro.EncodingBER,
			Handshake: hs, Data: data}
		var err error
		for try := 0; try < 2; try++ {
			req.To = tg.tryTo(try)
			if _, err = s.endpointOf(tg).Invoke(ctx, req); !isFailure(err) {
				break
			}
			unreachable := isUnreachable(err)
			if tg.learned && (try == 1 || tg.fallback.IsValid() || unreachable) {
				s.contactFailed(dev.addr, req.To)
			}
			// An ICMP error said nothing listens there: the fallback, if
			// any, is worth its try, the same address is not.
			if unreachable && !tg.fallback.IsValid() {
				break
			}
		}
		if err == nil {
			continue
		}
		var er *esro.ErrorReply
		switch {
		case ctx.Err() != nil || errors.Is(err, esro.ErrClosed):
			return attemptResult{kind: attemptRequeue, err: "shutdown"}
		case errors.As(err, &er):
			var p emsd.ErrorParameter
			hasParam := len(er.Data) > 0 && p.Unmarshal(er.Data, emsd.Options{}) == nil
			text := fmt.Sprintf("device answered ERROR %d", er.Value)
			if hasParam {
				text += fmt.Sprintf(" (parameter %d)", p)
			}
			// Parameter 6 (resource error) is the only transient error;
			// anything else, no parameter included, is permanent (see
			// docs/protocol.md EMSD §1.6, the intended rule).
			if hasParam && p.Code() == emsd.CodeResource {
				return attemptResult{kind: attemptRespool, err: text}
			}
			reason, diag := refusalDiagnostic(emsd.ErrorCode(er.Value), ct)
			r := fail(reason, diag, "%s", text)
			r.refused = true
			return r
		default: // ESRO failure twice, or a local resource problem
			return attemptResult{kind: attemptRespool, err: err.Error()}
		}
	}
	if tg.learned {
		s.alive(dev.addr, tg.to)
	}
	return attemptResult{kind: attemptDelivered}
}

// isUnreachable reports the failure of an invocation an ICMP error ended.
func isUnreachable(err error) bool {
	var f *esro.Failure
	return errors.As(err, &f) && f.Reason == esro.Unreachable && !f.Remote
}

func isFailure(err error) bool {
	var f *esro.Failure
	return errors.As(err, &f)
}

// refusalDiagnostic maps a device's EMSD error to a non-delivery reason
// and diagnostic (docs/protocol.md EMSD §5).
func refusalDiagnostic(code emsd.ErrorCode, ct emsd.ContentType) (emsd.NonDeliveryReason, emsd.Diagnostic) {
	switch code {
	case emsd.CodeProtocolViolation:
		if ct != emsd.ContentIPM {
			return emsd.ReasonUnableToTransfer, emsd.DiagContentTypeNotSupported
		}
		return emsd.ReasonUnableToTransfer, emsd.DiagProtocolViolation
	case emsd.CodeSecurity:
		return emsd.ReasonUnableToTransfer, emsd.DiagRecipientRefused
	case emsd.CodeDeliveryControl:
		return emsd.ReasonRestrictedDelivery, emsd.DiagRecipientRefused
	}
	return emsd.ReasonUnableToTransfer, emsd.DiagUnableToCompleteTransfer
}

// expire drops queued deliveries and relays past their expiry with
// non-delivery reports (docs/protocol.md EMSD §9.8: 1 hour for deliveries).
func (s *Server) expire(now time.Time) {
	ctx := s.loopCtx
	ds, err := s.st.ExpiredDeliveries(ctx, now, 100)
	if err != nil && ctx.Err() == nil {
		s.log.Error("expired deliveries", "err", err)
	}
	for _, d := range ds {
		text := "not delivered within " + time.Duration(s.conf().Delivery.Expiry).String()
		if d.LastError != "" {
			text += "; last error: " + d.LastError
		}
		// Each delivery is finished in a transaction of its own, and its
		// report must be committed with it: one report per recipient.
		w, err := s.reportWork(ctx, []reportItem{{d.Report, failed(emsd.ReasonUnableToTransfer, emsd.DiagMaximumTimeExpired, text)}})
		if err != nil {
			s.log.Error("reports", "err", err)
		}
		err = s.st.FinishDelivery(ctx, d.ID, store.DeliveryQueued, store.DeliveryResult{State: store.DeliveryFailed,
			Status: uint8(emsd.NonDeliveryReportSent), Error: text, Work: w})
		if err != nil {
			// Conflict: claimed meanwhile; not found: removed meanwhile
			// (emsdp queue remove).
			if !errors.Is(err, store.ErrConflict) && !errors.Is(err, store.ErrNotFound) {
				s.log.Error("expire delivery", "err", err)
			}
			continue
		}
		s.log.Warn("delivery expired", "device", emsd.Address(d.Device), "id", idText(d.MessageID), "attempts", d.Attempts)
		s.metrics.deliveries.WithLabelValues("expired").Inc()
		s.noteQueued(w)
	}
	s.expireRelays(now)
}

// purge deletes old finished entries and resolves submissions left
// pending long after any handler could still be waiting for them.
func (s *Server) purge(now time.Time) {
	if err := s.recoverSubmissions(s.loopCtx, now.Add(-staleSubmission)); err != nil && s.loopCtx.Err() == nil {
		s.log.Error("pending submissions", "err", err)
	}
	sc := s.conf().Store
	n, err := s.st.Purge(s.loopCtx, now.Add(-time.Duration(sc.Retention)), now.Add(-time.Duration(sc.StatusRetention)))
	if err != nil {
		if s.loopCtx.Err() == nil {
			s.log.Error("purge", "err", err)
		}
		return
	}
	if n > 0 {
		s.log.Info("purged finished entries", "rows", n)
	}
}

// staleSubmission is how long a submission may stay pending before the
// hourly maintenance resolves it: far beyond an ESRO performer's wait for
// the acknowledgement plus a submission verify.
const staleSubmission = 30 * time.Minute

// drainDeliveries stops new deliveries and waits (at most until ctx ends)
// for those in flight; then it cancels what remains.
func (s *Server) drainDeliveries(ctx context.Context) {
	s.sched.mu.Lock()
	s.sched.draining = true
	s.sched.mu.Unlock()
	done := make(chan struct{})
	go func() {
		s.sched.workers.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		s.dcancel()
		<-done
	}
}
