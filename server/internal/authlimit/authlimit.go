// Package authlimit limits failed authentications (wrong passwords), so
// that passwords cannot be guessed at the rate the bcrypt cap allows, and
// schedules the password checks on a bounded pool of workers. It is the
// server's (emsd.*auth_* keys); Buckets also limit DTLS handshakes.
package authlimit

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

// Bounds of the limits: beyond them a limit means nothing (or its
// arithmetic would overflow).
const (
	MaxBurst   = 100000
	MinRate    = 0.01  // failures regained a minute: one per 100 minutes
	MaxRate    = 60000 // 1000 a second
	MaxTracked = 1 << 24
	MaxQueue   = 1 << 20
	MaxWorkers = 1024
)

// Limits are a Limiter's settings (the server's emsd.*auth_* keys).
type Limits struct {
	// SourceBurst failures per source, then SourceRate a minute; a burst
	// of 0 turns the limit off.
	SourceBurst int
	SourceRate  float64
	// DeviceBurst and DeviceRate: the same per device.
	DeviceBurst int
	DeviceRate  float64
	// Tracked bounds the sources, and the devices, on record.
	Tracked int
	// Queue bounds the checks waiting for a worker.
	Queue int
	// Workers run the checks; 0: one less than the CPUs.
	Workers int
}

// Limits an authentication can be over, the label of
// emsd_auth_limited_total: LimitQueue is a check that found the queue for
// the bcrypt workers full.
const (
	LimitSource = "source"
	LimitDevice = "device"
	LimitQueue  = "queue"
)

// authWarnEvery: at most one warning this often about refused
// authentications, so that a flood is not one log line per datagram.
const authWarnEvery = time.Minute

// Limiter limits failed authentications (wrong passwords), so that
// passwords cannot be guessed at the rate the bcrypt cap allows, and
// schedules the password checks on a bounded pool of bcrypt workers:
//
//   - per source, an IPv4 address or an IPv6 /64 (see Key): a token
//     bucket of SourceBurst failures (emsd.auth_failures_burst), regained
//     at SourceRate a minute;
//   - per device, against guessing one device's password from many
//     sources: DeviceBurst and DeviceRate. Attempts from
//     the device's registered IP address are not counted there, so that
//     no one elsewhere can lock a device out at home by failing on its
//     behalf (they can still do so abroad, the price of this limit).
//
// A failure is counted only once a check has failed: load never turns a
// correct password away. Checks wait in a bounded queue, served round
// robin by source so that one source cannot starve the others, for one
// of the workers (Workers). A check starts only when its
// source (and device) could take a failure for it and for every check of
// theirs still running, so that many attempts at once cannot pass more
// guesses than the burst; the others wait their turn rather than being
// refused. Devices behind one NAT address are the normal case.
//
// While a source or the device is over its limit, every password check
// for it is answered with a transient resource error, without running
// bcrypt, the correct password included: the device retries later
// instead of giving up. That includes a password the server's cache holds
// as correct: the cache costs no bcrypt, so if it still answered for
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
type Limiter struct {
	now   func() time.Time
	epoch time.Time // times are nanoseconds since epoch: monotonic with time.Now

	mu       sync.Mutex
	src      Buckets[Key]
	dev      Buckets[emsd.Address]
	warned   int64 // when the last warning was logged
	anyWarn  bool  // whether one was
	unwarned int   // refusals not yet in a warning

	workers, running int
	maxQueue         int
	waiting          int
	queues           map[Key][]*authWaiter // waiting checks by source, in order
	ring             []Key                 // sources with waiting checks, served in turn
	next             int                   // ring position of the next turn
	runSrc           map[Key]int           // checks running by source
	runDev           map[emsd.Address]int  // and by device (counted ones only)
}

// authWaiter is one password check waiting for a worker.
type authWaiter struct {
	k        Key
	dev      emsd.Address
	byDevice bool
	ready    chan struct{} // closed when started or limited
	started  bool
	limit    string // the limit it ran into while waiting
}

