package server

import (
	"context"
	"errors"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/gateway"
	"github.com/esro-emsdp/emsdp/server/internal/storedid"
	"github.com/esro-emsdp/emsdp/store"
)

// relayer sends one message to the smarthost; *gateway.Relay is the
// implementation.
type relayer interface {
	SendDSN(ctx context.Context, from string, to []string, msg []byte, dsn *gateway.DSNRequest) ([]gateway.RecipientResult, error)
}

func (s *Server) kickRelay() {
	select {
	case s.relayKick <- struct{}{}:
	default:
	}
}

// relayIdle is the longest the relay worker sleeps: it then looks for due
// recipients even if nothing told it of any (entries made due by another
// process, such as emsdp queue retry without a SIGHUP).
const relayIdle = 30 * time.Second

// runRelay hands due relay recipients to the smarthost, one SMTP
// transaction per message (docs/protocol.md EMSD §9.7 Recommend), with a retry
// schedule per recipient. Without a smarthost mail stays queued until it
// expires.
func (s *Server) runRelay() {
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-s.loopCtx.Done():
			return
		case <-s.relayKick:
		case <-t.C:
		}
		if s.live.Load().relay == nil {
			t.Reset(relayIdle)
			continue
		}
		// One time for the claims and for the next wake-up: an entry that
		// falls due in between must not be missed by both.
		now := time.Now()
		for s.relayRound(s.live.Load(), now) {
		}
		wait := relayIdle
		if next, ok, err := s.st.NextDue(s.loopCtx, now); err == nil && ok {
			wait = min(wait, max(time.Until(next), time.Millisecond))
		}
		t.Reset(wait)
	}
}

// relayRound sends one batch of the relays due at now with the settings
// of lc, whatever a reconfiguration changes meanwhile; it reports whether
// there may be more.
func (s *Server) relayRound(lc *liveConfig, now time.Time) bool {
	s.sched.mu.Lock()
	stop := s.sched.draining
	s.sched.mu.Unlock()
	if stop || s.dctx.Err() != nil || lc.relay == nil {
		return false
	}
	bs, err := s.st.ClaimRelays(s.dctx, now, lc.cfg.Relay.Batch)
	if err != nil {
		if s.dctx.Err() == nil {
			s.log.Error("claim relays", "err", err)
		}
		return false
	}
	n := 0
	for _, b := range bs {
		n += len(b.Recipients)
		refs := make([]store.QueueRef, len(b.Recipients))
		for i, rc := range b.Recipients {
			refs[i] = store.QueueRef{Kind: store.QueueRelay, ID: rc.ID}
			s.out.hold(refs[i])
		}
		s.sendRelay(lc, b)
		for _, r := range refs {
			s.out.release(r)
		}
	}
	return n >= lc.cfg.Relay.Batch
}

func (s *Server) sendRelay(lc *liveConfig, b *store.RelayBatch) {
	to := make([]string, len(b.Recipients))
	for i, rc := range b.Recipients {
		to[i] = rc.Addr
	}
	start := time.Now()
	results, sendErr := lc.relay.SendDSN(s.dctx, b.From, to, b.Message, relayDSN(b))
	s.metrics.relayTime.Observe(time.Since(start).Seconds())
	shutdown := s.dctx.Err() != nil
	now := time.Now()
	var rs []store.RelayResult
	var items []reportItem
	for i, rc := range b.Recipients {
		rr := gateway.RecipientResult{Addr: rc.Addr, Err: sendErr, Permanent: gateway.IsPermanent(sendErr)}
		if i < len(results) {
			rr = results[i]
		}
		res := store.RelayResult{ID: rc.ID, From: store.RelaySending}
		log := s.log.With("from", b.From, "rcpt", rc.Addr, "attempt", rc.Attempts)
		var o *outcome
		switch {
		case rr.Err == nil:
			res.State = store.RelaySent
			o = &outcome{delivered: true, at: now}
			s.metrics.relay.WithLabelValues("sent").Inc()
			log.Info("relayed")
		case shutdown && !rr.Permanent:
			res.State, res.NextAttempt, res.Requeue = store.RelayQueued, now, true
		case rr.Permanent:
			res.State, res.Error = store.RelayFailed, rr.Err.Error()
			reason, diag := gateway.NonDeliveryFor(rr.Err)
			f := failed(reason, diag, rr.Err.Error())
			o = &f
			s.metrics.relay.WithLabelValues("failed").Inc()
			log.Warn("relay refused", "err", rr.Err)
		default:
			res.State, res.Error = store.RelayQueued, rr.Err.Error()
			res.NextAttempt = now.Add(backoff(lc.cfg.Relay.Retry, rc.Attempts))
			s.metrics.relay.WithLabelValues("deferred").Inc()
			log.Info("relay deferred", "err", rr.Err, "next", res.NextAttempt.Round(time.Second))
		}
		if o != nil {
			items = append(items, reportItem{rc.Report, *o})
		}
		rs = append(rs, res)
	}
	// The recipients of this message that this transaction settled are
	// reported together: one report per originator (reportWork), committed
	// with the outcomes, retried until the store takes them (persist; the
	// relay worker waits meanwhile: it could claim nothing anyway).
	log := s.log.With("from", b.From, "recipients", len(rs))
	var work store.Work
	err := s.persist("relay outcome", log, func(ctx context.Context) error {
		var err error
		if work, err = s.reportsFor(ctx, log, items); err != nil {
			return err
		}
		return s.st.FinishRelays(ctx, rs, work)
	})
	if err != nil {
		if permanentWriteError(err) {
			log.Warn("relay outcome not recorded: the entries were taken back meanwhile", "err", err)
		} else {
			log.Error("record relay outcome", "err", err)
		}
		return
	}
	s.noteQueued(work)
}

