package server

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/mailconv"
	"github.com/esro-emsdp/emsdp/server/internal/storedid"
	"github.com/esro-emsdp/emsdp/store"
)

// segKey identifies one submission INVOKE independently of its ESRO
// reference: a device that re-invokes a segment after an ESRO failure uses
// the same socket, instance id and octets (§1.5 Recommend).
type segKey struct {
	from submitter
	id   uint8
	sum  [32]byte
}

// submitter keys the reassembly of segmented submissions: a device's
// address and the socket it sends from. Two programs of one device (two
// runs of emsdp ua send, which both start their sequence ids afresh) then
// never have their segments joined; a device whose address changes in the
// middle of a message has it refused and sends it again.
type submitter struct {
	dev  emsd.Address
	peer netip.AddrPort
}

type segEntry struct {
	answer []byte
	sub    *store.Submission // set for the segment that completed a message
	ipm    *emsd.IPM         // sub's message, decoded
	// full is a message the segment completed but that could not be
	// committed: a re-invocation of the segment retries the commit
	// instead of failing on the reassembler's forgotten sequence.
	full *emsd.SubmitArgument
	at   time.Time
}

// segCache remembers the answers to recent segment INVOKEs so that a
// re-invoked segment gets the same answer instead of a duplicate-segment
// error from the reassembler. An entry is forgotten as soon as the device
// acknowledges its answer: the device then knows the segment arrived and
// will not re-invoke it, so a later identical segment is a new message (a
// reference UA restarts its instance ids and sequence ids at every start,
// docs/protocol.md EMSD §1.5, §8). Bounded in size and age.
type segCache struct {
	mu    sync.Mutex
	m     map[segKey]*segEntry
	order []segKey
	ttl   time.Duration
	max   int
}

func (c *segCache) get(k segKey, now time.Time) *segEntry {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.m[k]
	if e == nil || now.Sub(e.at) > c.ttl {
		return nil
	}
	return e
}

func (c *segCache) del(k segKey) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, k) // its place in order goes when it reaches the front
}

func (c *segCache) put(k segKey, e *segEntry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[segKey]*segEntry{}
	}
	if _, ok := c.m[k]; !ok {
		c.order = append(c.order, k)
	}
	c.m[k] = e
	for len(c.order) > c.max || (len(c.order) > 0 && c.m[c.order[0]] == nil) {
		delete(c.m, c.order[0])
		c.order = c.order[1:]
	}
}

// activeSubs tracks the submissions whose RESULT handlers still wait for
// the device's confirmation: how many handlers wait (a submission
// re-invoked while the first handler still waits must not be dropped by
// the first one's verify), the socket the submission came from, and
// whether a confirmation has arrived (before the store has heard of it).
type activeSubs struct {
	mu sync.Mutex
	m  map[int64]*activeSub
	// gone lists resolved submissions, oldest first: they stay known (as
	// not re-invocable) for resolvedGrace, since a concurrent INVOKE may
	// have read the store before the resolution was committed.
	gone []goneSub
	// devices serialises, per device (striped), finding a submission's
	// earlier copy and registering a new one, so that of two concurrent
	// submissions the second sees the first with its socket.
	devices [64]sync.Mutex
}

// lockDevice locks addr's stripe of devices and returns the unlock.
func (a *activeSubs) lockDevice(addr uint32) func() {
	m := &a.devices[addr%uint32(len(a.devices))]
	m.Lock()
	return m.Unlock
}

type activeSub struct {
	waiters   int
	peer      netip.AddrPort
	confirmed bool
	resolved  bool
}

type goneSub struct {
	id int64
	at time.Time
}

// resolvedGrace is how long a resolved submission stays known: far longer
// than one store read.
const resolvedGrace = 30 * time.Second

// wait registers a handler waiting for the confirmation of submission id
// from peer.
func (a *activeSubs) wait(id int64, peer netip.AddrPort) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.m == nil {
		a.m = map[int64]*activeSub{}
	}
	e := a.m[id]
	if e == nil {
		e = &activeSub{peer: peer}
		a.m[id] = e
	}
	e.waiters++
}

