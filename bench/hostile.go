package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/ua"
)

// floodTimers are ESRO timers between the shipped ones and the throughput
// runs': short enough for a run of seconds, long enough (T_noresp 2.3 s)
// that a durable commit under a flood on two cores makes its deadline.
var floodTimers = esro.Timers{Acknowledgement: 20 * time.Millisecond, Roundtrip: 100 * time.Millisecond,
	Retransmit: 200 * time.Millisecond, NSDULifetime: 100 * time.Millisecond, RetransmitCount: 6}

func runHostile(ctx context.Context, o *benchOptions) (*report, error) {
	refl, err := reflection(ctx, o)
	if err != nil {
		return nil, fmt.Errorf("reflection: %w", err)
	}
	flood, err := floodWhileSubmitting(ctx, o)
	if err != nil {
		return nil, fmt.Errorf("flood: %w", err)
	}
	auth, err := authUnderLoad(ctx, o)
	if err != nil {
		return nil, fmt.Errorf("authentication: %w", err)
	}
	ttf, err := timeToFailure(ctx, o)
	if err != nil {
		return nil, fmt.Errorf("time to failure: %w", err)
	}
	tomb, err := tombstoneMemory(ctx, o)
	if err != nil {
		return nil, fmt.Errorf("tombstones: %w", err)
	}
	return &report{tables: []table{
		{caption: "Reflection: what comes back to a forged source, per kind of unsolicited datagram (goal ≤ 1.0).", results: refl},
		{caption: "Forged INVOKEs at full speed from 1024 addresses in 4 /24s while 16 registered devices submit.", results: flood},
		{caption: "Passwords: correct ones at once from one address on a fresh server; a guesser.", results: auth},
		{caption: "Time until an invocation to a closed port fails (goal ≤ 1.5 s).", results: ttf},
		{caption: "Memory of a refused invocation (tombstone), one ESRO endpoint.", results: tomb},
	}, notes: []string{
		fmt.Sprintf("Reflection: %d datagrams of each kind from one socket that never authenticates (a forged victim address), "+
			"each on its own reference number, then everything the target sends back in the next %v counted at that socket "+
			"(retransmissions included). serve: a real server with one registered device; esro perform: an endpoint answering "+
			"every INVOKE with the date (up to 29 octets, like `esro perform --reply date`); ua receive: a ua.Client whose MTS "+
			"is elsewhere. ESRO timers A 5 ms, RT 20 ms, R 50 ms, L 10 ms, N 4. The reference answered a 3-octet INVOKE with "+
			"9 retransmitted ERRORs (9.0×).", reflectCount(o), reflectWait(o)),
		"Flood: senders on 1024 loopback addresses (127.2.0.0/22) send 3-octet INVOKEs to SAPs 5 and 9 and, one in eight, a " +
			"submission with a registered device's address and a wrong password, as fast as 2 goroutines can; the 16 devices " +
			"(on 127.0.0.1, authenticated once before) submit in a closed loop with a 10 s deadline each. Server: `serve`'s " +
			"defaults (own socket, 4 MiB receive buffer), ESRO timers A 20 ms, RT 100 ms, R 200 ms, L 100 ms, N 6. RSS is the " +
			"whole benchmark process's peak (server, devices and flood senders). Before this work 81,920 such INVOKEs filled " +
			"the invocation table and every device's submission failed.",
		"Passwords: devices registered with bcrypt's default cost 10; the server checks on one worker (one CPU less than " +
			"the two). Shipped ESRO timers. The guesser sends 30 submissions with wrong passwords for one device, one after " +
			"another, from another address: the source limit is 10 failures, then 6 a minute. Before this work 20 concurrent " +
			"correct passwords from one address gave 3 to 8 refusals, answered as final.",
		"Time to failure: shipped timers (the first retransmission after 3 s, failure after 30 s without ICMP). " +
			"Before this work: 30.7 s (esro invoke) and 60.7 s (ua send).",
	}}, nil
}

// ---- flood while devices submit ----

