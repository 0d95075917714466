package server

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/store"
)

// sched is the delivery scheduler's state: the fleet (per-device due
// times and reachability) and the attempts in flight, under mu.
type sched struct {
	kick chan struct{}
	// rescan asks the scheduler for a rescan at once (another server's
	// work was taken over, or this server's own re-queued).
	rescan   chan struct{}
	mu       sync.Mutex
	fleet    *fleet
	inflight map[emsd.Address]*flight
	// expireAt is when the scheduler next looks for expired entries; new
	// work that expires sooner brings it forward.
	expireAt time.Time
	// silentAfter is the cut time: how long a device may leave an
	// invocation unanswered before it counts as silent (see silentAfter).
	silentAfter time.Duration
	draining    bool
	workers     sync.WaitGroup
}

// flight is one attempt in flight.
type flight struct {
	d      *fdev
	cancel context.CancelFunc
	// progress is when the device last answered (UnixNano), or when the
	// attempt started: shutdown gives up at once on an attempt whose
	// device has been silent for a retransmission interval.
	progress atomic.Int64
	// Under sched.mu: watchdog cuts a live attempt short (cut) when its
	// device stays silent for the cut time and no probe is free;
	// abandoned: shutdown cancelled it; done: the attempt is over.
	watchdog             *time.Timer
	cut, abandoned, done bool
	// peeked: the delivery attempted unclaimed (a first attempt with a
	// store of its own: PeekDelivery), which expiry leaves alone. Under
	// sched.mu.
	peeked int64
	// batch: the store read of this first attempt, made for many at once
	// (nil: the attempt reads alone).
	batch *firstBatch
}

// firstBatch is one store read for many first attempts
// (store.BatchPeeker). After a start every device with mail is one not
// heard from, maybe most of them switched off: a read each of its
// delivery and of its contact would cost the devices that answer two
// queries per silent device, on the store they need for their own
// deliveries. got is set before done closes; a device missing from it
// (held back by limits, busy, or the read failed) reads alone.
type firstBatch struct {
	done chan struct{}
	got  map[uint32]store.Peeked
}

// firstBatchSize is how many first attempts one read serves: small
// enough that the first invocations go out at once, large enough that a
// thousand devices take a handful of queries.
const firstBatchSize = 128

// defaultRescan is the scheduler's rescan period (Server.rescan): changes
// made by other processes without telling this one (emsdp queue retry,
// another server sharing the store queueing mail for a device, or
// re-queueing the work of a server that stopped) are seen within it.
const defaultRescan = 30 * time.Second

// rescanOverlap: a rescan asks for the rows changed since the previous
// one began, less this margin, so that the clocks of servers sharing a
// PostgreSQL store may differ that much without a change being missed.
const rescanOverlap = time.Minute

// rescanNow makes the scheduler rescan the queue at once.
func (s *Server) rescanNow() {
	select {
	case s.sched.rescan <- struct{}{}:
	default:
	}
}

func (s *Server) kick() {
	select {
	case s.sched.kick <- struct{}{}:
	default:
	}
}

// probeLimit is how many probes (attempts to devices that did not answer)
// may run at once: delivery.probes, or a quarter of delivery.concurrency.
func probeLimit(c DeliveryConfig) int {
	if c.Probes > 0 {
		return c.Probes
	}
	return max(c.Concurrency/4, 1)
}

// firstAttempts is how many attempts to devices not heard from may run at
// once: sixteen times delivery.concurrency. Most answer within a round
// trip; one that does not ties up only its own attempt, for the cut time
// at most. Many at once keep a fleet whose devices are unknown (after a
// restart, or mail for devices idle until now) from waiting cut time
// after cut time on switched-off devices before reaching those that
// answer; the ESRO endpoint's invocation limit is far above it.
func firstAttempts(c DeliveryConfig) int { return 16 * c.Concurrency }

func deliveryLimits(c DeliveryConfig) fleetLimits {
	return fleetLimits{kLive: c.Concurrency, kFirst: firstAttempts(c), kProbe: probeLimit(c)}
}