// done ends a wait and returns how many handlers still wait. The
// submission stays known until resolved is called.
func (a *activeSubs) done(id int64, confirmed bool) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	e := a.m[id]
	if e == nil {
		return 0
	}
	e.waiters--
	e.confirmed = e.confirmed || confirmed
	return max(e.waiters, 0)
}

// resolved marks a submission released or dropped (or left for the next
// start): no later INVOKE is its re-invocation. Unless another handler
// still waits for it, it is forgotten after resolvedGrace.
func (a *activeSubs) resolved(id int64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	now := time.Now()
	for len(a.gone) > 0 && now.Sub(a.gone[0].at) > resolvedGrace {
		if e := a.m[a.gone[0].id]; e != nil && e.resolved && e.waiters <= 0 {
			delete(a.m, a.gone[0].id)
		}
		a.gone = a.gone[1:]
	}
	if e := a.m[id]; e != nil && e.waiters <= 0 {
		e.resolved = true
		a.gone = append(a.gone, goneSub{id, now})
	}
}

// waiting returns how many handlers wait for submission id.
func (a *activeSubs) waiting(id int64) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	if e := a.m[id]; e != nil {
		return e.waiters
	}
	return 0
}

// mayReinvoke reports whether an INVOKE from peer can be a re-invocation
// of submission id as far as this process knows: a re-invocation comes
// from the socket of the first one (§1.5), and not after the device
// confirmed the RESULT. Unknown here (another process, or before a
// restart): true, and the stored state decides.
func (a *activeSubs) mayReinvoke(id int64, peer netip.AddrPort) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	e := a.m[id]
	return e == nil || (!e.confirmed && !e.resolved && e.peer == peer)
}

// intermediateResult answers a segment that does not complete a message:
// docs/protocol.md EMSD §8 recommends zeros (the reference sends leftovers).
func intermediateResult(o emsd.Options) []byte {
	b, _ := (&emsd.SubmitResult{}).Marshal(o)
	return b
}

func (s *Server) submitResult(rec *store.Submission, o emsd.Options) ([]byte, error) {
	b, err := (&emsd.SubmitResult{MessageID: emsd.LocalMessageID{SubmissionTime: emsd.Time(rec.LocalTime), Number: rec.Number}}).Marshal(o)
	if err != nil {
		return nil, err
	}
	// 1.0: the codec writes the reference's inner tag 25 (docs/protocol.md EMSD §4);
	// without the quirk switch send the standard 30.
	if o.Version == emsd.V1_0 && !s.conf().Compat.SubmitResultTag25 && len(b) > 2 && b[2] == 0x25 {
		b[2] = 0x30
	}
	return b, nil
}

