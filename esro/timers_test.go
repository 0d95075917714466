package esro

import (
	"testing"
	"time"
)

// TestWakeAt: the endpoint's timer follows retransmission deadlines
// exactly, and the end of a reference hold with a slack of 1/lenientSlack of
// it; advance still releases the number at the hold's exact end.
func TestWakeAt(t *testing.T) {
	h := newHarness(t, nil)
	inv := h.invoke(TwoWay, "date")
	h.expect(invokeDate)
	if at, ok := h.m.wakeAt(); !ok || !at.Equal(h.now.Add(h.m.td.retx)) {
		t.Fatalf("wake at %v, want the retransmission at +%v", at.Sub(h.t0), h.m.td.retx)
	}
	h.recv(resultText)
	h.state(inv, stInvokerRefWait)
	end := h.now.Add(h.m.td.hold)
	if at, _ := h.m.nextDeadline(); !at.Equal(end) {
		t.Fatalf("deadline +%v, want +%v", at.Sub(h.t0), end.Sub(h.t0))
	}
	if at, ok := h.m.wakeAt(); !ok || !at.Equal(end.Add(h.m.td.hold/lenientSlack)) {
		t.Fatalf("wake at +%v, want +%v", at.Sub(h.t0), end.Add(h.m.td.hold/lenientSlack).Sub(h.t0))
	}
	h.at(end.Sub(h.t0) - time.Nanosecond)
	if h.m.invoker(inv.key) == nil {
		t.Fatal("released before the hold's end")
	}
	h.at(end.Sub(h.t0))
	if h.m.invoker(inv.key) != nil || inv.st != stReleased {
		t.Fatal("not released at the hold's end")
	}
	if _, ok := h.m.wakeAt(); ok {
		t.Fatal("a wake-up with no timer left")
	}
}

// TestWakeAtLenient: a 2-way performer's T_inact may wake the endpoint
// 1/lenientSlack of itself late, and a 3-way invoker's (the start of its
// reference hold) as late as the hold may end (without that the endpoint's
// timer fired once per invocation); the performer timeout and T_last stay
// exact; advance fires each at its exact deadline.
func TestWakeAtLenient(t *testing.T) {
	none := func(durations) time.Duration { return 0 }
	for _, tc := range []struct {
		name  string
		setup func(h *harness) (*invocation, timerKind)
		d     func(td durations) time.Duration
		slack func(td durations) time.Duration
	}{
		{"performer timeout", func(h *harness) (*invocation, timerKind) {
			h.bind(13, TwoWay)
			h.recv(invokeDate)
			return h.started[0], tNoResp
		}, func(td durations) time.Duration { return td.noresp }, none},
		{"2-way performer T_inact", func(h *harness) (*invocation, timerKind) {
			h.bind(13, TwoWay)
			h.recv(invokeDate)
			inv := h.started[0]
			if err := h.m.answer(h.now, inv, false, 2, 0, []byte("ok")); err != nil {
				h.t.Fatal(err)
			}
			return inv, tInact
		}, func(td durations) time.Duration { return td.inact }, func(td durations) time.Duration { return td.inact / lenientSlack }},
		{"3-way invoker T_inact", func(h *harness) (*invocation, timerKind) {
			inv := h.invoke(ThreeWay, "date")
			h.recv(resultText)
			return inv, tInact
		}, func(td durations) time.Duration { return td.inact }, func(td durations) time.Duration { return td.hold / lenientSlack }},
		{"invoker T_last", func(h *harness) (*invocation, timerKind) {
			inv := h.invoke(TwoWay, "date")
			h.run(time.Duration(h.m.cfg.Timers.RetransmitCount+1) * h.m.td.retx) // RETX with k = N starts T_last
			return inv, tLast
		}, func(td durations) time.Duration { return td.last }, none},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, nil)
			inv, k := tc.setup(h)
			if inv.timer != k {
				t.Fatalf("timer %v, want %v", inv.timer, k)
			}
			if inv.fq == 0 {
				t.Fatal("not in a timer queue")
			}
			end := h.now.Add(tc.d(h.m.td))
			want := end.Add(tc.slack(h.m.td))
			if at, ok := h.m.wakeAt(); !ok || !at.Equal(want) {
				t.Fatalf("wake at +%v, want +%v", at.Sub(h.t0), want.Sub(h.t0))
			}
			h.at(end.Sub(h.t0) - time.Nanosecond)
			if inv.timer != k {
				t.Fatal("expired early")
			}
			h.at(end.Sub(h.t0))
			if inv.timer == k {
				t.Fatal("not expired at its deadline")
			}
		})
	}
}
