package server

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
)

// fakeClock is a clock the test moves.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// authTestConfig is the default limits: 10 failures then 6 a minute per
// source, 20 then 12 a minute per device.
func authTestConfig() EMSDConfig { return DefaultConfig().EMSD }

func pass() bool { return true }
func fail() bool { return false }

// limStep is a step of a limiter scenario: the clock moves by after;
// oks checks from src for dev succeed; fails checks fail (each from its
// own address in 10.0.0.0/8 when spread), of which refused must be
// refused by the limits; then over must say want.
type limStep struct {
	after   time.Duration
	src     string
	dev     emsd.Address
	home    bool // from the device's registered address
	oks     int
	fails   int
	spread  bool
	refused int
	want    string
}

func TestAuthLimiter(t *testing.T) {
	const A, B = "192.0.2.1", "192.0.2.2"
	off := authTestConfig()
	off.AuthFailuresBurst, off.DeviceAuthFailuresBurst = 0, 0
	for _, tc := range []struct {
		name  string
		cfg   EMSDConfig
		steps []limStep
	}{
		{"burst, then limited", authTestConfig(), []limStep{
			{src: A, dev: 1, fails: 9, want: ""},
			{src: A, dev: 1, fails: 1, want: limitSource},
			{src: A, dev: 2, want: limitSource}, // whichever device it tries
		}},
		{"one after another: no more than the burst gets checked", authTestConfig(), []limStep{
			{src: A, dev: 1, fails: 15, refused: 5, want: limitSource},
		}},
		{"successes cost nothing and give back nothing", authTestConfig(), []limStep{
			{src: A, dev: 1, fails: 9, want: ""},
			{src: A, dev: 1, oks: 50, want: ""},
			{src: A, dev: 1, fails: 1, want: limitSource},
		}},
		{"a success after the debt ran out", authTestConfig(), []limStep{
			{src: A, dev: 1, fails: 1},
			{after: time.Hour, src: A, dev: 1, oks: 1, fails: 10, want: limitSource},
		}},
		{"another source is unaffected", authTestConfig(), []limStep{
			{src: A, dev: 1, fails: 10, want: limitSource},
			{src: B, dev: 1, want: ""},
		}},
		{"one failure regained every 10 s", authTestConfig(), []limStep{
			{src: A, dev: 1, fails: 10, want: limitSource},
			{after: 9 * time.Second, src: A, dev: 1, want: limitSource},
			{after: time.Second, src: A, dev: 1, want: ""},
			{src: A, dev: 1, fails: 1, want: limitSource},
			{after: 100 * time.Second, src: A, dev: 1, fails: 9, want: ""},
			{src: A, dev: 1, fails: 1, want: limitSource},
		}},
		{"IPv6: one /64 is one source", authTestConfig(), []limStep{
			{src: "2001:db8::1", dev: 1, fails: 5, want: ""},
			{src: "2001:db8::ffff:1", dev: 1, fails: 5, want: limitSource},
			{src: "2001:db8::77", dev: 1, want: limitSource},
			{src: "2001:db8:0:1::1", dev: 1, want: ""},
		}},
		{"IPv4-mapped is IPv4", authTestConfig(), []limStep{
			{src: "::ffff:" + A, dev: 1, fails: 10, want: limitSource},
			{src: A, dev: 1, want: limitSource},
			{src: "::", dev: 1, want: ""},
		}},
		{"device limit across sources", authTestConfig(), []limStep{
			{dev: 7, fails: 19, spread: true, want: ""},
			{dev: 7, fails: 1, spread: true, want: limitDevice},
			{src: B, dev: 7, want: limitDevice},
			{src: B, dev: 8, want: ""},
			{src: B, dev: 7, home: true, want: ""},
			{after: 5 * time.Second, src: B, dev: 7, want: ""},
		}},
		{"failures from home leave the device limit alone", authTestConfig(), []limStep{
			{src: A, dev: 7, home: true, fails: 10, want: limitSource},
			{src: B, dev: 7, fails: 19, spread: true, want: ""},
		}},
		{"off", off, []limStep{
			{src: A, dev: 1, fails: 1000, want: ""},
			{dev: 1, fails: 1000, spread: true, want: ""},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk := newFakeClock()
			l := newAuthLimiter(tc.cfg, clk.Now)
			n := 0
			for i, st := range tc.steps {
				clk.Advance(st.after)
				src := cmp.Or(st.src, "203.0.113.1")
				for range st.oks {
					if _, got, err := l.check(context.Background(), netip.MustParseAddr(src), st.dev, !st.home, pass); got != "" || err != nil {
						t.Fatalf("step %d (%+v): a check within the limits refused: %q %v", i, st, got, err)
					}
				}
				refused := 0
				for range st.fails {
					src := src
					if st.spread {
						n++
						src = netip.AddrFrom4([4]byte{10, byte(n >> 16), byte(n >> 8), byte(n)}).String()
					}
					if _, limit, _ := l.check(context.Background(), netip.MustParseAddr(src), st.dev, !st.home, fail); limit != "" {
						refused++
					}
				}
				if refused != st.refused {
					t.Errorf("step %d (%+v): check refused %d, want %d", i, st, refused, st.refused)
				}
				if got := l.over(netip.MustParseAddr(src), st.dev, !st.home); got != st.want {
					t.Errorf("step %d (%+v): over = %q, want %q", i, st, got, st.want)
				}
			}
		})
	}
}

