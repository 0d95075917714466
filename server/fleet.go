package server

import (
	"container/heap"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
)

// fleet is the delivery scheduler's picture of the devices with queued
// deliveries: when each one's next delivery is due, whether an attempt to
// it is in flight, and its reachability. It is rebuilt from the store at
// start (store.QueuedDevices) and kept current by what the server does
// and sees, so that a scheduling pass costs O(attempts started), never
// O(queue). A device with nothing queued is forgotten: the fleet holds an
// entry for each device with queued deliveries, and nothing for the idle
// rest of the registry.
//
// Reachability is per device, not per message: a device whose attempt
// failed is held until its retry time, all its messages with it.
// Attempts are of three kinds, each with a limit (fleetLimits):
//   - live: to devices that answered their last attempt (or proved who
//     they are since), and, until an attempt says otherwise, to devices
//     the store knows were heard lately (noteHeard: after a restart, the
//     devices that were answering): delivery.concurrency;
//   - first: to devices not heard from (new mail for an idle device, or
//     any device after a restart): many, since most answer within a round
//     trip and one that does not only ties up its own attempt; but only
//     the probe share while the live devices have work waiting for a
//     worker (see take);
//   - probe: to devices whose last attempt got no answer:
//     delivery.probes, so that switched-off devices never take more.
//
// A live or first attempt left unanswered for the cut time (one
// retransmission interval) becomes a probe if there is room, or is cut
// short and its device held as silent. Due devices wait in a first-come-
// first-served line per kind and go back to the end of theirs after every
// attempt, one delivery each: a device with 10,000 messages queued does
// not starve one with 1.
//
// Not safe for concurrent use: sched.mu guards it.
type fleet struct {
	devs  map[emsd.Address]*fdev
	wait  dueHeap // devices not yet due, by ready time
	lines [kinds]line
	busy  [kinds]int // attempts in flight by kind
	// recording: attempts over whose outcomes are being written (record).
	recording int
	// contended is when live devices last waited for a worker; calm is
	// how long after it first attempts stay held to the probe share (the
	// cut time: see take).
	contended time.Time
	calm      time.Duration
	// heldUntil: first attempts were held to the probe share with devices
	// left in line; the full budget applies from then (next).
	heldUntil time.Time
}

// Attempt kinds.
const (
	kLive = iota
	kFirst
	kProbe
	kinds
)

// fleetLimits are the attempts in flight allowed by kind.
type fleetLimits [kinds]int

// where a device is.
const (
	fIdle    = iota // nothing due known (parked)
	fWaiting        // in the heap, due later
	fReady          // in a line, due now
	fBusy           // an attempt is in flight
)

type fdev struct {
	addr emsd.Address
	// due is the earliest next attempt of its queued deliveries as far as
	// this server knows; it may be early (another server delivered), which
	// a claim finds out.
	due time.Time
	// hold: no attempt before (the backoff after failed attempts, or
	// another server delivering to it).
	hold time.Time
	// fails counts consecutive attempts that ended without delivery for a
	// transient reason.
	fails int
	// answered: the last attempt got an answer, or the device proved who
	// it is since; silent: the last attempt got none, and no
	// authenticated sign of life came since. Neither: not heard from.
	answered, silent bool
	// parked: due deliveries exist but none may be claimed now (delivery
	// control limits); a change of limits or new work unparks it.
	parked bool
	// elsewhere: the hold is for another server delivering to it; new
	// work or a rescan that finds its queue changed lifts it (note).
	elsewhere bool
	// again: new work or a sign of life came while an attempt was in
	// flight: look again when it ends.
	again bool
	// recording: its attempt is over and its outcome being written; the
	// device stays busy, its worker's slot is free (fleet.record).
	recording bool
	where     int
	line      int    // its line while ready
	kind      int    // the kind of its attempt while busy
	idx       int    // heap index while waiting
	seq       uint64 // line entry generation: stale entries are skipped
}

func newFleet() *fleet { return &fleet{devs: map[emsd.Address]*fdev{}} }

