package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/mux"
	coapnet "github.com/plgd-dev/go-coap/v3/net"
	"github.com/plgd-dev/go-coap/v3/options"
	"github.com/plgd-dev/go-coap/v3/udp"
	udpclient "github.com/plgd-dev/go-coap/v3/udp/client"

	"github.com/esro-emsdp/emsdp/esro"
)

// clientSockets is how many client sockets the invokers take turns on, for
// ESRO and CoAP alike: a gateway standing in for many devices.
const clientSockets = 64

// esroSockets is that number for ESRO and raw UDP in the esro section
// (CoAP keeps clientSockets: with 256 of them go-coap v3 completed no
// request at 256 callers). An invoker holds each of the 256 reference numbers per peer for
// T_ref + T_last + L after its invocation (about 355 ms with
// loopbackTimers, docs/protocol.md ESRO §6), so n sockets cap the rate at
// n × 256 / 0.355 s: 46 000/s with 64, which the engine reaches; 185 000/s
// with 256, above what this section measures.
const esroSockets = 256

// serverRcvBuf is the kernel receive buffer of the ESRO performer's and
// the raw-UDP server's socket, as a server serving many callers is given
// (emsd.receive_buffer): with the system's default (208 KiB, some 200
// small datagrams) the INVOKEs and ACKs of 256 callers overflow it, and
// each drop costs ESRO a retransmission interval.
const serverRcvBuf = 4 << 20

// listenServer opens the performer's endpoint on loopback with a receive
// buffer of serverRcvBuf.
func listenServer(cfg *esro.Config) (*esro.Endpoint, error) {
	conn, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, err
	}
	if _, err := esro.SetReceiveBuffer(conn, serverRcvBuf); err != nil {
		conn.Close()
		return nil, err
	}
	ep, err := esro.NewEndpoint(conn, cfg)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return ep, nil
}

// loopbackTimers are ESRO timers for loopback: a retry budget of about
// 0.4 s and reference holds of a few hundred milliseconds.
var loopbackTimers = esro.Timers{Acknowledgement: time.Millisecond, Roundtrip: 2 * time.Millisecond,
	Retransmit: 50 * time.Millisecond, NSDULifetime: time.Millisecond, RetransmitCount: 5}

func runESROvsCoAP(ctx context.Context, o *benchOptions) (*report, error) {
	concs := []int{1, 16, 256}
	sizes := []int{64, 1400}
	var out []Result
	for _, size := range sizes {
		for _, c := range concs {
			coap, err := coapLoad(ctx, o, size, c)
			if err != nil {
				return nil, fmt.Errorf("coap: %w", err)
			}
			for _, hs := range []esro.Handshake{esro.TwoWay, esro.ThreeWay} {
				raw, err := rawLoad(ctx, o, hs, size, c)
				if err != nil {
					return nil, fmt.Errorf("raw udp: %w", err)
				}
				st, err := esroLoad(ctx, o, hs, size, c)
				if err != nil {
					return nil, fmt.Errorf("esro: %w", err)
				}
				r := newResult("esro", fmt.Sprintf("ESRO %v", hs), "payload", fmt.Sprintf("%d B", size), "concurrency", fmt.Sprint(c))
				fill(&r, st)
				r.set("syscalls/op", st.perOp(st.calls), "")
				r.set("vs raw UDP", 100*st.rate()/raw.rate(), "%")
				r.set("ratio to CoAP", st.rate()/coap.rate(), "×")
				out = append(out, r)
				r = newResult("esro", fmt.Sprintf("raw UDP %d-datagram", hs), "payload", fmt.Sprintf("%d B", size), "concurrency", fmt.Sprint(c))
				fill(&r, raw)
				r.set("syscalls/op", raw.perOp(raw.calls), "")
				r.set("vs raw UDP", 100, "%")
				r.set("ratio to CoAP", raw.rate()/coap.rate(), "×")
				out = append(out, r)
			}
			r := newResult("esro", "CoAP CON POST", "payload", fmt.Sprintf("%d B", size), "concurrency", fmt.Sprint(c))
			fill(&r, coap)
			r.set("ratio to CoAP", 1, "×")
			out = append(out, r)
		}
	}
	return &report{tables: []table{{results: out}}, notes: []string{
		fmt.Sprintf("Closed loop: `concurrency` callers each wait for their answer before the next request; %v warm-up, then %v measured per row. "+
			"Echo of the argument; ops/s counts completed operations, p50/p99 their latency; `failed` are operations that ended without a reply.",
			o.duration/4, o.duration),
		fmt.Sprintf("Both sides in one process on loopback UDP; callers take turns over %d client sockets (a gateway standing in for many devices; CoAP %d, see the code). "+
			"CoAP: go-coap v3 confirmable POST, piggybacked response, no blockwise transfer. "+
			"ESRO timers: A 1 ms, RT 2 ms, R 50 ms, L 1 ms, N 5 on both ends (an invoker holds each of 256 reference numbers per peer about 355 ms: %d sockets cap ESRO near %d 000 invocations/s). "+
			"The performer's echo runs inline on its read loop (`HandleInline`), as the raw-UDP server's does; the clients are its trusted peers (`Trust`). "+
			"The ESRO performer's and the raw-UDP server's sockets have a 4 MiB receive buffer (`esro.SetReceiveBuffer`), as a server's should.", esroSockets, clientSockets, esroSockets, esroSockets*256*1000/355/1000),
		"raw UDP: the same exchange on plain sockets, run right before its ESRO row with the same payload, concurrency and client sockets: " +
			"request and echoed reply (2-datagram), plus an ACK from the client's reader when the reply arrives (3-datagram); " +
			"one recvfrom or sendto per datagram, no retransmission, no state. `vs raw UDP` is the ESRO row's ops/s as a share of it.",
		"allocs/op: heap allocations of the whole process (both ends and the load loop) per completed operation; " +
			"syscalls/op: socket system calls of both ends per completed operation, reads that found nothing waiting included (not counted for CoAP).",
	}}, nil
}