// relayDSN is what a device's mail asks of the Internet (RFC 3461), from
// its per-recipient flags: a delivery report (bit 6) NOTIFY=SUCCESS, a
// non-delivery report (bit 5) FAILURE, neither NEVER; the headers only
// (a device takes no returned message); its local message id as ENVID;
// the recipient as written as ORCPT. Bounces (null sender) ask nothing.
func relayDSN(b *store.RelayBatch) *gateway.DSNRequest {
	if b.From == "" {
		return nil
	}
	d := &gateway.DSNRequest{Ret: smtp.DSNReturnHeaders}
	for _, rc := range b.Recipients {
		if id, err := storedid.ParseMessageID(rc.Report.MessageID); err == nil && id.IsLocal && d.EnvID == "" {
			d.EnvID = id.Local.String()
		}
		var n []smtp.DSNNotify
		f := emsd.PerRecipientFlags(rc.Report.Flags)
		if rc.Report.Device != 0 {
			if f.Has(emsd.RcptDeliveryReport) {
				n = append(n, smtp.DSNNotifySuccess)
			}
			if f.Has(emsd.RcptNonDeliveryReport) {
				n = append(n, smtp.DSNNotifyFailure)
			}
			if n == nil {
				n = []smtp.DSNNotify{smtp.DSNNotifyNever}
			}
		}
		d.Notify = append(d.Notify, n)
		d.ORCPT = append(d.ORCPT, rc.Addr)
	}
	return d
}

// expireRelays fails relay recipients past their expiry.
func (s *Server) expireRelays(now time.Time) {
	ctx := s.loopCtx
	bs, err := s.st.ExpiredRelays(ctx, now, 100)
	if err != nil {
		if ctx.Err() == nil {
			s.log.Error("expired relays", "err", err)
		}
		return
	}
	lc := s.live.Load()
	for _, b := range bs {
		var rs []store.RelayResult
		var items []reportItem
		for _, rc := range b.Recipients {
			text := "not relayed within " + time.Duration(lc.cfg.Relay.Expiry).String()
			if lc.relay == nil {
				text += " (no smarthost configured)"
			}
			if rc.LastError != "" {
				text += "; last error: " + rc.LastError
			}
			rs = append(rs, store.RelayResult{ID: rc.ID, From: store.RelayQueued, State: store.RelayFailed, Error: text})
			items = append(items, reportItem{rc.Report, failed(emsd.ReasonUnableToTransfer, emsd.DiagMaximumTimeExpired, text)})
			s.metrics.relay.WithLabelValues("expired").Inc()
		}
		// The recipients of this message that expire in this pass are
		// reported together, committed with their outcomes.
		work, err := s.reportsFor(ctx, s.log, items)
		if err != nil {
			// The store failed: the recipients stay queued, expired
			// again at the next pass with their report.
			s.log.Error("expire relays: report", "from", b.From, "err", err)
			continue
		}
		if err := s.st.FinishRelays(ctx, rs, work); err != nil {
			if !errors.Is(err, store.ErrConflict) {
				s.log.Error("expire relays", "err", err)
			}
			continue
		}
		s.noteQueued(work)
	}
}
