package esro

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/esro-emsdp/emsdp/internal/lossynet"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// pair is two endpoints on an in-memory network: inv invokes, perf performs.
type pair struct {
	net               *lossynet.Network
	invConn, perfConn *lossynet.Conn
	inv, perf         *Endpoint
	perfAddr          netip.AddrPort
}

func newPair(t *testing.T, ncfg lossynet.Config, mod func(*Config)) *pair {
	t.Helper()
	n := lossynet.New(ncfg)
	ic, err := n.Listen("127.0.0.1:2003")
	if err != nil {
		t.Fatal(err)
	}
	pc, err := n.Listen("127.0.0.1:2002")
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{Logger: quiet}
	if mod != nil {
		mod(&cfg)
	}
	ie, err := NewEndpoint(ic, &cfg)
	if err != nil {
		t.Fatal(err)
	}
	pe, err := NewEndpoint(pc, &cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ie.Close(); pe.Close() })
	return &pair{net: n, invConn: ic, perfConn: pc, inv: ie, perf: pe, perfAddr: pc.AddrPort()}
}

func (p *pair) req(sap uint8, hs Handshake, op uint8, data string) *Request {
	return &Request{To: p.perfAddr, SAP: sap, Operation: op, Encoding: 2, Handshake: hs, Data: []byte(data)}
}

// echo answers every invocation with its own argument and counts runs.
type echo struct {
	mu   sync.Mutex
	runs map[string]int
	conf atomic.Int64
}

func (e *echo) ServeESRO(ctx context.Context, w ResponseWriter, inv *Invocation) {
	e.mu.Lock()
	if e.runs == nil {
		e.runs = map[string]int{}
	}
	e.runs[string(inv.Data)]++
	e.mu.Unlock()
	if err := w.Result(inv.Encoding, inv.Data); err != nil {
		panic(err)
	}
	if w.Confirmed(ctx) == nil {
		e.conf.Add(1)
	}
}

// The acceptance run: 1000 3-way and 1000 2-way invocations through
// 30% loss each way, 10% duplication and 10% reordering all complete, and
// every handler runs exactly once. Runs on synctest's fake clock.
func TestLossyNetworkExactlyOnce(t *testing.T) {
	for _, hs := range []Handshake{ThreeWay, TwoWay} {
		for _, fixed := range []bool{false, true} {
			t.Run(fmt.Sprintf("%v fixed=%v", hs, fixed), func(t *testing.T) {
				synctest.Test(t, func(t *testing.T) {
					p := newPair(t, lossynet.Config{Loss: 0.3, Duplicate: 0.1, Reorder: 0.1, Delay: 5 * time.Millisecond, MaxDelay: 200 * time.Millisecond, Seed: uint64(hs)},
						func(c *Config) {
							// At 51% loss per round trip, 8 retries leave a
							// 0.2% chance per invocation of giving up, 20 a
							// chance of 7e-7 (one run in 1400 of 1000
							// invocations), 30 one of 2e-9.
							c.Timers = ShippedTimers()
							c.Timers.RetransmitCount = 30
							c.FixedTimers = fixed
						})
					// The invoker is a peer the performer knows (as the
					// server knows a device after its password): this run
					// is about exactly-once under loss, not about how an
					// unproven source fares under the reflection limit.
					p.perf.Trust(p.invConn.AddrPort())
					h := &echo{}
					p.perf.Handle(13, hs, h)
					const total, workers = 1000, 50
					var failed atomic.Int64
					var wg sync.WaitGroup
					for w := range workers {
						wg.Go(func() {
							for i := w; i < total; i += workers {
								id := fmt.Sprintf("inv-%04d", i)
								r, err := p.inv.Invoke(t.Context(), p.req(13, hs, 2, id))
								if err != nil || string(r.Data) != id {
									failed.Add(1)
									t.Errorf("%s: %v %v", id, r, err)
								}
							}
						})
					}
					wg.Wait()
					if failed.Load() != 0 {
						t.Fatalf("%d invocations failed", failed.Load())
					}
					h.mu.Lock()
					defer h.mu.Unlock()
					if len(h.runs) != total {
						t.Fatalf("%d distinct invocations performed, want %d", len(h.runs), total)
					}
					for id, n := range h.runs {
						if n != 1 {
							t.Fatalf("handler ran %d times for %s", n, id)
						}
					}
					ns := p.net.Stats()
					is, ps := p.inv.Stats(), p.perf.Stats()
					if ns.Lost == 0 || ns.Duplicated == 0 || ns.Reordered == 0 || is.Retransmissions == 0 || ps.DuplicatesIn == 0 {
						t.Fatalf("the network did not misbehave: %+v inv %+v", ns, is)
					}
					t.Logf("network %+v; invoker: %d sent, %d retransmissions; performer: %d retransmissions, %d duplicates",
						ns, is.InvokesSent, is.Retransmissions, ps.Retransmissions, ps.DuplicatesIn)
				})
			})
		}
	}
}

