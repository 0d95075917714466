package server

import (
	"errors"
	"math"
	"net/netip"
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
)

// Limits an authentication can be over, the label of
// emsd_auth_limited_total.
const (
	limitSource = "source"
	limitDevice = "device"
)

// authWarnEvery: at most one warning this often about refused
// authentications, so that a flood is not one log line per datagram.
const authWarnEvery = time.Minute

// authLimiter limits failed authentications (wrong passwords), so that
// passwords cannot be guessed at the rate the bcrypt cap allows:
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
// While a source or the device is over its limit, every password check
// for it is refused without running bcrypt, the correct password
// included, and answered like a wrong password. That includes a password
// pwCache holds as correct: the cache costs no bcrypt, so if it still
// answered for limited sources, a limited source could test guesses
// against it at any rate and learn (or, spoofing a source, use) the
// password the device last authenticated with. Within the limits the
// cache answers as before, at the cost of one map lookup here.
//
// A failure is charged before bcrypt runs, in the same step as the
// check, and given back when the password matches: otherwise many
// attempts at once from one source (up to ESRO's 256 reference numbers
// per port) could all pass the check before the first failure counted.
// A correct password being checked thus holds one failure's room for
// the time bcrypt takes.
//
// A success gives back only its own charge, never earlier failures: a
// source with a device of its own could otherwise reset its limit between
// guesses.
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
}

func newAuthLimiter(c EMSDConfig, now func() time.Time) *authLimiter {
	return &authLimiter{
		now:   now,
		epoch: now(),
		src:   newFailBuckets[srcKey](c.AuthFailuresBurst, c.AuthFailuresRate, c.AuthFailuresTracked),
		dev:   newFailBuckets[emsd.Address](c.DeviceAuthFailuresBurst, c.DeviceAuthFailuresRate, c.AuthFailuresTracked),
	}
}

func (l *authLimiter) clock() int64 { return int64(l.now().Sub(l.epoch)) }

// setLimits applies changed emsd.*auth_failures* keys (Reconfigure). The
// failures on record stay: a source's debt carries over as the time until
// its bucket is full again, now measured against the new burst and rate,
// so that a reload neither forgives a guesser nor punishes anyone twice.
func (l *authLimiter) setLimits(c EMSDConfig) {
	now := l.clock()
	l.mu.Lock()
	defer l.mu.Unlock()
	l.src.setLimits(newFailBuckets[srcKey](c.AuthFailuresBurst, c.AuthFailuresRate, c.AuthFailuresTracked), now)
	l.dev.setLimits(newFailBuckets[emsd.Address](c.DeviceAuthFailuresBurst, c.DeviceAuthFailuresRate, c.AuthFailuresTracked), now)
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
	case l.src.over(k, now):
		return limitSource
	case byDevice && l.dev.over(dev, now):
		return limitDevice
	}
	return ""
}

// charge is over, and when neither limit is over it charges a failure to
// both in the same step, before bcrypt runs; refund gives it back when
// the password matched.
func (l *authLimiter) charge(src netip.Addr, dev emsd.Address, byDevice bool) string {
	now := l.clock()
	k := sourceOf(src)
	l.mu.Lock()
	defer l.mu.Unlock()
	if limit := l.overLocked(k, dev, byDevice, now); limit != "" {
		return limit
	}
	l.src.fail(k, now)
	if byDevice {
		l.dev.fail(dev, now)
	}
	return ""
}

// refund gives back what charge took, for a password that matched.
func (l *authLimiter) refund(src netip.Addr, dev emsd.Address, byDevice bool) {
	now := l.clock()
	l.mu.Lock()
	defer l.mu.Unlock()
	l.src.refund(sourceOf(src), now)
	if byDevice {
		l.dev.refund(dev, now)
	}
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

// over reports whether k has used its burst: one more failure now would
// run its debt past the tolerance.
func (b *failBuckets[K]) over(k K, now int64) bool {
	t, ok := b.tat[k]
	return b.interval > 0 && ok && t-now > b.tolerance-b.interval
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

// refund takes one failure off k: the charge for a check that succeeded.
// A key evicted meanwhile has nothing to give back.
func (b *failBuckets[K]) refund(k K, now int64) {
	t, ok := b.tat[k]
	if !ok {
		return
	}
	if t -= b.interval; t <= now {
		delete(b.tat, k)
		return
	}
	b.tat[k] = t
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
	if n := c.EMSD.AuthFailuresTracked; n < 1 || n > maxAuthTracked {
		errs = append(errs, configErr("emsd.auth_failures_tracked %d: want 1 to %d", n, maxAuthTracked))
	}
	return errors.Join(errs...)
}
