package authlimit

import (
	"cmp"
	"context"
	"errors"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/internal/testclock"
)

// authTestConfig is the server's default limits: 10 failures then 6 a minute per
// source, 20 then 12 a minute per device.
func authTestConfig() Limits {
	return Limits{SourceBurst: 10, SourceRate: 6, DeviceBurst: 20, DeviceRate: 12, Tracked: 65536, Queue: 1024}
}

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
	off.SourceBurst, off.DeviceBurst = 0, 0
	for _, tc := range []struct {
		name  string
		cfg   Limits
		steps []limStep
	}{
		{"burst, then limited", authTestConfig(), []limStep{
			{src: A, dev: 1, fails: 9, want: ""},
			{src: A, dev: 1, fails: 1, want: LimitSource},
			{src: A, dev: 2, want: LimitSource}, // whichever device it tries
		}},
		{"one after another: no more than the burst gets checked", authTestConfig(), []limStep{
			{src: A, dev: 1, fails: 15, refused: 5, want: LimitSource},
		}},
		{"successes cost nothing and give back nothing", authTestConfig(), []limStep{
			{src: A, dev: 1, fails: 9, want: ""},
			{src: A, dev: 1, oks: 50, want: ""},
			{src: A, dev: 1, fails: 1, want: LimitSource},
		}},
		{"a success after the debt ran out", authTestConfig(), []limStep{
			{src: A, dev: 1, fails: 1},
			{after: time.Hour, src: A, dev: 1, oks: 1, fails: 10, want: LimitSource},
		}},
		{"another source is unaffected", authTestConfig(), []limStep{
			{src: A, dev: 1, fails: 10, want: LimitSource},
			{src: B, dev: 1, want: ""},
		}},
		{"one failure regained every 10 s", authTestConfig(), []limStep{
			{src: A, dev: 1, fails: 10, want: LimitSource},
			{after: 9 * time.Second, src: A, dev: 1, want: LimitSource},
			{after: time.Second, src: A, dev: 1, want: ""},
			{src: A, dev: 1, fails: 1, want: LimitSource},
			{after: 100 * time.Second, src: A, dev: 1, fails: 9, want: ""},
			{src: A, dev: 1, fails: 1, want: LimitSource},
		}},
		{"IPv6: one /64 is one source", authTestConfig(), []limStep{
			{src: "2001:db8::1", dev: 1, fails: 5, want: ""},
			{src: "2001:db8::ffff:1", dev: 1, fails: 5, want: LimitSource},
			{src: "2001:db8::77", dev: 1, want: LimitSource},
			{src: "2001:db8:0:1::1", dev: 1, want: ""},
		}},
		{"IPv4-mapped is IPv4", authTestConfig(), []limStep{
			{src: "::ffff:" + A, dev: 1, fails: 10, want: LimitSource},
			{src: A, dev: 1, want: LimitSource},
			{src: "::", dev: 1, want: ""},
		}},
		{"device limit across sources", authTestConfig(), []limStep{
			{dev: 7, fails: 19, spread: true, want: ""},
			{dev: 7, fails: 1, spread: true, want: LimitDevice},
			{src: B, dev: 7, want: LimitDevice},
			{src: B, dev: 8, want: ""},
			{src: B, dev: 7, home: true, want: ""},
			{after: 5 * time.Second, src: B, dev: 7, want: ""},
		}},
		{"failures from home leave the device limit alone", authTestConfig(), []limStep{
			{src: A, dev: 7, home: true, fails: 10, want: LimitSource},
			{src: B, dev: 7, fails: 19, spread: true, want: ""},
		}},
		{"off", off, []limStep{
			{src: A, dev: 1, fails: 1000, want: ""},
			{dev: 1, fails: 1000, spread: true, want: ""},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk := testclock.New()
			l := New(tc.cfg, clk.Now)
			n := 0
			for i, st := range tc.steps {
				clk.Advance(st.after)
				src := cmp.Or(st.src, "203.0.113.1")
				for range st.oks {
					if _, got, err := l.Check(context.Background(), netip.MustParseAddr(src), st.dev, !st.home, pass); got != "" || err != nil {
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
					if _, limit, _ := l.Check(context.Background(), netip.MustParseAddr(src), st.dev, !st.home, fail); limit != "" {
						refused++
					}
				}
				if refused != st.refused {
					t.Errorf("step %d (%+v): check refused %d, want %d", i, st, refused, st.refused)
				}
				if got := l.Over(netip.MustParseAddr(src), st.dev, !st.home); got != st.want {
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
			cfg.Tracked = bound
			clk := testclock.New()
			l := New(cfg, clk.Now)
			attacker := netip.MustParseAddr("192.0.2.66")
			for range 10 {
				l.Check(context.Background(), attacker, 1, true, fail)
			}
			peak := 0
			for i := range 100 * bound {
				clk.Advance(100 * time.Microsecond)
				l.Check(context.Background(), tc.source(i), emsd.Address(i), true, fail)
				srcs, devs := l.tracked()
				if srcs > bound || devs > bound {
					t.Fatalf("after %d spoofed sources: %d sources, %d devices tracked, bound %d", i+1, srcs, devs, bound)
				}
				peak = max(peak, srcs)
			}
			if peak < bound-bound/8 {
				t.Errorf("at most %d sources tracked: the bound was never reached", peak)
			}
			if got := l.Over(attacker, 1, true); got != LimitSource {
				t.Errorf("attacker after the flood: over = %q, want %q", got, LimitSource)
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
			b := NewBuckets[int](10, 6, bound)
			for k, n := range tc.fails {
				for range n {
					b.Fail(k, 0)
				}
			}
			b.Fail(100, int64(tc.after))
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
	clk := testclock.New()
	l := New(authTestConfig(), clk.Now)
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
		if n, warn := l.Refused(); n != st.n || warn != st.warn {
			t.Errorf("refusal %d: (%d, %v), want (%d, %v)", i, n, warn, st.n, st.warn)
		}
	}
}

// Checks wait for a worker instead of being refused: many correct
// passwords at once from one source all pass, never more than the
// workers run at once, and failures count only once they happened.
func TestAuthQueue(t *testing.T) {
	cfg := authTestConfig()
	cfg.Workers = 2
	l := New(cfg, testclock.New().Now)
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
			ok, limit, err := l.Check(context.Background(), src, emsd.Address(i), true, slow(true))
			if !ok || limit != "" || err != nil {
				refused.Add(1)
			}
		})
	}
	wg.Wait()
	if n := refused.Load(); n != 0 || peak > 2 {
		t.Fatalf("32 correct passwords: %d refused, %d checks at once", n, peak)
	}
	if got := l.Over(src, 1, true); got != "" {
		t.Fatalf("successes counted: over %q", got)
	}

	// Wrong passwords at once: no more than the burst get checked.
	checked := atomic.Int32{}
	for range 40 {
		wg.Go(func() {
			l.Check(context.Background(), src, 1, false, func() bool { checked.Add(1); return slow(false)() })
		})
	}
	wg.Wait()
	if n := checked.Load(); n != int32(cfg.SourceBurst) {
		t.Fatalf("%d wrong passwords checked, burst %d", n, cfg.SourceBurst)
	}
	if l.queued() != 0 {
		t.Fatalf("%d left waiting", l.queued())
	}
}

// Sources take turns: one with a long queue does not hold up another.
func TestAuthQueueFair(t *testing.T) {
	cfg := authTestConfig()
	cfg.Workers, cfg.SourceBurst, cfg.Queue = 1, 0, 400
	l := New(cfg, testclock.New().Now)
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
		wg.Go(func() { l.Check(context.Background(), a, 1, true, record("a")) })
	}
	for l.queued() < 49 {
		time.Sleep(time.Millisecond)
	}
	wg.Go(func() { l.Check(context.Background(), b, 2, true, record("b")) })
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
	cfg.Workers, cfg.Queue = 1, 8
	l := New(cfg, testclock.New().Now)
	release := make(chan struct{})
	block := func() bool { <-release; return true }
	var wg sync.WaitGroup
	a := netip.MustParseAddr("192.0.2.1")
	wg.Go(func() { l.Check(context.Background(), a, 1, true, block) }) // running
	for range 2 {
		wg.Go(func() { l.Check(context.Background(), a, 1, true, block) })
	}
	for l.queued() < 2 {
		time.Sleep(time.Millisecond)
	}
	if _, _, err := l.Check(context.Background(), a, 1, true, block); !errors.Is(err, ErrQueueFull) {
		t.Fatalf("a source's share: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() {
		_, _, err := l.Check(ctx, netip.MustParseAddr("192.0.2.2"), 2, true, block)
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

// SetLimits keeps the failures on record against the new limits.
func TestAuthLimiterSetLimits(t *testing.T) {
	src := netip.MustParseAddr("192.0.2.1")
	limits := func(edit func(*Limits)) Limits {
		c := authTestConfig() // burst 10 per source
		edit(&c)
		return c
	}
	off := limits(func(c *Limits) { c.SourceBurst = 0 })
	for _, tc := range []struct {
		name    string
		fails   int      // from src, and as many from other sources
		set     []Limits // applied in turn
		want    string   // over afterwards
		then    int      // failures more from src before its limit; -1: not checked
		tracked int      // most sources tracked afterwards
	}{
		{"lower burst: over at once", 5, []Limits{limits(func(c *Limits) { c.SourceBurst = 5 })}, LimitSource, 0, 6},
		{"higher burst: more room", 10, []Limits{limits(func(c *Limits) { c.SourceBurst = 15 })}, "", 5, 11},
		{"same limits: nothing forgotten", 10, []Limits{authTestConfig()}, LimitSource, 0, 11},
		{"off: forgotten", 10, []Limits{off}, "", -1, 0},
		{"off and on again: forgotten", 10, []Limits{off, authTestConfig()}, "", 10, 0},
		{"smaller table: trimmed", 3, []Limits{limits(func(c *Limits) { c.Tracked = 2 })}, "", -1, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := New(authTestConfig(), testclock.New().Now)
			for i := range tc.fails {
				l.Check(context.Background(), netip.AddrFrom4([4]byte{10, 0, 0, byte(i)}), 1, true, fail)
				l.Check(context.Background(), src, 1, false, fail)
			}
			for _, c := range tc.set {
				l.SetLimits(c)
			}
			if got := l.Over(src, 1, false); got != tc.want {
				t.Errorf("over %q, want %q", got, tc.want)
			}
			if n, _ := l.tracked(); n > tc.tracked {
				t.Errorf("%d sources tracked, want at most %d", n, tc.tracked)
			}
			if tc.then < 0 {
				return
			}
			for i := range tc.then {
				if _, got, _ := l.Check(context.Background(), src, 1, false, fail); got != "" {
					t.Fatalf("failure %d refused: %q", i+1, got)
				}
			}
			if _, got, _ := l.Check(context.Background(), src, 1, false, fail); got != LimitSource {
				t.Errorf("failure %d: %q, want the source limit", tc.then+1, got)
			}
		})
	}
}