// Spec docs/protocol.md ESRO §9, reference scenarios 1xxx–6xxx on two engines.
func TestReferenceScenarios(t *testing.T) {
	fixed := func(c *Config) { c.FixedTimers = true }
	t.Run("1001 result and confirm", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p := newPair(t, lossynet.Config{}, fixed)
			h := &echo{}
			p.perf.Handle(13, ThreeWay, h)
			r, err := p.inv.Invoke(t.Context(), p.req(13, ThreeWay, 2, "date"))
			if err != nil || string(r.Data) != "date" || r.Encoding != 2 {
				t.Fatal(r, err)
			}
			synctest.Wait()
			if h.conf.Load() != 1 {
				t.Fatal("no RESULT.confirm at the performer")
			}
		})
	})
	t.Run("1002 error value 2 and confirm", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p := newPair(t, lossynet.Config{}, fixed)
			confirmed := make(chan error, 1)
			p.perf.HandleFunc(13, ThreeWay, func(ctx context.Context, w ResponseWriter, inv *Invocation) {
				w.Error(2, 2, []byte("Error response"))
				confirmed <- w.Confirmed(ctx)
			})
			_, err := p.inv.Invoke(t.Context(), p.req(13, ThreeWay, 2, "daten"))
			var er *ErrorReply
			if !errors.As(err, &er) || er.Value != 2 || string(er.Data) != "Error response" {
				t.Fatal(err)
			}
			if err := <-confirmed; err != nil {
				t.Fatalf("ERROR.confirm: %v", err)
			}
		})
	})
	t.Run("1003 failure 1 when the performer is out of resources", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p := newPair(t, lossynet.Config{}, func(c *Config) { c.FixedTimers = true; c.MaxPeerInvocations = 1 })
			p.perf.HandleFunc(13, ThreeWay, func(ctx context.Context, w ResponseWriter, inv *Invocation) {
				if string(inv.Data) == "first" {
					w.Result(0, nil)
				}
			})
			if _, err := p.inv.Invoke(t.Context(), p.req(13, ThreeWay, 2, "first")); err != nil {
				t.Fatal(err)
			}
			_, err := p.inv.Invoke(t.Context(), p.req(13, ThreeWay, 2, "second"))
			var f *Failure
			if !errors.As(err, &f) || f.Reason != LocalResource || !f.Remote {
				t.Fatalf("got %v", err)
			}
		})
	})
	t.Run("1004 1005 silent performer then unbind: failure 2", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p := newPair(t, lossynet.Config{}, fixed)
			got := make(chan struct{})
			p.perf.HandleFunc(13, ThreeWay, func(ctx context.Context, w ResponseWriter, inv *Invocation) {
				close(got)
				<-ctx.Done()
				if !errors.Is(context.Cause(ctx), ErrSAPNotBound) {
					t.Errorf("handler context ended by %v", context.Cause(ctx))
				}
			})
			go func() { <-got; p.perf.Unbind(13) }()
			start := time.Now()
			_, err := p.inv.Invoke(t.Context(), p.req(13, ThreeWay, 2, "date"))
			var f *Failure
			if !errors.As(err, &f) || f.Reason != UserNotResponding {
				t.Fatalf("got %v", err)
			}
			if d := time.Since(start); d != 31200*time.Millisecond {
				t.Fatalf("failure after %v, want (N+1)·T_retx + T_last = 31.2s", d)
			}
			if n := p.inv.Stats().Retransmissions; n != 8 {
				t.Fatalf("%d retransmissions, want 8", n)
			}
		})
	})
	t.Run("2002 remote SAP 16 refused locally", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p := newPair(t, lossynet.Config{}, fixed)
			if _, err := p.inv.Invoke(t.Context(), p.req(16, ThreeWay, 2, "x")); err == nil {
				t.Fatal("accepted")
			}
			if p.inv.Stats().DatagramsSent != 0 {
				t.Fatal("something was sent")
			}
		})
	})
	t.Run("2003 2004 unreachable address and wrong port", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p := newPair(t, lossynet.Config{}, fixed)
			p.net.Record()
			r := p.req(13, ThreeWay, 2, "date")
			r.To = netip.MustParseAddrPort("127.0.0.1:2999")
			start := time.Now()
			_, err := p.inv.Invoke(t.Context(), r)
			var f *Failure
			if !errors.As(err, &f) || f.Reason != UserNotResponding || time.Since(start) != 31200*time.Millisecond {
				t.Fatalf("got %v after %v", err, time.Since(start))
			}
			if n := len(p.net.Trace()); n != 9 {
				t.Fatalf("%d transmissions, want 1+N = 9", n)
			}
		})
	})
	t.Run("2005 2006 3xxx sequence of results and errors", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p := newPair(t, lossynet.Config{}, fixed)
			p.perf.HandleFunc(13, ThreeWay, func(ctx context.Context, w ResponseWriter, inv *Invocation) {
				switch {
				case inv.Encoding != 2:
					w.Error(2, 6, []byte("unexpected encoding"))
				case inv.Operation == 1:
					w.Result(2, []byte(fmt.Sprintf("%d bytes received", len(inv.Data))))
				case inv.Operation == 2:
					w.Result(2, []byte("Thursday"))
				default:
					w.Error(2, 5, []byte("unknown operation"))
				}
			})
			for i, tc := range []struct {
				op      uint8
				enc     Encoding
				size    int
				wantErr uint8
			}{{2, 2, 4, 0}, {1, 2, 100, 0}, {9, 2, 7, 5}, {2, 0, 4, 6}, {1, 2, 1, 0}, {2, 2, 50, 0}} {
				r := p.req(13, ThreeWay, tc.op, string(make([]byte, tc.size)))
				r.Encoding = tc.enc
				res, err := p.inv.Invoke(t.Context(), r)
				var er *ErrorReply
				switch {
				case tc.wantErr != 0 && (!errors.As(err, &er) || er.Value != tc.wantErr):
					t.Fatalf("#%d: got %v, want error %d", i, err, tc.wantErr)
				case tc.wantErr == 0 && err != nil:
					t.Fatalf("#%d: %v", i, err)
				case tc.op == 1 && tc.wantErr == 0 && string(res.Data) != fmt.Sprintf("%d bytes received", tc.size):
					t.Fatalf("#%d: %q", i, res.Data)
				}
			}
		})
	})
	t.Run("4xxx sizes", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p := newPair(t, lossynet.Config{}, fixed)
			p.perf.Handle(13, ThreeWay, &echo{})
			for _, n := range []int{100, 1000, 1500} {
				r, err := p.inv.Invoke(t.Context(), p.req(13, ThreeWay, 1, string(make([]byte, n))))
				if err != nil || len(r.Data) != n {
					t.Fatalf("%d octets: %v", n, err)
				}
			}
			for _, n := range []int{1501, 2048, 3072} {
				if _, err := p.inv.Invoke(t.Context(), p.req(13, ThreeWay, 1, string(make([]byte, n)))); !errors.Is(err, ErrTooLarge) {
					t.Fatalf("%d octets: %v", n, err)
				}
			}
		})
	})
	t.Run("4xxx 2000 sequential invocations reuse reference numbers", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p := newPair(t, lossynet.Config{}, fixed)
			h := &echo{}
			p.perf.Handle(15, TwoWay, h)
			for i := range 2000 {
				id := fmt.Sprint(i)
				r, err := p.inv.Invoke(t.Context(), p.req(15, TwoWay, 2, id))
				if err != nil || string(r.Data) != id {
					t.Fatalf("#%d: %v %v", i, r, err)
				}
			}
			if len(h.runs) != 2000 {
				t.Fatalf("%d performed", len(h.runs))
			}
			if p.inv.Stats().ReferenceWaits == 0 {
				t.Fatal("2000 invocations to one peer never waited for a reference number")
			}
		})
	})
	t.Run("5001 answers after the first are ignored", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p := newPair(t, lossynet.Config{}, fixed)
			p.net.Record()
			p.perf.HandleFunc(13, ThreeWay, func(ctx context.Context, w ResponseWriter, inv *Invocation) {
				if err := w.Result(2, []byte("one")); err != nil {
					t.Error(err)
				}
				for range 3 {
					if err := w.Result(2, []byte("again")); !errors.Is(err, ErrAnswered) {
						t.Errorf("later answer: %v", err)
					}
				}
			})
			r, err := p.inv.Invoke(t.Context(), p.req(13, ThreeWay, 2, "date"))
			if err != nil || string(r.Data) != "one" {
				t.Fatal(r, err)
			}
			synctest.Wait()
			if n := len(p.net.Trace()); n != 3 {
				t.Fatalf("%d datagrams, want INVOKE, RESULT, ACK", n)
			}
		})
	})
	t.Run("6001 INVOKE lost", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p := newPair(t, lossynet.Config{}, fixed)
			h := &echo{}
			p.perf.Handle(13, ThreeWay, h)
			p.invConn.DropNextSent(1)
			start := time.Now()
			if _, err := p.inv.Invoke(t.Context(), p.req(13, ThreeWay, 2, "date")); err != nil {
				t.Fatal(err)
			}
			if time.Since(start) != 3*time.Second || h.runs["date"] != 1 {
				t.Fatalf("after %v, %d runs", time.Since(start), h.runs["date"])
			}
		})
	})
	t.Run("6002 RESULT lost twice", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p := newPair(t, lossynet.Config{}, fixed)
			h := &echo{}
			p.perf.Handle(13, ThreeWay, h)
			p.invConn.DropNextReceived(2)
			if _, err := p.inv.Invoke(t.Context(), p.req(13, ThreeWay, 2, "date")); err != nil {
				t.Fatal(err)
			}
			synctest.Wait()
			if h.runs["date"] != 1 || h.conf.Load() != 1 {
				t.Fatalf("%d runs, %d confirms", h.runs["date"], h.conf.Load())
			}
		})
	})
	t.Run("7 flood until refused, bind/unbind loop", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p := newPair(t, lossynet.Config{}, func(c *Config) { c.FixedTimers = true; c.MaxInvocations = 100 })
			ctx, cancel := context.WithTimeout(t.Context(), time.Second)
			defer cancel()
			var refused atomic.Int64
			var wg sync.WaitGroup
			for range 150 {
				wg.Go(func() {
					_, err := p.inv.Invoke(ctx, p.req(13, ThreeWay, 2, "x"))
					if errors.Is(err, ErrTooManyInvokes) {
						refused.Add(1)
					}
				})
			}
			wg.Wait()
			if refused.Load() != 50 {
				t.Fatalf("%d refused, want 50", refused.Load())
			}
			for range 50 {
				if err := p.perf.Handle(14, TwoWay, &echo{}); err != nil {
					t.Fatal(err)
				}
				if err := p.perf.Unbind(14); err != nil {
					t.Fatal(err)
				}
			}
		})
	})
}