// handleSubmit performs Submission (op 33, or 0 from a 1.0 device, on SAP
// 5; docs/protocol.md EMSD §9.5): decode, identify, reassemble, commit, RESULT, and
// on confirmation release the message.
func (s *Server) handleSubmit(ctx context.Context, w esro.ResponseWriter, inv *esro.Invocation, peer netip.AddrPort, v emsd.Version, woken bool) {
	iid, arg, err := emsd.StripInstanceID(emsd.Operation(inv.Operation), inv.Data)
	if err != nil {
		s.refuse(w, "submit", emsd.CodeProtocolViolation, "no instance id")
		return
	}
	o := s.opts(v)
	var sa emsd.SubmitArgument
	if err := sa.Unmarshal(arg, o); err != nil {
		s.refuse(w, "submit", emsd.CodeOf(err), err.Error())
		return
	}
	dev, authed, err := s.devs.identify(ctx, w, peer, sa.Security, true)
	if err != nil {
		s.refuseIdentity(w, "submit", peer, err)
		return
	}
	if dev.version != v {
		s.refuse(w, "submit", emsd.CodeProtocolViolation, "credentials name a device of another protocol version")
		return
	}
	if authed {
		s.contacts.heard(dev, peer, false)
	}
	if !woken {
		s.wake(dev.addr, authed)
	} else if authed {
		s.touch(dev.addr, true)
	}
	now := time.Now()
	var key segKey
	var e *segEntry
	if sa.Segment != nil {
		key = segKey{from: submitter{dev.addr, peer}, id: iid, sum: sha256.Sum256(arg)}
		e = s.segs.get(key, now)
	}
	if e != nil && e.full == nil {
		s.metrics.submissions.WithLabelValues("reinvoked").Inc()
		if err := w.Result(esro.EncodingBER, e.answer); err != nil {
			return
		}
		if e.sub != nil {
			s.subs.wait(e.sub.ID, peer)
			s.afterResult(w, dev, peer, e.sub, e.ipm, key)
		} else {
			s.forgetWhenConfirmed(w, key)
		}
		return
	}
	var full *emsd.SubmitArgument
	if e != nil {
		full = e.full
	} else if full, err = s.reasm.AddSubmit(now, submitter{dev.addr, peer}, &sa); err != nil {
		s.refuse(w, "submit", emsd.CodeOf(err), err.Error())
		return
	}
	if full == nil { // more segments to come (docs/protocol.md EMSD §8)
		ans := intermediateResult(o)
		s.segs.put(key, &segEntry{answer: ans, at: now})
		if w.Result(esro.EncodingBER, ans) == nil {
			s.forgetWhenConfirmed(w, key)
		}
		return
	}
	if full.ContentType != emsd.ContentIPM { // docs/protocol.md EMSD §9.5 step 3
		s.refuse(w, "submit", emsd.CodeProtocolViolation, "content type "+full.ContentType.String())
		return
	}
	c, err := emsd.DecodeContents(emsd.ContentIPM, full.Contents, o)
	if err != nil {
		s.refuse(w, "submit", emsd.CodeOf(err), err.Error())
		return
	}
	ipm := c.(*emsd.IPM)
	if len(ipm.Heading.Recipients) == 0 {
		s.refuse(w, "submit", emsd.CodeProtocolViolation, "no recipients")
		return
	}
	content := full.Contents
	if o != (emsd.Options{}) { // the store keeps 1.1 in list order
		if content, err = ipm.Marshal(emsd.Options{}); err != nil {
			s.refuse(w, "submit", emsd.CodeProtocolViolation, err.Error())
			return
		}
	}
	sum := sha256.Sum256(content)
	rec, dup, err := s.addSubmission(ctx, peer, &store.Submission{Device: uint32(dev.addr), InstanceID: iid,
		ContentHash: sum[:], ContentType: uint32(emsd.ContentIPM), Content: content, Received: now})
	if err != nil {
		if sa.Segment != nil {
			s.segs.put(key, &segEntry{full: full, at: now})
		}
		s.log.Error("store submission", "device", dev.addr, "err", err)
		s.refuse(w, "submit", emsd.CodeResource, "store")
		return
	}
	ans, err := s.submitResult(rec, o)
	if err != nil {
		s.subs.done(rec.ID, false)
		s.subs.resolved(rec.ID) // stays pending: released or dropped at the next start
		s.log.Error("encode SubmitResult", "err", err)
		s.refuse(w, "submit", emsd.CodeResource, "encode")
		return
	}
	if sa.Segment != nil {
		s.segs.put(key, &segEntry{answer: ans, sub: rec, ipm: ipm, at: now})
	}
	if dup {
		s.metrics.submissions.WithLabelValues("duplicate").Inc()
	} else {
		s.metrics.submissions.WithLabelValues("accepted").Inc()
		s.log.Info("submission", "device", dev.addr, "id", emsd.LocalMessageID{SubmissionTime: emsd.Time(rec.LocalTime), Number: rec.Number},
			"octets", len(content), "recipients", len(ipm.Heading.Recipients))
	}
	if err := w.Result(esro.EncodingBER, ans); err != nil {
		s.log.Debug("submit result", "device", dev.addr, "err", err)
	}
	s.afterResult(w, dev, peer, rec, ipm, key)
}

