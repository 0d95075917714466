package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/server"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/sqlite"
	"github.com/esro-emsdp/emsdp/ua"
)

// runFleet delivers queued mail to a fleet of which part is switched off:
// the devices that answer must get their mail as fast as when all answer.
//
// The machine is shared: one run's figure swings with the other load
// (the 90% run lasts a quarter of a second), so the runs are compared in
// pairs: every round runs each case once, in an order rotated from round
// to round, and each silent case is divided by the all-live run (and by
// its answering devices alone) of the same round. The table gives each
// case's median over the rounds, the paired ratios their median and
// quartiles, and every round's ratio is stated in a note. Process CPU
// time per live delivery is the cost measure the other load moves least.
func runFleet(ctx context.Context, o *benchOptions) (*report, error) {
	devices, per := 1000, 10
	rounds := 9
	if o.quick {
		devices, per, rounds = 200, 5, 2
	}
	// Each silent share also runs without its silent devices (not
	// registered, no mail): the answering devices alone, the same work
	// minus the switched-off ones. The known cases are a restart of a
	// server that knew the fleet: the answering devices heard from a
	// minute before, the silent ones a day before.
	runs := []fleetCase{{0, false, false}, {50, false, false}, {50, true, false}, {90, false, false}, {90, true, false},
		{0, false, true}, {50, false, true}, {90, false, true}}
	index := func(c fleetCase) int { return slices.Index(runs, c) }
	all := make([][]Result, len(runs)) // by case, by round
	for round := range rounds {
		for k := range runs {
			i := (k + round) % len(runs)
			r, err := fleetRun(ctx, o, devices, per, runs[i], 0)
			if err != nil {
				return nil, fmt.Errorf("%d%% silent: %w", runs[i].pct, err)
			}
			all[i] = append(all[i], r)
		}
	}
	rows := make([]Result, len(runs))
	for i, rs := range all {
		rows[i] = rs[0]
		rows[i].Metrics, rows[i].Units, rows[i].order = map[string]float64{}, map[string]string{}, nil
		for _, m := range []string{"live deliveries/s", "all delivered", "first deliveries", "CPU per live delivery", "datagrams/silent device", "shutdown"} {
			if _, ok := rs[0].Metrics[m]; ok {
				rows[i].set(m, median(column(rs, m)), rs[0].Units[m])
			}
		}
	}
	// The paired ratios of each silent case: to the all-live run and to
	// its answering devices alone, of the same round.
	var ratioRows []Result
	var roundNotes []string
	for i, run := range runs {
		if run.pct == 0 || run.alone {
			continue
		}
		for _, to := range []int{index(fleetCase{0, false, run.known}), index(fleetCase{run.pct, true, run.known})} {
			if to < 0 {
				continue
			}
			name := "to all live"
			if runs[to].alone {
				name = "to the answering devices alone"
			}
			if run.known {
				name += ", known fleet"
			}
			tput := pairRatio(all[i], all[to], "live deliveries/s")
			cpu := pairRatio(all[i], all[to], "CPU per live delivery")
			r := newResult("fleet", fmt.Sprintf("%d%% silent, %s", run.pct, name), "rounds", strconv.Itoa(rounds))
			q1, med, q3 := quartiles(tput)
			r.set("throughput ratio, median", med, "×")
			r.set("q1", q1, "×")
			r.set("q3", q3, "×")
			r.set("min", slices.Min(tput), "×")
			r.set("max", slices.Max(tput), "×")
			at := 0
			for _, v := range tput {
				if v >= 0.9 {
					at++
				}
			}
			r.set("rounds ≥ 0.9", float64(at), "")
			if len(cpu) > 0 {
				_, cmed, _ := quartiles(cpu)
				r.set("CPU per live delivery ratio, median", cmed, "×")
			}
			ratioRows = append(ratioRows, r)
			roundNotes = append(roundNotes, fmt.Sprintf("%d%% silent %s: %s", run.pct, name, ratioList(tput)))
		}
	}
	// The pace holding: all devices answering, delivery.rate well below
	// what the server does unpaced.
	const rate = 1000
	paced, err := fleetRun(ctx, o, devices, per, fleetCase{}, rate)
	if err != nil {
		return nil, fmt.Errorf("paced: %w", err)
	}
	rows = append(rows, paced)
	def := server.DefaultConfig()
	// The aggregate pacing of retransmissions: invocations to silent
	// peers started together, their retransmissions falling due
	// together; without a limit, then at the server's default.
	retxInv, retxPeers := 2000, 16
	if o.quick {
		retxInv = 400
	}
	var retxRows []Result
	for _, rate := range []float64{0, def.ESRO.RetransmitRate} {
		r, err := retxPaceRun(ctx, retxInv, retxPeers, rate, def.ESRO.RetransmitBurst)
		if err != nil {
			return nil, fmt.Errorf("retransmissions at %g/s: %w", rate, err)
		}
		retxRows = append(retxRows, r)
	}
	retxBurst := (&esro.Config{RetransmitRate: def.ESRO.RetransmitRate, RetransmitBurst: def.ESRO.RetransmitBurst}).RetransmitBucket()
	t := esro.ShippedTimers()
	perAttempt := t.RetransmitCount + 1
	return &report{tables: []table{{caption: fmt.Sprintf("%d devices × %d queued messages, part of the devices switched off: each case's median over %d rounds.", devices, per, rounds),
		results: rows}, {caption: "Live throughput and CPU with silent devices, to the all-live run and to the answering devices alone of the same round (paired ratios).",
		results: ratioRows}, {caption: fmt.Sprintf("%d invocations to silent peers started at once: their retransmissions fall due together.", retxInv),
		results: retxRows}}, notes: []string{
		fmt.Sprintf("A real `server.Start` (SQLite store in a temporary directory) with the default configuration: "+
			"delivery.concurrency %d, delivery.probes %d (a quarter; first attempts to devices not heard from: 16 × concurrency), the shipped ESRO timers (T_retx %v, T_noresp %v) on both ends. "+
			"The mail is in the store before the server starts, as after a restart: the scheduler rebuilds its due times from it and knows nothing of the devices. "+
			"Every device has its own loopback socket; an answering one runs a `ua.Client` that takes every delivery; "+
			"a silent one reads and counts datagrams and never answers. Messages are queued in rounds (message 1 for every device, then message 2, ...), "+
			"devices in address order, the silent ones spread evenly among them. "+
			"history none: no device was ever heard from (every device is one not heard from at the start); heard before (a known fleet): "+
			"the store holds each answering device's contact, heard a minute before the start at its own address, and each silent device's, "+
			"heard a day before (switched off since), as after the restart of a server that delivered to them; vs all live compares it with the all-live run of the same history.",
			def.Delivery.Concurrency, max(def.Delivery.Concurrency/4, 1), t.RetransmitInterval(), t.NoResponse()),
		fmt.Sprintf("%d rounds; each round runs every case once (the paced one apart), the order rotated by one from round to round so that no case always "+
			"follows the same one. One run's figure swings with the machine's other load (the 90%% run delivers %d messages in a fraction of a second), "+
			"so each silent case is compared with the runs of its own round, which met the same background: the paired ratio, given as its median, "+
			"quartiles (q1, q3), extremes, and how many rounds reached 0.9; every round's ratio is listed below. ", rounds, devices/10*per) +
			"live deliveries/s = messages delivered to the answering devices / time from the end of `server.Start` (store open; the scheduler's rebuild of its due times from the store runs after it, within that time) until the last of them; " +
			"all delivered = that time; first deliveries = median over the answering devices of the time to their first message; " +
			"CPU per live delivery = the process's CPU time (user + system: server, store and simulated devices) over the same time, per message delivered to an answering device, " +
			"the cost measure the other load moves least; " +
			"alone = the same answering devices without the silent ones " +
			"(not registered, no mail for them), which isolates what the silent devices cost from the smaller number of devices delivered to; datagrams/silent device = datagrams each silent socket received within it, mean (1: every silent device got its first attempt, " +
			"none a retransmission yet: the answering devices had all their mail within one retransmission interval). Shutdown = `Shutdown` right after, " +
			"with the first attempts to the silent devices in flight: given up after one retransmission interval of silence, the rest is the ESRO " +
			"invoker's wait after its last acknowledgement (T_last).",
		"Every round's throughput ratio, in the order of the rounds: " + strings.Join(roundNotes, "; ") + ".",
		fmt.Sprintf("Datagrams to a silent device over time are bounded by the backoff schedule: one attempt (%d datagrams per invocation: "+
			"the INVOKE and %d retransmissions) after each delay of delivery.retry (%s, the last one repeating), at most %d attempts "+
			"and %d datagrams in the first hour, %d an hour after that, fewer when more silent devices than delivery.probes wait their turn.",
			perAttempt, t.RetransmitCount, retryList(def.Delivery.Retry), attemptsInHour(def.Delivery.Retry), perAttempt*attemptsInHour(def.Delivery.Retry),
			perAttempt*int(time.Hour/time.Duration(def.Delivery.Retry[len(def.Delivery.Retry)-1]))),
		"A first attempt to a device not heard from is made without claiming the delivery (a read; its outcome, a store write, counts it), " +
			"and the first attempts a scheduling pass starts read the store together, up to 128 in one query (the due delivery, the next instance id " +
			"and the contact of each device): the silent devices' first attempts cost the answering devices neither store writes nor two queries each.",
		fmt.Sprintf("Retransmissions: one `esro.Endpoint` (the shipped timers, retries cut to 2 for a short run) invoking %d times towards %d silent "+
			"loopback sockets at once, without a limit and with esro.retransmit_rate at the server's default (%g/s, burst %g: at most %g in any second); "+
			"times are when the endpoint wrote each datagram (its Trace hook), every one checked to arrive. over = from the first retransmission "+
			"to the last; deferred = retransmissions that waited for their turn (none is dropped: all %d were sent); all failed after = until every "+
			"invocation ended with its no-answer failure, which pacing delays by as much as it spreads the retransmissions.",
			retxInv, retxPeers, def.ESRO.RetransmitRate, retxBurst, retxBurst+def.ESRO.RetransmitRate, 2*retxInv),
	}}, nil
}

