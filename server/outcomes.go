package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/esro-emsdp/emsdp/store"
)

// An outcome write records what happened to an entry a server claimed:
// a delivery attempt's end (recordOutcome) or a relay transaction's
// (sendRelay). It must not be lost: a delivered message whose outcome is
// not written stays in flight, and its device's queue behind it. So the
// write is retried with backoff until the store takes it, the outcome
// held in memory (the worker's stack) meanwhile, and the device stays
// busy in the scheduler; /healthz and emsd_store_outcomes_pending say
// so. Only shutdown ends the retries (the drain time is over): the entry
// then stays in flight and is re-queued at the next start, or by another
// server sharing the store (at-least-once: the device or smarthost may
// get it again, README "What is guaranteed").
const (
	outcomeRetryMin = 100 * time.Millisecond
	outcomeRetryMax = time.Second
	// outcomeTryTimeout bounds one try: a store that does not answer (a
	// vanished PostgreSQL host) must not hold the retries.
	outcomeTryTimeout = 30 * time.Second
	// outcomeLogEvery: while the store refuses, the failure is logged
	// again this often, not at every try.
	outcomeLogEvery = 30 * time.Second
)

// outcomes is the server's account of its outcome writes and of the
// entries it holds in flight (held), which tells its own entries that no
// worker holds apart (reclaimStuck).
type outcomes struct {
	pending atomic.Int64 // outcome writes failing and being retried

	mu       sync.Mutex
	lastErr  string    // the last store write failure
	lastAt   time.Time // when
	held     map[heldRef]time.Time
	stuck    int // entries in flight past their deadline, as the last check found
	stuckOld time.Duration
}

type heldRef = store.QueueRef

func newOutcomes() *outcomes { return &outcomes{held: map[heldRef]time.Time{}} }

// hold records that this server has claimed ref; release that it is done
// with it (its outcome written, or given up).
func (o *outcomes) hold(ref heldRef) {
	o.mu.Lock()
	o.held[ref] = time.Now()
	o.mu.Unlock()
}

func (o *outcomes) release(ref heldRef) {
	o.mu.Lock()
	delete(o.held, ref)
	o.mu.Unlock()
}

func (o *outcomes) holds(ref heldRef) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	_, ok := o.held[ref]
	return ok
}

func (o *outcomes) failed(err error) {
	o.mu.Lock()
	o.lastErr, o.lastAt = err.Error(), time.Now()
	o.mu.Unlock()
}

// health is what /healthz says of outcome writes and stuck entries: ""
// when all is well.
func (o *outcomes) health() []string {
	var bad []string
	o.mu.Lock()
	defer o.mu.Unlock()
	if n := o.pending.Load(); n > 0 {
		bad = append(bad, fmt.Sprintf("store writes: %d outcomes not recorded yet, retrying (last error: %s)", n, o.lastErr))
	}
	if o.stuck > 0 {
		bad = append(bad, fmt.Sprintf("queue: %d entries in flight past their deadline (oldest %v; emsdp queue list --state inflight,sending)",
			o.stuck, o.stuckOld.Round(time.Second)))
	}
	return bad
}

// collectors are the metrics of o: outcome writes waiting for the store,
// entries stuck in flight.
func (o *outcomes) collectors() []prometheus.Collector {
	return []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "emsd_store_outcomes_pending",
			Help: "Delivery and relay outcomes this server could not record yet: the store refuses writes; they are retried until it takes them."},
			func() float64 { return float64(o.pending.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "emsd_queue_stuck_entries",
			Help: "Deliveries and relay recipients in flight past their deadline, as the last check (every rescan) found; this server's own are re-queued."},
			func() float64 {
				o.mu.Lock()
				defer o.mu.Unlock()
				return float64(o.stuck)
			}),
	}
}

// permanentWriteError: errors a retry cannot cure. ErrConflict and
// ErrNotFound mean the entry is no longer ours (another server took over
// an entry it believed abandoned, an operator's retry --force or
// removal): the outcome has nowhere to go.
func permanentWriteError(err error) bool {
	return errors.Is(err, store.ErrConflict) || errors.Is(err, store.ErrNotFound) || errors.Is(err, store.ErrInvalid)
}