// addSubmission commits a submission, or finds the copy it re-invokes: the
// same device, instance id and content within the dedupe window, whose
// RESULT the device may not have got (docs/protocol.md EMSD §1.5 Recommend: a
// re-invocation after an ESRO failure reuses the instance id). An earlier
// copy the device is known to have been told about (its RESULT was
// acknowledged, or submission verify answered "send") or that was dropped
// is not re-invoked: instance ids are 8 bits, wrap, and restart at 0 with
// every start of a device (a reference UA, each run of emsdp ua send), so
// the same octets are then a new message, which must not be merged into
// the old one and lost. For the same reason a copy whose handler is still
// here matches only an INVOKE from the socket it came from and only
// before its confirmation (activeSubs.mayReinvoke): two programs of one
// device, each starting at instance id 0, are two senders.
//
// On success the caller is registered as waiting for the confirmation of
// rec (activeSubs.wait) and must end it with activeSubs.done, which
// afterResult does.
func (s *Server) addSubmission(ctx context.Context, peer netip.AddrPort, sub *store.Submission) (*store.Submission, bool, error) {
	defer s.subs.lockDevice(sub.Device)()
	since := sub.Received.Add(-time.Duration(s.conf().EMSD.DedupeWindow))
	for {
		rec, dup, err := s.st.AddSubmission(ctx, sub, since)
		if err != nil {
			return rec, dup, err
		}
		if !dup || (mayReinvoke(rec) && s.subs.mayReinvoke(rec.ID, peer)) {
			s.subs.wait(rec.ID, peer)
			return rec, dup, nil
		}
		// Look only past that copy (the store keeps milliseconds).
		since = rec.Received.Add(time.Millisecond)
	}
}

// mayReinvoke reports whether the device may re-invoke submission rec: it
// may not know that rec succeeded.
func mayReinvoke(rec *store.Submission) bool {
	switch rec.State {
	case store.SubmissionPending:
		return true
	case store.SubmissionDropped:
		return false
	}
	return rec.Verify != "confirmed" && rec.Verify != "send"
}

// forgetWhenConfirmed waits for the acknowledgement of an intermediate
// segment's RESULT and then forgets its answer (see segCache).
func (s *Server) forgetWhenConfirmed(w esro.ResponseWriter, key segKey) {
	if w.Confirmed(s.ctx) == nil {
		s.segs.del(key)
	}
}

// afterResult waits for the device's acknowledgement of the RESULT and
// releases the submission, or runs submission verify when it does not
// come (docs/protocol.md EMSD §9.5 steps 7-8). key is the segment cache entry of
// the last segment of a segmented submission (zero otherwise); peer is
// where the submission came from, hence where the verify goes: behind a
// NAT the only address that reaches the device. ipm is the submitted
// message, decoded once by the handler and carried to the release.
func (s *Server) afterResult(w esro.ResponseWriter, dev *device, peer netip.AddrPort, rec *store.Submission, ipm *emsd.IPM, key segKey) {
	if rec.State != store.SubmissionPending {
		s.subs.done(rec.ID, false)
		s.subs.resolved(rec.ID)
		return
	}
	err := w.Confirmed(s.ctx)
	others := s.subs.done(rec.ID, err == nil)
	switch {
	case err == nil:
		if key != (segKey{}) {
			s.segs.del(key)
		}
		s.release(rec, ipm, "confirmed")
		s.subs.resolved(rec.ID)
	case s.ctx.Err() != nil:
		// Shutting down: the submission stays pending and is released
		// at the next start.
	case others > 0:
		// A re-invocation of the same submission is waiting for its own
		// confirmation and decides.
	default:
		s.verifySubmission(dev, peer, rec, ipm)
	}
}