// A flood of failures from ever new (spoofed) sources keeps the table at
// its bound and does not flush a source that is over its limit.
func TestAuthLimiterFlood(t *testing.T) {
	for _, tc := range []struct {
		name   string
		source func(i int) netip.Addr
	}{
		{"IPv4", func(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}) }},
		{"IPv6 /64s", func(i int) netip.Addr {
			return netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, byte(i >> 16), byte(i >> 8), byte(i), 15: 1})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const bound = 64
			cfg := authTestConfig()
			cfg.AuthFailuresTracked = bound
			clk := newFakeClock()
			l := newAuthLimiter(cfg, clk.Now)
			attacker := netip.MustParseAddr("192.0.2.66")
			for range 10 {
				l.check(context.Background(), attacker, 1, true, fail)
			}
			peak := 0
			for i := range 100 * bound {
				clk.Advance(100 * time.Microsecond)
				l.check(context.Background(), tc.source(i), emsd.Address(i), true, fail)
				srcs, devs := l.tracked()
				if srcs > bound || devs > bound {
					t.Fatalf("after %d spoofed sources: %d sources, %d devices tracked, bound %d", i+1, srcs, devs, bound)
				}
				peak = max(peak, srcs)
			}
			if peak < bound-bound/8 {
				t.Errorf("at most %d sources tracked: the bound was never reached", peak)
			}
			if got := l.over(attacker, 1, true); got != limitSource {
				t.Errorf("attacker after the flood: over = %q, want %q", got, limitSource)
			}
		})
	}
}

// Eviction: refilled keys first, then those with the least debt, an
// eighth of the bound at once.
func TestFailBucketsEvict(t *testing.T) {
	const bound = 8
	for _, tc := range []struct {
		name  string
		fails []int         // failures per key 0, 1, ... at time 0
		after time.Duration // before key 100 fails
		kept  []int         // keys left besides 100
	}{
		{"refilled keys go first", []int{1, 1, 1, 1, 1, 1, 1, 10}, 11 * time.Second, []int{7}},
		{"least debt goes first", []int{8, 7, 6, 5, 4, 3, 2, 1}, 0, []int{0, 1, 2, 3, 4, 5}},
		{"ties: an eighth goes", []int{3, 3, 3, 3, 3, 3, 3, 3}, 0, nil},
		{"room: nothing goes", []int{1, 2, 3}, 0, []int{0, 1, 2}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newFailBuckets[int](10, 6, bound)
			for k, n := range tc.fails {
				for range n {
					b.fail(k, 0)
				}
			}
			b.fail(100, int64(tc.after))
			if _, ok := b.tat[100]; !ok {
				t.Error("the new key is not tracked")
			}
			if tc.kept == nil { // which of equals go is not defined, only how many
				if len(b.tat) != bound-bound/8 {
					t.Errorf("%d keys tracked, want %d", len(b.tat), bound-bound/8)
				}
				return
			}
			if len(b.tat) != len(tc.kept)+1 {
				t.Errorf("keys %v, want %v and 100", b.tat, tc.kept)
			}
			for _, k := range tc.kept {
				if _, ok := b.tat[k]; !ok {
					t.Errorf("key %d evicted; left %v", k, b.tat)
				}
			}
		})
	}
}

// The warning about refusals comes at most once a minute and counts the
// refusals since the previous one.
func TestAuthLimiterWarn(t *testing.T) {
	clk := newFakeClock()
	l := newAuthLimiter(authTestConfig(), clk.Now)
	for i, st := range []struct {
		after time.Duration
		n     int
		warn  bool
	}{
		{0, 1, true},
		{0, 0, false},
		{time.Second, 0, false},
		{58 * time.Second, 0, false},
		{time.Second, 4, true},
		{30 * time.Second, 0, false},
		{time.Hour, 2, true},
	} {
		clk.Advance(st.after)
		if n, warn := l.refused(); n != st.n || warn != st.warn {
			t.Errorf("refusal %d: (%d, %v), want (%d, %v)", i, n, warn, st.n, st.warn)
		}
	}
}