func retryList(retry []server.Duration) string {
	var out []string
	for _, d := range retry {
		out = append(out, time.Duration(d).String())
	}
	return strings.Join(out, ", ")
}

// attemptsInHour counts the attempts the retry schedule allows in the
// first hour.
func attemptsInHour(retry []server.Duration) int {
	n, at := 1, time.Duration(0)
	for i := 0; ; i++ {
		at += time.Duration(retry[min(i, len(retry)-1)])
		if at > time.Hour {
			return n
		}
		n++
	}
}

type fleetDevice struct {
	addr   emsd.Address
	silent bool
	conn   net.PacketConn
	ep     *esro.Endpoint
	ua     *ua.Client
	heard  atomic.Int64 // datagrams a silent device received
}

// fleetCase is one case of the fleet section: silent share, the answering
// devices alone (the silent ones absent), and whether the store knows the
// fleet (known: each answering device heard a minute before the start,
// each silent one a day before).
type fleetCase struct {
	pct          int
	alone, known bool
}

func fleetRun(ctx context.Context, o *benchOptions, n, per int, c fleetCase, rate float64) (_ Result, err error) {
	silentPct, alone := c.pct, c.alone
	pacing := "off"
	if rate > 0 {
		pacing = fmt.Sprintf("%g/s", rate)
	}
	name, silentCond := "queued mail to a fleet", fmt.Sprintf("%d%%", silentPct)
	if alone {
		name, silentCond = "the answering devices alone", fmt.Sprintf("(%d%% absent)", silentPct)
	}
	history := "none"
	if c.known {
		history = "heard before"
	}
	r := newResult("fleet", name, "devices", strconv.Itoa(n), "silent", silentCond, "history", history, "delivery.rate", pacing)
	dir, err := os.MkdirTemp("", "emsdp-fleet-")
	if err != nil {
		return r, err
	}
	defer os.RemoveAll(dir)
	srvConn, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		return r, err
	}
	// The receive buffer serve asks for its own socket ([emsd]
	// receive_buffer): the answers to a fleet's first attempts arrive
	// together.
	if err := srvConn.(*net.UDPConn).SetReadBuffer(server.DefaultConfig().EMSD.ReceiveBuffer); err != nil {
		srvConn.Close()
		return r, err
	}
	srvAP := srvConn.LocalAddr().(*net.UDPAddr).AddrPort()
	var devs []*fleetDevice
	var wg sync.WaitGroup
	defer func() {
		for _, d := range devs {
			if d.ua != nil {
				d.ua.Close()
			}
			if d.ep != nil {
				d.ep.Close()
			} else {
				d.conn.Close()
			}
		}
		wg.Wait()
	}()
	live := 0
	delivered := make(chan struct{}, n*per)
	// firsts: when each answering device got its first message.
	var firstMu sync.Mutex
	var firsts []time.Time
	var extra atomic.Int64 // deliveries beyond the expected (none expected)
	for i := range n {
		// Silent devices spread evenly: device i is silent when the
		// running share falls behind silentPct.
		silent := (i+1)*silentPct/100 > i*silentPct/100
		if silent && alone {
			continue
		}
		d := &fleetDevice{addr: emsd.Address(300000 + i), silent: silent}
		if d.conn, err = net.ListenPacket("udp", "127.0.0.1:0"); err != nil {
			srvConn.Close()
			return r, err
		}
		devs = append(devs, d)
		if silent {
			wg.Go(func() {
				buf := make([]byte, 2048)
				for {
					if _, _, err := d.conn.ReadFrom(buf); err != nil {
						return
					}
					d.heard.Add(1)
				}
			})
			continue
		}
		live++
		if d.ep, err = esro.NewEndpoint(d.conn, &esro.Config{Logger: o.srvLog}); err != nil {
			srvConn.Close()
			return r, err
		}
		got := 0
		var mu sync.Mutex
		d.ua, err = ua.New(d.ep, ua.Config{Server: srvAP, Address: d.addr, Logger: o.srvLog,
			Handler: ua.HandlerFunc(func(context.Context, *ua.Delivery) error {
				mu.Lock()
				got++
				more, first := got > per, got == 1
				mu.Unlock()
				if first {
					firstMu.Lock()
					firsts = append(firsts, time.Now())
					firstMu.Unlock()
				}
				if more {
					extra.Add(1)
				} else {
					delivered <- struct{}{}
				}
				return nil
			})})
		if err != nil {
			srvConn.Close()
			return r, err
		}
	}
	r.Conditions["devices"] = strconv.Itoa(len(devs))
	if err := fleetQueue(ctx, dir, devs, per, c.known); err != nil {
		srvConn.Close()
		return r, err
	}

	cfg := server.DefaultConfig()
	cfg.Domain, cfg.Hostname, cfg.Data = benchDomain, "mts."+benchDomain, dir
	cfg.EMSD.Listen, cfg.Admin.Listen, cfg.SMTP.Listen = srvAP.String(), "", ""
	cfg.Delivery.Rate = rate
	srv, err := server.Start(ctx, cfg, server.Options{Logger: o.srvLog, PacketConn: srvConn})
	if err != nil {
		srvConn.Close()
		return r, fmt.Errorf("server: %w", err)
	}
	start := time.Now()
	cpu0, cpuOK := processCPU()
	want := live * per
	timeout := time.After(10 * time.Minute)
	for k := 0; k < want; k++ {
		select {
		case <-delivered:
		case <-timeout:
			srv.Close()
			return r, fmt.Errorf("%d of %d deliveries to the answering devices after 10 minutes", k, want)
		case <-ctx.Done():
			srv.Close()
			return r, ctx.Err()
		}
	}
	took := time.Since(start)
	cpu1, _ := processCPU()
	var heard int64
	for _, d := range devs {
		heard += d.heard.Load()
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	stopAt := time.Now()
	err = srv.Shutdown(sctx)
	stopped := time.Since(stopAt)
	cancel()
	if err != nil {
		return r, fmt.Errorf("shutdown: %w", err)
	}
	r.set("live deliveries/s", float64(want)/took.Seconds(), "1/s")
	r.set("all delivered", took.Seconds(), "s")
	firstMu.Lock()
	var fs []float64
	for _, t := range firsts {
		fs = append(fs, float64(t.Sub(start))/float64(time.Millisecond))
	}
	firstMu.Unlock()
	r.set("first deliveries", median(fs), "ms")
	if cpuOK {
		r.set("CPU per live delivery", float64(cpu1-cpu0)/float64(time.Microsecond)/float64(want), "µs")
	}
	if silent := len(devs) - live; silent > 0 {
		r.set("datagrams/silent device", float64(heard)/float64(silent), "")
	}
	r.set("shutdown", stopped.Seconds(), "s")
	if x := extra.Load(); x > 0 {
		return r, fmt.Errorf("%d deliveries doubled", x)
	}
	return r, nil
}