// verifySubmission asks the device whether it knows the submission
// succeeded (op 6, MTS SAP 6 -> UA SAP 7, 2-way). No answer counts as
// compat.verify_failure says: "send" by default, since a possible
// duplicate is better than a loss (Open Point 25).
func (s *Server) verifySubmission(dev *device, peer netip.AddrPort, rec *store.Submission, ipm *emsd.IPM) {
	defer s.subs.resolved(rec.ID)
	id := emsd.LocalMessageID{SubmissionTime: emsd.Time(rec.LocalTime), Number: rec.Number}
	verdict := "failure"
	if dev.version == emsd.V1_1 { // 1.0 has no verify operations (docs/protocol.md EMSD §1.4)
		o := s.opts(dev.version)
		arg, err := (&emsd.SubmissionVerifyArgument{MessageID: emsd.MessageID{IsLocal: true, Local: id}}).Marshal(o)
		if err == nil {
			// First where the submission came from (the device's socket,
			// the only address that reaches it behind a NAT), then, when
			// that is gone (emsdp ua send has exited), the registered
			// address, where its receiver answers from the same verify
			// list.
			to := []netip.AddrPort{peer}
			if dev.ap.IsValid() && dev.ap != peer {
				to = append(to, dev.ap)
			}
			ep, to := s.verifyRoute(dev, to)
			var res *esro.Result
			err = errNoRoute
			for _, ap := range to {
				res, err = ep.Invoke(s.ctx, &esro.Request{To: ap, SAP: uint8(emsd.SAPUAPerformer2Way),
					Operation: uint8(emsd.OpSubmissionVerify), Encoding: esro.EncodingBER, Handshake: esro.TwoWay, Data: arg})
				if !isFailure(err) {
					break
				}
			}
			if s.ctx.Err() != nil || errors.Is(err, esro.ErrClosed) {
				return // stays pending; released at the next start
			}
			var vr emsd.SubmissionVerifyResult
			if err == nil && vr.Unmarshal(res.Data, o) == nil {
				switch vr.Status {
				case emsd.SendMessage:
					verdict = "send"
				case emsd.DropMessage:
					verdict = "drop"
				}
			}
		}
	}
	s.metrics.verifies.WithLabelValues(verdict).Inc()
	lv := slog.LevelInfo
	if verdict == "failure" {
		lv = slog.LevelWarn
	}
	s.log.Log(s.ctx, lv, "submission verify", "device", dev.addr, "id", id, "verdict", verdict)
	if verdict == "drop" || (verdict == "failure" && s.conf().Compat.VerifyFailure == "drop") {
		if s.subs.waiting(rec.ID) > 0 {
			return // re-invoked meanwhile: that invocation decides
		}
		if _, err := s.st.DropSubmission(s.ctx, rec.ID, verdict); err != nil {
			s.log.Error("drop submission", "id", id, "err", err)
		}
		return
	}
	s.release(rec, ipm, verdict)
}

// release queues the deliveries and relays of a pending submission. ipm
// is its message decoded, nil for one read from the store (recovered at
// start), which is then decoded here.
func (s *Server) release(rec *store.Submission, ipm *emsd.IPM, verify string) {
	ctx := s.ctx
	w, err := s.submissionWork(ctx, rec, ipm)
	if err != nil {
		s.log.Error("release submission", "id", rec.ID, "err", err)
		return // stays pending: retried at the next start
	}
	ok, err := s.st.ReleaseSubmission(ctx, rec.ID, verify, w)
	if err != nil {
		s.log.Error("release submission", "id", rec.ID, "err", err)
		return
	}
	if ok {
		s.noteQueued(w)
	}
}

