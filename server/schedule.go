package server

import (
	"cmp"
	"context"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/store"
)

// scheduler is the delivery scheduler: it attempts the queued
// deliveries device by device (claim.go, deliver.go, copies.go), holds
// devices back after failures (backoff), expires what is too old
// (expire.go), paces new invocations (pace.go) and writes every outcome
// until the store takes it (outcomes.go). Its state is the fleet
// (per-device due times and reachability) and the attempts in flight,
// under mu.
type scheduler struct {
	st       schedulerStore
	devs     deviceRegistry
	routes   deliveryRoutes
	contacts contactNews
	reports  outcomeReports
	subs     submissionRecovery // set after construction (the performer needs the scheduler)
	relays   relayQueue         // likewise
	log      *slog.Logger
	metrics  *metrics
	conf     func() *Config
	// ctx lives until Close (outcome writes use it); loopCtx ends the
	// scheduler's loop at shutdown; dctx ends the attempts in flight when
	// the drain time is over (dcancel).
	ctx, loopCtx, dctx context.Context
	dcancel            context.CancelFunc

	seq         emsd.SequenceCounter
	pace        pacer
	rescanEvery time.Duration // full rescan period
	out         *outcomes     // outcome writes and the entries held in flight

	kicked chan struct{}
	// rescan asks the scheduler for a rescan at once (another server's
	// work was taken over, or this server's own re-queued).
	rescanReq chan struct{}
	mu        sync.Mutex
	fleet     *fleet
	inflight  map[emsd.Address]*flight
	// expireAt is when the scheduler next looks for expired entries; new
	// work that expires sooner brings it forward.
	expireAt time.Time
	// silentAfter is the cut time: how long a device may leave an
	// invocation unanswered before it counts as silent (see silentAfter).
	cutAfter time.Duration
	stopping bool // draining: no new attempts
	workers  sync.WaitGroup
}

// schedulerStore is the part of the store the scheduler uses: the
// delivery queue, the queue administration's look at the entries in
// flight (checkInFlight) and the purge of finished entries. A store that
// also implements store.BatchPeeker serves first attempts in batches.
type schedulerStore interface {
	store.Deliveries
	ListQueue(ctx context.Context, f store.QueueFilter) (store.QueueList, error)
	RetryQueued(ctx context.Context, sel store.QueueSelect, now time.Time) (store.QueueChange, error)
	Purge(ctx context.Context, before, statusBefore time.Time) (int, error)
}

// deviceRegistry is the device registry as last loaded (registrar).
type deviceRegistry interface {
	current() *registry
}

// deliveryRoutes are where a device's deliveries go and the ESRO
// endpoint that reaches them: in clear or over DTLS (Server.targetOf,
// Server.endpointOf).
type deliveryRoutes interface {
	// targetOf is the device's target, or why it has none now; known is
	// its contact when the caller read it already (nil: read it).
	targetOf(dev *device, known *store.Contact) (t target, why string)
	endpointOf(t *target) *esro.Endpoint
}

// contactNews is what attempts tell the contact book (contactBook), and
// what it tells the scheduler of new work's devices.
type contactNews interface {
	// lastHeard: when the device was last heard from since start (zero:
	// not, or its contact stopped answering).
	lastHeard(a emsd.Address) time.Time
	// alive: the device answered at to.
	alive(a emsd.Address, to netip.AddrPort)
	// failed: the device did not answer at ap.
	failed(a emsd.Address, ap netip.AddrPort)
}

// outcomeReports are the reports an outcome asks for (reporter).
type outcomeReports interface {
	reportWork(ctx context.Context, items []reportItem) (store.Work, error)
	// noticeFromReport: a report the device refused, as a notice.
	noticeFromReport(ctx context.Context, d *store.Delivery) []store.NewDelivery
}

// submissionRecovery resolves submissions left pending (performer).
type submissionRecovery interface {
	recoverSubmissions(ctx context.Context, before time.Time) error
}

// relayQueue is the relay worker as the scheduler sees it: told of new
// relays, and asked to expire old ones in the housekeeping pass.
type relayQueue interface {
	kick()
	expire(now time.Time)
}

// newScheduler is a scheduler with nothing queued yet; run starts it.
func newScheduler(s *scheduler) *scheduler {
	s.out = newOutcomes()
	s.rescanEvery = cmp.Or(s.rescanEvery, defaultRescan)
	s.kicked, s.rescanReq = make(chan struct{}, 1), make(chan struct{}, 1)
	s.fleet, s.inflight = newFleet(), map[emsd.Address]*flight{}
	return s
}