// The ESRO datagrams two of our engines exchange have the shape of the C
// reference's captures (reference numbers and the date text aside).
func TestWireMatchesCaptures(t *testing.T) {
	for _, tc := range []struct {
		name   string
		sap    uint8
		hs     Handshake
		answer func(w ResponseWriter)
		want   []string // with RR for the reference number
	}{
		{"esro-3way-result", 13, ThreeWay, func(w ResponseWriter) { w.Result(2, []byte("ok")) }, []string{"d0RR82" + "64617465", "81RR6f6b", "03RR"}},
		{"esro-2way-result", 13, TwoWay, func(w ResponseWriter) { w.Result(2, []byte("ok")) }, []string{"d0RR8264617465", "81RR6f6b"}},
		{"esro-3way-error", 13, ThreeWay, func(w ResponseWriter) { w.Error(2, 0, []byte("ok")) }, []string{"d0RR8264617465", "82RR006f6b", "03RR"}},
		{"esro-2way-error", 13, TwoWay, func(w ResponseWriter) { w.Error(2, 0, []byte("ok")) }, []string{"d0RR8264617465", "82RR006f6b"}},
		{"esro-invoke-unbound-sap", 14, ThreeWay, nil, []string{"e0RR8264617465", "04RR02"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p := newPair(t, lossynet.Config{}, nil)
				p.net.Record()
				p.perf.HandleFunc(13, tc.hs, func(ctx context.Context, w ResponseWriter, inv *Invocation) { tc.answer(w) })
				p.inv.Invoke(t.Context(), p.req(tc.sap, tc.hs, 2, "date"))
				synctest.Wait()
				tr := p.net.Trace()
				if len(tr) != len(tc.want) {
					t.Fatalf("%d datagrams, want %d", len(tr), len(tc.want))
				}
				rr := fmt.Sprintf("%02x", tr[0].Payload[1])
				for i, ev := range tr {
					want := unhex(t, replaceRR(tc.want[i], rr))
					if string(ev.Payload) != string(want) {
						t.Fatalf("#%d: % x, want % x", i, ev.Payload, want)
					}
					if (i%2 == 0) != (ev.From == p.invConn.AddrPort()) {
						t.Fatalf("#%d sent by the wrong side", i)
					}
				}
			})
		})
	}
}