// watch is the watchdog of a live or first attempt: when the device has
// not answered for the cut time, the attempt becomes a probe, or is cut
// short if every probe is taken.
func (s *Server) watch(d *fdev, f *flight) {
	sc := &s.sched
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if f.done || f.cut || f.abandoned {
		return
	}
	quiet, c := time.Since(time.Unix(0, f.progress.Load())), s.silentAfter()
	if quiet < c {
		f.watchdog.Reset(c - quiet)
		return
	}
	if sc.fleet.promote(d, probeLimit(s.conf().Delivery)) {
		s.setInFlight()
		return
	}
	f.cut = true
	f.cancel()
}

// unparkAll makes the scheduler try the devices held back by delivery
// control limits again (the limits or the registry changed).
func (s *Server) unparkAll() {
	s.sched.mu.Lock()
	s.sched.fleet.unparkAll(time.Now())
	s.sched.mu.Unlock()
	s.kick()
}

// unpark puts the given devices back in line if delivery-control limits
// parked them (their registry entries changed).
func (s *Server) unpark(addrs []emsd.Address) {
	now := time.Now()
	s.sched.mu.Lock()
	for _, a := range addrs {
		s.sched.fleet.unpark(a, now)
	}
	s.sched.mu.Unlock()
	s.kick()
}

// wake makes a device's queued deliveries due now and lifts its hold: any
// INVOKE from the device is its poll (docs/protocol.md EMSD §9.4). authenticated
// says the device proved who it is, which also makes it count as
// answering (see fleet.wake).
func (s *Server) wake(a emsd.Address, authenticated bool) {
	now := time.Now()
	n, err := s.st.WakeDevice(s.ctx, uint32(a), now)
	if err != nil {
		s.log.Warn("wake device", "device", a, "err", err)
	}
	if n > 0 {
		s.log.Debug("device poll woke its queue", "device", a, "deliveries", n)
		s.sched.mu.Lock()
		s.sched.fleet.note(a, now, now)
		s.sched.mu.Unlock()
	}
	s.touch(a, authenticated)
}

// touch lifts the hold of a device whose queue wake already made due (a
// sign of life, or its delivery control limits or its contact changed);
// authenticated as for wake. A device the scheduler does not know may
// have mail another process queued (another server sharing the store):
// the store is asked, by an indexed look-up.
func (s *Server) touch(a emsd.Address, authenticated bool) {
	s.sched.mu.Lock()
	known := s.sched.fleet.devs[a] != nil
	s.sched.mu.Unlock()
	if !known {
		next, ok, err := s.st.DeviceNextDue(s.ctx, uint32(a))
		if err != nil {
			s.log.Warn("device queue", "device", a, "err", err)
		}
		if !ok {
			return
		}
		s.sched.mu.Lock()
		s.sched.fleet.note(a, next, time.Now())
		s.sched.mu.Unlock()
	}
	s.sched.mu.Lock()
	s.sched.fleet.wake(a, time.Now(), authenticated)
	s.sched.mu.Unlock()
	s.kick()
}

// noteQueued tells the loops about new work.
func (s *Server) noteQueued(w store.Work) {
	if w.Empty() {
		return
	}
	now := time.Now()
	sc := &s.sched
	sc.mu.Lock()
	for _, d := range w.Deliveries {
		sc.fleet.note(emsd.Address(d.Device), cmp.Or(d.NextAttempt, now), now)
		s.expiresLocked(d.Expires)
	}
	for _, r := range w.Relays {
		s.expiresLocked(r.Expires)
	}
	sc.mu.Unlock()
	s.kick()
	if len(w.Relays) > 0 {
		s.kickRelay()
	}
}

// expiresLocked brings the scheduler's next look for expired entries
// forward to t. sched.mu is held.
func (s *Server) expiresLocked(t time.Time) {
	if !t.IsZero() && t.Before(s.sched.expireAt) {
		s.sched.expireAt = t
	}
}

// rescanFleet tells the fleet about the devices with queued deliveries
// changed since 'since' (all of them with the zero time).
func (s *Server) rescanFleet(ctx context.Context, since time.Time) error {
	ds, err := s.st.QueuedDevices(ctx, since)
	if err != nil {
		return err
	}
	now := time.Now()
	s.sched.mu.Lock()
	for _, d := range ds {
		s.sched.fleet.note(emsd.Address(d.Device), d.Next, now)
	}
	s.sched.mu.Unlock()
	return nil
}