func TestAuthLimitConfig(t *testing.T) {
	limits := func(e EMSDConfig) [5]float64 {
		return [5]float64{float64(e.AuthFailuresBurst), e.AuthFailuresRate, float64(e.DeviceAuthFailuresBurst),
			e.DeviceAuthFailuresRate, float64(e.AuthFailuresTracked)}
	}
	if got, want := limits(DefaultConfig().EMSD), [5]float64{10, 6, 20, 12, 65536}; got != want {
		t.Errorf("default limits %v, want %v", got, want)
	}
	for _, tc := range []struct {
		name, text string
		check      func(*Config) bool
		wantErr    string
	}{
		{"fractional rate", "[emsd]\nauth_failures_rate = 0.5\n",
			func(c *Config) bool { return c.EMSD.AuthFailuresRate == 0.5 }, ""},
		{"limits off", "[emsd]\nauth_failures_burst = 0\ndevice_auth_failures_burst = 0\n",
			func(c *Config) bool { return c.EMSD.AuthFailuresBurst == 0 && c.EMSD.DeviceAuthFailuresBurst == 0 }, ""},
		{"negative burst", "[emsd]\nauth_failures_burst = -1\n", nil, "emsd.auth_failures_burst -1"},
		{"huge burst", "[emsd]\ndevice_auth_failures_burst = 1000000\n", nil, "emsd.device_auth_failures_burst"},
		{"zero rate", "[emsd]\nauth_failures_rate = 0\n", nil, "emsd.auth_failures_rate 0"},
		{"negative rate", "[emsd]\ndevice_auth_failures_rate = -6\n", nil, "emsd.device_auth_failures_rate -6"},
		{"NaN rate", "[emsd]\nauth_failures_rate = nan\n", nil, "emsd.auth_failures_rate NaN"},
		{"infinite rate", "[emsd]\nauth_failures_rate = inf\n", nil, "emsd.auth_failures_rate +Inf"},
		{"rate as text", "[emsd]\nauth_failures_rate = \"6/m\"\n", nil, "auth_failures_rate"},
		{"nothing tracked", "[emsd]\nauth_failures_tracked = 0\n", nil, "emsd.auth_failures_tracked 0"},
		{"too many tracked", "[emsd]\nauth_failures_tracked = 100000000\n", nil, "emsd.auth_failures_tracked"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := LoadConfig(writeFile(t, tc.text))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one mentioning %q", err, tc.wantErr)
				}
				return
			}
			must(t, err)
			if !tc.check(c) {
				t.Errorf("config %+v", c.EMSD)
			}
		})
	}
}

// deliveryControl invokes delivery control (2-way, SAP 9) with
// credentials for dev from ep.
func deliveryControl(t *testing.T, s *Server, ep *esro.Endpoint, dev emsd.Address, pw string) answer {
	t.Helper()
	arg, err := (&emsd.DeliveryControlArgument{Security: &emsd.SecurityElement{
		Address: &emsd.EMSDAddress{Address: dev}, Password: pw}}).Marshal(emsd.Options{})
	must(t, err)
	res, err := ep.Invoke(context.Background(), &esro.Request{To: s.Addrs().EMSD, SAP: 9, Operation: 2,
		Handshake: esro.TwoWay, Data: arg})
	a := outcomeOf(res, err)
	if a.kind == "result" {
		a.data = ""
	}
	return a
}