func (d *fdev) ready() time.Time {
	if d.hold.After(d.due) {
		return d.hold
	}
	return d.due
}

// kindOf is the kind of d's next attempt.
func (d *fdev) kindOf() int {
	switch {
	case d.answered:
		return kLive
	case d.silent:
		return kProbe
	}
	return kFirst
}

func (f *fleet) get(a emsd.Address) *fdev {
	d := f.devs[a]
	if d == nil {
		d = &fdev{addr: a, idx: -1}
		f.devs[a] = d
	}
	return d
}

// place files d where its state says it belongs.
func (f *fleet) place(d *fdev, now time.Time) {
	if d.where == fBusy {
		return
	}
	if d.where == fWaiting {
		heap.Remove(&f.wait, d.idx)
	}
	switch r := d.ready(); {
	case d.due.IsZero() || d.parked:
		d.where = fIdle
	case r.After(now):
		d.where = fWaiting
		heap.Push(&f.wait, d)
	default:
		k := d.kindOf()
		if d.where == fReady && d.line == k {
			return // keeps its place in its line
		}
		d.where, d.line = fReady, k
		d.seq++
		f.lines[k].push(d)
	}
}

// note tells the fleet that a device has queued deliveries due at t (new
// work, or a rescan found its queue changed). A hold for another server
// delivering to it ends (see fdev.elsewhere): that server may be done, or
// gone with its work re-queued; a claim tells.
func (f *fleet) note(a emsd.Address, t, now time.Time) {
	d := f.get(a)
	if d.elsewhere {
		d.hold, d.elsewhere = time.Time{}, false
	}
	if d.due.IsZero() || t.Before(d.due) {
		d.due = t
	}
	d.parked = false
	if d.where == fBusy {
		d.again = true
		return
	}
	f.place(d, now)
}

// noteHeard tells the fleet when a device with queued deliveries was
// last heard from as the store knows it (its contact's time). A device
// this server has no outcome of yet (neither answered nor silent) and
// heard within recent counts as answering: its attempts are live ones,
// ahead of the first attempts to devices not heard from, until an
// attempt says otherwise (a live attempt left unanswered is cut or
// becomes a probe after the cut time, as any). After a restart this puts
// the devices that were answering before the ones that were switched
// off, which would otherwise share the first pass with them.
func (f *fleet) noteHeard(a emsd.Address, heard, now time.Time, recent time.Duration) {
	d := f.devs[a]
	if d == nil || d.answered || d.silent || d.fails > 0 || heard.IsZero() || now.Sub(heard) >= recent {
		return
	}
	d.answered = true
	if d.where == fReady {
		f.place(d, now) // to the live line
	}
}

// wake makes a device's queue due now (docs/protocol.md EMSD §9.4: any INVOKE is a
// poll) and lifts its hold. An authenticated sign of life also makes it
// answering (live); an unauthenticated one (any datagram from its
// address, which anyone can forge) makes a silent device one not heard
// from (a first attempt): forged polls cost first attempts, cut short
// when unanswered, never the live devices' workers.
func (f *fleet) wake(a emsd.Address, now time.Time, authenticated bool) {
	d := f.devs[a]
	if d == nil {
		return // nothing queued that this server knows of
	}
	d.hold = time.Time{}
	if authenticated {
		d.fails, d.answered = 0, true
	}
	d.silent = false
	if !d.due.IsZero() && d.due.After(now) {
		d.due = now
	}
	d.parked = false
	if d.where == fBusy {
		d.again = true
		return
	}
	f.place(d, now)
}

// unparkAll puts parked devices back in line (delivery control limits or
// the registry changed).
func (f *fleet) unparkAll(now time.Time) {
	for _, d := range f.devs {
		if d.parked {
			d.parked = false
			f.place(d, now)
		} else if d.where == fBusy {
			d.again = true
		}
	}
}

// unpark puts a device parked by its limits back in line (its registry
// entry changed).
func (f *fleet) unpark(a emsd.Address, now time.Time) {
	switch d := f.devs[a]; {
	case d == nil:
	case d.parked:
		d.parked = false
		f.place(d, now)
	case d.where == fBusy:
		d.again = true
	}
}

