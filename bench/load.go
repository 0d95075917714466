package main

import (
	"context"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// loadStats is what one load point measured.
type loadStats struct {
	completed, failed int
	elapsed           time.Duration
	lat               []time.Duration // of successful operations, sorted
	mallocs           uint64          // heap allocations in the process while measuring
	calls             uint64          // socket system calls while measuring, when counted
}

// perOp is n per completed operation.
func (l loadStats) perOp(n uint64) float64 {
	if l.completed == 0 {
		return 0
	}
	return float64(n) / float64(l.completed)
}

func (l loadStats) rate() float64 { return float64(l.completed) / l.elapsed.Seconds() }

func (l loadStats) pct(p int) time.Duration {
	if len(l.lat) == 0 {
		return 0
	}
	i := (len(l.lat)*p + 99) / 100
	return l.lat[min(max(i-1, 0), len(l.lat)-1)]
}

// closedLoop runs op from conc workers for warmup, then measures for dur.
// op gets the worker number and a running sequence number.
func closedLoop(ctx context.Context, conc int, warmup, dur time.Duration, op func(ctx context.Context, worker int, seq int64) error) loadStats {
	return closedLoopCounted(ctx, conc, warmup, dur, nil, op)
}

// closedLoopCounted is closedLoop that also counts the process's heap
// allocations and, with calls (a running count of socket system calls),
// the system calls made while measuring.
func closedLoopCounted(ctx context.Context, conc int, warmup, dur time.Duration, calls func() uint64, op func(ctx context.Context, worker int, seq int64) error) loadStats {
	var seq atomic.Int64
	var measuring atomic.Bool
	stop := make(chan struct{})
	var mu sync.Mutex
	var st loadStats
	var wg sync.WaitGroup
	for w := range conc {
		wg.Go(func() {
			var lat []time.Duration
			failed := 0
			for {
				select {
				case <-stop:
					mu.Lock()
					st.lat = append(st.lat, lat...)
					st.failed += failed
					mu.Unlock()
					return
				default:
				}
				t0 := time.Now()
				err := op(ctx, w, seq.Add(1))
				if !measuring.Load() {
					continue
				}
				if err != nil {
					failed++
					continue
				}
				lat = append(lat, time.Since(t0))
			}
		})
	}
	select {
	case <-time.After(warmup):
	case <-ctx.Done():
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	m0 := ms.Mallocs
	var c0 uint64
	if calls != nil {
		c0 = calls()
	}
	measuring.Store(true)
	start := time.Now()
	select {
	case <-time.After(dur):
	case <-ctx.Done():
	}
	measuring.Store(false)
	st.elapsed = time.Since(start)
	if calls != nil {
		st.calls = calls() - c0
	}
	runtime.ReadMemStats(&ms)
	st.mallocs = ms.Mallocs - m0
	close(stop)
	wg.Wait()
	st.completed = len(st.lat)
	slices.Sort(st.lat)
	return st
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
