package esro

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/esro-emsdp/emsdp/internal/lossynet"
)

// committer is a performer that commits an operation only when its RESULT
// is confirmed by the 3-way ACK, as the reference MTS does with
// submissions. It records each argument's fate.
type committer struct {
	mu        sync.Mutex
	committed map[string]int
	failed    map[string]error
}

func newCommitter() *committer {
	return &committer{committed: map[string]int{}, failed: map[string]error{}}
}

func (c *committer) ServeESRO(ctx context.Context, w ResponseWriter, inv *Invocation) {
	if err := w.Result(inv.Encoding, inv.Data); err != nil {
		return
	}
	err := w.Confirmed(context.Background())
	c.mu.Lock()
	defer c.mu.Unlock()
	if err != nil {
		c.failed[string(inv.Data)] = err
		return
	}
	c.committed[string(inv.Data)]++
}

func (c *committer) outcome(id string) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.committed[id], c.failed[id]
}

// isAck matches ACK PDUs.
func isAck(b []byte) bool { return len(b) >= 2 && PDUType(b[0]&7) == TypeAck }

// lingerNet is a performer like the reference MTS (fixed timers, no limit
// on what it sends to an invoker that has not proven itself, commits on
// confirmation) on an in-memory network, and a way to start invokers on
// it. Within the default amplification limit a performer could not
// retransmit its RESULT at all to an invoker whose ACK was lost (the
// invoker sends nothing more to earn it), unless its handler proves the
// invoker, as the EMSD server does once a device's password checks.
type lingerNet struct {
	t        *testing.T
	net      *lossynet.Network
	perfConn *lossynet.Conn
	perf     *committer
	timers   Timers // both ends'; zero: the shipped ones
}

func newLingerNet(t *testing.T, ncfg lossynet.Config, timers Timers) *lingerNet {
	t.Helper()
	n := lossynet.New(ncfg)
	pc, err := n.Listen("127.0.0.1:2002")
	if err != nil {
		t.Fatal(err)
	}
	pe, err := NewEndpoint(pc, &Config{Timers: timers, FixedTimers: true, AmplificationFactor: -1, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pe.Close() })
	ln := &lingerNet{t: t, net: n, perfConn: pc, perf: newCommitter(), timers: timers}
	if err := pe.Handle(13, ThreeWay, ln.perf); err != nil {
		t.Fatal(err)
	}
	return ln
}

// invoker starts an invoking endpoint with the default (adaptive) timers.
func (ln *lingerNet) invoker(noLinger bool) *Endpoint {
	ln.t.Helper()
	c, err := ln.net.Listen("127.0.0.1:0")
	if err != nil {
		ln.t.Fatal(err)
	}
	e, err := NewEndpoint(c, &Config{Timers: ln.timers, NoLinger: noLinger, Logger: quiet})
	if err != nil {
		ln.t.Fatal(err)
	}
	ln.t.Cleanup(func() { e.Close() })
	return e
}

func (ln *lingerNet) req(id string) *Request {
	return &Request{To: ln.perfConn.AddrPort(), SAP: 13, Operation: 33, Handshake: ThreeWay, Data: []byte(id)}
}

// A one-shot invoker (invoke, then Shutdown) whose first ACKs are lost keeps
// answering the performer's retransmissions, so that the performer
// confirms; on a clean link it stays one retransmission interval and a
// grace of 2·RT. Shipped timers: T_retx 3 s, RT 1 s, N 8.
func TestShutdownLingers(t *testing.T) {
	for _, tc := range []struct {
		name      string
		acksLost  int
		noLinger  bool
		timeout   time.Duration // Shutdown's context
		wantStay  time.Duration // how long Shutdown takes after the result
		wantErr   error
		confirmed bool
	}{
		{name: "clean", wantStay: 5 * time.Second, confirmed: true},
		// One lost ACK in three datagrams: lossy, the whole budget
		// (N·T_retx + grace after the reply).
		{name: "first ACK lost", acksLost: 1, wantStay: 26 * time.Second, confirmed: true},
		{name: "first two ACKs lost", acksLost: 2, wantStay: 26 * time.Second, confirmed: true},
		{name: "no linger, clean", noLinger: true, confirmed: true},
		{name: "no linger, first ACK lost", acksLost: 1, noLinger: true},
		{name: "context ends first", acksLost: 1, timeout: 2 * time.Second, wantStay: 2 * time.Second, wantErr: context.DeadlineExceeded},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				ln := newLingerNet(t, lossynet.Config{Delay: 5 * time.Millisecond}, Timers{})
				ln.perfConn.DropNextReceivedIf(tc.acksLost, isAck)
				inv := ln.invoker(tc.noLinger)
				if r, err := inv.Invoke(t.Context(), ln.req("msg")); err != nil || string(r.Data) != "msg" {
					t.Fatalf("invoke: %v %v", r, err)
				}
				ctx := t.Context()
				if tc.timeout > 0 {
					var cancel context.CancelFunc
					ctx, cancel = context.WithTimeout(ctx, tc.timeout)
					defer cancel()
				}
				start := time.Now()
				err := inv.Shutdown(ctx)
				if stay := time.Since(start); stay != tc.wantStay || !errors.Is(err, tc.wantErr) {
					t.Fatalf("Shutdown took %v and returned %v, want %v and %v", stay, err, tc.wantStay, tc.wantErr)
				}
				time.Sleep(time.Minute) // past the performer's T_last
				synctest.Wait()
				n, ferr := ln.perf.outcome("msg")
				if tc.confirmed && (n != 1 || ferr != nil) {
					t.Fatalf("performer committed %d times, failure %v", n, ferr)
				}
				var f *Failure
				if !tc.confirmed && (n != 0 || !errors.As(ferr, &f) || f.Reason != Transmission) {
					t.Fatalf("performer committed %d times, failure %v; want a transmission failure", n, ferr)
				}
			})
		})
	}
}

