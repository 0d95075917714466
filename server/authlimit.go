package server

import (
	"context"
	"errors"
	"math"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/internal/clientaddr"
)

// Bounds of the emsd.*auth_failures* keys: beyond them a limit means
// nothing (or its arithmetic would overflow).
const (
	maxAuthBurst   = 100000
	minAuthRate    = 0.01  // failures regained a minute: one per 100 minutes
	maxAuthRate    = 60000 // 1000 a second
	maxAuthTracked = 1 << 24
	maxAuthQueue   = 1 << 20
	maxAuthWorkers = 1024
)

// Limits an authentication can be over, the label of
// emsd_auth_limited_total: limitQueue is a check that found the queue for
// the bcrypt workers full.
const (
	limitSource = "source"
	limitDevice = "device"
	limitQueue  = "queue"
)

// authWarnEvery: at most one warning this often about refused
// authentications, so that a flood is not one log line per datagram.
const authWarnEvery = time.Minute

// authLimiter limits failed authentications (wrong passwords), so that
// passwords cannot be guessed at the rate the bcrypt cap allows, and
// schedules the password checks on a bounded pool of bcrypt workers:
//
//   - per source, an IPv4 address or an IPv6 /64 (see srcKey): a token
//     bucket of emsd.auth_failures_burst failures, regained at
//     emsd.auth_failures_rate a minute;
//   - per device, against guessing one device's password from many
//     sources: emsd.device_auth_failures_burst and _rate. Attempts from
//     the device's registered IP address are not counted there, so that
//     no one elsewhere can lock a device out at home by failing on its
//     behalf (they can still do so abroad, the price of this limit).
//
// A failure is counted only once a check has failed: load never turns a
// correct password away. Checks wait in a bounded queue, served round
// robin by source so that one source cannot starve the others, for one
// of the workers (emsd.auth_workers). A check starts only when its
// source (and device) could take a failure for it and for every check of
// theirs still running, so that many attempts at once cannot pass more
// guesses than the burst; the others wait their turn rather than being
// refused. Devices behind one NAT address are the normal case.
//
// While a source or the device is over its limit, every password check
// for it is answered with a transient resource error, without running
// bcrypt, the correct password included: the device retries later
// instead of giving up. That includes a password pwCache holds as
// correct: the cache costs no bcrypt, so if it still answered for
// limited sources, a limited source could test guesses against it at any
// rate and learn (or, spoofing a source, use) the password the device
// last authenticated with. A full queue gets the same transient answer.
//
// A success gives back nothing: a source with a device of its own could
// otherwise reset its limit between guesses.
//
// With UDP a source address proves nothing, so whoever can spoof a
// device's address can keep it over its limit at the cost of rate
// datagrams a minute; a burst of 0 turns a limit off.
type authLimiter struct {
	now   func() time.Time
	epoch time.Time // times are nanoseconds since epoch: monotonic with time.Now

	mu       sync.Mutex
	src      failBuckets[srcKey]
	dev      failBuckets[emsd.Address]
	warned   int64 // when the last warning was logged
	anyWarn  bool  // whether one was
	unwarned int   // refusals not yet in a warning

	workers, running int
	maxQueue         int
	waiting          int
	queues           map[srcKey][]*authWaiter // waiting checks by source, in order
	ring             []srcKey                 // sources with waiting checks, served in turn
	next             int                      // ring position of the next turn
	runSrc           map[srcKey]int           // checks running by source
	runDev           map[emsd.Address]int     // and by device (counted ones only)
}

// authWaiter is one password check waiting for a worker.
type authWaiter struct {
	k        srcKey
	dev      emsd.Address
	byDevice bool
	ready    chan struct{} // closed when started or limited
	started  bool
	limit    string // the limit it ran into while waiting
}

func newAuthLimiter(c EMSDConfig, now func() time.Time) *authLimiter {
	return &authLimiter{
		now:      now,
		epoch:    now(),
		src:      newFailBuckets[srcKey](c.AuthFailuresBurst, c.AuthFailuresRate, c.AuthFailuresTracked),
		dev:      newFailBuckets[emsd.Address](c.DeviceAuthFailuresBurst, c.DeviceAuthFailuresRate, c.AuthFailuresTracked),
		workers:  authWorkers(c),
		maxQueue: c.AuthQueue,
		queues:   map[srcKey][]*authWaiter{},
		runSrc:   map[srcKey]int{},
		runDev:   map[emsd.Address]int{},
	}
}