func replaceRR(s, rr string) string {
	out := ""
	for i := 0; i < len(s); i++ {
		if i+1 < len(s) && s[i:i+2] == "RR" {
			out += rr
			i++
			continue
		}
		out += s[i : i+1]
	}
	return out
}

func TestInvokeContextCancel(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := newPair(t, lossynet.Config{}, nil)
		p.perf.HandleFunc(13, ThreeWay, func(ctx context.Context, w ResponseWriter, inv *Invocation) {})
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		_, err := p.inv.Invoke(ctx, p.req(13, ThreeWay, 2, "x"))
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("got %v", err)
		}
		sent := p.inv.Stats().DatagramsSent
		time.Sleep(time.Minute)
		if p.inv.Stats().DatagramsSent != sent {
			t.Fatal("retransmissions went on after the caller gave up")
		}
	})
}

func TestShutdownDrains(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := newPair(t, lossynet.Config{}, nil)
		release := make(chan struct{})
		p.perf.HandleFunc(13, ThreeWay, func(ctx context.Context, w ResponseWriter, inv *Invocation) {
			<-release
			w.Result(0, []byte("late"))
		})
		res := make(chan error, 1)
		go func() {
			_, err := p.inv.Invoke(t.Context(), p.req(13, ThreeWay, 2, "x"))
			res <- err
		}()
		synctest.Wait()
		done := make(chan error, 1)
		go func() { done <- p.perf.Shutdown(t.Context()) }()
		synctest.Wait()
		select {
		case <-done:
			t.Fatal("Shutdown returned with an answer still owed")
		default:
		}
		close(release)
		if err := <-res; err != nil {
			t.Fatalf("invocation lost by the shutdown: %v", err)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if _, err := p.perf.Invoke(t.Context(), p.req(13, ThreeWay, 2, "x")); !errors.Is(err, ErrClosed) {
			t.Fatalf("Invoke after shutdown: %v", err)
		}
	})
}

