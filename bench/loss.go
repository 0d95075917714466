package main

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/internal/lossynet"
)

// runLoss completes 1000 3-way invocations through an in-process link
// with 20 ms one-way delay and 0, 10 and 30% loss each way, with the
// adaptive timer and with the reference's fixed timers (both from the same
// timer inputs, a tenth of the shipped erop.ini so runs stay short).
func runLoss(ctx context.Context, o *benchOptions) ([]Result, error) {
	n := 1000
	if o.quick {
		n = 200
	}
	timers := esro.Timers{Acknowledgement: 10 * time.Millisecond, Roundtrip: 100 * time.Millisecond,
		Retransmit: 200 * time.Millisecond, NSDULifetime: 300 * time.Millisecond, RetransmitCount: 8}
	var out []Result
	for _, loss := range []float64{0, 0.1, 0.3} {
		for _, fixed := range []bool{false, true} {
			name := "adaptive timers"
			if fixed {
				name = "fixed timers (reference)"
			}
			elapsed, failed, retx, err := lossRun(ctx, o, n, loss, fixed, timers)
			if err != nil {
				return nil, err
			}
			r := newResult("loss", name, "loss each way", fmt.Sprintf("%.0f%%", loss*100), "invocations", fmt.Sprint(n),
				"link", "lossynet, 20 ms one way, 16 in flight")
			r.set("time", elapsed.Seconds(), "s")
			r.set("failed", float64(failed), "")
			r.set("retransmissions", float64(retx), "")
			out = append(out, r)
		}
	}
	return out, nil
}

func lossRun(ctx context.Context, o *benchOptions, n int, loss float64, fixed bool, timers esro.Timers) (time.Duration, int, uint64, error) {
	net := lossynet.New(lossynet.Config{Loss: loss, Delay: 20 * time.Millisecond, Seed: 1})
	cfg := &esro.Config{Timers: timers, FixedTimers: fixed, Logger: o.log}
	pc, err := net.Listen("10.0.0.1:641")
	if err != nil {
		return 0, 0, 0, err
	}
	perf, err := esro.NewEndpoint(pc, cfg)
	if err != nil {
		return 0, 0, 0, err
	}
	defer perf.Close()
	perf.HandleFunc(5, esro.ThreeWay, func(_ context.Context, w esro.ResponseWriter, inv *esro.Invocation) {
		w.Result(0, inv.Data)
	})
	const workers = 16
	var mu sync.Mutex
	failed := 0
	var retx uint64
	next := make(chan int, n)
	for i := range n {
		next <- i
	}
	close(next)
	start := time.Now()
	var wg sync.WaitGroup
	for w := range workers {
		c, err := net.Listen(fmt.Sprintf("10.0.1.%d:641", w+1))
		if err != nil {
			return 0, 0, 0, err
		}
		ep, err := esro.NewEndpoint(c, cfg)
		if err != nil {
			return 0, 0, 0, err
		}
		wg.Go(func() {
			defer ep.Close()
			data := make([]byte, 100)
			for range next {
				if _, err := ep.Invoke(ctx, &esro.Request{To: pc.AddrPort(), SAP: 5, Handshake: esro.ThreeWay, Operation: 33, Data: data}); err != nil {
					mu.Lock()
					failed++
					mu.Unlock()
				}
			}
			mu.Lock()
			retx += ep.Stats().Retransmissions
			mu.Unlock()
		})
	}
	wg.Wait()
	return time.Since(start), failed, retx + perf.Stats().Retransmissions, nil
}