// release lifts every hold and unparks every device (the operator asked
// for a look at the queues: SIGHUP); failures stay counted.
func (f *fleet) release(now time.Time) {
	for _, d := range f.devs {
		d.hold, d.parked = time.Time{}, false
		if d.where == fBusy {
			d.again = true
		} else {
			f.place(d, now)
		}
	}
}

// take starts attempts: it returns due devices within the limits and
// marks them busy.
//
// While live devices wait for a worker (all delivery.concurrency live
// attempts run), and for calm after, first attempts are held to the
// probe share (lim[kProbe]): the answering devices use all the workers
// there are, so reaching more devices sooner would not deliver more, and
// a first attempt to a switched-off device costs the CPU, the store
// reads and the datagrams the live ones need. With no live work waiting
// (after a start that knows nothing of the devices; or mail for idle
// devices) the full first budget applies. A live device's next message
// waits in line for a moment after each delivery: calm (the cut time)
// keeps that moment from opening the budget.
func (f *fleet) take(now time.Time, lim fleetLimits) []*fdev {
	for len(f.wait) > 0 && !f.wait[0].ready().After(now) {
		d := heap.Pop(&f.wait).(*fdev)
		d.where = fIdle
		f.place(d, now)
	}
	var out []*fdev
	f.heldUntil = time.Time{}
	for k := range kinds {
		limit := lim[k]
		if k == kFirst && f.lines[kLive].waiting() {
			f.contended = now
		}
		held := k == kFirst && !f.contended.IsZero() && !now.After(f.contended.Add(f.calm)) && lim[kProbe] < limit
		if held {
			limit = lim[kProbe]
		}
		for f.busy[k] < limit {
			d := f.lines[k].pop()
			if d == nil {
				break
			}
			d.where, d.kind, d.again = fBusy, k, false
			f.busy[k]++
			out = append(out, d)
		}
		if held && f.busy[k] < lim[k] && f.lines[k].waiting() {
			f.heldUntil = f.contended.Add(f.calm)
		}
	}
	return out
}

// inFlight is the number of attempts in flight.
func (f *fleet) inFlight() int { return f.busy[kLive] + f.busy[kFirst] + f.busy[kProbe] }

// record frees the slot of d's attempt once the attempt is over and only
// its outcome remains to be written: the next device in line can claim
// and invoke while that write waits for its commit. The limits bound the
// attempts on the network; a device's outcome write, a commit wait of
// several milliseconds, would otherwise hold a slot for a third of a live
// delivery's time, which with fewer answering devices than slots in
// line makes the rate follow the store's commit latency. d stays busy
// (one attempt per device at a time; its next waits for the outcome, and
// finish). At most limit outcomes are written that way at once; beyond,
// the slot is held as before. false: not freed.
func (f *fleet) record(d *fdev, limit int) bool {
	if d.where != fBusy || d.recording || f.recording >= limit {
		return false
	}
	f.busy[d.kind]--
	d.recording = true
	f.recording++
	return true
}

// promote makes d's attempt, unanswered for the cut time, a probe if
// fewer than probeLimit run; false: cut it short.
func (f *fleet) promote(d *fdev, probeLimit int) bool {
	if d.where != fBusy || d.recording || d.kind == kProbe {
		return true
	}
	if f.busy[kProbe] >= probeLimit {
		return false
	}
	f.busy[d.kind]--
	d.kind = kProbe
	f.busy[kProbe]++
	return true
}

// next is when the earliest held or future device falls due, or first
// attempts held to the probe share may go (take).
func (f *fleet) next() (time.Time, bool) {
	t, ok := f.heldUntil, !f.heldUntil.IsZero()
	if len(f.wait) > 0 && (!ok || f.wait[0].ready().Before(t)) {
		t, ok = f.wait[0].ready(), true
	}
	return t, ok
}

// outcome of one attempt, as the fleet sees it.
type fleetOutcome int