// fleetQueue registers the devices and queues per messages for each, in
// rounds, as a running server would have received them. known: the
// devices were heard from before (an answering one a minute ago, a
// silent one a day ago: switched off since), from their own addresses.
func fleetQueue(ctx context.Context, dir string, devs []*fleetDevice, per int, known bool) error {
	db, err := sqlite.OpenDir(ctx, dir, nil)
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	defer db.Close()
	for _, d := range devs {
		ap := d.conn.LocalAddr().(*net.UDPAddr).AddrPort()
		if err := db.AddDevice(ctx, &store.Device{Address: uint32(d.addr), IP: ap.Addr(), Port: ap.Port(),
			Version: "1.1", Mode: store.ModeComplete}); err != nil {
			return fmt.Errorf("device %s: %w", d.addr, err)
		}
		if known {
			at := time.Now().Add(-time.Minute)
			if d.silent {
				at = time.Now().Add(-24 * time.Hour)
			}
			if _, _, err := db.SetContact(ctx, uint32(d.addr), store.Contact{Addr: ap, Via: "mts.bench earlier run", At: at, Polled: true}); err != nil {
				return fmt.Errorf("device %s: %w", d.addr, err)
			}
		}
	}
	now := time.Now()
	for i := range per {
		var w store.Work
		for _, d := range devs {
			ipm := &emsd.IPM{Heading: emsd.Heading{Originator: emsd.RFC822OR("carol@example.com"),
				Recipients: []emsd.RecipientData{{Recipient: emsd.LocalOR(d.addr, "")}},
				Subject:    fmt.Sprintf("message %d", i)}, Body: &emsd.Body{Text: textBody(200)}}
			content, err := ipm.Marshal(emsd.Options{})
			if err != nil {
				return err
			}
			w.Deliveries = append(w.Deliveries, store.NewDelivery{Device: uint32(d.addr),
				// The store's form of an RFC 822 message id (server/ids.go).
				MessageID:   fmt.Sprintf("R:<fleet.%d.%d@%s>", d.addr, i, benchDomain),
				ContentType: uint32(emsd.ContentIPM), Content: content, Priority: 1,
				NextAttempt: now, Expires: now.Add(time.Hour)})
		}
		if err := db.Enqueue(ctx, w); err != nil {
			return fmt.Errorf("queue: %w", err)
		}
	}
	return nil
}