// submissionWork converts a submitted IPM into its deliveries (local
// recipients, which never leave the server) and one relay (Internet
// recipients, the IPM formatted as Internet mail), plus immediate
// non-delivery reports for recipients that cannot be served
// (docs/protocol.md EMSD §9.5-9.7). Routing (mailconv.Route) comes first;
// formatting only when some recipient is on the Internet.
func (s *Server) submissionWork(ctx context.Context, rec *store.Submission, ipm *emsd.IPM) (store.Work, error) {
	var w store.Work
	if ipm == nil {
		ipm = new(emsd.IPM)
		if err := ipm.Unmarshal(rec.Content, emsd.Options{}); err != nil {
			return w, err
		}
	}
	lid := emsd.LocalMessageID{SubmissionTime: emsd.Time(rec.LocalTime), Number: rec.Number}
	mid := emsd.MessageID{IsLocal: true, Local: lid}
	// Route first: mail for devices only is never rendered as Internet
	// mail.
	m := s.devs.mapping()
	recipients, err := mailconv.Route(ipm, s.domain, m)
	if err != nil {
		return w, err
	}
	now := time.Now()
	reg := s.registry()
	prio := priorityOf(ipm)
	var remote []store.RelayRecipient
	var fails []reportItem
	done := map[emsd.Address]bool{}
	for _, r := range recipients {
		rep := store.Report{Device: rec.Device, Flags: uint8(r.Flags), MessageID: storedid.MessageID(mid).String(),
			Recipient: storedid.Internet(r.Addr)}
		var fail *outcome
		switch {
		case r.Err != nil:
			o := failed(emsd.ReasonUnableToTransfer, emsd.DiagUnrecognizedAddress, r.Err.Error())
			fail = &o
		case r.Local:
			rep.Recipient = storedid.Address(emsd.LocalOR(r.Device, "")).String()
			if reg.get(r.Device) == nil {
				o := failed(emsd.ReasonUnableToTransfer, emsd.DiagRecipientUnknown, "no such EMSD address")
				fail = &o
				break
			}
			if done[r.Device] {
				break
			}
			done[r.Device] = true
			content, err := s.copyFor(ipm, rec.Content, r.Device)
			if err != nil {
				o := failed(emsd.ReasonUnableToTransfer, emsd.DiagProtocolViolation, err.Error())
				fail = &o
				break
			}
			st := uint32(lid.SubmissionTime)
			w.Deliveries = append(w.Deliveries, store.NewDelivery{Device: uint32(r.Device), MessageID: storedid.MessageID(mid).String(),
				SubmissionTime: &st, ContentType: uint32(emsd.ContentIPM), Content: content, Priority: prio,
				NextAttempt: now, Expires: now.Add(time.Duration(s.conf().Delivery.Expiry)), Report: rep})
		default:
			remote = append(remote, store.RelayRecipient{Addr: r.Addr, Report: rep})
		}
		if fail != nil {
			s.metrics.deliveries.WithLabelValues("rejected").Inc()
			fails = append(fails, reportItem{rep, *fail})
		}
	}
	// The recipients refused at submission are known together: one report.
	rw, err := s.reportWork(ctx, fails)
	if err != nil {
		return w, err
	}
	w.Deliveries = append(w.Deliveries, rw.Deliveries...)
	w.Relays = append(w.Relays, rw.Relays...)
	if len(remote) > 0 {
		out, err := mailconv.FormatIPM(ipm, mailconv.FormatOptions{Domain: s.domain, MessageID: rfc822MessageID(lid, s.domain),
			Date: lid.SubmissionTime.UTC(), MTS: s.hostname, Mapping: m})
		if err != nil {
			return w, err
		}
		msg := append(s.receivedEMSD(rec, reg, rfc822MessageID(lid, s.domain)), out.Message...)
		w.Relays = append(w.Relays, store.NewRelay{From: s.deviceAddrSpec(emsd.Address(rec.Device)), Message: msg,
			Recipients: remote, NextAttempt: now, Expires: now.Add(time.Duration(s.conf().Relay.Expiry))})
	}
	return w, nil
}