// authWorkers is emsd.auth_workers, or for 0 one CPU less than there are
// (at least one), so that a flood of wrong passwords cannot take every
// CPU.
func authWorkers(c EMSDConfig) int {
	if c.AuthWorkers > 0 {
		return c.AuthWorkers
	}
	return max(runtime.GOMAXPROCS(0)-1, 1)
}

func (l *authLimiter) clock() int64 { return int64(l.now().Sub(l.epoch)) }

// setLimits applies changed emsd.auth_* keys (Reconfigure). The
// failures on record stay: a source's debt carries over as the time until
// its bucket is full again, now measured against the new burst and rate,
// so that a reload neither forgives a guesser nor punishes anyone twice.
func (l *authLimiter) setLimits(c EMSDConfig) {
	now := l.clock()
	l.mu.Lock()
	defer l.mu.Unlock()
	l.src.setLimits(newFailBuckets[srcKey](c.AuthFailuresBurst, c.AuthFailuresRate, c.AuthFailuresTracked), now)
	l.dev.setLimits(newFailBuckets[emsd.Address](c.DeviceAuthFailuresBurst, c.DeviceAuthFailuresRate, c.AuthFailuresTracked), now)
	l.workers, l.maxQueue = authWorkers(c), c.AuthQueue
	l.dispatchLocked(now)
}

// over reports the limit a password check from src for device dev is
// over: limitSource, limitDevice, or "" when it may go ahead. byDevice is
// false for a check from the device's registered IP address, which the
// device limit leaves alone.
func (l *authLimiter) over(src netip.Addr, dev emsd.Address, byDevice bool) string {
	now := l.clock()
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.overLocked(sourceOf(src), dev, byDevice, now)
}

func (l *authLimiter) overLocked(k srcKey, dev emsd.Address, byDevice bool, now int64) string {
	switch {
	case l.src.over(k, now, 0):
		return limitSource
	case byDevice && l.dev.over(dev, now, 0):
		return limitDevice
	}
	return ""
}

// errAuthQueueFull: the check could not even wait for a worker.
var errAuthQueueFull = errors.New("password checks queue full")

// check runs verify, the password check (bcrypt) of a check from src for
// dev, on a worker, once its turn comes, and counts a failure when it
// returns false. It returns the limit the source or device is over
// without running verify, or an error when the queue is full or ctx
// ended before the check started.
func (l *authLimiter) check(ctx context.Context, src netip.Addr, dev emsd.Address, byDevice bool, verify func() bool) (ok bool, limit string, err error) {
	k := sourceOf(src)
	now := l.clock()
	l.mu.Lock()
	if limit := l.overLocked(k, dev, byDevice, now); limit != "" {
		l.mu.Unlock()
		return false, limit, nil
	}
	q := l.queues[k]
	if l.waiting >= l.maxQueue || len(q) >= max(l.maxQueue/4, 1) {
		l.mu.Unlock()
		return false, "", errAuthQueueFull
	}
	w := &authWaiter{k: k, dev: dev, byDevice: byDevice, ready: make(chan struct{})}
	if len(q) == 0 {
		l.ring = append(l.ring, k)
	}
	l.queues[k] = append(q, w)
	l.waiting++
	l.dispatchLocked(now)
	l.mu.Unlock()

	select {
	case <-w.ready:
	case <-ctx.Done():
		l.mu.Lock()
		if !w.started && w.limit == "" {
			l.removeLocked(w)
			l.mu.Unlock()
			return false, "", ctx.Err()
		}
		l.mu.Unlock()
	}
	if w.limit != "" {
		return false, w.limit, nil
	}
	ok = verify()
	now = l.clock()
	l.mu.Lock()
	defer l.mu.Unlock()
	l.running--
	if l.runSrc[k]--; l.runSrc[k] == 0 {
		delete(l.runSrc, k)
	}
	if byDevice {
		if l.runDev[dev]--; l.runDev[dev] == 0 {
			delete(l.runDev, dev)
		}
	}
	if !ok {
		l.src.fail(k, now)
		if byDevice {
			l.dev.fail(dev, now)
		}
	}
	l.dispatchLocked(now)
	return ok, "", nil
}

