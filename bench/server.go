package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/ua"
)

// serverTimers are ESRO timers for the throughput runs on both ends.
// Holds must be short: a device can have 256 reference numbers held
// towards the server (docs/protocol.md ESRO §4), each for about T_ref + T_last + L
// after its submission (here 0.35 s), which caps one device at some 700
// submissions/s; and T_noresp (0.37 s) must cover a durable SQLite commit
// on a busy machine.
var serverTimers = esro.Timers{Acknowledgement: 5 * time.Millisecond, Roundtrip: 20 * time.Millisecond,
	Retransmit: 50 * time.Millisecond, NSDULifetime: 10 * time.Millisecond, RetransmitCount: 4}

func runServer(ctx context.Context, o *benchOptions) (*report, error) {
	thr, err := serverThroughput(ctx, o)
	if err != nil {
		return nil, err
	}
	mem, err := inflightMemory(ctx, o)
	if err != nil {
		return nil, err
	}
	return &report{tables: []table{
		{caption: "Submissions per second through the server (each a durable SQLite commit before its RESULT).", results: thr},
		{caption: "Memory per 1000 invocations in flight (one ESRO endpoint).", results: mem},
	}, notes: []string{
		fmt.Sprintf("Throughput: a real `server.Start` (SQLite store in a temporary directory, synchronous=FULL) and N devices on loopback, "+
			"each a `ua.Client` on its own socket submitting a %d-octet message (body 200 octets, one recipient on the Internet, "+
			"password checked) in a closed loop: %v warm-up, %v measured. No smarthost, so the relay queue only grows and nothing competes. "+
			"ESRO timers A 5 ms, RT 20 ms, R 50 ms, L 10 ms, N 4 on both ends.", submitMessageLen(), o.duration/4, o.duration),
		"Memory: 1000 3-way invocations held in flight on one endpoint with shipped timers, 200-octet arguments. " +
			"Performer: the INVOKEs come from plain sockets and the handler has not answered (one goroutine each, as the API gives every invocation). " +
			"Invoker: 1000 goroutines blocked in Invoke towards sockets that never answer. " +
			"Go heap = live heap objects after GC; stacks = goroutine stacks; RSS = resident set from /proc/self/statm " +
			"(after returning freed memory to the OS), all as differences from before.",
	}}, nil
}

func submitMessage() *ua.Message {
	return &ua.Message{To: []string{internetRcp}, Subject: subject, Body: textBody(200)}
}

// submitMessageLen is the size of the message as Internet mail.
func submitMessageLen() int {
	b, err := rfc5322(submitMessage(), sender, "<EMSD.00000001.00000001@"+benchDomain+">")
	if err != nil {
		return 0
	}
	return len(b)
}

func serverThroughput(ctx context.Context, o *benchOptions) ([]Result, error) {
	concs := []int{1, 8, 32}
	specs := make([]deviceSpec, concs[len(concs)-1])
	for i := range specs {
		specs[i] = deviceSpec{addr: emsd.Address(200000 + i), password: devPassword}
	}
	h, err := startEMSD(ctx, specs, harnessOptions{timers: serverTimers, log: o.srvLog})
	if err != nil {
		return nil, err
	}
	defer h.Close(ctx)
	msg := submitMessage()
	var out []Result
	for _, c := range concs {
		var waits0 uint64
		for _, d := range h.devs[:c] {
			waits0 += d.ep.Stats().ReferenceWaits
		}
		st := closedLoop(ctx, c, o.duration/4, o.duration, func(ctx context.Context, w int, _ int64) error {
			ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			_, err := h.devs[w].ua.Submit(ctx, msg)
			return err
		})
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		var waits uint64
		for _, d := range h.devs[:c] {
			waits += d.ep.Stats().ReferenceWaits
		}
		r := newResult("server", "EMSD submit via ua.Client", "devices", strconv.Itoa(c))
		r.set("submissions/s", st.rate(), "1/s")
		r.set("p50", ms(st.pct(50)), "ms")
		r.set("p99", ms(st.pct(99)), "ms")
		r.set("failed", float64(st.failed), "")
		// Waits for a free reference number would mean the timers, not the
		// server, set the rate.
		r.set("reference waits", float64(waits-waits0), "")
		out = append(out, r)
	}
	return out, nil
}

// ---- memory per invocation in flight ----

const inflight = 1000

// memStat is the process's memory at one moment.
type memStat struct{ heap, stacks, rss uint64 }

func readMem() (memStat, error) {
	// Twice: the first cycle may leave finalizers whose objects the second
	// frees. FreeOSMemory also forces a GC and returns freed pages, so that
	// RSS differences show what is in use rather than what was once.
	runtime.GC()
	debug.FreeOSMemory()
	s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}, {Name: "/memory/classes/heap/stacks:bytes"}}
	metrics.Read(s)
	m := memStat{heap: s[0].Value.Uint64(), stacks: s[1].Value.Uint64()}
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return m, fmt.Errorf("resident memory: %w", err)
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return m, fmt.Errorf("resident memory: short /proc/self/statm")
	}
	pages, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		return m, fmt.Errorf("resident memory: %w", err)
	}
	m.rss = pages * uint64(os.Getpagesize())
	return m, nil
}