func floodWhileSubmitting(ctx context.Context, o *benchOptions) ([]Result, error) {
	const ndev = 16
	specs := make([]deviceSpec, ndev)
	for i := range specs {
		specs[i] = deviceSpec{addr: emsd.Address(200000 + i), password: devPassword}
	}
	h, err := startEMSD(ctx, specs, harnessOptions{timers: floodTimers, plain: true, log: o.srvLog})
	if err != nil {
		return nil, err
	}
	defer h.Close(ctx)
	msg := submitMessage()
	submit := func(ctx context.Context, w int, _ int64) error {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		_, err := h.devs[w].ua.Submit(ctx, msg)
		return err
	}
	phase := max(o.duration, 2*time.Second)
	if !o.quick {
		phase = max(phase, 8*time.Second)
	}
	before := closedLoop(ctx, ndev, phase/4, phase/2, submit)

	// The flood.
	var senders []*net.UDPConn
	defer func() {
		for _, c := range senders {
			c.Close()
		}
	}()
	naddr := 1024
	if o.quick {
		naddr = 64
	}
	for i := range naddr {
		c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 2, byte(i/256), byte(i%256))})
		if err != nil {
			return nil, fmt.Errorf("flood socket: %w", err)
		}
		senders = append(senders, c)
	}
	forged := forgedSubmission(200000)
	fctx, stop := context.WithCancel(ctx)
	var sent atomic.Int64
	var wg sync.WaitGroup
	for g := range 2 {
		wg.Go(func() {
			n := g
			for fctx.Err() == nil {
				c := senders[n%len(senders)]
				ref := uint8(n / len(senders))
				var b []byte
				switch {
				case n%8 == 7:
					b, _ = esro.AppendPDU(nil, &esro.PDU{Type: esro.TypeInvoke, SAP: 5, Ref: ref, Operation: uint8(emsd.OpSubmission), Data: forged})
				case n%2 == 0:
					b = invokePDU(5, ref, nil)
				default:
					b = invokePDU(9, ref, nil)
				}
				if _, err := c.WriteToUDPAddrPort(b, h.addr); err == nil {
					sent.Add(1)
				}
				n += 2
			}
		})
	}
	var peakRSS uint64
	var peakTombs, peakUnproven int
	sample := func() {
		if m, err := readMemQuick(); err == nil {
			peakRSS = max(peakRSS, m)
		}
		st := h.srv.ESROStats()
		peakTombs = max(peakTombs, st.Tombstones)
		peakUnproven = max(peakUnproven, st.InFlightUnproven)
	}
	sctx, sstop := context.WithCancel(ctx)
	var swg sync.WaitGroup
	swg.Go(func() {
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-sctx.Done():
				return
			case <-t.C:
				sample()
			}
		}
	})
	st0 := h.srv.ESROStats()
	start := time.Now()
	during := closedLoop(ctx, ndev, 0, phase, submit)
	stop()
	wg.Wait()
	floodFor := time.Since(start)
	sstop()
	swg.Wait()
	st1 := h.srv.ESROStats()
	after := closedLoop(ctx, ndev, phase/4, phase/2, submit)
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	pct := func(l loadStats) float64 {
		if l.completed+l.failed == 0 {
			return 0
		}
		return 100 * float64(l.completed) / float64(l.completed+l.failed)
	}
	r := newResult("hostile", "16 devices submitting under a flood", "flood addresses", strconv.Itoa(naddr))
	r.set("flood datagrams/s", float64(sent.Load())/floodFor.Seconds(), "1/s")
	r.set("sent", float64(sent.Load()), "")
	r.set("received by the server", float64(st1.DatagramsReceived-st0.DatagramsReceived), "")
	r.set("dropped in the kernel", float64(st1.KernelDrops-st0.KernelDrops), "")
	r.set("submissions ok", pct(during), "%")
	r.set("failed", float64(during.failed), "")
	r.set("submissions/s before", before.rate(), "1/s")
	r.set("during", during.rate(), "1/s")
	r.set("after", after.rate(), "1/s")
	r.set("ok after", pct(after), "%")
	r.set("p99 during", ms(during.pct(99)), "ms")
	r.set("peak RSS", float64(peakRSS)/(1<<20), "MiB")
	r.set("peak tombstones", float64(peakTombs), "")
	r.set("peak unproven in flight", float64(peakUnproven), "")
	r.set("dropped over the unproven caps", float64(st1.Drops[esro.DropUnprovenLimit]-st0.Drops[esro.DropUnprovenLimit]), "")
	r.set("withheld", float64(st1.Withheld-st0.Withheld), "")
	return []Result{r}, nil
}