// runScheduler starts an attempt for every due device there is a worker
// for, expires what is too old, and sleeps until the next due time or a
// kick. A pass costs O(attempts started): the due times are in memory
// (fleet), rebuilt from the store at start and brought up to date with
// what other processes changed at every rescan, which asks the store only
// for the rows changed since the previous one.
func (s *Server) runScheduler() {
	t := time.NewTimer(0)
	defer t.Stop()
	now := time.Now()
	lastScan := now
	if err := s.rescanFleet(s.loopCtx, time.Time{}); err != nil && s.loopCtx.Err() == nil {
		s.log.Error("delivery queue", "err", err)
		lastScan = time.Time{} // the next rescan reads everything
	}
	purgeAt, rescanAt := now, now.Add(s.rescan)
	s.sched.mu.Lock()
	s.sched.expireAt = now
	s.sched.mu.Unlock()
	// A PostgreSQL store signals when its sweep took over the work of a
	// server that is gone: rescan at once, and the relays too (nil: never).
	var requeued <-chan struct{}
	if r, ok := s.st.(interface{ Requeued() <-chan struct{} }); ok {
		requeued = r.Requeued()
	}
	for {
		select {
		case <-s.loopCtx.Done():
			return
		case <-s.sched.kick:
		case <-t.C:
		case <-requeued:
			s.log.Info("took over the work of a server that is gone")
			rescanAt = time.Time{}
			s.kickRelay()
		case <-s.sched.rescan:
			rescanAt = time.Time{}
		}
		now = time.Now()
		if !now.Before(rescanAt) {
			since := lastScan
			if !since.IsZero() {
				since = since.Add(-rescanOverlap)
			}
			if err := s.rescanFleet(s.loopCtx, since); err != nil {
				if s.loopCtx.Err() == nil {
					s.log.Error("delivery queue rescan", "err", err)
				}
			} else {
				lastScan = now
			}
			if err := s.checkInFlight(s.loopCtx, now); err != nil && s.loopCtx.Err() == nil {
				s.log.Error("entries in flight", "err", err)
			}
			rescanAt = now.Add(s.rescan)
		}
		s.sched.mu.Lock()
		expireAt := s.sched.expireAt
		s.sched.mu.Unlock()
		if !now.Before(expireAt) {
			s.expire(now)
			// The next expiry (or due time, which NextDue also gives: a
			// look too many costs an indexed query), at most once a second.
			expireAt = rescanAt
			if next, ok, err := s.st.NextDue(s.loopCtx, now); err == nil && ok && next.Before(expireAt) {
				expireAt = next
				if floor := now.Add(time.Second); expireAt.Before(floor) {
					expireAt = floor
				}
			}
			s.sched.mu.Lock()
			if expireAt.Before(s.sched.expireAt) || !s.sched.expireAt.After(now) {
				s.sched.expireAt = expireAt
			}
			s.sched.mu.Unlock()
		}
		if !now.Before(purgeAt) {
			s.purge(now)
			purgeAt = now.Add(time.Hour)
		}
		s.startWorkers(now)
		wakeAt := rescanAt
		s.sched.mu.Lock()
		if s.sched.expireAt.Before(wakeAt) {
			wakeAt = s.sched.expireAt
		}
		if next, ok := s.sched.fleet.next(); ok && next.Before(wakeAt) {
			wakeAt = next
		}
		s.sched.mu.Unlock()
		t.Reset(max(time.Until(wakeAt), time.Millisecond))
	}
}

func (s *Server) startWorkers(now time.Time) {
	sc := &s.sched
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.draining {
		return
	}
	// First attempts read the store in batches when it can (SQLite: one
	// server, attempts unclaimed).
	bp, _ := s.st.(store.BatchPeeker)
	if s.conf().Store.Driver == StorePostgres {
		bp = nil
	}
	var batch *firstBatch
	var addrs []uint32
	flush := func() {
		if batch == nil {
			return
		}
		b, as := batch, addrs
		sc.workers.Go(func() {
			defer close(b.done)
			got, err := bp.PeekDeliveries(s.dctx, as, now)
			if err != nil {
				if s.dctx.Err() == nil {
					s.log.Warn("first attempts: batch read failed; each reads alone", "devices", len(as), "err", err)
				}
				return
			}
			b.got = got
		})
		batch, addrs = nil, nil
	}
	for _, d := range sc.fleet.take(now, deliveryLimits(s.conf().Delivery)) {
		ctx, cancel := context.WithCancel(s.dctx)
		f := &flight{d: d, cancel: cancel}
		if bp != nil && d.kind == kFirst {
			if batch == nil {
				batch = &firstBatch{done: make(chan struct{})}
			}
			f.batch = batch
			if addrs = append(addrs, uint32(d.addr)); len(addrs) == firstBatchSize {
				flush()
			}
		}
		f.progress.Store(now.UnixNano())
		if d.kind != kProbe {
			f.watchdog = time.AfterFunc(s.silentAfter(), func() { s.watch(d, f) })
		}
		sc.inflight[d.addr] = f
		sc.workers.Go(func() {
			defer cancel()
			s.attemptDevice(ctx, d, f)
		})
	}
	flush()
	s.setInFlight()
}

