package esro

import (
	"fmt"
	"net/netip"
	"time"
)

// ---- completion and release ----

func (m *machine) finishInvoker(inv *invocation, res *Result, err error) {
	if inv.finished {
		return
	}
	inv.res, inv.err, inv.finished = res, err, true
	inv.done <- struct{}{} // never blocks: one slot, one token
}

// finishPerformer records the end of a performer invocation: nil for a
// confirm, else the failure. A handler still working is cancelled.
func (m *machine) finishPerformer(inv *invocation, err error) {
	if inv.finished {
		return
	}
	inv.err, inv.finished = err, true
	if inv.done != nil {
		close(inv.done)
	}
	if !inv.answered {
		inv.hctx.cancel(err)
	}
}

func (m *machine) release(inv *invocation) {
	m.disarm(inv)
	p := inv.peer
	if inv.perf {
		p.perf.del(inv)
		m.nperf--
		if inv.unproven {
			m.countUnproven(inv, -1)
		}
		p.ip.n--
		m.st.inflightPerf.Add(-1)
		inv.hctx.cancel(ErrInvocationEnded)
	} else {
		p.inv.del(inv)
		m.ninv--
		r := inv.key.ref
		p.held[r>>6] &^= 1 << (r & 63)
		p.nheld--
		m.st.inflightInv.Add(-1)
		for _, w := range p.waiters {
			close(w)
		}
		p.waiters = p.waiters[:0]
	}
	m.setState(inv, stReleased)
	m.unuse(p)
}

// ---- user requests ----

// invoke starts an invocation, or returns a channel to wait on when every
// reference number towards the peer is held.
func (m *machine) invoke(now time.Time, req *Request, to netip.AddrPort) (*invocation, chan struct{}, error) {
	if m.closing || m.closed {
		return nil, nil, ErrClosed
	}
	if m.total() >= m.cfg.MaxInvocations {
		return nil, nil, m.localFailure(LocalResource, ErrTooManyInvokes)
	}
	pk := m.peerKey(to)
	p := m.peerFor(pk)
	ref, ok := m.allocRef(p)
	if !ok {
		w := make(chan struct{})
		m.use(p)
		p.waiters = append(p.waiters, w)
		m.st.refWaits.Add(1)
		return nil, w, nil
	}
	inv := newInvocation(3 + len(req.Data))
	inv.key, inv.addr, inv.peer, inv.hs, inv.hidx, inv.sentAt = invKey{pk, ref}, to, p, req.Handshake, -1, now
	pdu := PDU{Type: TypeInvoke, SAP: req.SAP, Ref: ref, Operation: req.Operation, Encoding: req.Encoding, Data: req.Data}
	kept, err := AppendPDU(inv.pduBuf(3+len(req.Data)), &pdu)
	if err != nil { // validated by the caller; kept for safety
		m.freeRef(p, ref)
		return nil, nil, err
	}
	inv.kept, inv.done = kept, m.token()
	p.inv.put(inv)
	m.ninv++
	m.st.inflightInv.Add(1)
	m.st.invokesOut.Add(1)
	m.setState(inv, stInvokeSent)
	p.loss.sent()
	m.send(to, kept)
	m.arm(inv, tRetx, now, m.rto(p, 0))
	return inv, nil, nil
}

// allocRef takes the next number of the engine-wide rotating counter that
// is not held towards p (docs/protocol.md ESRO §4).
func (m *machine) allocRef(p *peer) (uint8, bool) {
	if p.nheld >= 256 {
		return 0, false
	}
	for range 256 {
		m.nextRef++
		r := m.nextRef
		if !p.isHeld(r) {
			m.use(p)
			p.held[r>>6] |= 1 << (r & 63)
			p.nheld++
			return r, true
		}
	}
	return 0, false
}

// token returns a channel for an invoker's outcome: recycled, or new.
// Invoke gives it back with recycleToken once it has taken the token.
func (m *machine) token() chan struct{} {
	if c, ok := m.tokens.Get().(chan struct{}); ok {
		return c
	}
	return make(chan struct{}, 1)
}

func (m *machine) recycleToken(c chan struct{}) { m.tokens.Put(c) }

func (m *machine) freeRef(p *peer, r uint8) {
	p.held[r>>6] &^= 1 << (r & 63)
	p.nheld--
	m.unuse(p)
}