// readMemQuick is the resident set, without the GC readMem forces.
func readMemQuick() (uint64, error) {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return 0, err
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0, errors.New("short /proc/self/statm")
	}
	pages, err := strconv.ParseUint(f[1], 10, 64)
	return pages * uint64(os.Getpagesize()), err
}

// ---- authentication under load ----

func authUnderLoad(ctx context.Context, o *benchOptions) ([]Result, error) {
	n := 32
	if o.quick {
		n = 8
	}
	specs := make([]deviceSpec, n)
	for i := range specs {
		specs[i] = deviceSpec{addr: emsd.Address(200000 + i), password: fmt.Sprint(devPassword, i)}
	}
	h, err := startEMSD(ctx, specs, harnessOptions{timers: esro.ShippedTimers(), plain: true, cost: bcrypt.DefaultCost, log: o.srvLog})
	if err != nil {
		return nil, err
	}
	defer h.Close(ctx)
	msg := submitMessage()
	var wg sync.WaitGroup
	lat := make([]time.Duration, n)
	errs := make([]error, n)
	start := time.Now()
	for i, d := range h.devs {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
			defer cancel()
			_, errs[i] = d.ua.Submit(ctx, msg)
			lat[i] = time.Since(start)
		})
	}
	wg.Wait()
	refused, failed := 0, 0
	for _, err := range errs {
		var ue *ua.Error
		switch {
		case errors.As(err, &ue):
			refused++
		case err != nil:
			failed++
		}
	}
	slices.Sort(lat)
	r := newResult("hostile", "correct passwords at once, one address", "devices", strconv.Itoa(n))
	r.set("accepted", float64(n-refused-failed), "")
	r.set("refused", float64(refused), "")
	r.set("failed", float64(failed), "")
	r.set("last answer", ms(lat[len(lat)-1]), "ms")

	// A guesser from another address.
	gc, err := listenCountingUDP("127.0.0.9:0")
	if err != nil {
		return nil, err
	}
	gep, err := esro.NewEndpoint(gc, &esro.Config{Logger: o.log})
	if err != nil {
		gc.Close()
		return nil, err
	}
	defer gep.Close()
	guesser, err := ua.New(gep, ua.Config{Server: h.addr, Address: 200000, Password: "guess", Logger: o.log})
	if err != nil {
		return nil, err
	}
	defer guesser.Close()
	wrong, limited := 0, 0
	for range 30 {
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		_, err := guesser.Submit(cctx, msg)
		cancel()
		var ue *ua.Error
		if errors.As(err, &ue) {
			if ue.Transient() && ue.Code == emsd.CodeResource {
				limited++
			} else if ue.Code == emsd.CodeSecurity {
				wrong++
			}
		}
	}
	g := newResult("hostile", "guesser, 30 wrong passwords", "devices", "1")
	g.set("checked (wrong password)", float64(wrong), "")
	g.set("not checked (transient error)", float64(limited), "")
	return []Result{r, g}, nil
}

// ---- time to failure ----

