package main

import (
	"context"
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
	measuring.Store(true)
	start := time.Now()
	select {
	case <-time.After(dur):
	case <-ctx.Done():
	}
	close(stop)
	st.elapsed = time.Since(start)
	wg.Wait()
	st.completed = len(st.lat)
	slices.Sort(st.lat)
	return st
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
