package esrodtls

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/esro"
)

// echoPerformer serves SAP 13 (3-way) on srv, answering each INVOKE with
// its data repeated times over (more than 1: more than it received, which
// the amplification limit would withhold from an unproven source).
func echoPerformer(t testing.TB, srv *Conn, cfg *esro.Config, repeat int) *esro.Endpoint {
	t.Helper()
	ep, err := esro.NewEndpoint(srv, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ep.Close() })
	ep.HandleFunc(13, esro.ThreeWay, func(_ context.Context, w esro.ResponseWriter, inv *esro.Invocation) {
		w.Result(inv.Encoding, bytes.Repeat(inv.Data, repeat))
	})
	return ep
}

// invokers opens n client sessions to srv, all from 127.0.0.1, each under
// an endpoint of its own, and waits until every session carries an
// invocation.
func invokers(t testing.TB, srv *Conn, n int, cfg *esro.Config) []*esro.Endpoint {
	t.Helper()
	eps := make([]*esro.Endpoint, n)
	for i := range eps {
		cl, err := NewClient(Config{Logger: slog.New(slog.DiscardHandler),
			Credentials: func(netip.AddrPort) (string, []byte, error) { return devIdent, devKey, nil }})
		if err != nil {
			t.Fatal(err)
		}
		if eps[i], err = esro.NewEndpoint(cl, cfg); err != nil {
			cl.Close()
			t.Fatal(err)
		}
		t.Cleanup(func() { eps[i].Close() })
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		_, err = eps[i].Invoke(ctx, &esro.Request{To: addrOf(srv), SAP: 13, Handshake: esro.ThreeWay, Data: []byte("open")})
		cancel()
		if err != nil {
			t.Fatalf("session %d: %v", i, err)
		}
	}
	return eps
}

// Many invocations at once, over sessions that all come from one address,
// are performed at once: the engine counts DTLS peers as proven, so none
// of its caps on unproven sources (set to one here) drops an INVOKE to
// wait for a retransmission. That cap, per address, is what held the DTLS
// benchmark at a flat rate. The timers are long, so any INVOKE or RESULT
// the engine held back would show as a retransmission.
func TestConcurrentInvocationsNotCapped(t *testing.T) {
	cfg := &esro.Config{Timers: esro.CompiledTimers(), Logger: slog.New(slog.DiscardHandler),
		MaxUnproven: 1, MaxUnprovenPerPrefix: 1, MaxUnprovenPerAddr: 1}
	srv := listen(t, Config{Logger: slog.New(slog.DiscardHandler)})
	perf := echoPerformer(t, srv, cfg, 4)
	eps := invokers(t, srv, 4, cfg)
	const perSession = 16
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	var failed atomic.Int64
	for _, ep := range eps {
		for i := range perSession {
			wg.Go(func() {
				data := []byte{byte(i), 'x'}
				res, err := ep.Invoke(ctx, &esro.Request{To: addrOf(srv), SAP: 13, Operation: 1, Handshake: esro.ThreeWay, Data: data})
				if err != nil {
					t.Errorf("invoke: %v", err)
					failed.Add(1)
				} else if !bytes.Equal(res.Data, bytes.Repeat(data, 4)) {
					t.Errorf("result %q", res.Data)
				}
			})
		}
	}
	wg.Wait()
	ps := perf.Stats()
	if d := ps.Drops[esro.DropUnprovenLimit]; d != 0 {
		t.Errorf("performer dropped %d INVOKEs over the unproven caps", d)
	}
	if ps.Withheld != 0 || ps.InFlightUnproven != 0 {
		t.Errorf("performer withheld %d datagrams, %d invocations unproven", ps.Withheld, ps.InFlightUnproven)
	}
	if n := int(ps.InvokesReceived); n != len(eps)*(perSession+1) {
		t.Errorf("performer received %d invocations, want %d", n, len(eps)*(perSession+1))
	}
	var retx uint64
	for _, ep := range eps {
		retx += ep.Stats().Retransmissions
	}
	if retx != 0 {
		t.Errorf("invokers retransmitted %d times", retx)
	}
}

// BenchmarkInvokeOverDTLS measures complete 3-way invocations (64-octet
// argument) over DTLS on loopback: c concurrent invokers taking turns over
// 64 sessions, each a client Conn of its own, all from 127.0.0.1, to one
// performer with the engine's default caps. Before the engine counted
// DTLS peers as proven, the per-address cap on unproven sources held this
// near 1 800/s at any c; drops/op shows INVOKEs dropped over such caps,
// retransmissions/op what any loss cost.
func BenchmarkInvokeOverDTLS(b *testing.B) {
	for _, c := range []int{1, 16, 256} {
		b.Run(fmt.Sprintf("c=%d", c), func(b *testing.B) { benchInvokeDTLS(b, c) })
	}
}

func benchInvokeDTLS(b *testing.B, conc int) {
	cfg := &esro.Config{Logger: slog.New(slog.DiscardHandler), PerformerTimeout: 5 * time.Second,
		Timers: esro.Timers{Acknowledgement: time.Millisecond, Roundtrip: 2 * time.Millisecond,
			Retransmit: 50 * time.Millisecond, NSDULifetime: time.Millisecond, RetransmitCount: 5},
		// All sessions come from 127.0.0.1 and the performer holds each
		// number after its confirm: the per-address cap meant against
		// floods would set the rate (as in esro's BenchmarkInvokeUDP).
		MaxPeerInvocations: 65536}
	srv := listen(b, Config{Logger: slog.New(slog.DiscardHandler)})
	perf := echoPerformer(b, srv, cfg, 1)
	eps := invokers(b, srv, 64, cfg)
	data := make([]byte, 64)
	to := addrOf(srv)
	var next, failed atomic.Int64
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	for range conc {
		wg.Go(func() {
			req := &esro.Request{To: to, SAP: 13, Handshake: esro.ThreeWay, Operation: 2, Data: data}
			for n := next.Add(1); n <= int64(b.N); n = next.Add(1) {
				if _, err := eps[n%int64(len(eps))].Invoke(context.Background(), req); err != nil {
					failed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	var retx uint64
	for _, ep := range eps {
		retx += ep.Stats().Retransmissions
	}
	ps := perf.Stats()
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "invocations/s")
	b.ReportMetric(float64(failed.Load())/float64(b.N), "failures/op")
	b.ReportMetric(float64(retx+ps.Retransmissions)/float64(b.N), "retransmissions/op")
	b.ReportMetric(float64(ps.Drops[esro.DropUnprovenLimit])/float64(b.N), "drops/op")
}