// dispatchLocked starts waiting checks while workers are free, one source
// at a time in turn. A source whose first check cannot start yet (its
// running checks could use up its burst) is passed over; one that went
// over its limit while waiting has its checks answered with the limit.
func (l *authLimiter) dispatchLocked(now int64) {
	for l.running < l.workers && len(l.ring) > 0 {
		started := false
		for range len(l.ring) {
			if l.next >= len(l.ring) {
				l.next = 0
			}
			k := l.ring[l.next]
			w := l.queues[k][0]
			if limit := l.overLocked(k, w.dev, w.byDevice, now); limit != "" {
				w.limit = limit
				l.removeLocked(w)
				close(w.ready)
				started = true // the ring changed: look again
				break
			}
			if l.src.over(k, now, l.runSrc[k]) || (w.byDevice && l.dev.over(w.dev, now, l.runDev[w.dev])) {
				l.next++
				continue
			}
			l.removeLocked(w)
			w.started = true
			l.running++
			l.runSrc[k]++
			if w.byDevice {
				l.runDev[w.dev]++
			}
			close(w.ready)
			l.next++
			started = true
			break
		}
		if !started {
			return
		}
	}
}

// removeLocked takes w out of its source's queue.
func (l *authLimiter) removeLocked(w *authWaiter) {
	q := l.queues[w.k]
	for i, x := range q {
		if x == w {
			q = append(q[:i], q[i+1:]...)
			break
		}
	}
	l.waiting--
	if len(q) > 0 {
		l.queues[w.k] = q
		return
	}
	delete(l.queues, w.k)
	for i, k := range l.ring {
		if k == w.k {
			l.ring = append(l.ring[:i], l.ring[i+1:]...)
			if l.next > i {
				l.next--
			}
			break
		}
	}
}

// queued returns how many checks wait for a worker.
func (l *authLimiter) queued() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.waiting
}

// refused counts a refusal and reports whether to log a warning about it
// now, with the refusals since the previous warning (this one included):
// at most one warning every authWarnEvery.
func (l *authLimiter) refused() (n int, warn bool) {
	now := l.clock()
	l.mu.Lock()
	defer l.mu.Unlock()
	l.unwarned++
	if l.anyWarn && now-l.warned < int64(authWarnEvery) {
		return 0, false
	}
	n = l.unwarned
	l.warned, l.anyWarn, l.unwarned = now, true, 0
	return n, true
}

// tracked returns how many sources and devices have failures on record.
func (l *authLimiter) tracked() (sources, devices int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.src.tat), len(l.dev.tat)
}

// collectors are gauges of the keys tracked, which the bound
// emsd.auth_failures_tracked caps.
func (l *authLimiter) collectors() []prometheus.Collector {
	gauge := func(limit string, n func() float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "emsd_auth_failures_tracked",
			Help:        "Sources and devices whose failed authentications are remembered, by limit (source, device).",
			ConstLabels: prometheus.Labels{"limit": limit}}, n)
	}
	return []prometheus.Collector{
		gauge(limitSource, func() float64 { n, _ := l.tracked(); return float64(n) }),
		gauge(limitDevice, func() float64 { _, n := l.tracked(); return float64(n) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "emsd_auth_queue_waiting",
			Help: "Password checks waiting for a bcrypt worker (emsd.auth_queue bounds them)."},
			func() float64 { return float64(l.queued()) }),
	}
}

// srcKey is a source as the limiter counts it: an IPv4 address, or the
// /64 prefix of an IPv6 address, since a subscriber usually has a whole
// /64 and can use every address in it. An IPv4 source is kept in its
// v4-mapped IPv6 form, whose low half is never zero, so it cannot equal
// a masked /64.
type srcKey [16]byte

func sourceOf(a netip.Addr) srcKey { return srcKey(clientaddr.Group(a).As16()) }

func (k srcKey) String() string {
	a := netip.AddrFrom16(k)
	if a.Is4In6() {
		return a.Unmap().String()
	}
	return netip.PrefixFrom(a, 64).String()
}

// failBuckets is a token bucket of failures per key, in the form of the
// generic cell rate algorithm: a key's one number, tat, is when its
// bucket is full again; each failure moves it one interval later, from
// now at the latest. A key whose tat has passed is the same as no key,
// so keys cost memory only while they have failures to remember. The
// zero value (interval 0) limits nothing.
type failBuckets[K comparable] struct {
	interval  int64 // nanoseconds to regain one failure: a minute / rate
	tolerance int64 // burst × interval: the most debt a key may run up
	max       int   // most keys tracked
	tat       map[K]int64
}

func newFailBuckets[K comparable](burst int, perMinute float64, tracked int) failBuckets[K] {
	if burst <= 0 || !(perMinute > 0) || tracked < 1 {
		return failBuckets[K]{}
	}
	iv := int64(math.Max(1, float64(time.Minute)/perMinute))
	return failBuckets[K]{interval: iv, tolerance: int64(burst) * iv, max: tracked}
}

