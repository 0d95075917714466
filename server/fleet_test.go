package server

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
)

var fleetT0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

func fixedBackoff(fails int) time.Duration { return time.Duration(fails) * time.Minute }

func addrs(ds []*fdev) []emsd.Address {
	var out []emsd.Address
	for _, d := range ds {
		out = append(out, d.addr)
	}
	return out
}

// lim4 allows 2 live attempts, 4 first and 1 probe at once.
var lim4 = fleetLimits{kLive: 2, kFirst: 4, kProbe: 1}

// Devices not heard from get first attempts, those that answered live
// ones, those that did not probes, each within its limit; an attempt
// left unanswered becomes a probe only if one is free.
func TestFleetLimits(t *testing.T) {
	f := newFleet()
	now := fleetT0
	for a := emsd.Address(1); a <= 10; a++ {
		f.note(a, now, now)
	}
	got := f.take(now, lim4)
	if !slices.Equal(addrs(got), []emsd.Address{1, 2, 3, 4}) || f.busy != [kinds]int{kFirst: 4} {
		t.Fatalf("first pass started %v (busy %v)", addrs(got), f.busy)
	}
	// 1 and 2 stay silent: 1's attempt becomes the one probe; 2's is cut.
	if !f.promote(f.devs[1], 1) || f.promote(f.devs[2], 1) || f.busy[kProbe] != 1 {
		t.Fatalf("promote: busy %v", f.busy)
	}
	if got := f.take(now, lim4); !slices.Equal(addrs(got), []emsd.Address{5}) {
		t.Fatalf("a promoted attempt frees its slot: took %v, want 5", addrs(got))
	}
	f.finish(f.devs[2], fSilent, now, fixedBackoff, time.Time{}, false, time.Minute)
	if d := f.devs[2]; !d.silent || d.answered || d.fails != 1 || !d.hold.Equal(now.Add(time.Minute)) || d.where != fWaiting {
		t.Fatalf("silent device: %+v", d)
	}
	if next, ok := f.next(); !ok || !next.Equal(now.Add(time.Minute)) {
		t.Errorf("next %v %v, want device 2's hold", next, ok)
	}
	// 3 and 4 answer: live from now on. Two live attempts at once.
	f.finish(f.devs[3], fDone, now, fixedBackoff, time.Time{}, false, time.Minute)
	f.finish(f.devs[4], fDone, now, fixedBackoff, time.Time{}, false, time.Minute)
	got = f.take(now, lim4)
	if !slices.Equal(addrs(got), []emsd.Address{3, 4, 6, 7, 8}) || got[0].kind != kLive || got[1].kind != kLive {
		t.Fatalf("after two answers took %v, want 3, 4 (live) and 6, 7, 8 (first)", addrs(got))
	}
	f.finish(f.devs[3], fDone, now, fixedBackoff, time.Time{}, false, time.Minute)
	if got := f.take(now, lim4); !slices.Equal(addrs(got), []emsd.Address{3}) {
		t.Fatalf("took %v, want live 3 again", addrs(got))
	}
	// After its hold, 2 is a probe: it waits for 1's probe to end.
	later := now.Add(time.Minute)
	if got := f.take(later, lim4); len(got) != 0 {
		t.Fatalf("took %v beyond the limits", addrs(got))
	}
	f.finish(f.devs[1], fSilent, later, fixedBackoff, time.Time{}, false, time.Minute)
	got = f.take(later, lim4)
	if !slices.Equal(addrs(got), []emsd.Address{2}) || got[0].kind != kProbe {
		t.Fatalf("after the hold took %v, want probe 2", addrs(got))
	}
}

// A device with many queued messages goes back to the end of the line
// after each attempt: a device with one message waits one round at most.
func TestFleetFairness(t *testing.T) {
	f := newFleet()
	now := fleetT0
	for a := emsd.Address(1); a <= 3; a++ {
		f.note(a, now, now)
		f.wake(a, now, true) // all answered before
	}
	left := map[emsd.Address]int{1: 3, 2: 1, 3: 2}
	var order []emsd.Address
	for range 9 {
		got := f.take(now, fleetLimits{kLive: 1})
		if len(got) != 1 {
			t.Fatalf("took %v", addrs(got))
		}
		d := got[0]
		if left[d.addr] == 0 {
			f.finish(d, fNothing, now, fixedBackoff, time.Time{}, false, time.Minute)
			continue
		}
		left[d.addr]--
		order = append(order, d.addr)
		f.finish(d, fDone, now, fixedBackoff, time.Time{}, false, time.Minute)
	}
	if want := []emsd.Address{1, 2, 3, 1, 3, 1}; !slices.Equal(order, want) {
		t.Errorf("order %v, want %v", order, want)
	}
}

