package server

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/store"
)

// attemptDevice makes one attempt to a device: it claims the device's
// oldest due delivery, makes one attempt and records its outcome; then
// the device goes back in line (fleet.finish).
func (s *scheduler) attemptDevice(ctx context.Context, fd *fdev, f *flight) {
	a := fd.addr
	o, next, ok := fNothing, time.Time{}, false
	defer func() {
		s.mu.Lock()
		f.done = true
		if f.watchdog != nil {
			f.watchdog.Stop()
		}
		// A device another server sharing the store delivers to (that
		// server goes on with its queue) is left alone until new work
		// for it or a rescan finding its queue changed (fleet.note); one
		// the store failed to answer for, for storeErrorHold.
		s.fleet.finish(fd, o, time.Now(), s.deviceBackoff, next, ok, s.rescanEvery)
		delete(s.inflight, a)
		s.setInFlight()
		s.mu.Unlock()
		s.kick()
	}()
	var pk *store.Peeked
	if f.batch != nil {
		select {
		case <-f.batch.done:
		case <-ctx.Done():
			o = fAbandoned
			return
		}
		if p, ok := f.batch.got[uint32(a)]; ok {
			pk = &p
		}
	}
	// A first attempt, to a device not heard from, is made unclaimed when
	// this server has the store to itself: it then costs a read, not a
	// write the live devices' writes would queue behind, and its outcome
	// counts it (PeekDelivery). With a shared store the claim is what
	// keeps the servers apart.
	s.mu.Lock()
	peek := fd.kind == kFirst && s.conf().Store.Driver != StorePostgres
	s.mu.Unlock()
	dev := s.devs.current().get(a)
	var lim store.Limits
	var tg target
	// Where the delivery goes needs the device's contact. A peek, and the
	// claim of a live attempt (a device that answers: it has somewhere to
	// go), read it with the delivery (store.Delivery.Contact): no read of
	// its own per delivery. Other attempts (probes; first attempts that
	// claim, with a shared store) may find the device offline or another
	// server's, so they ask first, and claim only if it goes somewhere.
	withClaim := dev != nil && pk == nil && (peek || fd.kind == kLive)
	// waits says why the delivery cannot go now: offline, parked until
	// the device is heard (contact.go); heard by another server sharing
	// the store, left to it until the next rescan.
	waits := func(why string) {
		s.log.Debug("delivery waits", "device", a, "why", why)
		if why == targetElsewhere {
			o = fElsewhere
		} else {
			o, next, ok = fParked, time.Now(), true
		}
	}
	if dev != nil {
		if !withClaim {
			var why string
			var known *store.Contact
			if pk != nil {
				known = &pk.Contact
			}
			if tg, why = s.routes.targetOf(dev, known); why != "" {
				waits(why)
				return
			}
		}
		c := dev.Control
		if c.Operations != nil && !emsd.OperationSet(*c.Operations).Has(deliveryOp(dev.version)) {
			// Delivery not permitted at all (docs/protocol.md EMSD §9.12): parked
			// until the device's limits change.
			o, next, ok = fParked, time.Now(), true
			return
		}
		lim = store.Limits{MaxContentLength: c.MaxContentLength, LowestPriority: c.LowestPriority}
	}
	// The message is encoded and split while it is claimed, so that the
	// claim reserves its instance ids in the same write.
	var p prepared
	refIDs := s.conf().Compat.ReferenceInstanceIDs // once: a reconfiguration must not split an attempt
	if dev != nil {
		lim.InstanceIDs = func(d *store.Delivery) int {
			p = s.prepare(dev, d)
			if p.fail != nil || !p.carries || refIDs {
				return 0
			}
			return len(p.segs)
		}
	}
	claimAt := time.Now()
	var d *store.Delivery
	var err error
	switch {
	case peek && pk != nil && lim.MaxContentLength == nil && lim.LowestPriority == nil:
		d, err = peekedDelivery(pk.Delivery, lim)
	case peek:
		d, err = s.st.PeekDelivery(ctx, uint32(a), claimAt, lim)
	default:
		d, err = s.st.ClaimDelivery(ctx, uint32(a), claimAt, lim)
	}
	switch {
	case errors.Is(err, store.ErrNotFound):
		if next, ok, err = s.st.DeviceNextDue(ctx, uint32(a)); err != nil {
			if ctx.Err() == nil {
				s.log.Error("device next due", "device", a, "err", err)
			}
			o = fStoreError
		} else if ok && !next.After(claimAt) {
			o = fParked // due, yet nothing claimable: held back by its limits
		}
		return
	case errors.Is(err, store.ErrBusy):
		o = fElsewhere
		return
	case err != nil:
		if ctx.Err() != nil {
			o = fAbandoned
			return
		}
		s.log.Error("claim delivery", "device", a, "err", err)
		o = fStoreError
		return
	}
	ref := store.QueueRef{Kind: store.QueueDelivery, ID: d.ID}
	s.out.hold(ref)
	defer s.out.release(ref)
	if withClaim {
		var why string
		if tg, why = s.routes.targetOf(dev, &d.Contact); why != "" {
			if !peek { // claimed: back in the queue, the attempt not counted
				s.recordOutcome(d, attemptResult{kind: attemptRequeue, err: "waits: device " + why}, time.Time{})
			}
			waits(why)
			return
		}
	}
	s.mu.Lock()
	fails := fd.fails
	if peek {
		f.peeked = d.ID
	}
	s.mu.Unlock()
	r := s.attempt(ctx, dev, d, &p, refIDs, &tg, f)
	if peek && p.fail == nil && p.carries && !refIDs {
		r.ids = len(p.segs)
	}
	s.mu.Lock()
	if r.kind == attemptRequeue { // cancelled: by shutdown or by the watchdog
		switch {
		case f.abandoned:
			r.abandoned = true
		case f.cut:
			if tg.learned {
				s.contacts.failed(a, tg.to)
			}
			r = attemptResult{kind: attemptRespool, silent: true, took: r.took,
				err: fmt.Sprintf("no answer within %v, and every probe taken", r.took.Round(time.Millisecond))}
		}
	}
	// The attempt is over: its slot goes to the next device in line while
	// the outcome is written (fleet.record).
	freed := s.fleet.record(fd, s.conf().Delivery.Concurrency)
	if freed {
		if f.watchdog != nil {
			f.watchdog.Stop()
		}
		s.setInFlight()
	}
	s.mu.Unlock()
	if freed {
		s.kick()
	}
	s.recordOutcome(d, r, time.Now().Add(s.deviceBackoff(fails+1)))
	switch r.kind {
	case attemptDelivered, attemptFailed:
		o = fDone
	case attemptRespool:
		o = fTransient
		if r.silent {
			o = fSilent
		}
	case attemptRequeue:
		o = fAbandoned
	}
}

// peekedDelivery is d, read by a batch (store.BatchPeeker), as
// PeekDelivery would have returned it under lim (no content or priority
// limits): InstanceBase, the device's next instance id, is kept only
// when the delivery needs instance ids.
func peekedDelivery(d *store.Delivery, lim store.Limits) (*store.Delivery, error) {
	next := d.InstanceBase
	d.InstanceBase = 0
	if lim.InstanceIDs != nil {
		switch n := lim.InstanceIDs(d); {
		case n < 0 || n > 256:
			return nil, fmt.Errorf("%w: %d instance ids", store.ErrInvalid, n)
		case n > 0:
			d.InstanceBase = next
		}
	}
	return d, nil
}

// deviceBackoff is the hold after a device's fails-th consecutive failed
// attempt: delivery.retry, whose last delay repeats.
func (s *scheduler) deviceBackoff(fails int) time.Duration {
	return backoff(s.conf().Delivery.Retry, fails)
}