func fill(r *Result, st loadStats) {
	r.set("ops/s", st.rate(), "1/s")
	r.set("p50", ms(st.pct(50)), "ms")
	r.set("p99", ms(st.pct(99)), "ms")
	r.set("failed", float64(st.failed), "")
	r.set("allocs/op", st.perOp(st.mallocs), "")
}

func esroLoad(ctx context.Context, o *benchOptions, hs esro.Handshake, size, conc int) (loadStats, error) {
	cfg := &esro.Config{Timers: loopbackTimers, PerformerTimeout: 5 * time.Second, Logger: o.log,
		// All client sockets share 127.0.0.1, and the performer holds each
		// number for T_ref (about 250 ms here) after its confirm: at 20 000
		// operations/s that is some 5 000 held per address, over the
		// default per-address cap (4 096) meant against floods. With it the
		// cap, not the engine, would set the rate (FAILURE(1) answers).
		MaxPeerInvocations: 65536}
	perf, err := listenServer(cfg)
	if err != nil {
		return loadStats{}, err
	}
	defer perf.Close()
	// The echo never blocks: it runs inline, on the read loop (HandleInline).
	perf.HandleInline(13, hs, esro.HandlerFunc(func(_ context.Context, w esro.ResponseWriter, inv *esro.Invocation) {
		w.Result(inv.Encoding, inv.Data)
	}))
	to := netip.MustParseAddrPort(perf.LocalAddr().String())
	clients := make([]*esro.Endpoint, esroSockets)
	for i := range clients {
		if clients[i], err = esro.Listen("udp", "127.0.0.1:0", cfg); err != nil {
			return loadStats{}, err
		}
		defer clients[i].Close()
		// The clients are the performer's known peers: unproven sources
		// would be held to the caps meant against floods (512 in flight
		// per address), and those, not the engine, would set the rate.
		perf.Trust(netip.MustParseAddrPort(clients[i].LocalAddr().String()))
	}
	data := make([]byte, size)
	calls := func() uint64 {
		n := perf.Stats().SocketCalls
		for _, c := range clients {
			n += c.Stats().SocketCalls
		}
		return n
	}
	st := closedLoopCounted(ctx, conc, o.duration/4, o.duration, calls, func(ctx context.Context, _ int, seq int64) error {
		_, err := clients[seq%esroSockets].Invoke(ctx, &esro.Request{To: to, SAP: 13, Handshake: hs, Operation: 2, Data: data})
		return err
	})
	return st, nil
}

func coapLoad(ctx context.Context, o *benchOptions, size, conc int) (loadStats, error) {
	r := mux.NewRouter()
	if err := r.Handle("/echo", mux.HandlerFunc(func(w mux.ResponseWriter, m *mux.Message) {
		body, _ := m.ReadBody()
		w.SetResponse(codes.Changed, message.AppOctets, bytes.NewReader(body))
	})); err != nil {
		return loadStats{}, err
	}
	l, err := coapnet.NewListenUDP("udp", "127.0.0.1:0")
	if err != nil {
		return loadStats{}, err
	}
	// One datagram per message both ways, like ESRO: no blockwise transfer.
	s := udp.NewServer(options.WithMux(r), options.WithBlockwise(false, 0, 0))
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	defer func() { s.Stop(); <-done; l.Close() }()
	addr := l.LocalAddr().String()
	clients := make([]*udpclient.Conn, clientSockets)
	for i := range clients {
		if clients[i], err = udp.Dial(addr, options.WithBlockwise(false, 0, 0)); err != nil {
			return loadStats{}, err
		}
		defer clients[i].Close()
	}
	payload := make([]byte, size)
	st := closedLoopCounted(ctx, conc, o.duration/4, o.duration, nil, func(ctx context.Context, _ int, seq int64) error {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		c := clients[seq%clientSockets]
		resp, err := c.Post(ctx, "/echo", message.AppOctets, bytes.NewReader(payload))
		if err != nil {
			return err
		}
		c.ReleaseMessage(resp)
		return nil
	})
	return st, nil
}