// New returns a limiter with limits c and clock now.
func New(c Limits, now func() time.Time) *Limiter {
	return &Limiter{
		now:      now,
		epoch:    now(),
		src:      NewBuckets[Key](c.SourceBurst, c.SourceRate, c.Tracked),
		dev:      NewBuckets[emsd.Address](c.DeviceBurst, c.DeviceRate, c.Tracked),
		workers:  workers(c),
		maxQueue: c.Queue,
		queues:   map[Key][]*authWaiter{},
		runSrc:   map[Key]int{},
		runDev:   map[emsd.Address]int{},
	}
}

// workers is c.Workers, or for 0 one CPU less than there are (at least
// one), so that a flood of wrong passwords cannot take every CPU.
func workers(c Limits) int {
	if c.Workers > 0 {
		return c.Workers
	}
	return max(runtime.GOMAXPROCS(0)-1, 1)
}

func (l *Limiter) clock() int64 { return int64(l.now().Sub(l.epoch)) }

// SetLimits applies changed limits (the server's Reconfigure). The
// failures on record stay: a source's debt carries over as the time until
// its bucket is full again, now measured against the new burst and rate,
// so that a reload neither forgives a guesser nor punishes anyone twice.
func (l *Limiter) SetLimits(c Limits) {
	now := l.clock()
	l.mu.Lock()
	defer l.mu.Unlock()
	l.src.SetLimits(NewBuckets[Key](c.SourceBurst, c.SourceRate, c.Tracked), now)
	l.dev.SetLimits(NewBuckets[emsd.Address](c.DeviceBurst, c.DeviceRate, c.Tracked), now)
	l.workers, l.maxQueue = workers(c), c.Queue
	l.dispatchLocked(now)
}

// Over reports the limit a password check from src for device dev is
// over: LimitSource, LimitDevice, or "" when it may go ahead. byDevice is
// false for a check from the device's registered IP address, which the
// device limit leaves alone.
func (l *Limiter) Over(src netip.Addr, dev emsd.Address, byDevice bool) string {
	now := l.clock()
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.overLocked(Source(src), dev, byDevice, now)
}

func (l *Limiter) overLocked(k Key, dev emsd.Address, byDevice bool, now int64) string {
	switch {
	case l.src.Over(k, now, 0):
		return LimitSource
	case byDevice && l.dev.Over(dev, now, 0):
		return LimitDevice
	}
	return ""
}

// ErrQueueFull: the check could not even wait for a worker.
var ErrQueueFull = errors.New("password checks queue full")

// Check runs verify, the password check (bcrypt) of a check from src for
// dev, on a worker, once its turn comes, and counts a failure when it
// returns false. It returns the limit the source or device is over
// without running verify, or an error when the queue is full or ctx
// ended before the check started.
func (l *Limiter) Check(ctx context.Context, src netip.Addr, dev emsd.Address, byDevice bool, verify func() bool) (ok bool, limit string, err error) {
	k := Source(src)
	now := l.clock()
	l.mu.Lock()
	if limit := l.overLocked(k, dev, byDevice, now); limit != "" {
		l.mu.Unlock()
		return false, limit, nil
	}
	q := l.queues[k]
	if l.waiting >= l.maxQueue || len(q) >= max(l.maxQueue/4, 1) {
		l.mu.Unlock()
		return false, "", ErrQueueFull
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
		l.src.Fail(k, now)
		if byDevice {
			l.dev.Fail(dev, now)
		}
	}
	l.dispatchLocked(now)
	return ok, "", nil
}

