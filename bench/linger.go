package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/internal/lossynet"
	"github.com/esro-emsdp/emsdp/server"
	"github.com/esro-emsdp/emsdp/ua"
)

const lingerDelay = 10 * time.Millisecond // one way

// runLinger measures what `emsdp ua send` does: a fresh endpoint, one
// submission, then Shutdown with or without the linger, against the EMSD
// server on the reference's fixed shipped timers, through a link that
// loses 0% or 20% of datagrams each way. It counts the submissions whose
// RESULT no ACK ever reached the server: a reference MTS, which commits
// only on that confirmation, would have dropped them although `ua send`
// printed "submitted".
func runLinger(ctx context.Context, o *benchOptions) (*report, error) {
	n := 100
	if o.quick {
		n = 5
	}
	var res []Result
	for _, loss := range []float64{0, 0.2} {
		for _, noLinger := range []bool{false, true} {
			r, err := lingerRun(ctx, o, esro.ShippedTimers(), n, loss, noLinger)
			if err != nil {
				return nil, err
			}
			res = append(res, r)
		}
	}
	return &report{tables: []table{{results: res}}, notes: []string{
		fmt.Sprintf("Each run: %d devices at once, each a fresh ESRO endpoint that submits one 200-octet message and shuts down, "+
			"as `emsdp ua send` does (time = from opening the socket to the end of Shutdown; process start-up not included). "+
			"Shipped erop.ini timers on both ends (T_retx 3 s, RT 1 s, N 8), the server's fixed as the reference's; "+
			"in-process lossynet, %d ms one-way delay, each datagram independently lost with the given probability, each way, seeded.", n, lingerDelay.Milliseconds()),
		"`unconfirmed`: submissions reported as submitted whose RESULT no ACK ever reached the server. This server commits " +
			"before it answers, so nothing is lost here; the reference MTS commits only on the ACK and would have dropped them.",
	}}, nil
}

func lingerRun(ctx context.Context, o *benchOptions, timers esro.Timers, n int, loss float64, noLinger bool) (Result, error) {
	lnet := lossynet.New(lossynet.Config{Loss: loss, Delay: lingerDelay, Seed: 20})
	lnet.Record()
	specs := make([]deviceSpec, n)
	addrs := make([]netip.AddrPort, n)
	for i := range specs {
		specs[i] = deviceSpec{addr: emsd.Address(300000 + i), password: devPassword}
		addrs[i] = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, 1, byte(i + 1)}), 641)
	}
	srvAddr, stop, err := lingerServer(ctx, o, timers, lnet, specs, addrs)
	if err != nil {
		return Result{}, err
	}
	defer stop()
	times := make([]time.Duration, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			start := time.Now()
			errs[i] = lingerSend(ctx, o, timers, lnet, addrs[i], srvAddr, specs[i], noLinger)
			times[i] = time.Since(start)
		})
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return Result{}, err
	}
	acked := map[netip.AddrPort]bool{}
	for _, ev := range lnet.Trace() {
		if ev.To == srvAddr && !ev.Lost && len(ev.Payload) >= 2 && esro.PDUType(ev.Payload[0]&7) == esro.TypeAck {
			acked[ev.From] = true
		}
	}
	var submitted, unconfirmed int
	for i, err := range errs {
		if err != nil {
			continue
		}
		submitted++
		if !acked[addrs[i]] {
			unconfirmed++
		}
	}
	slices.Sort(times)
	var sum time.Duration
	for _, d := range times {
		sum += d
	}
	name := "ua send, linger"
	if noLinger {
		name = "ua send --no-linger"
	}
	r := newResult("linger", name, "loss each way", fmt.Sprintf("%.0f%%", loss*100), "sends", fmt.Sprint(n))
	r.set("mean", (sum / time.Duration(n)).Seconds(), "s")
	r.set("p50", times[n/2].Seconds(), "s")
	r.set("max", times[n-1].Seconds(), "s")
	r.set("submitted", float64(submitted), "")
	r.set("unconfirmed", float64(unconfirmed), "")
	return r, nil
}

// lingerSend is `emsdp ua send` from local.
func lingerSend(ctx context.Context, o *benchOptions, timers esro.Timers, lnet *lossynet.Network, local, srv netip.AddrPort, s deviceSpec, noLinger bool) error {
	c, err := lnet.Listen(local.String())
	if err != nil {
		return err
	}
	ep, err := esro.NewEndpoint(c, &esro.Config{Timers: timers, NoLinger: noLinger, Logger: o.srvLog})
	if err != nil {
		c.Close()
		return err
	}
	defer ep.Shutdown(ctx)
	u, err := ua.New(ep, ua.Config{Server: srv, Address: s.addr, Password: s.password, Logger: o.srvLog})
	if err != nil {
		return err
	}
	defer u.Close()
	_, err = u.Submit(ctx, submitMessage())
	return err
}

// lingerServer starts the EMSD server on lnet with fixed timers.
func lingerServer(ctx context.Context, o *benchOptions, t esro.Timers, lnet *lossynet.Network, specs []deviceSpec, addrs []netip.AddrPort) (netip.AddrPort, func(), error) {
	dir, err := os.MkdirTemp("", "emsdp-bench-")
	if err != nil {
		return netip.AddrPort{}, nil, err
	}
	fail := func(err error) (netip.AddrPort, func(), error) {
		os.RemoveAll(dir)
		return netip.AddrPort{}, nil, err
	}
	if err := register(ctx, dir, specs, addrs, 0, nil); err != nil {
		return fail(err)
	}
	cfg := server.DefaultConfig()
	cfg.Domain, cfg.Hostname, cfg.Data = benchDomain, "mts."+benchDomain, dir
	cfg.EMSD.Listen, cfg.Admin.Listen, cfg.SMTP.Listen = "127.0.0.1:0", "", ""
	cfg.ESRO.AckDelay, cfg.ESRO.Roundtrip = server.Duration(t.Acknowledgement), server.Duration(t.Roundtrip)
	cfg.ESRO.Retransmit, cfg.ESRO.NSDULifetime = server.Duration(t.Retransmit), server.Duration(t.NSDULifetime)
	cfg.ESRO.Retries, cfg.ESRO.FixedTimers = t.RetransmitCount, true
	pc, err := lnet.Listen("10.0.0.1:641")
	if err != nil {
		return fail(err)
	}
	srv, err := server.Start(ctx, cfg, server.Options{Logger: o.srvLog, PacketConn: pc})
	if err != nil {
		pc.Close()
		return fail(fmt.Errorf("server: %w", err))
	}
	return pc.AddrPort(), func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		os.RemoveAll(dir)
	}, nil
}