// column is metric m of each result.
func column(rs []Result, m string) []float64 {
	var out []float64
	for _, r := range rs {
		if v, ok := r.Metrics[m]; ok {
			out = append(out, v)
		}
	}
	return out
}

// pairRatio is, round by round, metric m of a divided by that of b.
func pairRatio(a, b []Result, m string) []float64 {
	var out []float64
	for i := range min(len(a), len(b)) {
		x, okx := a[i].Metrics[m]
		y, oky := b[i].Metrics[m]
		if okx && oky && y > 0 {
			out = append(out, x/y)
		}
	}
	return out
}

// quartiles are the first quartile, the median and the third quartile of
// vs (linear interpolation between the order statistics).
func quartiles(vs []float64) (q1, med, q3 float64) {
	s := slices.Sorted(slices.Values(vs))
	q := func(p float64) float64 {
		if len(s) == 0 {
			return 0
		}
		x := p * float64(len(s)-1)
		i := int(x)
		if i+1 >= len(s) {
			return s[len(s)-1]
		}
		return s[i] + (x-float64(i))*(s[i+1]-s[i])
	}
	return q(0.25), q(0.5), q(0.75)
}

func median(vs []float64) float64 {
	_, m, _ := quartiles(vs)
	return m
}

func ratioList(vs []float64) string {
	var out []string
	for _, v := range vs {
		out = append(out, fmt.Sprintf("%.2f", v))
	}
	return strings.Join(out, ", ")
}