// dispatchLocked starts waiting checks while workers are free, one source
// at a time in turn. A source whose first check cannot start yet (its
// running checks could use up its burst) is passed over; one that went
// over its limit while waiting has its checks answered with the limit.
func (l *Limiter) dispatchLocked(now int64) {
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
			if l.src.Over(k, now, l.runSrc[k]) || (w.byDevice && l.dev.Over(w.dev, now, l.runDev[w.dev])) {
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
func (l *Limiter) removeLocked(w *authWaiter) {
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
func (l *Limiter) queued() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.waiting
}

// Refused counts a refusal and reports whether to log a warning about it
// now, with the refusals since the previous warning (this one included):
// at most one warning every authWarnEvery.
func (l *Limiter) Refused() (n int, warn bool) {
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
func (l *Limiter) tracked() (sources, devices int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.src.tat), len(l.dev.tat)
}

// Collectors are gauges of the keys tracked, which the bound
// Tracked (emsd.auth_failures_tracked) caps, and of the checks waiting.
func (l *Limiter) Collectors() []prometheus.Collector {
	gauge := func(limit string, n func() float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "emsd_auth_failures_tracked",
			Help:        "Sources and devices whose failed authentications are remembered, by limit (source, device).",
			ConstLabels: prometheus.Labels{"limit": limit}}, n)
	}
	return []prometheus.Collector{
		gauge(LimitSource, func() float64 { n, _ := l.tracked(); return float64(n) }),
		gauge(LimitDevice, func() float64 { _, n := l.tracked(); return float64(n) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "emsd_auth_queue_waiting",
			Help: "Password checks waiting for a bcrypt worker (emsd.auth_queue bounds them)."},
			func() float64 { return float64(l.queued()) }),
	}
}

// Key is a source as the limiter counts it: an IPv4 address, or the
// /64 prefix of an IPv6 address, since a subscriber usually has a whole
// /64 and can use every address in it. An IPv4 source is kept in its
// v4-mapped IPv6 form, whose low half is never zero, so it cannot equal
// a masked /64.
type Key [16]byte

// Source is the key of address a.
func Source(a netip.Addr) Key { return Key(clientaddr.Group(a).As16()) }

// String is the address, or the /64.
func (k Key) String() string {
	a := netip.AddrFrom16(k)
	if a.Is4In6() {
		return a.Unmap().String()
	}
	return netip.PrefixFrom(a, 64).String()
}

// Buckets is a token bucket of failures per key, in the form of the
// generic cell rate algorithm: a key's one number, tat, is when its
// bucket is full again; each failure moves it one interval later, from
// now at the latest. A key whose tat has passed is the same as no key,
// so keys cost memory only while they have failures to remember. The
// zero value (interval 0) limits nothing.
type Buckets[K comparable] struct {
	interval  int64 // nanoseconds to regain one failure: a minute / rate
	tolerance int64 // burst × interval: the most debt a key may run up
	max       int   // most keys tracked
	tat       map[K]int64
}

// NewBuckets returns buckets of burst failures per key, regained at
// perMinute, of at most tracked keys; a burst of 0 limits nothing.
// Times are nanoseconds since an epoch of the caller's.
func NewBuckets[K comparable](burst int, perMinute float64, tracked int) Buckets[K] {
	if burst <= 0 || !(perMinute > 0) || tracked < 1 {
		return Buckets[K]{}
	}
	iv := int64(math.Max(1, float64(time.Minute)/perMinute))
	return Buckets[K]{interval: iv, tolerance: int64(burst) * iv, max: tracked}
}

// SetLimits takes the limits of n (new, empty Buckets) and keeps
// the keys on record, trimmed to the new bound; a limit turned off
// forgets them, since it has nothing to count them against.
func (b *Buckets[K]) SetLimits(n Buckets[K], now int64) {
	b.interval, b.tolerance, b.max = n.interval, n.tolerance, n.max
	if b.interval == 0 {
		b.tat = nil
		return
	}
	if len(b.tat) > b.max {
		b.evict(now)
	}
}

// Over reports whether k has used its burst, counting pending failures
// that may still come (checks running): one more failure now would run
// its debt past the tolerance.
func (b *Buckets[K]) Over(k K, now int64, pending int) bool {
	if b.interval == 0 {
		return false
	}
	t, ok := b.tat[k]
	if !ok || t < now {
		t = now
	}
	return t+int64(pending)*b.interval-now > b.tolerance-b.interval
}

// Fail counts a failure of k at now.
func (b *Buckets[K]) Fail(k K, now int64) {
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
func (b *Buckets[K]) evict(now int64) {
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
