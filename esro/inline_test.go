package esro

import (
	"context"
	"errors"
	"net/netip"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/internal/lossynet"
)

// Inline handlers answer over real UDP in both handshakes, and over the
// in-memory network (the generic path), from the read loop itself.
func TestHandleInline(t *testing.T) {
	loop := func(t *testing.T, perf, inv *Endpoint, to netip.AddrPort) {
		// A reply longer than the INVOKE is more than an unproven
		// source may be sent (AmplificationFactor 1).
		perf.Trust(netip.MustParseAddrPort(inv.LocalAddr().String()))
		var calls [2]int // by handshake, written on the read loop only
		for i, hs := range []Handshake{TwoWay, ThreeWay} {
			sap := uint8(3 + i)
			if err := perf.HandleInline(sap, hs, HandlerFunc(func(ctx context.Context, w ResponseWriter, in *Invocation) {
				calls[i]++
				if ctx.Err() != nil {
					t.Errorf("context ended: %v", ctx.Err())
				}
				if err := w.Result(in.Encoding, append([]byte("re:"), in.Data...)); err != nil {
					t.Errorf("result: %v", err)
				}
			})); err != nil {
				t.Fatal(err)
			}
			for n := range 20 {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				r, err := inv.Invoke(ctx, &Request{To: to, SAP: sap, Handshake: hs, Operation: 1, Data: []byte{byte(n)}})
				cancel()
				if err != nil || string(r.Data) != "re:"+string([]byte{byte(n)}) {
					t.Fatalf("%v #%d: %v %v\nperf %+v\ninv %+v", hs, n, r, err, perf.Stats(), inv.Stats())
				}
			}
		}
		perf.Close() // waits for the read loop: calls is settled
		if calls != [2]int{20, 20} {
			t.Fatalf("handler runs %v, want 20 each", calls)
		}
		if s := perf.Stats(); s.AnswersSent != 40 {
			t.Fatalf("answers sent %d", s.AnswersSent)
		}
	}
	t.Run("udp", func(t *testing.T) {
		perf, err := Listen("udp", "127.0.0.1:0", &Config{Logger: quiet})
		if err != nil {
			t.Fatal(err)
		}
		defer perf.Close()
		inv, err := Listen("udp", "127.0.0.1:0", &Config{Logger: quiet})
		if err != nil {
			t.Fatal(err)
		}
		defer inv.Close()
		loop(t, perf, inv, netip.MustParseAddrPort(perf.LocalAddr().String()))
	})
	t.Run("generic", func(t *testing.T) {
		p := newPair(t, lossynet.Config{}, nil)
		loop(t, p.perf, p.inv, p.perfAddr)
	})
}

// Confirmed would wait for the read loop the handler is running on: it
// fails at once with ErrInline, and the invocation still completes.
func TestInlineConfirmed(t *testing.T) {
	p := newPair(t, lossynet.Config{}, nil)
	got := make(chan error, 1)
	p.perf.HandleInline(13, ThreeWay, HandlerFunc(func(ctx context.Context, w ResponseWriter, in *Invocation) {
		w.Result(0, in.Data)
		got <- w.Confirmed(ctx)
	}))
	if _, err := p.inv.Invoke(context.Background(), p.req(13, ThreeWay, 1, "x")); err != nil {
		t.Fatal(err)
	}
	if err := <-got; !errors.Is(err, ErrInline) {
		t.Fatalf("Confirmed: %v, want ErrInline", err)
	}
}

// An inline handler may leave the answer to another goroutine: it goes
// out with a flush of its own. One that panics costs only its invocation.
func TestInlineLateAnswerAndPanic(t *testing.T) {
	p := newPair(t, lossynet.Config{}, func(c *Config) {
		c.PerformerTimeout = 200 * time.Millisecond
		c.Timers = Timers{Acknowledgement: time.Millisecond, Roundtrip: 2 * time.Millisecond,
			Retransmit: 20 * time.Millisecond, NSDULifetime: time.Millisecond, RetransmitCount: 2}
	})
	var wg sync.WaitGroup
	defer wg.Wait()
	p.perf.HandleInline(13, TwoWay, HandlerFunc(func(ctx context.Context, w ResponseWriter, in *Invocation) {
		if string(in.Data) == "panic" {
			panic("handler bug")
		}
		data := append([]byte(nil), in.Data...)
		wg.Go(func() {
			time.Sleep(5 * time.Millisecond)
			if err := w.Result(0, data); err != nil {
				t.Errorf("late result: %v", err)
			}
		})
	}))
	r, err := p.inv.Invoke(context.Background(), p.req(13, TwoWay, 1, "later"))
	if err != nil || string(r.Data) != "later" {
		t.Fatalf("late answer: %v %v", r, err)
	}
	var f *Failure
	if _, err := p.inv.Invoke(context.Background(), p.req(13, TwoWay, 1, "panic")); !errors.As(err, &f) {
		t.Fatalf("panicking handler: %v, want a failure", err)
	}
	r, err = p.inv.Invoke(context.Background(), p.req(13, TwoWay, 1, "again"))
	if err != nil || string(r.Data) != "again" {
		t.Fatalf("after the panic: %v %v", r, err)
	}
}

// Handlers run on workers that stay for later invocations: a burst leaves
// at most maxIdleWorkers of them, and Close takes them all down (goleak
// checks the rest).
func TestHandlerWorkers(t *testing.T) {
	p := newPair(t, lossynet.Config{}, func(c *Config) { c.MaxPeerInvocations = 1 << 16 })
	release := make(chan struct{})
	p.perf.Handle(13, TwoWay, HandlerFunc(func(ctx context.Context, w ResponseWriter, in *Invocation) {
		<-release // all in flight at once: one worker each
		w.Result(0, in.Data)
	}))
	const burst = 3 * maxIdleWorkers
	base := runtime.NumGoroutine()
	var wg sync.WaitGroup
	for i := range burst {
		wg.Go(func() {
			if _, err := p.inv.Invoke(context.Background(), p.req(13, TwoWay, 1, string(rune('a'+i%26)))); err != nil {
				t.Errorf("invoke %d: %v", i, err)
			}
		})
	}
	deadline := time.Now().Add(10 * time.Second)
	for p.perf.Stats().InvokesReceived < burst && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if n := runtime.NumGoroutine() - base; n < burst { // invokers + workers
		t.Fatalf("%d goroutines for %d blocked handlers and their invokers", n, burst)
	}
	close(release)
	wg.Wait()
	idle := func() int { return int(p.perf.idle.Load()) }
	for idle() < maxIdleWorkers && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if idle() != maxIdleWorkers {
		t.Fatalf("%d idle workers, want %d", idle(), maxIdleWorkers)
	}
	// Steady load reuses them: no new worker for sequential invocations.
	before := runtime.NumGoroutine()
	for range 50 {
		if _, err := p.inv.Invoke(context.Background(), p.req(13, TwoWay, 1, "seq")); err != nil {
			t.Fatal(err)
		}
	}
	if after := runtime.NumGoroutine(); after > before {
		t.Fatalf("goroutines grew from %d to %d under sequential load", before, after)
	}
}