// The failed-authentication limits through the server: a limited source
// (or device) gets the transient ERROR 6 with parameter 6, even for the
// correct password, and the refusals are counted.
func TestAuthFailureLimit(t *testing.T) {
	clk := newFakeClock()
	s := startServerWith(t, testConfig(t), Options{Logger: testLogger(t), now: clk.Now})
	home := listenESRO(t, "127.0.0.1")
	addDevice(t, s, 198036, epAddr(home), deviceOpts{password: "pw"})
	a, b, c := listenESRO(t, "127.0.0.21"), listenESRO(t, "127.0.0.22"), listenESRO(t, "127.0.0.23")
	var spread []*esro.Endpoint
	for i := range 12 {
		spread = append(spread, listenESRO(t, fmt.Sprintf("127.0.0.%d", 31+i)))
	}
	wrong := answer{"error", 4, "020104"}
	limitedAns := answer{"error", 6, "020106"} // transient: the device retries later
	ok := answer{kind: "result"}
	limited := func(limit string) float64 { return s.metrics.counter(t, "emsd_auth_limited_total", limit) }

	type step struct {
		what     string
		after    time.Duration
		from     []*esro.Endpoint
		pw       string
		want     answer
		bySource float64 // emsd_auth_limited_total afterwards
		byDevice float64
	}
	for _, st := range []step{
		// pwCache now holds the password: it must not answer for a
		// limited source either.
		{what: "the device at home", from: []*esro.Endpoint{home}, pw: "pw", want: ok},
		{what: "10 wrong passwords, checked", from: slices.Repeat([]*esro.Endpoint{a}, 10), pw: "x", want: wrong},
		{what: "the 11th, limited", from: []*esro.Endpoint{a}, pw: "x", want: limitedAns, bySource: 1},
		{what: "correct password from the limited source", from: []*esro.Endpoint{a}, pw: "pw", want: limitedAns, bySource: 2},
		{what: "another source", from: []*esro.Endpoint{b}, pw: "pw", want: ok, bySource: 2},
		{what: "the device at home again", from: []*esro.Endpoint{home}, pw: "pw", want: ok, bySource: 2},
		{what: "a failure regained", after: 10 * time.Second, from: []*esro.Endpoint{a}, pw: "pw", want: ok, bySource: 2},
		// The device has 10 failures from a, 2 of them regained (12 a minute).
		{what: "12 more from 12 sources", from: spread, pw: "x", want: wrong, bySource: 2},
		{what: "device limited", from: []*esro.Endpoint{c}, pw: "pw", want: limitedAns, bySource: 2, byDevice: 1},
		{what: "device limited for b too", from: []*esro.Endpoint{b}, pw: "pw", want: limitedAns, bySource: 2, byDevice: 2},
		{what: "device at home unaffected", from: []*esro.Endpoint{home}, pw: "pw", want: ok, bySource: 2, byDevice: 2},
		{what: "device failure regained", after: 5 * time.Second, from: []*esro.Endpoint{c}, pw: "pw", want: ok, bySource: 2, byDevice: 2},
	} {
		clk.Advance(st.after)
		for i, ep := range st.from {
			if got := deliveryControl(t, s, ep, 198036, st.pw); got != st.want {
				t.Fatalf("%s (#%d from %s): %+v, want %+v", st.what, i, epAddr(ep), got, st.want)
			}
		}
		if gs, gd := limited(limitSource), limited(limitDevice); gs != st.bySource || gd != st.byDevice {
			t.Errorf("%s: limited source %v device %v, want %v %v", st.what, gs, gd, st.bySource, st.byDevice)
		}
	}
	if got := s.metrics.counter(t, "emsd_auth_failures_tracked", limitSource); got != 13 {
		t.Errorf("sources tracked %v, want 13", got)
	}
}

// compat.ip_only_identification checks no password, so the limiter never
// refuses anything there.
func TestAuthFailureLimitIPOnly(t *testing.T) {
	c := testConfig(t)
	c.Compat.IPOnlyIdentification = true
	c.EMSD.AuthFailuresBurst, c.EMSD.DeviceAuthFailuresBurst = 1, 1
	s := startServerWith(t, c, Options{Logger: testLogger(t), now: newFakeClock().Now})
	ep := listenESRO(t, "127.0.0.1")
	addDevice(t, s, 198036, epAddr(ep), deviceOpts{password: "pw"})
	for i := range 5 {
		if got := deliveryControl(t, s, ep, 198036, "wrong"); got.kind != "result" {
			t.Fatalf("attempt %d: %+v, want a result", i, got)
		}
	}
	if got := s.metrics.counter(t, "emsd_auth_limited_total", limitSource); got != 0 {
		t.Errorf("limited %v", got)
	}
	if got := s.metrics.counter(t, "emsd_auth_failures_tracked", limitSource); got != 0 {
		t.Errorf("sources tracked %v", got)
	}
}

