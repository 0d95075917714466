package server

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/storedid"
)

// attempt outcomes.
type attemptKind int

const (
	attemptDelivered attemptKind = iota
	attemptRespool               // transient: retry later
	attemptFailed                // permanent: non-delivery
	attemptRequeue               // never reached the device (shutdown): no attempt counted
)

type attemptResult struct {
	kind      attemptKind
	o         outcome
	refused   bool // the device answered an ERROR other than resource error
	silent    bool // respool: the device did not answer at all
	abandoned bool // requeue: shutdown gave up on a silent device
	ids       int  // instance ids used by an unclaimed attempt, reserved with its outcome
	took      time.Duration
	err       string
}

// recordOutcome records an attempt's outcome, its reports and status in
// one store transaction; retryAt is the next attempt of a respooled
// delivery (the device's hold). Every outcome is recorded here, retried
// until the store takes it (persist): the device stays busy meanwhile.
// It uses the server's context, not the deliveries': an outcome is
// recorded even when deliveries are being cancelled.
func (s *scheduler) recordOutcome(d *store.Delivery, r attemptResult, retryAt time.Time) {
	res := store.DeliveryResult{Error: r.err}
	unclaimed := d.State == store.DeliveryQueued // PeekDelivery: the outcome counts the attempt
	if unclaimed {
		res.Attempted, res.InstanceIDs = true, r.ids
		d.Attempts++
	}
	log := s.log.With("device", emsd.Address(d.Device), "id", storedid.Text(d.MessageID), "attempt", d.Attempts)
	switch r.kind {
	case attemptDelivered:
		res.State, res.Status = store.DeliveryDelivered, uint8(emsd.DeliveryReportSent)
		r.o = outcome{delivered: true, at: time.Now()}
		log.Info("delivered", "took", r.took.Round(time.Millisecond))
	case attemptFailed:
		res.State, res.Status = store.DeliveryFailed, uint8(emsd.NonDeliveryReportSent)
		log.Warn("not delivered", "why", r.err)
	case attemptRespool:
		res.State, res.NextAttempt = store.DeliveryQueued, retryAt
		defer func() { // queued again: its expiry is the scheduler's to see
			s.mu.Lock()
			s.expiresLocked(d.Expires)
			s.mu.Unlock()
		}()
		log.Info("delivery deferred", "why", r.err, "next", res.NextAttempt.Round(time.Second))
	case attemptRequeue:
		res.State, res.NextAttempt, res.Requeue = store.DeliveryQueued, time.Now(), true
		if r.abandoned {
			log.Info("delivery abandoned at shutdown: the device is silent; re-queued", "took", r.took.Round(time.Millisecond))
		}
		if unclaimed {
			return // still queued, nothing counted: nothing to write
		}
	}
	err := s.persist("delivery outcome", log, func(ctx context.Context) error {
		res.Work = store.Work{}
		if r.kind == attemptDelivered || r.kind == attemptFailed {
			// One device per delivery: its outcome is known alone, so its
			// report is about this recipient only.
			w, err := s.reportsFor(ctx, log, []reportItem{{d.Report, r.o}})
			if err != nil {
				return err
			}
			if r.kind == attemptFailed && r.refused {
				// A device that refuses a report (the reference UA accepts
				// only IPMs) gets it as a notice instead (delivery.reports auto).
				w.Deliveries = append(w.Deliveries, s.reports.noticeFromReport(ctx, d)...)
			}
			res.Work = w
		}
		return s.st.FinishDelivery(ctx, d.ID, d.State, res)
	})
	if err != nil {
		if unclaimed && permanentWriteError(err) {
			// Removed (emsdp queue remove) or expired while attempted.
			log.Warn("delivery outcome not recorded: the entry changed during its unclaimed attempt", "err", err)
		} else if permanentWriteError(err) {
			// Taken back meanwhile (retry --force, or another server
			// re-queued it): it is attempted again, and the device may get
			// it twice.
			log.Warn("delivery outcome not recorded: the entry was taken back meanwhile", "err", err)
		} else {
			log.Error("record delivery outcome", "err", err)
		}
		return
	}
	label := map[attemptKind]string{attemptDelivered: "delivered", attemptFailed: "failed",
		attemptRespool: "deferred", attemptRequeue: "requeued"}[r.kind]
	s.metrics.deliveries.WithLabelValues(label).Inc()
	s.metrics.deliverTime.WithLabelValues(label).Observe(r.took.Seconds())
	s.noteQueued(res.Work)
}

func backoff(schedule []Duration, attempts int) time.Duration {
	i := min(max(attempts-1, 0), len(schedule)-1)
	return time.Duration(schedule[i])
}

// attempt delivers one message, prepared while it was claimed: op 35
// (1.1) or op 1 (1.0), 3-way to SAP 3 (Complete mode and 1.0) or 2-way
// to SAP 7 (Efficient), one ESRO operation per segment with the instance
// ids the claim reserved (the reference's 0 with refIDs), to tg's
// contact, then once more to its fallback when there is one
// (contact.go). An ESRO failure at the last address ends the attempt:
// the invocation already retransmitted for as long as the timers allow,
// and invoking the same address again at once would only hold a worker
// on a silent device for as long again; the device is retried after its
// hold.
func (s *scheduler) attempt(ctx context.Context, dev *device, d *store.Delivery, p *prepared, refIDs bool, tg *target, f *flight) (r attemptResult) {
	start := time.Now()
	defer func() { r.took = time.Since(start) }()
	if dev == nil {
		text := "device no longer registered"
		return attemptResult{kind: attemptFailed, o: failed(emsd.ReasonUnableToTransfer, emsd.DiagRecipientUnknown, text), err: text}
	}
	if p.segs == nil && p.fail == nil {
		*p = s.prepare(dev, d) // a store that claimed without asking for instance ids
	}
	if p.fail != nil {
		return *p.fail
	}
	ct, segs, op, sap, hs, carries := p.ct, p.segs, p.op, p.sap, p.hs, p.carries
	base := d.InstanceBase
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
		for try := 0; ; try++ {
			req.To = tg.tryTo(try)
			c := s.conf().Delivery
			var waited time.Duration
			if waited, err = s.pace.wait(ctx, c.Rate, c.Burst); err != nil {
				break
			}
			if waited > 0 {
				s.metrics.paced.Add(waited.Seconds())
				f.progress.Store(time.Now().UnixNano()) // the device's silence counts from the send
			}
			s.metrics.invocations.Inc()
			if _, err = s.routes.endpointOf(tg).Invoke(ctx, req); !isFailure(err) {
				break
			}
			if tg.learned {
				s.contacts.failed(dev.addr, req.To)
			}
			if try > 0 || !tg.fallback.IsValid() {
				break // one invocation per address
			}
		}
		if err == nil {
			f.progress.Store(time.Now().UnixNano())
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
			return attemptResult{kind: attemptFailed, o: failed(reason, diag, text), err: text, refused: true}
		default: // ESRO failure, or a local resource problem
			var fl *esro.Failure
			silent := errors.As(err, &fl) && !fl.Remote && (fl.Reason == esro.UserNotResponding || fl.Reason == esro.Unreachable)
			return attemptResult{kind: attemptRespool, err: err.Error(), silent: silent}
		}
	}
	if tg.learned {
		s.contacts.alive(dev.addr, tg.to)
	}
	return attemptResult{kind: attemptDelivered}
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