func TestCloseEndsEverything(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := newPair(t, lossynet.Config{}, nil)
		ended := make(chan error, 1)
		p.perf.HandleFunc(13, ThreeWay, func(ctx context.Context, w ResponseWriter, inv *Invocation) {
			<-ctx.Done()
			ended <- context.Cause(ctx)
		})
		res := make(chan error, 1)
		go func() {
			_, err := p.inv.Invoke(t.Context(), p.req(13, ThreeWay, 2, "x"))
			res <- err
		}()
		synctest.Wait()
		p.perf.Close()
		if err := <-ended; !errors.Is(err, ErrClosed) {
			t.Fatalf("handler ended by %v", err)
		}
		p.inv.Close()
		if err := <-res; !errors.Is(err, ErrClosed) {
			t.Fatalf("Invoke ended by %v", err)
		}
	})
}

func TestHandlerPanicIsContained(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := newPair(t, lossynet.Config{}, func(c *Config) { c.PerformerTimeout = 10 * time.Second })
		p.perf.HandleFunc(13, TwoWay, func(ctx context.Context, w ResponseWriter, inv *Invocation) { panic("boom") })
		_, err := p.inv.Invoke(t.Context(), p.req(13, TwoWay, 2, "x"))
		var f *Failure
		if !errors.As(err, &f) || f.Reason != UserNotResponding || !f.Remote {
			t.Fatalf("got %v", err)
		}
	})
}