// setInFlight updates the in-flight gauges. sched.mu is held.
func (s *Server) setInFlight() {
	for k, name := range [kinds]string{kLive: "live", kFirst: "first", kProbe: "probe"} {
		s.metrics.inflight.WithLabelValues(name).Set(float64(s.sched.fleet.busy[k]))
	}
}

// attemptDevice makes one attempt to a device: it claims the device's
// oldest due delivery, makes one attempt and records its outcome; then
// the device goes back in line (fleet.finish).
func (s *Server) attemptDevice(ctx context.Context, fd *fdev, f *flight) {
	a := fd.addr
	o, next, ok := fNothing, time.Time{}, false
	defer func() {
		sc := &s.sched
		sc.mu.Lock()
		f.done = true
		if f.watchdog != nil {
			f.watchdog.Stop()
		}
		// A device another server sharing the store delivers to (that
		// server goes on with its queue) is left alone until new work
		// for it or a rescan finding its queue changed (fleet.note); one
		// the store failed to answer for, for storeErrorHold.
		sc.fleet.finish(fd, o, time.Now(), s.deviceBackoff, next, ok, s.rescan)
		delete(sc.inflight, a)
		s.setInFlight()
		sc.mu.Unlock()
		s.kick()
	}()
	var pk *store.Peeked
	if f.batch != nil {
		select {
		case <-f.batch.done:
		case <-ctx.Done():
			o = fAbandoned
			return
		}
		if p, ok := f.batch.got[uint32(a)]; ok {
			pk = &p
		}
	}
	dev := s.registry().get(a)
	var lim store.Limits
	var tg target
	if dev != nil {
		var why string
		var known *store.Contact
		if pk != nil {
			known = &pk.Contact
		}
		if tg, why = s.targetOf(dev, known); why != "" {
			// Offline: parked until the device is heard (contact.go);
			// heard by another server sharing the store: left to it until
			// the next rescan.
			s.log.Debug("delivery waits", "device", a, "why", why)
			if why == targetElsewhere {
				o = fElsewhere
			} else {
				o, next, ok = fParked, time.Now(), true
			}
			return
		}
		c := dev.Control
		if c.Operations != nil && !emsd.OperationSet(*c.Operations).Has(deliveryOp(dev.version)) {
			// Delivery not permitted at all (docs/protocol.md EMSD §9.12): parked
			// until the device's limits change.
			o, next, ok = fParked, time.Now(), true
			return
		}
		lim = store.Limits{MaxContentLength: c.MaxContentLength, LowestPriority: c.LowestPriority}
	}
	// The message is encoded and split while it is claimed, so that the
	// claim reserves its instance ids in the same write.
	var p prepared
	refIDs := s.conf().Compat.ReferenceInstanceIDs // once: a reconfiguration must not split an attempt
	if dev != nil {
		lim.InstanceIDs = func(d *store.Delivery) int {
			p = s.prepare(dev, d)
			if p.fail != nil || !p.carries || refIDs {
				return 0
			}
			return len(p.segs)
		}
	}
	// A first attempt, to a device not heard from, is made unclaimed when
	// this server has the store to itself: it then costs a read, not a
	// write the live devices' writes would queue behind, and its outcome
	// counts it (PeekDelivery). With a shared store the claim is what
	// keeps the servers apart.
	s.sched.mu.Lock()
	peek := fd.kind == kFirst && s.conf().Store.Driver != StorePostgres
	s.sched.mu.Unlock()
	claimAt := time.Now()
	var d *store.Delivery
	var err error
	switch {
	case peek && pk != nil && lim.MaxContentLength == nil && lim.LowestPriority == nil:
		d, err = peekedDelivery(pk.Delivery, lim)
	case peek:
		d, err = s.st.PeekDelivery(ctx, uint32(a), claimAt, lim)
	default:
		d, err = s.st.ClaimDelivery(ctx, uint32(a), claimAt, lim)
	}
	switch {
	case errors.Is(err, store.ErrNotFound):
		if next, ok, err = s.st.DeviceNextDue(ctx, uint32(a)); err != nil {
			if ctx.Err() == nil {
				s.log.Error("device next due", "device", a, "err", err)
			}
			o = fStoreError
		} else if ok && !next.After(claimAt) {
			o = fParked // due, yet nothing claimable: held back by its limits
		}
		return
	case errors.Is(err, store.ErrBusy):
		o = fElsewhere
		return
	case err != nil:
		if ctx.Err() != nil {
			o = fAbandoned
			return
		}
		s.log.Error("claim delivery", "device", a, "err", err)
		o = fStoreError
		return
	}
	ref := store.QueueRef{Kind: store.QueueDelivery, ID: d.ID}
	s.out.hold(ref)
	defer s.out.release(ref)
	s.sched.mu.Lock()
	fails := fd.fails
	if peek {
		f.peeked = d.ID
	}
	s.sched.mu.Unlock()
	r := s.attempt(ctx, dev, d, &p, refIDs, &tg, f)
	if peek && p.fail == nil && p.carries && !refIDs {
		r.ids = len(p.segs)
	}
	s.sched.mu.Lock()
	if r.kind == attemptRequeue { // cancelled: by shutdown or by the watchdog
		switch {
		case f.abandoned:
			r.abandoned = true
		case f.cut:
			if tg.learned {
				s.contactFailed(a, tg.to)
			}
			r = attemptResult{kind: attemptRespool, silent: true, took: r.took,
				err: fmt.Sprintf("no answer within %v, and every probe taken", r.took.Round(time.Millisecond))}
		}
	}
	s.sched.mu.Unlock()
	s.recordOutcome(d, r, time.Now().Add(s.deviceBackoff(fails+1)))
	switch r.kind {
	case attemptDelivered, attemptFailed:
		o = fDone
	case attemptRespool:
		o = fTransient
		if r.silent {
			o = fSilent
		}
	case attemptRequeue:
		o = fAbandoned
	}
}