// receivedEMSD is the Received: field for the EMSD hop of a submission
// going out as Internet mail (RFC 5321 §4.4): from the device, at its
// registered address, by this host, with the message's id.
func (s *Server) receivedEMSD(rec *store.Submission, reg *registry, id string) []byte {
	from := "device " + emsd.Address(rec.Device).String()
	if d := reg.get(emsd.Address(rec.Device)); d != nil && d.ap.IsValid() {
		from += " ([" + d.ap.Addr().Unmap().String() + "])"
	}
	line := fmt.Sprintf("Received: from %s\r\n\tby %s (emsdp) with EMSD", from, s.hostname)
	if id != "" {
		line += " id " + id
	}
	return fmt.Appendf(nil, "%s;\r\n\t%s\r\n", line, rec.Received.UTC().Format("Mon, 02 Jan 2006 15:04:05 -0700"))
}

// copyFor returns the IPM as delivered to device to (docs/protocol.md EMSD §9.5):
//   - blind-copy recipients other than to itself are removed (§11 T0103,
//     "Bcc hiding");
//   - every address that designates a device (EMSD=<n>, `"198.036": `,
//     number@domain, an alias) is written as a local address, as it would
//     be had the message gone out as Internet mail and come back (§6.2).
//     A device finds itself among the local recipients only (§10.3): the
//     reference UA answers ERROR 7 to a delivery that does not name it so,
//     although it stores it (seen with the tester scripts' EMSD=<n> and
//     T0104's number@domain), and the sender would get a false
//     non-delivery report.
//
// When nothing changes it is the submitted octets.
func (s *Server) copyFor(ipm *emsd.IPM, orig []byte, to emsd.Address) ([]byte, error) {
	m := s.devs.mapping()
	changed := false
	local := func(a emsd.ORAddress) emsd.ORAddress {
		if a.IsLocal {
			return a
		}
		if n, ok := m.Device(a); ok {
			changed = true
			return emsd.LocalOR(n, "")
		}
		return a
	}
	c := *ipm
	h := &c.Heading
	if h.Sender != nil {
		sender := local(*h.Sender)
		h.Sender = &sender
	}
	h.Originator = local(h.Originator)
	h.Recipients = nil
	for _, r := range ipm.Heading.Recipients {
		r.Recipient = local(r.Recipient)
		if r.Flags.Has(emsd.RcptBlindCopy) && !(r.Recipient.IsLocal && r.Recipient.Local == to) {
			changed = true
			continue
		}
		h.Recipients = append(h.Recipients, r)
	}
	if ipm.Heading.ReplyTo != nil { // nil = absent, empty = present
		h.ReplyTo = make([]emsd.ORAddress, 0, len(ipm.Heading.ReplyTo))
		for _, a := range ipm.Heading.ReplyTo {
			h.ReplyTo = append(h.ReplyTo, local(a))
		}
	}
	if !changed {
		return orig, nil
	}
	return c.Marshal(emsd.Options{})
}

// priorityOf maps the IPM's per-message flags to the delivery-control
// priority scale (docs/protocol.md EMSD §5): 0 non-urgent, 1 normal, 2 urgent.
func priorityOf(ipm *emsd.IPM) uint8 {
	switch f := ipm.Heading.Flags; {
	case f.Has(emsd.MsgPriorityUrgent):
		return 2
	case f.Has(emsd.MsgPriorityNonUrgent):
		return 0
	}
	return 1
}

// recoverSubmissions releases (or drops, per compat.verify_failure) the
// submissions received before 'before' and still pending: at start, those
// of a previous process that stopped between the RESULT and its
// confirmation; later, any whose release failed (a store error).
func (s *Server) recoverSubmissions(ctx context.Context, before time.Time) error {
	pend, err := s.st.PendingSubmissions(ctx, before)
	if err != nil {
		return err
	}
	verdict := s.conf().Compat.VerifyFailure
	for _, rec := range pend {
		if s.subs.waiting(rec.ID) > 0 {
			continue // its handler still waits for the confirmation
		}
		if verdict == "drop" {
			if _, err := s.st.DropSubmission(ctx, rec.ID, "restart"); err != nil {
				return err
			}
			continue
		}
		s.release(rec, nil, "restart")
	}
	if len(pend) > 0 {
		s.log.Info("resolved submissions left pending", "count", len(pend), "as", verdict)
	}
	return nil
}
