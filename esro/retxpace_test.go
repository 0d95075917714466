package esro

import (
	"errors"
	"fmt"
	"net/netip"
	"testing"
	"time"
)

// Invocations to many silent peers, all timing out together: with
// RetransmitRate the retransmissions never exceed the rate (after the
// burst) over any interval, and none is lost: every invocation still
// makes all its retransmissions, then fails as a silent peer's does.
// Without it they all go out at once.
func TestRetransmitRate(t *testing.T) {
	const peers, rate, burst = 20, 2.0, 3
	for _, tc := range []struct {
		name        string
		rate        float64
		wantSpanMin time.Duration // from the first retransmission to the last
	}{
		{"paced", rate, time.Duration(float64(peers*8-burst) / rate * float64(time.Second))},
		{"off", 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(c *Config) {
				c.RetransmitRate, c.RetransmitBurst = tc.rate, burst
			})
			count := h.m.cfg.Timers.RetransmitCount
			var invs []*invocation
			for i := range peers {
				to := netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(10 + i)}), 2003)
				h.m.prove(h.now, to)
				inv, wait, err := h.m.invoke(h.now, &Request{To: to, SAP: 13, Operation: 2, Encoding: 2,
					Handshake: ThreeWay, Data: []byte(fmt.Sprint(i))}, to)
				if err != nil || wait != nil {
					t.Fatalf("invoke %d: %v %v", i, err, wait)
				}
				invs = append(invs, inv)
			}
			if n := len(h.m.takeOut()); n != peers {
				t.Fatalf("%d INVOKEs sent at once, want %d: new invocations are not paced here", n, peers)
			}
			// Every retransmission, with its time, and per peer.
			var at []time.Time
			per := map[netip.AddrPort]int{}
			end := h.t0.Add(10 * time.Minute)
			for {
				next, ok := h.m.nextDeadline()
				if !ok || next.After(end) {
					break
				}
				h.at(next.Sub(h.t0))
				for _, o := range h.m.takeOut() {
					at = append(at, h.now)
					per[o.to]++
				}
			}
			if len(at) != peers*count {
				t.Fatalf("%d retransmissions, want %d", len(at), peers*count)
			}
			for to, n := range per {
				if n != count {
					t.Errorf("peer %v: %d retransmissions, want %d", to, n, count)
				}
			}
			for i, inv := range invs {
				var f *Failure
				if !inv.finished || !errors.As(inv.err, &f) || f.Reason != UserNotResponding {
					t.Errorf("invocation %d: finished %v, %v; want a user-not-responding failure", i, inv.finished, inv.err)
				}
			}
			st := h.st.snapshot()
			if st.Retransmissions != uint64(peers*count) {
				t.Errorf("Stats.Retransmissions %d, want %d", st.Retransmissions, peers*count)
			}
			if tc.rate == 0 {
				if st.RetransmissionsDeferred != 0 {
					t.Errorf("%d deferred without a rate", st.RetransmissionsDeferred)
				}
				return
			}
			// The bound: over any interval, at most burst + rate × its
			// length.
			for i := range at {
				for j := i; j < len(at); j++ {
					if n, allowed := j-i+1, burst+tc.rate*at[j].Sub(at[i]).Seconds(); float64(n) > allowed+1e-9 {
						t.Fatalf("%d retransmissions within %v (from +%v), want at most %.2f", n, at[j].Sub(at[i]),
							at[i].Sub(h.t0), allowed)
					}
				}
			}
			if span := at[len(at)-1].Sub(at[0]); span < tc.wantSpanMin {
				t.Errorf("retransmissions spread over %v, want at least %v", span, tc.wantSpanMin)
			}
			if st.RetransmissionsDeferred == 0 {
				t.Error("no retransmission counted as deferred")
			}
		})
	}
}

// An invocation answered while its retransmission waits for a slot does
// not retransmit when the slot comes.
func TestRetransmitRateAnswered(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.RetransmitRate, c.RetransmitBurst = 1, 1 })
	other := netip.MustParseAddrPort("192.0.2.8:2003")
	h.m.prove(h.now, other)
	if _, _, err := h.m.invoke(h.now, &Request{To: other, SAP: 13, Operation: 2, Encoding: 2,
		Handshake: ThreeWay, Data: []byte("x")}, other); err != nil { // reference 0x5e
		t.Fatal(err)
	}
	h.at(100 * time.Millisecond)
	inv := h.invoke(ThreeWay, "date") // reference 0x5f
	h.m.takeOut()
	// The other invocation's retransmission takes the only token; this
	// one's, due 0.1 s later, waits for the next.
	h.at(3 * time.Second)
	h.at(3*time.Second + 100*time.Millisecond)
	if n := len(h.m.takeOut()); n != 1 || !inv.retxPaid {
		t.Fatalf("%d retransmissions by T_retx + 0.1 s with a burst of 1, deferred %v; want 1, true", n, inv.retxPaid)
	}
	h.at(3*time.Second + 200*time.Millisecond)
	h.recv("81 5f 6f 6b") // RESULT 0x5f "ok"
	h.expect(ack5f)
	h.run(5 * time.Second)
	for _, o := range h.m.takeOut() {
		if o.to == h.peer {
			t.Errorf("sent %x to the peer after its answer", o.payload())
		}
	}
	if !isDone(inv) || inv.err != nil {
		t.Errorf("answered invocation: done %v, %v", isDone(inv), inv.err)
	}
	if n := h.st.snapshot().RetransmissionsDeferred; n != 1 {
		t.Errorf("%d deferred, want 1", n)
	}
}

const ack5f = "03 5f"

func TestRetransmitRateValidation(t *testing.T) {
	for _, c := range []Config{{RetransmitRate: -1}, {RetransmitRate: 5, RetransmitBurst: -1}} {
		if _, err := c.resolved(); err == nil {
			t.Errorf("%+v accepted", c)
		}
	}
	for _, c := range []struct {
		rate  float64
		burst int
		want  float64
	}{{1, 0, 1}, {1000, 0, 100}, {1000, 7, 7}} {
		if got := (&Config{RetransmitRate: c.rate, RetransmitBurst: c.burst}).RetransmitBucket(); got != c.want {
			t.Errorf("rate %v burst %d: bucket of %v, want %v", c.rate, c.burst, got, c.want)
		}
	}
}
