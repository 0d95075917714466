package server

import (
	"context"
	"errors"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/storedid"
)

// expire drops queued deliveries and relays past their expiry with
// non-delivery reports (docs/protocol.md EMSD §9.8: 1 hour for deliveries).
func (s *scheduler) expire(now time.Time) {
	ctx := s.loopCtx
	ds, err := s.st.ExpiredDeliveries(ctx, now, 100)
	if err != nil && ctx.Err() == nil {
		s.log.Error("expired deliveries", "err", err)
	}
	for _, d := range ds {
		s.mu.Lock()
		f := s.inflight[emsd.Address(d.Device)]
		attempted := f != nil && f.peeked == d.ID
		s.mu.Unlock()
		if attempted {
			continue // its attempt's outcome decides; it expires after, if still queued
		}
		text := "not delivered within " + time.Duration(s.conf().Delivery.Expiry).String()
		if d.LastError != "" {
			text += "; last error: " + d.LastError
		}
		// Each delivery is finished in a transaction of its own, and its
		// report must be committed with it: one report per recipient.
		w, err := s.reportsFor(ctx, s.log, []reportItem{{d.Report, failed(emsd.ReasonUnableToTransfer, emsd.DiagMaximumTimeExpired, text)}})
		if err != nil {
			// The store failed: the entry stays queued, expired again
			// at the next pass with its report.
			s.log.Error("expire delivery: report", "err", err)
			continue
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
		s.log.Warn("delivery expired", "device", emsd.Address(d.Device), "id", storedid.Text(d.MessageID), "attempts", d.Attempts)
		s.metrics.deliveries.WithLabelValues("expired").Inc()
		s.noteQueued(w)
	}
	s.relays.expire(now)
}

// purge deletes old finished entries and resolves submissions left
// pending long after any handler could still be waiting for them.
func (s *scheduler) purge(now time.Time) {
	if err := s.subs.recoverSubmissions(s.loopCtx, now.Add(-staleSubmission)); err != nil && s.loopCtx.Err() == nil {
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
// for those in flight, saying which; then it cancels what remains. A probe
// (its device did not answer last time) is given up at once, and any
// other attempt as soon as its device has not answered for a
// retransmission interval (silent: it would only end with an ESRO
// failure); they are re-queued without counting the attempt, to be
// retried after the restart.
func (s *scheduler) drainDeliveries(ctx context.Context) {
	s.mu.Lock()
	s.stopping = true
	n := len(s.inflight)
	devs := make([]emsd.Address, 0, min(n, 10))
	for a := range s.inflight {
		if len(devs) == cap(devs) {
			break
		}
		devs = append(devs, a)
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() {
		s.workers.Wait()
		close(done)
	}()
	if n > 0 {
		deadline, _ := ctx.Deadline()
		s.log.Info("shutdown: waiting for deliveries in flight; those to silent devices are given up",
			"deliveries", n, "devices", devs, "until", deadline.Round(time.Second))
	}
	silent := s.silentAfter()
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case <-ctx.Done():
			s.mu.Lock()
			left := len(s.inflight)
			s.mu.Unlock()
			s.log.Warn("shutdown: drain time over; cancelling deliveries in flight (re-queued)", "deliveries", left)
			s.dcancel()
			<-done
			return
		case <-t.C:
		}
		// Give up on the silent ones; look again when the next one would
		// turn silent.
		now := time.Now()
		wait := silent
		s.mu.Lock()
		for _, f := range s.inflight {
			quiet := now.Sub(time.Unix(0, f.progress.Load()))
			if quiet >= silent || f.d.kind == kProbe {
				if !f.abandoned {
					f.abandoned = true
					f.cancel()
				}
				continue
			}
			wait = min(wait, silent-quiet)
		}
		s.mu.Unlock()
		t.Reset(wait)
	}
}

// silentAfter is how long a device may leave an invocation unanswered
// before shutdown counts it silent: one retransmission interval of the
// configured timers (T_retx = R + RT; the ESRO keys are restart-only),
// far beyond an answering device's round trip.
func (s *scheduler) silentAfter() time.Duration { return s.cutAfter }