// draining reports whether the server is shutting down: the relay worker
// then claims nothing more.
func (s *scheduler) draining() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stopping
}

// stop makes the scheduler start no more attempts (Close).
func (s *scheduler) stop() {
	s.mu.Lock()
	s.stopping = true
	s.mu.Unlock()
}

// reload is SIGHUP's part (Server.Reload): every device's due time read
// again, and the holds of devices whose attempts failed lifted.
func (s *scheduler) reload(ctx context.Context) error {
	err := s.rescanFleet(ctx, time.Time{})
	s.mu.Lock()
	s.fleet.release(time.Now())
	s.mu.Unlock()
	s.kick()
	return err
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

// defaultRescan is the scheduler's rescan period (scheduler.rescanEvery): changes
// made by other processes without telling this one (emsdp queue retry,
// another server sharing the store queueing mail for a device, or
// re-queueing the work of a server that stopped) are seen within it.
const defaultRescan = 30 * time.Second

// rescanOverlap: a rescan asks for the rows changed since the previous
// one began, less this margin, so that the clocks of servers sharing a
// PostgreSQL store may differ that much without a change being missed.
const rescanOverlap = time.Minute

// rescanNow makes the scheduler rescan the queue at once.
func (s *scheduler) rescanNow() {
	select {
	case s.rescanReq <- struct{}{}:
	default:
	}
}

func (s *scheduler) kick() {
	select {
	case s.kicked <- struct{}{}:
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
func (s *scheduler) watch(d *fdev, f *flight) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if f.done || f.cut || f.abandoned {
		return
	}
	quiet, c := time.Since(time.Unix(0, f.progress.Load())), s.silentAfter()
	if quiet < c {
		f.watchdog.Reset(c - quiet)
		return
	}
	if s.fleet.promote(d, probeLimit(s.conf().Delivery)) {
		s.setInFlight()
		return
	}
	f.cut = true
	f.cancel()
}

// unparkAll makes the scheduler try the devices held back by delivery
// control limits again (the limits or the registry changed).
func (s *scheduler) unparkAll() {
	s.mu.Lock()
	s.fleet.unparkAll(time.Now())
	s.mu.Unlock()
	s.kick()
}

// unpark puts the given devices back in line if delivery-control limits
// parked them (their registry entries changed).
func (s *scheduler) unpark(addrs []emsd.Address) {
	now := time.Now()
	s.mu.Lock()
	for _, a := range addrs {
		s.fleet.unpark(a, now)
	}
	s.mu.Unlock()
	s.kick()
}

// wake makes a device's queued deliveries due now and lifts its hold: any
// INVOKE from the device is its poll (docs/protocol.md EMSD §9.4). authenticated
// says the device proved who it is, which also makes it count as
// answering (see fleet.wake).
func (s *scheduler) wake(a emsd.Address, authenticated bool) {
	now := time.Now()
	n, err := s.st.WakeDevice(s.ctx, uint32(a), now)
	if err != nil {
		s.log.Warn("wake device", "device", a, "err", err)
	}
	if n > 0 {
		s.log.Debug("device poll woke its queue", "device", a, "deliveries", n)
		s.mu.Lock()
		s.fleet.note(a, now, now)
		s.mu.Unlock()
	}
	s.touch(a, authenticated)
}

// touch lifts the hold of a device whose queue wake already made due (a
// sign of life, or its delivery control limits or its contact changed);
// authenticated as for wake. A device the scheduler does not know may
// have mail another process queued (another server sharing the store):
// the store is asked, by an indexed look-up.
func (s *scheduler) touch(a emsd.Address, authenticated bool) {
	s.mu.Lock()
	known := s.fleet.devs[a] != nil
	s.mu.Unlock()
	if !known {
		next, ok, err := s.st.DeviceNextDue(s.ctx, uint32(a))
		if err != nil {
			s.log.Warn("device queue", "device", a, "err", err)
		}
		if !ok {
			return
		}
		s.mu.Lock()
		s.fleet.note(a, next, time.Now())
		s.mu.Unlock()
	}
	s.mu.Lock()
	s.fleet.wake(a, time.Now(), authenticated)
	s.mu.Unlock()
	s.kick()
}

// noteQueued tells the loops about new work.
func (s *scheduler) noteQueued(w store.Work) {
	if w.Empty() {
		return
	}
	now := time.Now()
	recent := time.Duration(s.conf().Delivery.Expiry)
	s.mu.Lock()
	for _, d := range w.Deliveries {
		a := emsd.Address(d.Device)
		s.fleet.note(a, cmp.Or(d.NextAttempt, now), now)
		s.fleet.noteHeard(a, s.contacts.lastHeard(a), now, recent)
		s.expiresLocked(d.Expires)
	}
	for _, r := range w.Relays {
		s.expiresLocked(r.Expires)
	}
	s.mu.Unlock()
	s.kick()
	if len(w.Relays) > 0 {
		s.relays.kick()
	}
}

// expiresLocked brings the scheduler's next look for expired entries
// forward to t. sched.mu is held.
func (s *scheduler) expiresLocked(t time.Time) {
	if !t.IsZero() && t.Before(s.expireAt) {
		s.expireAt = t
	}
}

// rescanFleet tells the fleet about the devices with queued deliveries
// changed since 'since' (all of them with the zero time), and when each
// was last heard from: one heard within delivery.expiry (the time mail
// is given to reach a device) counts as answering until an attempt says
// otherwise (fleet.noteHeard).
func (s *scheduler) rescanFleet(ctx context.Context, since time.Time) error {
	ds, err := s.st.QueuedDevices(ctx, since)
	if err != nil {
		return err
	}
	now := time.Now()
	recent := time.Duration(s.conf().Delivery.Expiry)
	s.mu.Lock()
	for _, d := range ds {
		s.fleet.note(emsd.Address(d.Device), d.Next, now)
		s.fleet.noteHeard(emsd.Address(d.Device), d.Heard, now, recent)
	}
	s.mu.Unlock()
	return nil
}

// runScheduler starts an attempt for every due device there is a worker
// for, expires what is too old, and sleeps until the next due time or a
// kick. A pass costs O(attempts started): the due times are in memory
// (fleet), rebuilt from the store at start and brought up to date with
// what other processes changed at every rescan, which asks the store only
// for the rows changed since the previous one.
func (s *scheduler) runScheduler() {
	t := time.NewTimer(0)
	defer t.Stop()
	s.mu.Lock()
	s.fleet.calm = s.silentAfter()
	s.mu.Unlock()
	now := time.Now()
	lastScan := now
	if err := s.rescanFleet(s.loopCtx, time.Time{}); err != nil && s.loopCtx.Err() == nil {
		s.log.Error("delivery queue", "err", err)
		lastScan = time.Time{} // the next rescan reads everything
	}
	purgeAt, rescanAt := now, now.Add(s.rescanEvery)
	s.mu.Lock()
	s.expireAt = now
	s.mu.Unlock()
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
		case <-s.kicked:
		case <-t.C:
		case <-requeued:
			s.log.Info("took over the work of a server that is gone")
			rescanAt = time.Time{}
			s.relays.kick()
		case <-s.rescanReq:
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
			rescanAt = now.Add(s.rescanEvery)
		}
		s.mu.Lock()
		expireAt := s.expireAt
		s.mu.Unlock()
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
			s.mu.Lock()
			if expireAt.Before(s.expireAt) || !s.expireAt.After(now) {
				s.expireAt = expireAt
			}
			s.mu.Unlock()
		}
		if !now.Before(purgeAt) {
			s.purge(now)
			purgeAt = now.Add(time.Hour)
		}
		s.startWorkers(now)
		wakeAt := rescanAt
		s.mu.Lock()
		if s.expireAt.Before(wakeAt) {
			wakeAt = s.expireAt
		}
		if next, ok := s.fleet.next(); ok && next.Before(wakeAt) {
			wakeAt = next
		}
		s.mu.Unlock()
		t.Reset(max(time.Until(wakeAt), time.Millisecond))
	}
}

func (s *scheduler) startWorkers(now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopping {
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
		s.workers.Go(func() {
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
	for _, d := range s.fleet.take(now, deliveryLimits(s.conf().Delivery)) {
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
		s.inflight[d.addr] = f
		s.workers.Go(func() {
			defer cancel()
			s.attemptDevice(ctx, d, f)
		})
	}
	flush()
	s.setInFlight()
}

// setInFlight updates the in-flight gauges. sched.mu is held.
func (s *scheduler) setInFlight() {
	for k, name := range [kinds]string{kLive: "live", kFirst: "first", kProbe: "probe"} {
		s.metrics.inflight.WithLabelValues(name).Set(float64(s.fleet.busy[k]))
	}
}