// rearm only ever moves the endpoint's armed timer earlier: when the
// machine next wants it later, the timer fires early and is armed again
// then, rather than being reset on every change.
func TestRearmOnlyEarlier(t *testing.T) {
	ep, err := Listen("udp", "127.0.0.1:0", &Config{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer ep.Close()
	silent, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		ep.Invoke(ctx, &Request{To: silent.LocalAddr().(*net.UDPAddr).AddrPort(), SAP: 13, Handshake: TwoWay, Operation: 2, Data: []byte("x")})
	}()
	defer func() { cancel(); <-done }()
	// The INVOKE's retransmission timer arms the endpoint's.
	for start := time.Now(); ; time.Sleep(time.Millisecond) {
		ep.mu.Lock()
		armed := ep.armed
		ep.mu.Unlock()
		if armed {
			break
		}
		if time.Since(start) > 10*time.Second {
			t.Fatal("the endpoint's timer was never armed")
		}
	}
	ep.mu.Lock()
	defer ep.mu.Unlock()
	at, ok := ep.m.wakeAt()
	if !ok {
		t.Fatal("no wake-up wanted")
	}
	early := at.Add(-time.Second)
	ep.timerAt = early
	ep.rearm(time.Now())
	if !ep.timerAt.Equal(early) {
		t.Fatalf("armed timer moved %v later", ep.timerAt.Sub(early))
	}
	ep.timerAt = at.Add(time.Second)
	ep.rearm(time.Now())
	if !ep.timerAt.Equal(at) {
		t.Fatalf("armed timer at +%v of the wake-up, not moved to it", ep.timerAt.Sub(at))
	}
}