// persist runs the outcome write 'write' until it succeeds, a permanent
// error ends it, or shutdown does (see outcomes). The write builds what
// it records afresh at each try.
func (s *scheduler) persist(what string, log *slog.Logger, write func(context.Context) error) error {
	delay := outcomeRetryMin
	var since, logged time.Time
	tries := 0
	defer func() {
		if tries > 0 {
			s.out.pending.Add(-1)
		}
	}()
	for {
		ctx, cancel := context.WithTimeout(s.ctx, outcomeTryTimeout)
		err := write(ctx)
		cancel()
		switch {
		case err == nil:
			if tries > 0 {
				log.Info(what+" recorded after store failures", "tries", tries+1, "after", time.Since(since).Round(time.Millisecond))
			}
			return nil
		case s.ctx.Err() != nil || permanentWriteError(err):
			return err
		}
		s.metrics.storeWriteFailures.Inc()
		s.out.failed(err)
		now := time.Now()
		if tries == 0 {
			since = now
			s.out.pending.Add(1)
		}
		tries++
		if now.Sub(logged) >= outcomeLogEvery {
			logged = now
			log.Error(what+": store write failed; retrying until it succeeds", "err", err, "tries", tries,
				"failing for", now.Sub(since).Round(time.Millisecond))
		}
		select {
		case <-s.dctx.Done():
			// Drain over: the process stops. The entry stays in flight
			// and is re-queued at the next start or by another server.
			log.Error(what+" not recorded before shutdown: the entry stays in flight and is attempted again after the restart",
				"err", err)
			return err
		case <-time.After(delay):
		}
		delay = min(2*delay, outcomeRetryMax)
	}
}

// reportsFor builds the report work of an outcome. An item that cannot be
// reported (it does not encode) is left out, logged; one whose report
// needs a store write that failed (its message number) makes the outcome
// write try again, so that no report is lost to a store failure.
func (s *scheduler) reportsFor(ctx context.Context, log *slog.Logger, items []reportItem) (store.Work, error) {
	w, err := s.reports.reportWork(ctx, items)
	if err != nil {
		if rse := (*reportStoreError)(nil); errors.As(err, &rse) {
			return w, err
		}
		log.Error("reports", "err", err)
	}
	return w, nil
}

// Entries in flight: a server's own that no worker of it holds (a claim
// whose worker is gone without writing an outcome) are re-queued once
// they are reclaimAfter old (far past the moment between a claim and
// its hold); any entry in flight for longer than stuckAfter (far past
// the longest attempt: an ESRO invocation retransmitted until its timers
// give up, an SMTP transaction until its timeouts) counts as stuck in
// /healthz and emsd_queue_stuck_entries: a server that holds it is
// wedged, or its outcome write is failing. Entries of another live
// server are its business (it re-queues its own); an operator who knows
// it is wedged uses emsdp queue retry --force.
const (
	reclaimAfter = time.Minute
	stuckAfter   = 15 * time.Minute
	// stuckScan bounds the entries one check reads: those in flight are
	// at most the servers' attempt limits.
	stuckScan = 10000
)

// nodeOf is the owner this server's claims carry (store.QueueEntry.Owner):
// its PostgreSQL node id, 0 with SQLite.
func nodeOf(st any) int32 {
	if n, ok := st.(interface{ NodeID() int32 }); ok {
		return n.NodeID()
	}
	return 0
}

// checkInFlight re-queues this server's entries in flight that no worker
// holds and counts the stuck ones (see reclaimAfter).
func (s *scheduler) checkInFlight(ctx context.Context, now time.Time) error {
	l, err := s.st.ListQueue(ctx, store.QueueFilter{States: []string{string(store.DeliveryInFlight), string(store.RelaySending)},
		Limit: stuckScan})
	if err != nil {
		return err
	}
	me := nodeOf(s.st)
	var orphans []store.QueueRef
	stuck, oldest := 0, time.Duration(0)
	for _, e := range l.Entries {
		age := now.Sub(e.Updated)
		if e.Owner == me && age >= reclaimAfter && !s.out.holds(e.Ref) {
			orphans = append(orphans, e.Ref)
			continue
		}
		if age >= stuckAfter {
			stuck++
			oldest = max(oldest, age)
		}
	}
	s.out.mu.Lock()
	s.out.stuck, s.out.stuckOld = stuck, oldest
	s.out.mu.Unlock()
	if len(orphans) == 0 {
		return nil
	}
	ch, err := s.st.RetryQueued(ctx, store.QueueSelect{Refs: orphans, Force: true}, now)
	if err != nil {
		return err
	}
	if ch.Forced > 0 {
		s.log.Warn("re-queued entries this server had in flight without a worker on them", "entries", ch.Forced)
		s.rescanNow()
		s.relays.kick()
	}
	return nil
}