const (
	fDone       fleetOutcome = iota // delivered, or refused for good: the device answers
	fTransient                      // answered, but not now (resource error): hold with backoff
	fSilent                         // no answer: hold with backoff, probe from now on
	fNothing                        // nothing due: next says when (ok false: nothing queued)
	fParked                         // due deliveries, none claimable (delivery control, offline)
	fElsewhere                      // another server has a delivery to it in flight
	fAbandoned                      // never reached the device (shutdown): leave as is
	fStoreError                     // the store failed to answer: look again after storeErrorHold
)

// storeErrorHold is how long a device waits after the store failed to
// answer for it: short, so that its queue goes on soon after the store
// is back.
const storeErrorHold = 2 * time.Second

// finish ends d's attempt. backoff is the hold after 'fails' consecutive
// failures; next and ok are the device's earliest queued delivery for
// fNothing and fParked; elsewhere is how long to leave a device another
// server delivers to.
func (f *fleet) finish(d *fdev, o fleetOutcome, now time.Time, backoff func(fails int) time.Duration,
	next time.Time, ok bool, elsewhere time.Duration) {
	if d.recording {
		d.recording = false
		f.recording--
	} else {
		f.busy[d.kind]--
	}
	d.where = fIdle
	again := d.again
	d.again, d.elsewhere = false, false
	switch o {
	case fDone:
		d.fails, d.answered, d.silent, d.hold = 0, true, false, time.Time{}
		d.due = now // maybe more: the next claim tells
	case fTransient, fSilent:
		d.fails++
		d.answered, d.silent = o == fTransient, o == fSilent
		d.hold = now.Add(backoff(d.fails))
	case fNothing:
		switch {
		case again:
			d.due = now // woken meanwhile: look once more
		case !ok:
			delete(f.devs, d.addr)
			return
		default:
			d.due = next // (due meanwhile, maybe: then it goes in line)
		}
	case fParked:
		if again {
			d.due = now
		} else {
			d.due, d.parked = next, true
		}
	case fElsewhere:
		// Not this server's to call answering: its next attempt asks
		// where the device is before it claims (attemptDevice).
		d.hold, d.elsewhere, d.answered = now.Add(elsewhere), true, false
	case fStoreError:
		d.hold = now.Add(storeErrorHold)
	case fAbandoned:
	}
	f.place(d, now)
}

// line is a first-come-first-served queue of devices; entries whose
// device moved on since (seq changed, or no longer ready) are skipped.
type line struct {
	q    []lineEntry
	head int
}

type lineEntry struct {
	d   *fdev
	seq uint64
}

func (l *line) push(d *fdev) {
	if l.head > 0 && l.head >= len(l.q)/2 { // reuse the consumed half
		l.q = append(l.q[:0], l.q[l.head:]...)
		l.head = 0
	}
	l.q = append(l.q, lineEntry{d, d.seq})
}

// waiting reports whether a device waits in the line (entries of devices
// that moved on are dropped on the way).
func (l *line) waiting() bool {
	for l.head < len(l.q) {
		e := l.q[l.head]
		if e.d.where == fReady && e.d.seq == e.seq {
			return true
		}
		l.q[l.head] = lineEntry{}
		l.head++
	}
	return false
}

func (l *line) pop() *fdev {
	for l.head < len(l.q) {
		e := l.q[l.head]
		l.q[l.head] = lineEntry{}
		l.head++
		if e.d.where == fReady && e.d.seq == e.seq {
			return e.d
		}
	}
	return nil
}

// dueHeap orders waiting devices by ready time.
type dueHeap []*fdev

func (h dueHeap) Len() int           { return len(h) }
func (h dueHeap) Less(i, j int) bool { return h[i].ready().Before(h[j].ready()) }
func (h dueHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].idx, h[j].idx = i, j
}
func (h *dueHeap) Push(x any) {
	d := x.(*fdev)
	d.idx = len(*h)
	*h = append(*h, d)
}
func (h *dueHeap) Pop() any {
	old := *h
	d := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	d.idx = -1
	return d
}