// Any sign of life lifts a hold; only an authenticated one makes a
// silent device live, an unauthenticated one a first attempt.
func TestFleetWake(t *testing.T) {
	f := newFleet()
	now := fleetT0
	f.note(7, now, now)
	got := f.take(now, fleetLimits{kLive: 2, kFirst: 2, kProbe: 1})
	f.finish(got[0], fSilent, now, fixedBackoff, time.Time{}, false, time.Minute)
	if got := f.take(now, fleetLimits{kLive: 2, kFirst: 2, kProbe: 1}); len(got) != 0 {
		t.Fatalf("held device taken: %v", addrs(got))
	}
	f.wake(7, now, false)
	got = f.take(now, fleetLimits{kLive: 2, kFirst: 2, kProbe: 1})
	if len(got) != 1 || got[0].kind != kFirst {
		t.Fatalf("unauthenticated poll: took %v, want device 7 as a first attempt", addrs(got))
	}
	f.finish(got[0], fSilent, now, fixedBackoff, time.Time{}, false, time.Minute)
	if d := f.devs[7]; d.fails != 2 || !d.hold.Equal(now.Add(2*time.Minute)) {
		t.Fatalf("backoff after the second silence: %+v", d)
	}
	f.wake(7, now, true)
	got = f.take(now, fleetLimits{kLive: 2}) // no probe slot: only a live device may go
	if len(got) != 1 || got[0].kind != kLive {
		t.Fatalf("authenticated poll: took %v, want device 7 live", addrs(got))
	}
	// Woken while busy: looked at again even if the claim found nothing.
	f.note(7, now, now)
	f.finish(got[0], fNothing, now, fixedBackoff, time.Time{}, false, time.Minute)
	if got := f.take(now, fleetLimits{kLive: 2}); len(got) != 1 {
		t.Fatalf("device noted during its attempt not retaken: %v", addrs(got))
	}
}

// Devices heard from lately (the store's contacts, after a restart) are
// tried as live ones, before the devices not heard from; while live
// devices wait for a worker, and for calm after, first attempts are
// held to the probe share; then the full first budget applies again.
func TestFleetHeardFirst(t *testing.T) {
	f := newFleet()
	f.calm = 3 * time.Second
	now := fleetT0
	lim := fleetLimits{kLive: 2, kFirst: 4, kProbe: 1}
	for a := emsd.Address(1); a <= 9; a++ {
		f.note(a, now, now)
	}
	// 3, 6 and 9 were heard a minute ago; 1 a day ago; the rest never.
	for _, a := range []emsd.Address{3, 6, 9} {
		f.noteHeard(a, now.Add(-time.Minute), now, time.Hour)
	}
	f.noteHeard(1, now.Add(-24*time.Hour), now, time.Hour)
	got := f.take(now, lim)
	if !slices.Equal(addrs(got), []emsd.Address{3, 6, 1}) || got[0].kind != kLive || got[1].kind != kLive || got[2].kind != kFirst {
		t.Fatalf("first pass took %v (busy %v), want 3, 6 live, then 1 alone as a first attempt while 9 waits", addrs(got), f.busy)
	}
	// 3 answers; 9 and 3 take the live workers, first attempts stay held.
	f.finish(f.devs[3], fDone, now, fixedBackoff, time.Time{}, false, time.Minute)
	f.finish(f.devs[1], fSilent, now, fixedBackoff, time.Time{}, false, time.Minute)
	if got := f.take(now, lim); !slices.Equal(addrs(got), []emsd.Address{9, 2}) {
		t.Fatalf("took %v, want 9 (live) and 2 (the one first attempt)", addrs(got))
	}
	// The live devices are done: nothing waits for a live worker, but
	// first attempts stay held for calm.
	soon := now.Add(time.Second)
	for _, a := range []emsd.Address{6, 9} {
		f.finish(f.devs[a], fNothing, soon, fixedBackoff, time.Time{}, false, time.Minute)
	}
	f.finish(f.devs[2], fSilent, soon, fixedBackoff, time.Time{}, false, time.Minute)
	if got := f.take(soon, lim); !slices.Equal(addrs(got), []emsd.Address{3, 4}) {
		t.Fatalf("took %v, want live 3 and one first attempt (4)", addrs(got))
	}
	f.finish(f.devs[3], fNothing, soon, fixedBackoff, time.Time{}, false, time.Minute)
	later := now.Add(4 * time.Second)
	if got := f.take(later, lim); !slices.Equal(addrs(got), []emsd.Address{5, 7, 8}) || f.busy[kFirst] != 4 {
		t.Fatalf("after calm took %v (busy %v), want the full first budget: 5, 7, 8", addrs(got), f.busy)
	}
	// A device with an outcome of this server's is not presumed: a
	// silent one stays a probe however recent its stored contact.
	f.noteHeard(1, later, later, time.Hour)
	if d := f.devs[1]; d.answered || !d.silent {
		t.Errorf("silent device presumed answering: %+v", d)
	}
}

