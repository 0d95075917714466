package server

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/gateway"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/storedid"
)

// relayer sends one message to the smarthost; *gateway.Relay is the
// implementation.
type relayer interface {
	SendDSN(ctx context.Context, from string, to []string, msg []byte, dsn *gateway.DSNRequest) ([]gateway.RecipientResult, error)
}

// relayWorker hands due relay recipients to the smarthost and records
// their outcomes with the reports they ask for; it expires those not
// relayed in time. It takes only the store's relay queue.
type relayWorker struct {
	st      relayStore
	log     *slog.Logger
	metrics *metrics
	live    func() *liveConfig // the running configuration and its smarthost client
	sched   relayScheduler
	out     outcomeWriter
	held    *outcomes // the entries whose outcome is being written
	kicked  chan struct{}
	// ctx ends the worker; dctx ends the relays in flight (shutdown,
	// when the drain time is over).
	ctx, dctx context.Context
}

// relayStore is the part of the store the relay worker uses.
type relayStore interface {
	store.Relays
	// NextDue is when the next entry falls due (the worker's wake-up).
	NextDue(ctx context.Context, after time.Time) (t time.Time, ok bool, err error)
}

// relayScheduler is what the relay worker asks and tells the delivery
// scheduler: whether the server is draining, and what it queued (reports).
type relayScheduler interface {
	draining() bool
	noteQueued(w store.Work)
}

// outcomeWriter writes outcomes with their reports (outcomes.go).
type outcomeWriter interface {
	// persist runs write until the store takes it.
	persist(what string, log *slog.Logger, write func(context.Context) error) error
	// reportsFor are the reports on items, as work to commit with them.
	reportsFor(ctx context.Context, log *slog.Logger, items []reportItem) (store.Work, error)
}

// kick makes the worker look at the queue now.
func (r *relayWorker) kick() {
	select {
	case r.kicked <- struct{}{}:
	default:
	}
}

// relayIdle is the longest the relay worker sleeps: it then looks for due
// recipients even if nothing told it of any (entries made due by another
// process, such as emsdp queue retry without a SIGHUP).
const relayIdle = 30 * time.Second

// run hands due relay recipients to the smarthost, one SMTP
// transaction per message (docs/protocol.md EMSD §9.7 Recommend), with a retry
// schedule per recipient. Without a smarthost mail stays queued until it
// expires.
func (r *relayWorker) run() {
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-r.kicked:
		case <-t.C:
		}
		if r.live().relay == nil {
			t.Reset(relayIdle)
			continue
		}
		// One time for the claims and for the next wake-up: an entry that
		// falls due in between must not be missed by both.
		now := time.Now()
		for r.round(r.live(), now) {
		}
		wait := relayIdle
		if next, ok, err := r.st.NextDue(r.ctx, now); err == nil && ok {
			wait = min(wait, max(time.Until(next), time.Millisecond))
		}
		t.Reset(wait)
	}
}

// round sends one batch of the relays due at now with the settings
// of lc, whatever a reconfiguration changes meanwhile; it reports whether
// there may be more.
func (r *relayWorker) round(lc *liveConfig, now time.Time) bool {
	if r.sched.draining() || r.dctx.Err() != nil || lc.relay == nil {
		return false
	}
	bs, err := r.st.ClaimRelays(r.dctx, now, lc.cfg.Relay.Batch)
	if err != nil {
		if r.dctx.Err() == nil {
			r.log.Error("claim relays", "err", err)
		}
		return false
	}
	n := 0
	for _, b := range bs {
		n += len(b.Recipients)
		refs := make([]store.QueueRef, len(b.Recipients))
		for i, rc := range b.Recipients {
			refs[i] = store.QueueRef{Kind: store.QueueRelay, ID: rc.ID}
			r.held.hold(refs[i])
		}
		r.sendRelay(lc, b)
		for _, ref := range refs {
			r.held.release(ref)
		}
	}
	return n >= lc.cfg.Relay.Batch
}

func (r *relayWorker) sendRelay(lc *liveConfig, b *store.RelayBatch) {
	to := make([]string, len(b.Recipients))
	for i, rc := range b.Recipients {
		to[i] = rc.Addr
	}
	start := time.Now()
	results, sendErr := lc.relay.SendDSN(r.dctx, b.From, to, b.Message, relayDSN(b))
	r.metrics.relayTime.Observe(time.Since(start).Seconds())
	shutdown := r.dctx.Err() != nil
	now := time.Now()
	var rs []store.RelayResult
	var items []reportItem
	for i, rc := range b.Recipients {
		rr := gateway.RecipientResult{Addr: rc.Addr, Err: sendErr, Permanent: gateway.IsPermanent(sendErr)}
		if i < len(results) {
			rr = results[i]
		}
		res := store.RelayResult{ID: rc.ID, From: store.RelaySending}
		log := r.log.With("from", b.From, "rcpt", rc.Addr, "attempt", rc.Attempts)
		var o *outcome
		switch {
		case rr.Err == nil:
			res.State = store.RelaySent
			o = &outcome{delivered: true, at: now}
			r.metrics.relay.WithLabelValues("sent").Inc()
			log.Info("relayed")
		case shutdown && !rr.Permanent:
			res.State, res.NextAttempt, res.Requeue = store.RelayQueued, now, true
		case rr.Permanent:
			res.State, res.Error = store.RelayFailed, rr.Err.Error()
			reason, diag := gateway.NonDeliveryFor(rr.Err)
			f := failed(reason, diag, rr.Err.Error())
			o = &f
			r.metrics.relay.WithLabelValues("failed").Inc()
			log.Warn("relay refused", "err", rr.Err)
		default:
			res.State, res.Error = store.RelayQueued, rr.Err.Error()
			res.NextAttempt = now.Add(backoff(lc.cfg.Relay.Retry, rc.Attempts))
			r.metrics.relay.WithLabelValues("deferred").Inc()
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
	log := r.log.With("from", b.From, "recipients", len(rs))
	var work store.Work
	err := r.out.persist("relay outcome", log, func(ctx context.Context) error {
		var err error
		if work, err = r.out.reportsFor(ctx, log, items); err != nil {
			return err
		}
		return r.st.FinishRelays(ctx, rs, work)
	})
	if err != nil {
		if permanentWriteError(err) {
			log.Warn("relay outcome not recorded: the entries were taken back meanwhile", "err", err)
		} else {
			log.Error("record relay outcome", "err", err)
		}
		return
	}
	r.sched.noteQueued(work)
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

// expire fails relay recipients past their expiry.
func (r *relayWorker) expire(now time.Time) {
	ctx := r.ctx
	bs, err := r.st.ExpiredRelays(ctx, now, 100)
	if err != nil {
		if ctx.Err() == nil {
			r.log.Error("expired relays", "err", err)
		}
		return
	}
	lc := r.live()
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
			r.metrics.relay.WithLabelValues("expired").Inc()
		}
		// The recipients of this message that expire in this pass are
		// reported together, committed with their outcomes.
		work, err := r.out.reportsFor(ctx, r.log, items)
		if err != nil {
			// The store failed: the recipients stay queued, expired
			// again at the next pass with their report.
			r.log.Error("expire relays: report", "from", b.From, "err", err)
			continue
		}
		if err := r.st.FinishRelays(ctx, rs, work); err != nil {
			if !errors.Is(err, store.ErrConflict) {
				r.log.Error("expire relays", "err", err)
			}
			continue
		}
		r.sched.noteQueued(work)
	}
}