func timeToFailure(ctx context.Context, o *benchOptions) ([]Result, error) {
	closed, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, err
	}
	to := closed.LocalAddr().(*net.UDPAddr).AddrPort()
	closed.Close()
	ep, err := esro.Listen("udp", "127.0.0.1:0", &esro.Config{Logger: o.log})
	if err != nil {
		return nil, err
	}
	defer ep.Close()
	var lats []time.Duration
	reason := ""
	for range 20 {
		cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		t0 := time.Now()
		_, err := ep.Invoke(cctx, &esro.Request{To: to, SAP: 13, Handshake: esro.ThreeWay, Data: []byte("x")})
		lats = append(lats, time.Since(t0))
		cancel()
		var f *esro.Failure
		if !errors.As(err, &f) {
			return nil, fmt.Errorf("invoke: %v", err)
		}
		reason = f.Reason.String()
	}
	slices.Sort(lats)
	r := newResult("hostile", "esro invoke to a closed port", "outcome", reason)
	r.set("median", ms(lats[len(lats)/2]), "ms")
	r.set("max", ms(lats[len(lats)-1]), "ms")

	uep, err := esro.Listen("udp", "127.0.0.1:0", &esro.Config{Logger: o.log})
	if err != nil {
		return nil, err
	}
	defer uep.Close()
	uc, err := ua.New(uep, ua.Config{Server: to, Address: 198036, Password: "pw", Logger: o.log})
	if err != nil {
		return nil, err
	}
	defer uc.Close()
	t0 := time.Now()
	cctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	_, err = uc.Submit(cctx, submitMessage())
	cancel()
	d := time.Since(t0)
	var f *esro.Failure
	out := "no failure"
	if errors.As(err, &f) {
		out = f.Reason.String()
	}
	u := newResult("hostile", "ua send to a stopped server", "outcome", out)
	u.set("median", ms(d), "ms")
	u.set("max", ms(d), "ms")
	return []Result{r, u}, nil
}

// ---- tombstone memory ----

func tombstoneMemory(ctx context.Context, o *benchOptions) ([]Result, error) {
	n := 20000
	if o.quick {
		n = 2560
	}
	ep, err := esro.Listen("udp", "127.0.0.1:0", &esro.Config{Logger: o.log,
		MaxUnproven: n, MaxUnprovenPerPrefix: n, MaxUnprovenPerAddr: n})
	if err != nil {
		return nil, err
	}
	defer ep.Close()
	var refused atomic.Int64
	ep.HandleFunc(5, esro.ThreeWay, func(_ context.Context, w esro.ResponseWriter, _ *esro.Invocation) {
		esro.Refuse(w, esro.EncodingBER, 4, []byte{2, 1, 4})
		refused.Add(1)
	})
	to := ep.LocalAddr().(*net.UDPAddr).AddrPort()
	socks := make([]*net.UDPConn, (n+255)/256)
	for i := range socks {
		if socks[i], err = net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
			return nil, err
		}
		defer socks[i].Close()
	}
	before, err := readMem()
	if err != nil {
		return nil, err
	}
	arg := make([]byte, 40)
	for i := range n {
		if _, err := socks[i/256].WriteToUDPAddrPort(invokePDU(5, uint8(i), arg), to); err != nil {
			return nil, err
		}
		if i%64 == 63 {
			if err := waitFor(ctx, func() bool { return refused.Load() > int64(i)-32 }); err != nil {
				return nil, err
			}
		}
	}
	if err := waitFor(ctx, func() bool { return refused.Load() == int64(n) }); err != nil {
		return nil, fmt.Errorf("%d of %d refused: %w", refused.Load(), n, err)
	}
	after, err := readMem()
	if err != nil {
		return nil, err
	}
	st := ep.Stats()
	r := newResult("hostile", "refused invocations kept as tombstones", "invocations", strconv.Itoa(n))
	r.set("tombstones", float64(st.Tombstones), "")
	r.set("in flight", float64(st.InFlightPerformer), "")
	r.set("heap per tombstone", (float64(after.heap)-float64(before.heap))/float64(max(st.Tombstones, 1)), "B")
	r.set("at the default cap (16384)", (float64(after.heap)-float64(before.heap))/float64(max(st.Tombstones, 1))*16384/(1<<20), "MiB")
	return []Result{r}, nil
}
