package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/internal/lossynet"
)

// lossTimers are a tenth of the shipped erop.ini, so that runs stay short.
var lossTimers = esro.Timers{Acknowledgement: 10 * time.Millisecond, Roundtrip: 100 * time.Millisecond,
	Retransmit: 200 * time.Millisecond, NSDULifetime: 300 * time.Millisecond, RetransmitCount: 8}

const (
	lossWorkers = 16                    // invocations in flight
	lossDelay   = 20 * time.Millisecond // one way
	lossSAP     = 5
	lossArg     = 100 // argument octets
)

var lossRates = []float64{0, 0.1, 0.3}

// lossOutcome is one run of n invocations.
type lossOutcome struct {
	Elapsed time.Duration `json:"elapsed"`
	Failed  int           `json:"failed"`
	Retx    uint64        `json:"retransmissions"` // both ends
}

// runLoss completes 1000 3-way invocations through a link with 20 ms
// one-way delay and 0, 10 and 30% loss each way, with the adaptive timer
// and with the reference's fixed timers (both from the same timer inputs):
// on the in-process lossy network, and over a veth pair with netem where
// the system has it.
func runLoss(ctx context.Context, o *benchOptions) (*report, error) {
	n := 1000
	if o.quick {
		n = 200
	}
	rep := &report{notes: []string{
		fmt.Sprintf("3-way invocations of %d octets, %d in flight, %d ms one-way delay; each datagram independently lost with the given probability, each way. "+
			"Timers a tenth of the shipped erop.ini (A 10 ms, RT 100 ms, R 200 ms, L 300 ms, N 8): fixed = the reference's T_retx = R + RT "+
			"for every retransmission; adaptive = RFC 6298 estimate with backoff and jitter, between 200 ms and T_retx. "+
			"`failed` invocations ended in an ESRO failure (retry budget exhausted).", lossArg, lossWorkers, lossDelay.Milliseconds()),
		"lossynet: both ends in one process on internal/lossynet, an in-memory network (real time, seeded loss).",
	}}
	var mem []Result
	for _, loss := range lossRates {
		for _, fixed := range []bool{false, true} {
			x, err := lossRun(ctx, o, n, loss, fixed)
			if err != nil {
				return nil, err
			}
			mem = append(mem, lossResult(x, n, loss, fixed, "lossynet, in process"))
		}
	}
	rep.tables = append(rep.tables, table{results: mem})
	veth, note, err := netemLoss(ctx, o, n)
	if err != nil {
		return nil, fmt.Errorf("netem: %w", err)
	}
	rep.notes = append(rep.notes, note)
	if len(veth) > 0 {
		rep.tables = append(rep.tables, table{results: veth})
	}
	return rep, nil
}

func lossResult(x lossOutcome, n int, loss float64, fixed bool, link string) Result {
	name := "adaptive timers"
	if fixed {
		name = "fixed timers (reference)"
	}
	r := newResult("loss", name, "loss each way", fmt.Sprintf("%.0f%%", loss*100), "invocations", fmt.Sprint(n), "link", link)
	r.set("time", x.Elapsed.Seconds(), "s")
	r.set("failed", float64(x.Failed), "")
	r.set("retransmissions", float64(x.Retx), "")
	return r
}

// lossConfig is the endpoint configuration of both ends of a loss run.
func lossConfig(fixed bool, log *slog.Logger) *esro.Config {
	return &esro.Config{Timers: lossTimers, FixedTimers: fixed, Logger: log}
}

// echoPerformer answers every invocation on lossSAP with its argument.
func echoPerformer(ep *esro.Endpoint) error {
	return ep.HandleFunc(lossSAP, esro.ThreeWay, func(_ context.Context, w esro.ResponseWriter, inv *esro.Invocation) {
		w.Result(0, inv.Data)
	})
}

func lossRun(ctx context.Context, o *benchOptions, n int, loss float64, fixed bool) (lossOutcome, error) {
	lnet := lossynet.New(lossynet.Config{Loss: loss, Delay: lossDelay, Seed: 1})
	cfg := lossConfig(fixed, o.log)
	pc, err := lnet.Listen("10.0.0.1:641")
	if err != nil {
		return lossOutcome{}, err
	}
	perf, err := esro.NewEndpoint(pc, cfg)
	if err != nil {
		return lossOutcome{}, err
	}
	defer perf.Close()
	if err := echoPerformer(perf); err != nil {
		return lossOutcome{}, err
	}
	x, err := invokeAll(ctx, n, pc.AddrPort(), cfg, func(i int) (net.PacketConn, error) {
		return lnet.Listen(fmt.Sprintf("10.0.1.%d:641", i+1))
	})
	x.Retx += perf.Stats().Retransmissions
	return x, err
}

// invokeAll completes n invocations towards 'to' from lossWorkers
// endpoints, one invocation in flight each, on sockets from listen. Retx
// counts the invokers' retransmissions.
func invokeAll(ctx context.Context, n int, to netip.AddrPort, cfg *esro.Config, listen func(i int) (net.PacketConn, error)) (lossOutcome, error) {
	eps := make([]*esro.Endpoint, 0, lossWorkers)
	defer func() {
		for _, ep := range eps {
			ep.Close()
		}
	}()
	for i := range lossWorkers {
		c, err := listen(i)
		if err != nil {
			return lossOutcome{}, err
		}
		ep, err := esro.NewEndpoint(c, cfg)
		if err != nil {
			c.Close()
			return lossOutcome{}, err
		}
		eps = append(eps, ep)
	}
	next := make(chan int, n)
	for i := range n {
		next <- i
	}
	close(next)
	var mu sync.Mutex
	var x lossOutcome
	start := time.Now()
	var wg sync.WaitGroup
	for _, ep := range eps {
		wg.Go(func() {
			data := make([]byte, lossArg)
			failed := 0
			for range next {
				if _, err := ep.Invoke(ctx, &esro.Request{To: to, SAP: lossSAP, Handshake: esro.ThreeWay, Operation: 33, Data: data}); err != nil {
					failed++
				}
			}
			mu.Lock()
			x.Failed += failed
			mu.Unlock()
		})
	}
	wg.Wait()
	x.Elapsed = time.Since(start)
	if err := ctx.Err(); err != nil {
		return x, err
	}
	for _, ep := range eps {
		x.Retx += ep.Stats().Retransmissions
	}
	return x, nil
}