// Close ends a Shutdown that lingers.
func TestCloseEndsLinger(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ln := newLingerNet(t, lossynet.Config{Delay: 5 * time.Millisecond}, Timers{})
		ln.perfConn.DropNextReceivedIf(1, isAck)
		inv := ln.invoker(false)
		if _, err := inv.Invoke(t.Context(), ln.req("msg")); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		start := time.Now()
		go func() { done <- inv.Shutdown(t.Context()) }()
		time.Sleep(4 * time.Second) // the duplicate at 3 s is answered: linger till 26 s
		inv.Close()
		if err := <-done; err != nil || time.Since(start) != 4*time.Second {
			t.Fatalf("Shutdown returned %v after %v", err, time.Since(start))
		}
	})
}

// The acceptance run: 1000 invocations from one endpoint through a
// link that loses 20% of datagrams each way (5% duplicated, some
// reordered), then Shutdown: every result the invoker reported is
// committed at a performer that commits only on confirmation.
//
// With the shipped 8 retransmissions a performer fails, whatever the
// invoker does, when each of its 9 transmissions loses either itself or
// the ACK answering it: about 0.2 × 0.36^8 ≈ 6e-5 per invocation, a
// failure in one run of 20. 12 retransmissions make that 1e-6.
func TestLingerLossyEveryResultConfirmed(t *testing.T) {
	timers := ShippedTimers()
	timers.RetransmitCount = 12
	synctest.Test(t, func(t *testing.T) {
		ln := newLingerNet(t, lossynet.Config{Loss: 0.2, Duplicate: 0.05, Reorder: 0.1, Delay: 5 * time.Millisecond, MaxDelay: 20 * time.Millisecond, Seed: 20}, timers)
		inv := ln.invoker(false)
		const total, workers = 1000, 50
		var mu sync.Mutex
		var reported []string
		var failures int
		var wg sync.WaitGroup
		for w := range workers {
			wg.Go(func() {
				for i := w; i < total; i += workers {
					id := fmt.Sprintf("msg-%04d", i)
					_, err := inv.Invoke(t.Context(), ln.req(id))
					mu.Lock()
					if err == nil {
						reported = append(reported, id)
					} else {
						failures++
					}
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		start := time.Now()
		if err := inv.Shutdown(t.Context()); err != nil {
			t.Fatal(err)
		}
		stay := time.Since(start)
		time.Sleep(time.Minute)
		synctest.Wait()
		for _, id := range reported {
			if n, err := ln.perf.outcome(id); n != 1 {
				t.Errorf("%s reported as a result, committed %d times (%v)", id, n, err)
			}
		}
		s := ln.net.Stats()
		t.Logf("%d results, %d failures at the invoker; Shutdown lingered %v; network %+v", len(reported), failures, stay, s)
		if len(reported) < total*99/100 || s.Lost < total/2 {
			t.Fatalf("%d results of %d, %d datagrams lost", len(reported), total, s.Lost)
		}
	})
}

// One-shot invokers (a new endpoint per invocation, Shutdown right after
// the result, as `emsdp ua send` does) on the same 20% loss: the linger
// cuts the results the performer never commits, compared with closing at
// once. It cannot make them zero: an exchange that happened to lose
// nothing looks like a clean link and lingers one interval (linger.go).
func TestLingerOneShotLossy(t *testing.T) {
	lost := map[bool]int{}
	for _, noLinger := range []bool{true, false} {
		synctest.Test(t, func(t *testing.T) {
			ln := newLingerNet(t, lossynet.Config{Loss: 0.2, Duplicate: 0.05, Reorder: 0.1, Delay: 5 * time.Millisecond, MaxDelay: 20 * time.Millisecond, Seed: 21}, Timers{})
			const total, workers = 400, 40
			var mu sync.Mutex
			var reported []string
			var wg sync.WaitGroup
			for w := range workers {
				wg.Go(func() {
					for i := w; i < total; i += workers {
						id := fmt.Sprintf("msg-%04d", i)
						inv := ln.invoker(noLinger)
						_, err := inv.Invoke(t.Context(), ln.req(id))
						inv.Shutdown(t.Context())
						if err == nil {
							mu.Lock()
							reported = append(reported, id)
							mu.Unlock()
						}
					}
				})
			}
			wg.Wait()
			time.Sleep(time.Minute)
			synctest.Wait()
			for _, id := range reported {
				if n, _ := ln.perf.outcome(id); n != 1 {
					lost[noLinger]++
				}
			}
			t.Logf("no-linger=%v: %d of %d reported results not committed", noLinger, lost[noLinger], len(reported))
		})
	}
	if lost[false]*3 > lost[true] || lost[true] == 0 {
		t.Fatalf("lingering lost %d results, closing at once %d", lost[false], lost[true])
	}
}
