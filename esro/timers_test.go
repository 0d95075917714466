package esro

import (
	"testing"
	"time"
)

// TestWakeAt: the endpoint's timer follows retransmission deadlines
// exactly, and the end of a reference hold with a slack of 1/holdSlack of
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
	if at, ok := h.m.wakeAt(); !ok || !at.Equal(end.Add(h.m.td.hold/holdSlack)) {
		t.Fatalf("wake at +%v, want +%v", at.Sub(h.t0), end.Add(h.m.td.hold/holdSlack).Sub(h.t0))
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