// setLimits takes the limits of n (a new, empty failBuckets) and keeps
// the keys on record, trimmed to the new bound; a limit turned off
// forgets them, since it has nothing to count them against.
func (b *failBuckets[K]) setLimits(n failBuckets[K], now int64) {
	b.interval, b.tolerance, b.max = n.interval, n.tolerance, n.max
	if b.interval == 0 {
		b.tat = nil
		return
	}
	if len(b.tat) > b.max {
		b.evict(now)
	}
}

// over reports whether k has used its burst, counting pending failures
// that may still come (checks running): one more failure now would run
// its debt past the tolerance.
func (b *failBuckets[K]) over(k K, now int64, pending int) bool {
	if b.interval == 0 {
		return false
	}
	t, ok := b.tat[k]
	if !ok || t < now {
		t = now
	}
	return t+int64(pending)*b.interval-now > b.tolerance-b.interval
}

func (b *failBuckets[K]) fail(k K, now int64) {
	if b.interval == 0 {
		return
	}
	if b.tat == nil {
		b.tat = map[K]int64{}
	}
	t, ok := b.tat[k]
	if !ok && len(b.tat) >= b.max {
		b.evict(now)
	}
	b.tat[k] = max(t, now) + b.interval
}

// evict makes room for a new key when max keys are tracked. Keys whose
// buckets are full again go first: forgetting them loses nothing. Then,
// if need be, the keys with the least debt go, those closest to full:
// a source over its limit has the most debt and goes last, so a flood of
// new (spoofed) sources with a failure or a few each cannot flush the
// limit of a source that is guessing; it would take max sources as deep
// in debt, max × burst failed password checks within burst / rate (each
// holds an ESRO invocation until bcrypt has run), far beyond what the
// bcrypt cap lets through. The price is that while the
// table is full of such debt, a new source's first failures are the
// first forgotten. An eighth of max goes at once, so that the sort is
// paid once per max/8 new keys rather than for each.
func (b *failBuckets[K]) evict(now int64) {
	for k, t := range b.tat {
		if t <= now {
			delete(b.tat, k)
		}
	}
	keep := b.max - 1 - b.max/8
	drop := len(b.tat) - keep
	if drop <= 0 {
		return
	}
	ts := make([]int64, 0, len(b.tat))
	for _, t := range b.tat {
		ts = append(ts, t)
	}
	slices.Sort(ts)
	cut := ts[drop-1] // the most debt that goes; keys with as much may stay
	for k, t := range b.tat {
		if t < cut {
			delete(b.tat, k)
			drop--
		}
	}
	for k, t := range b.tat {
		if drop == 0 {
			break
		}
		if t == cut {
			delete(b.tat, k)
			drop--
		}
	}
}

// validAuthLimits checks the emsd.*auth_failures* keys.
func (c *Config) validAuthLimits() error {
	var errs []error
	for _, l := range []struct {
		name  string
		burst int
		rate  float64
	}{
		{"emsd.auth_failures", c.EMSD.AuthFailuresBurst, c.EMSD.AuthFailuresRate},
		{"emsd.device_auth_failures", c.EMSD.DeviceAuthFailuresBurst, c.EMSD.DeviceAuthFailuresRate},
	} {
		if l.burst < 0 || l.burst > maxAuthBurst {
			errs = append(errs, configErr("%s_burst %d: want 0 (off) to %d", l.name, l.burst, maxAuthBurst))
		}
		if !(l.rate >= minAuthRate && l.rate <= maxAuthRate) { // NaN too
			errs = append(errs, configErr("%s_rate %v: want %v to %v failures a minute", l.name, l.rate, minAuthRate, maxAuthRate))
		}
	}
	if n := c.EMSD.AuthQueue; n < 1 || n > maxAuthQueue {
		errs = append(errs, configErr("emsd.auth_queue %d: want 1 to %d", n, maxAuthQueue))
	}
	if n := c.EMSD.AuthWorkers; n < 0 || n > maxAuthWorkers {
		errs = append(errs, configErr("emsd.auth_workers %d: want 0 (one less than the CPUs) to %d", n, maxAuthWorkers))
	}
	if n := c.EMSD.AuthFailuresTracked; n < 1 || n > maxAuthTracked {
		errs = append(errs, configErr("emsd.auth_failures_tracked %d: want 1 to %d", n, maxAuthTracked))
	}
	return errors.Join(errs...)
}