// Checks wait for a worker instead of being refused: many correct
// passwords at once from one source all pass, never more than the
// workers run at once, and failures count only once they happened.
func TestAuthQueue(t *testing.T) {
	cfg := authTestConfig()
	cfg.AuthWorkers = 2
	l := newAuthLimiter(cfg, newFakeClock().Now)
	src := netip.MustParseAddr("192.0.2.1")
	var mu sync.Mutex
	running, peak := 0, 0
	slow := func(ok bool) func() bool {
		return func() bool {
			mu.Lock()
			running++
			peak = max(peak, running)
			mu.Unlock()
			time.Sleep(time.Millisecond)
			mu.Lock()
			running--
			mu.Unlock()
			return ok
		}
	}
	var wg sync.WaitGroup
	var refused atomic.Int32
	for i := range 32 {
		wg.Go(func() {
			ok, limit, err := l.check(context.Background(), src, emsd.Address(i), true, slow(true))
			if !ok || limit != "" || err != nil {
				refused.Add(1)
			}
		})
	}
	wg.Wait()
	if n := refused.Load(); n != 0 || peak > 2 {
		t.Fatalf("32 correct passwords: %d refused, %d checks at once", n, peak)
	}
	if got := l.over(src, 1, true); got != "" {
		t.Fatalf("successes counted: over %q", got)
	}

	// Wrong passwords at once: no more than the burst get checked.
	checked := atomic.Int32{}
	for range 40 {
		wg.Go(func() {
			l.check(context.Background(), src, 1, false, func() bool { checked.Add(1); return slow(false)() })
		})
	}
	wg.Wait()
	if n := checked.Load(); n != int32(cfg.AuthFailuresBurst) {
		t.Fatalf("%d wrong passwords checked, burst %d", n, cfg.AuthFailuresBurst)
	}
	if l.queued() != 0 {
		t.Fatalf("%d left waiting", l.queued())
	}
}

// Sources take turns: one with a long queue does not hold up another.
func TestAuthQueueFair(t *testing.T) {
	cfg := authTestConfig()
	cfg.AuthWorkers, cfg.AuthFailuresBurst, cfg.AuthQueue = 1, 0, 400
	l := newAuthLimiter(cfg, newFakeClock().Now)
	a, b := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")
	release := make(chan struct{})
	var order []string
	var mu sync.Mutex
	record := func(who string) func() bool {
		return func() bool {
			<-release
			mu.Lock()
			order = append(order, who)
			mu.Unlock()
			return true
		}
	}
	var wg sync.WaitGroup
	for range 50 {
		wg.Go(func() { l.check(context.Background(), a, 1, true, record("a")) })
	}
	for l.queued() < 49 {
		time.Sleep(time.Millisecond)
	}
	wg.Go(func() { l.check(context.Background(), b, 2, true, record("b")) })
	for l.queued() < 50 {
		time.Sleep(time.Millisecond)
	}
	close(release)
	wg.Wait()
	if i := slices.Index(order, "b"); i < 0 || i > 2 {
		t.Fatalf("b checked as #%d of %d", i+1, len(order))
	}
}

// A full queue, or a source's full share of it, answers at once.
func TestAuthQueueFull(t *testing.T) {
	cfg := authTestConfig()
	cfg.AuthWorkers, cfg.AuthQueue = 1, 8
	l := newAuthLimiter(cfg, newFakeClock().Now)
	release := make(chan struct{})
	block := func() bool { <-release; return true }
	var wg sync.WaitGroup
	a := netip.MustParseAddr("192.0.2.1")
	wg.Go(func() { l.check(context.Background(), a, 1, true, block) }) // running
	for range 2 {
		wg.Go(func() { l.check(context.Background(), a, 1, true, block) })
	}
	for l.queued() < 2 {
		time.Sleep(time.Millisecond)
	}
	if _, _, err := l.check(context.Background(), a, 1, true, block); !errors.Is(err, errAuthQueueFull) {
		t.Fatalf("a source's share: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() {
		_, _, err := l.check(ctx, netip.MustParseAddr("192.0.2.2"), 2, true, block)
		done <- err
	}()
	for l.queued() < 3 {
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled wait: %v", err)
	}
	close(release)
	wg.Wait()
	if l.queued() != 0 {
		t.Fatalf("%d left waiting", l.queued())
	}
}

// 32 devices behind one address authenticate at once on a server just
// started (cold password cache): none is refused.
func TestAuthConcurrentOneAddress(t *testing.T) {
	s := startServerWith(t, testConfig(t), Options{Logger: testLogger(t)})
	var eps []*esro.Endpoint
	for i := range 32 {
		ep := listenESRO(t, "127.0.0.77")
		addDevice(t, s, emsd.Address(198100+i), netip.MustParseAddrPort("127.0.0.1:9"), deviceOpts{password: fmt.Sprint("pw", i)})
		eps = append(eps, ep)
	}
	var wg sync.WaitGroup
	answers := make([]answer, len(eps))
	for i, ep := range eps {
		wg.Go(func() { answers[i] = deliveryControl(t, s, ep, emsd.Address(198100+i), fmt.Sprint("pw", i)) })
	}
	wg.Wait()
	for i, a := range answers {
		if a.kind != "result" {
			t.Errorf("device %d: %+v", i, a)
		}
	}
}