func memResult(name string, before, after memStat, rssOK bool) Result {
	r := newResult("server", name, "invocations", strconv.Itoa(inflight), "handshake", "3-way")
	kib := func(a, b uint64) float64 { return (float64(b) - float64(a)) / 1024 * 1000 / inflight }
	r.set("Go heap per 1000", kib(before.heap, after.heap), "KiB")
	r.set("stacks per 1000", kib(before.stacks, after.stacks), "KiB")
	if rssOK {
		r.set("RSS per 1000", kib(before.rss, after.rss), "KiB")
	}
	r.set("heap per invocation", (float64(after.heap)-float64(before.heap))/inflight, "B")
	return r
}

func inflightMemory(ctx context.Context, o *benchOptions) ([]Result, error) {
	perf, err := memPerformer(ctx, o)
	if err != nil {
		return nil, fmt.Errorf("performer: %w", err)
	}
	inv, err := memInvoker(ctx, o)
	if err != nil {
		return nil, fmt.Errorf("invoker: %w", err)
	}
	return []Result{perf, inv}, nil
}

// memPerformer holds inflight performer invocations whose handler has not
// answered yet, as an EMSD server does while its store commits.
func memPerformer(ctx context.Context, o *benchOptions) (Result, error) {
	// All from one address that never proves itself: the unproven caps
	// are lifted to the figure measured.
	ep, err := esro.Listen("udp", "127.0.0.1:0", &esro.Config{Logger: o.log,
		MaxUnproven: inflight, MaxUnprovenPerPrefix: inflight, MaxUnprovenPerAddr: inflight})
	if err != nil {
		return Result{}, err
	}
	defer ep.Close()
	var started atomic.Int64
	ep.HandleFunc(5, esro.ThreeWay, func(ctx context.Context, _ esro.ResponseWriter, _ *esro.Invocation) {
		started.Add(1)
		<-ctx.Done() // Close cancels it
	})
	to := ep.LocalAddr().(*net.UDPAddr)
	// 256 reference numbers per invoker socket (docs/protocol.md ESRO §4).
	socks := make([]*net.UDPConn, (inflight+255)/256)
	for i := range socks {
		if socks[i], err = net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
			return Result{}, err
		}
		defer socks[i].Close()
	}
	before, rssErr := readMem()
	arg := make([]byte, 200)
	for i := range inflight {
		pdu, err := esro.AppendPDU(nil, &esro.PDU{Type: esro.TypeInvoke, SAP: 5, Ref: uint8(i), Operation: 33, Data: arg})
		if err != nil {
			return Result{}, err
		}
		if _, err := socks[i/256].WriteToUDP(pdu, to); err != nil {
			return Result{}, err
		}
		if i%64 == 63 {
			// Keep well within the socket's receive buffer.
			if err := waitFor(ctx, func() bool { return started.Load() > int64(i)-32 }); err != nil {
				return Result{}, err
			}
		}
	}
	if err := waitFor(ctx, func() bool { return started.Load() == inflight && ep.Stats().InFlightPerformer == inflight }); err != nil {
		return Result{}, fmt.Errorf("%d of %d invocations started: %w", started.Load(), inflight, err)
	}
	after, err := readMem()
	if err != nil && rssErr == nil {
		rssErr = err
	}
	return memResult("ESRO performer, handler not yet answered", before, after, rssErr == nil), nil
}

// memInvoker holds inflight invoker invocations waiting for a reply.
func memInvoker(ctx context.Context, o *benchOptions) (Result, error) {
	ep, err := esro.Listen("udp", "127.0.0.1:0", &esro.Config{Logger: o.log})
	if err != nil {
		return Result{}, err
	}
	defer ep.Close()
	sinks := make([]netip.AddrPort, (inflight+255)/256)
	for i := range sinks {
		c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			return Result{}, err
		}
		// Never read: the kernel drops what does not fit its buffer.
		defer c.Close()
		sinks[i] = c.LocalAddr().(*net.UDPAddr).AddrPort()
	}
	before, rssErr := readMem()
	ictx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	arg := make([]byte, 200)
	var unexpected atomic.Pointer[error]
	for i := range inflight {
		wg.Go(func() {
			_, err := ep.Invoke(ictx, &esro.Request{To: sinks[i/256], SAP: 5, Operation: 33, Handshake: esro.ThreeWay, Data: arg})
			if err != nil && !errors.Is(err, context.Canceled) {
				unexpected.CompareAndSwap(nil, &err)
			}
		})
	}
	if err := waitFor(ctx, func() bool { return ep.Stats().InFlightInvoker == inflight || unexpected.Load() != nil }); err != nil {
		return Result{}, err
	}
	if e := unexpected.Load(); e != nil {
		return Result{}, *e
	}
	after, err := readMem()
	if err != nil && rssErr == nil {
		rssErr = err
	}
	return memResult("ESRO invoker, Invoke waiting", before, after, rssErr == nil), nil
}

// waitFor polls cond until it holds, for at most 10 s.
func waitFor(ctx context.Context, cond func() bool) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for !cond() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Millisecond):
		}
	}
	return nil
}