// peekedDelivery is d, read by a batch (store.BatchPeeker), as
// PeekDelivery would have returned it under lim (no content or priority
// limits): InstanceBase, the device's next instance id, is kept only
// when the delivery needs instance ids.
func peekedDelivery(d *store.Delivery, lim store.Limits) (*store.Delivery, error) {
	next := d.InstanceBase
	d.InstanceBase = 0
	if lim.InstanceIDs != nil {
		switch n := lim.InstanceIDs(d); {
		case n < 0 || n > 256:
			return nil, fmt.Errorf("%w: %d instance ids", store.ErrInvalid, n)
		case n > 0:
			d.InstanceBase = next
		}
	}
	return d, nil
}

// deviceBackoff is the hold after a device's fails-th consecutive failed
// attempt: delivery.retry, whose last delay repeats.
func (s *Server) deviceBackoff(fails int) time.Duration {
	return backoff(s.conf().Delivery.Retry, fails)
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
func (s *Server) recordOutcome(d *store.Delivery, r attemptResult, retryAt time.Time) {
	res := store.DeliveryResult{Error: r.err}
	unclaimed := d.State == store.DeliveryQueued // PeekDelivery: the outcome counts the attempt
	if unclaimed {
		res.Attempted, res.InstanceIDs = true, r.ids
		d.Attempts++
	}
	log := s.log.With("device", emsd.Address(d.Device), "id", idText(d.MessageID), "attempt", d.Attempts)
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
			s.sched.mu.Lock()
			s.expiresLocked(d.Expires)
			s.sched.mu.Unlock()
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
				w.Deliveries = append(w.Deliveries, s.noticeFromReport(ctx, d)...)
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

// prepared is a claimed delivery made ready to send: its segments, or
// why it cannot be sent.
type prepared struct {
	fail    *attemptResult
	ct      emsd.ContentType
	segs    [][]byte
	op      emsd.Operation
	sap     emsd.SAP
	hs      esro.Handshake
	carries bool // the operation carries an instance id
}

// prepare encodes d for dev and splits it into segments
// (docs/protocol.md EMSD §9.9).
func (s *Server) prepare(dev *device, d *store.Delivery) prepared {
	p := prepared{ct: emsd.ContentType(d.ContentType)}
	fail := func(reason emsd.NonDeliveryReason, diag emsd.Diagnostic, format string, a ...any) prepared {
		text := fmt.Sprintf(format, a...)
		p.fail = &attemptResult{kind: attemptFailed, o: failed(reason, diag, text), err: text}
		return p
	}
	o := s.opts(dev.version)
	content := d.Content
	if o != (emsd.Options{}) { // stored as 1.1 in list order; re-encode for this device
		c, err := emsd.DecodeContents(p.ct, content, emsd.Options{})
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
	env := &emsd.DeliverArgument{MessageID: mid, DeliveryTime: emsd.TimeOf(time.Now()), ContentType: p.ct}
	if d.SubmissionTime != nil {
		t := emsd.Time(*d.SubmissionTime)
		env.SubmissionTime = &t
	}
	sp := emsd.Splitter{Options: o, MaxUserData: s.conf().EMSD.PDUSize}
	if p.segs, err = sp.SplitDeliver(env, content, s.seq.Next()); err != nil {
		var sl *emsd.SegmentLimitError
		if errors.As(err, &sl) {
			return fail(emsd.ReasonUnableToTransfer, sl.Diagnostic(), "%v", err)
		}
		return fail(emsd.ReasonUnableToTransfer, emsd.DiagSizeConstraintViolated, "%v", err)
	}
	p.op = deliveryOp(dev.version)
	p.sap, p.hs = emsd.SAPUAPerformer3Way, esro.ThreeWay
	if dev.version == emsd.V1_1 && dev.Mode == store.ModeEfficient {
		p.sap, p.hs = emsd.SAPUAPerformer2Way, esro.TwoWay
	}
	p.carries = emsd.CarriesInstanceID(p.op)
	return p
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
func (s *Server) attempt(ctx context.Context, dev *device, d *store.Delivery, p *prepared, refIDs bool, tg *target, f *flight) (r attemptResult) {
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
			if _, err = s.endpointOf(tg).Invoke(ctx, req); !isFailure(err) {
				break
			}
			if tg.learned {
				s.contactFailed(dev.addr, req.To)
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
		s.alive(dev.addr, tg.to)
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

// expire drops queued deliveries and relays past their expiry with
// non-delivery reports (docs/protocol.md EMSD §9.8: 1 hour for deliveries).
func (s *Server) expire(now time.Time) {
	ctx := s.loopCtx
	ds, err := s.st.ExpiredDeliveries(ctx, now, 100)
	if err != nil && ctx.Err() == nil {
		s.log.Error("expired deliveries", "err", err)
	}
	for _, d := range ds {
		s.sched.mu.Lock()
		f := s.sched.inflight[emsd.Address(d.Device)]
		attempted := f != nil && f.peeked == d.ID
		s.sched.mu.Unlock()
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
// for those in flight, saying which; then it cancels what remains. A probe
// (its device did not answer last time) is given up at once, and any
// other attempt as soon as its device has not answered for a
// retransmission interval (silent: it would only end with an ESRO
// failure); they are re-queued without counting the attempt, to be
// retried after the restart.
func (s *Server) drainDeliveries(ctx context.Context) {
	sc := &s.sched
	sc.mu.Lock()
	sc.draining = true
	n := len(sc.inflight)
	devs := make([]emsd.Address, 0, min(n, 10))
	for a := range sc.inflight {
		if len(devs) == cap(devs) {
			break
		}
		devs = append(devs, a)
	}
	sc.mu.Unlock()
	done := make(chan struct{})
	go func() {
		sc.workers.Wait()
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
			sc.mu.Lock()
			left := len(sc.inflight)
			sc.mu.Unlock()
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
		sc.mu.Lock()
		for _, f := range sc.inflight {
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
		sc.mu.Unlock()
		t.Reset(wait)
	}
}

// silentAfter is how long a device may leave an invocation unanswered
// before shutdown counts it silent: one retransmission interval of the
// configured timers (T_retx = R + RT; the ESRO keys are restart-only),
// far beyond an answering device's round trip.
func (s *Server) silentAfter() time.Duration { return s.sched.silentAfter }