// stopWaiting removes a reference waiter that gave up.
func (m *machine) stopWaiting(to netip.AddrPort, w chan struct{}) {
	p := m.peers[m.peerKey(to)]
	if p == nil {
		return
	}
	for i, x := range p.waiters {
		if x == w {
			p.waiters = append(p.waiters[:i], p.waiters[i+1:]...)
			m.unuse(p)
			return
		}
	}
}

// abandon ends an invocation whose caller stopped waiting: no more
// retransmissions, but the number stays held for T_ref.
func (m *machine) abandon(now time.Time, inv *invocation, cause error) {
	m.finishInvoker(inv, nil, cause)
	if inv.st == stInvokeSent {
		inv.kept = nil
		m.refWait(now, inv)
	}
}

// answer is RESULT.request (isErr false) or ERROR.request.
func (m *machine) answer(now time.Time, inv *invocation, isErr bool, enc Encoding, value uint8, data []byte) error {
	switch {
	case m.closed:
		return ErrClosed
	case inv.answered:
		return ErrAnswered
	case inv.st != stInvokeReceived:
		return ErrInvocationEnded
	case enc > MaxEncoding:
		return fmt.Errorf("esro: encoding type %d out of range 0..%d", enc, MaxEncoding)
	case len(data) > m.cfg.PDUSize:
		return ErrTooLarge
	}
	pdu := PDU{Type: TypeResult, Ref: inv.key.ref, Encoding: enc, Data: data}
	if isErr {
		pdu.Type, pdu.Value = TypeError, value
	}
	kept, _ := AppendPDU(inv.pduBuf(3+len(data)), &pdu)
	inv.kept, inv.answered, inv.sentAt, inv.k = kept, true, now, 0
	m.st.answers.Add(1)
	inv.peer.loss.sent()
	m.reply(now, inv, kept)
	if inv.hs == ThreeWay {
		m.setState(inv, stAckWait)
		m.arm(inv, tRetx, now, m.rto(inv.peer, 0))
	} else {
		m.setState(inv, stResultSent)
		m.arm(inv, tInact, now, m.td.inact)
	}
	return nil
}

// bind is SAP-BIND.request (docs/protocol.md ESRO §3.3).
func (m *machine) bind(sap uint8, hs Handshake, h Handler) error {
	switch {
	case m.closed:
		return ErrClosed
	case sap == 0 || sap > MaxSAP:
		return fmt.Errorf("esro: SAP selector %d out of range 1..%d", sap, MaxSAP)
	case !hs.valid():
		return fmt.Errorf("esro: handshake %d is neither 2 nor 3", hs)
	case h == nil:
		return fmt.Errorf("esro: nil handler for SAP %d", sap)
	case m.saps[sap] != nil:
		return ErrSAPBound
	}
	m.saps[sap] = &binding{hs: hs, h: h}
	return nil
}

// unbind is SAP-UNBIND.request. Live invocations of the SAP end without
// further indications, but stay held for T_ref so that stale duplicates
// are absorbed rather than taken for new invocations (docs/protocol.md ESRO §3.3).
func (m *machine) unbind(now time.Time, sap uint8) error {
	if sap > MaxSAP || m.saps[sap] == nil {
		return ErrSAPNotBound
	}
	m.saps[sap] = nil
	m.eachInvocation(false, true, func(inv *invocation) {
		if inv.sap != sap || inv.st == stPerformerRefWait || inv.st == stFailedRefWait {
			return
		}
		inv.kept = nil
		m.finishPerformer(inv, ErrSAPNotBound)
		m.refWait(now, inv)
	})
	return nil
}

// shutdown stops new work and reports whether nothing active remains.
func (m *machine) shutdown() {
	m.closing = true
	if m.active == 0 {
		m.signalDrained()
	}
}

// close ends every invocation at once.
func (m *machine) close() {
	m.closed, m.closing = true, true
	m.eachInvocation(true, false, func(inv *invocation) { m.finishInvoker(inv, nil, ErrClosed) })
	m.eachInvocation(false, true, func(inv *invocation) {
		m.finishPerformer(inv, ErrClosed)
		inv.hctx.cancel(ErrClosed)
	})
	for _, p := range m.peers {
		for _, w := range p.waiters {
			close(w)
		}
		p.waiters = nil
	}
	m.signalDrained()
}