// A device whose due deliveries are all held back by its limits is
// parked until something changes; one whose next delivery is later
// waits for it; one with nothing queued is forgotten.
func TestFleetNothingClaimable(t *testing.T) {
	f := newFleet()
	now := fleetT0
	f.note(1, now, now)
	f.note(2, now, now)
	f.note(3, now, now)
	if got := f.take(now, fleetLimits{kLive: 3, kFirst: 3, kProbe: 3}); len(got) != 3 {
		t.Fatalf("took %v", addrs(got))
	}
	f.finish(f.devs[1], fParked, now, fixedBackoff, now, true, time.Minute)                 // parked
	f.finish(f.devs[2], fNothing, now, fixedBackoff, now.Add(time.Hour), true, time.Minute) // later
	f.finish(f.devs[3], fNothing, now, fixedBackoff, time.Time{}, false, time.Minute)       // nothing
	if len(f.take(now, fleetLimits{kLive: 3, kFirst: 3, kProbe: 3})) != 0 {
		t.Fatal("a parked or later device was taken")
	}
	if _, ok := f.devs[3]; ok {
		t.Error("a device with nothing queued is still tracked")
	}
	if next, ok := f.next(); !ok || !next.Equal(now.Add(time.Hour)) {
		t.Errorf("next %v %v", next, ok)
	}
	// A delivery that fell due between the claim and the look-up is not
	// held back: the device goes in line (fNothing), not parked.
	f.note(4, now, now)
	got4 := f.take(now, fleetLimits{kFirst: 1})
	f.finish(got4[0], fNothing, now, fixedBackoff, now.Add(-time.Millisecond), true, time.Minute)
	if got := f.take(now, fleetLimits{kFirst: 1}); !slices.Equal(addrs(got), []emsd.Address{4}) {
		t.Fatalf("a delivery due meanwhile: took %v, want 4", addrs(got))
	}
	f.finish(f.devs[4], fNothing, now, fixedBackoff, time.Time{}, false, time.Minute)
	f.unparkAll(now)
	if got := f.take(now, fleetLimits{kLive: 3, kFirst: 3, kProbe: 3}); !slices.Equal(addrs(got), []emsd.Address{1}) {
		t.Fatalf("after unparking took %v", addrs(got))
	}
}

// esro.retransmit_rate reaches the ESRO engine; a negative one is refused.
func TestRetransmitRateConfig(t *testing.T) {
	c := DefaultConfig()
	ec, err := c.ESROConfig(nil)
	if err != nil {
		t.Fatal(err)
	}
	if ec.RetransmitRate != 1000 || ec.RetransmitBurst != 0 {
		t.Errorf("default: retransmit rate %v, burst %d; want 1000, 0", ec.RetransmitRate, ec.RetransmitBurst)
	}
	c.ESRO.RetransmitRate = -1
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "esro.retransmit_rate") {
		t.Errorf("negative rate: %v", err)
	}
}

// An attempt whose outcome is being written frees its slot for the next
// device in line, but not its device: no second attempt to it before the
// outcome is in (finish), and no more outcomes written that way than the
// limit, beyond which the slot is held as before.
func TestFleetRecordFreesSlot(t *testing.T) {
	f := newFleet()
	now := fleetT0
	for a := emsd.Address(1); a <= 4; a++ {
		f.get(a).answered = true
		f.note(a, now, now)
	}
	if got := f.take(now, lim4); !slices.Equal(addrs(got), []emsd.Address{1, 2}) {
		t.Fatalf("took %v, want live 1, 2", addrs(got))
	}
	if !f.record(f.devs[1], 1) || f.busy[kLive] != 1 || f.recording != 1 {
		t.Fatalf("record: busy %v, recording %d", f.busy, f.recording)
	}
	if f.record(f.devs[1], 1) {
		t.Fatal("recorded twice")
	}
	if f.record(f.devs[2], 1) || f.busy[kLive] != 1 {
		t.Fatalf("a second outcome beyond the limit freed its slot: busy %v", f.busy)
	}
	// A watchdog firing late has nothing to promote.
	if !f.promote(f.devs[1], 1) || f.busy[kProbe] != 0 || f.devs[1].kind != kLive {
		t.Fatalf("promote of a recording attempt: busy %v", f.busy)
	}
	f.note(1, now, now) // new mail meanwhile: device 1 stays busy
	if got := f.take(now, lim4); !slices.Equal(addrs(got), []emsd.Address{3}) {
		t.Fatalf("took %v, want 3 in 1's slot (1 is still busy)", addrs(got))
	}
	f.finish(f.devs[1], fDone, now, fixedBackoff, time.Time{}, false, time.Minute)
	if f.recording != 0 || f.busy[kLive] != 2 || f.devs[1].recording || f.devs[1].where != fReady {
		t.Fatalf("after finish: busy %v, recording %d, device %+v", f.busy, f.recording, f.devs[1])
	}
	f.finish(f.devs[2], fDone, now, fixedBackoff, time.Time{}, false, time.Minute)
	// Back at the end of the line, behind 4: fairness as before.
	if got := f.take(now, lim4); !slices.Equal(addrs(got), []emsd.Address{4}) {
		t.Fatalf("took %v, want 4 (1 and 2 behind it)", addrs(got))
	}
}
