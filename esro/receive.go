package esro

import (
	"net/netip"
	"time"
)

// ---- receive path (docs/protocol.md ESRO §2.7) ----

func (m *machine) receive(now time.Time, b []byte, from netip.AddrPort) {
	m.st.datagramsIn.Add(1)
	m.st.bytesIn.Add(uint64(len(b)))
	m.rx = len(b)
	p, err := ParsePDU(b)
	if err != nil {
		switch {
		case len(b) == 0:
			m.drop(DropEmpty)
		case PDUType(b[0]&7).HeaderLen() == 0:
			m.drop(DropBadType)
		default:
			m.drop(DropShort)
		}
		return
	}
	from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
	m.rxFrom = from
	key := invKey{m.peerKey(from), p.Ref}
	switch p.Type {
	case TypeInvoke:
		m.onInvoke(now, &p, from, key)
	case TypeResult, TypeError:
		inv := m.invoker(key)
		if inv == nil {
			// No invocation: the peer's reply is for a released number
			// (docs/protocol.md ESRO §2.7 step 4).
			m.replyFailure(now, from, p.Ref, LocalResource, m.rxBudget())
			return
		}
		m.onReply(now, inv, &p)
	case TypeAck:
		inv := m.performer(key)
		if inv == nil && m.tombAck(key) {
			return
		}
		if inv == nil || !inv.answered {
			m.drop(DropUnmatchedAck)
			return
		}
		inv.budget.earn(m.rx)
		m.onAck(now, inv)
	case TypeFailure:
		m.onFailurePDU(now, &p, key)
	}
}

func (m *machine) drop(r DropReason) { m.st.drops[r].Add(1) }

func (m *machine) onInvoke(now time.Time, p *PDU, from netip.AddrPort, key invKey) {
	pr := m.peers[key.peer]
	var inv *invocation
	if pr != nil {
		inv = pr.perf.get(key.ref)
	}
	if inv != nil {
		switch {
		case inv.sap != p.SAP:
			m.drop(DropSAPMismatch)
			return
		case inv.sum == m.fingerprint(p.SAP, p.Operation, p.Encoding, p.Data):
			inv.budget.earn(m.rx)
			m.onDuplicateInvoke(now, inv)
			return
		}
		m.st.superseded.Add(1)
		m.finishPerformer(inv, &Failure{Reason: Transmission, Err: ErrSuperseded})
		m.release(inv)
		pr = nil // release may have forgotten the peer
	}
	if m.tombInvoke(now, p, key) {
		return
	}
	if m.closing {
		m.drop(DropClosing)
		return
	}
	bd := m.saps[p.SAP]
	if bd == nil {
		m.replyFailure(now, from, p.Ref, UserNotResponding, m.rxBudget())
		return
	}
	var load *ipLoad
	if pr != nil {
		load = pr.ip
	}
	if load == nil {
		load = m.perfPerIP[from.Addr()]
	}
	if m.total() >= m.cfg.MaxInvocations || load != nil && load.n >= m.cfg.MaxPeerInvocations {
		m.replyFailure(now, from, p.Ref, LocalResource, m.rxBudget())
		return
	}
	until := m.provenUntil(from)
	unproven := until <= m.clock(now)
	if unproven && !m.admitUnproven(from.Addr()) {
		m.drop(DropUnprovenLimit)
		return
	}
	if pr == nil {
		pr = m.peerFor(key.peer)
	}
	m.ipLoadOf(pr, from.Addr()).n++
	inv = newInvocation(m.rx)
	room := inv.room
	*inv = invocation{
		key: key, addr: from, peer: pr, perf: true, hs: bd.hs, sap: p.SAP, hidx: -1,
		sum: m.fingerprint(p.SAP, p.Operation, p.Encoding, p.Data),
		call: Invocation{
			Peer: from, SAP: p.SAP, RemoteSAP: p.SAP - 1, Ref: p.Ref,
			Operation: p.Operation, Encoding: p.Encoding, Handshake: bd.hs,
		},
		room: room,
	}
	if _, inline := bd.h.(inlineHandler); inline {
		// Runs before the next read: the argument stays in the receive
		// buffer (HandleInline's contract), and the room takes the reply.
		inv.call.Data = p.Data
	} else {
		// The worker's copy of the argument: in the room when there is
		// one, which then cannot take the reply as well.
		inv.call.Data = append(inv.room[:0:len(inv.room)], p.Data...)
		inv.room = nil
	}
	inv.budget.earn(m.rx)
	inv.budget.until = until
	if unproven {
		m.countUnproven(inv, 1)
	}
	m.use(pr)
	pr.perf.put(inv)
	m.nperf++
	m.st.inflightPerf.Add(1)
	m.st.invokesIn.Add(1)
	m.setState(inv, stInvokeReceived)
	if m.td.noresp > 0 {
		m.arm(inv, tNoResp, now, m.td.noresp)
	}
	m.ev.indicate(inv, bd.h)
}

func (m *machine) onDuplicateInvoke(now time.Time, inv *invocation) {
	m.st.duplicates.Add(1)
	switch inv.st {
	case stInvokeReceived:
		// The user is still working: silence (docs/protocol.md ESRO §5.3).
	case stAckWait:
		inv.peer.loss.lost()
		m.reply(now, inv, inv.kept)
		inv.resent = true
		if inv.timer == tRetx {
			m.arm(inv, tRetx, now, m.rto(inv.peer, inv.k))
		}
	case stResultSent:
		inv.peer.loss.lost()
		m.reply(now, inv, inv.kept)
		m.arm(inv, tInact, now, m.td.inact)
	case stPerformerRefWait:
		if inv.hs == TwoWay && inv.kept != nil {
			m.reply(now, inv, inv.kept)
		}
		m.arm(inv, tRef, now, m.td.ref)
	case stFailedRefWait:
		m.replyFailure(now, inv.addr, inv.key.ref, UserNotResponding, &inv.budget)
		m.arm(inv, tRef, now, m.td.ref)
	}
}

func (m *machine) onReply(now time.Time, inv *invocation, p *PDU) {
	switch inv.st {
	case stInvokeSent:
		m.proveReply(now, inv)
		m.disarm(inv)
		m.sample(inv, now)
		data := inv.replyData(p.Data)
		inv.kept = nil
		inv.gotReply = true
		if p.Type == TypeResult {
			m.st.results.Add(1)
			inv.result = Result{Encoding: p.Encoding, Data: data}
			m.finishInvoker(inv, &inv.result, nil)
		} else {
			m.st.errors.Add(1)
			m.finishInvoker(inv, nil, &ErrorReply{Value: p.Value, Encoding: p.Encoding, Data: data})
		}
		if inv.hs == ThreeWay {
			m.sendAck(inv)
			inv.peer.loss.sent()
			m.linger(now, inv)
			m.setState(inv, stAckSent)
			m.arm(inv, tInact, now, m.td.inact)
		} else {
			m.refWait(now, inv)
		}
	case stAckSent:
		m.st.duplicates.Add(1)
		inv.peer.loss.lost()
		m.sendAck(inv)
		m.linger(now, inv)
		m.arm(inv, tInact, now, m.td.inact)
	case stInvokerRefWait:
		m.st.duplicates.Add(1)
		if inv.hs == ThreeWay && inv.gotReply {
			inv.peer.loss.lost()
			m.sendAck(inv)
			m.linger(now, inv)
		}
		m.arm(inv, tRef, now, m.td.hold)
	}
}

func (m *machine) onAck(now time.Time, inv *invocation) {
	switch inv.st {
	case stAckWait:
		m.disarm(inv)
		m.sample(inv, now)
		inv.kept = nil
		m.st.confirms.Add(1)
		m.finishPerformer(inv, nil)
		m.refWait(now, inv)
	case stPerformerRefWait:
		m.st.duplicates.Add(1)
		m.arm(inv, tRef, now, m.td.ref)
	default:
		// A 2-way performer ignores ACKs: handshake mismatch (docs/protocol.md ESRO §5.7).
		m.drop(DropUnexpected)
	}
}

func (m *machine) onFailurePDU(now time.Time, p *PDU, key invKey) {
	r := FailureReason(p.Value)
	if inv := m.invoker(key); inv != nil && inv.st == stInvokeSent {
		m.proveReply(now, inv)
		m.st.failuresIn[reasonIndex(r)].Add(1)
		m.disarm(inv)
		inv.kept = nil
		m.finishInvoker(inv, nil, &Failure{Reason: r, Remote: true})
		m.refWait(now, inv)
		return
	}
	if inv := m.performer(key); inv != nil && inv.st == stAckWait {
		inv.budget.earn(m.rx)
		// The invoker no longer knows this number (it answers a reply for a
		// released number with FAILURE): stop retransmitting.
		m.log.Debug("esro: FAILURE applied to performer", "peer", inv.addr, "ref", key.ref, "reason", r)
		m.st.failuresIn[reasonIndex(r)].Add(1)
		m.disarm(inv)
		inv.kept = nil
		m.finishPerformer(inv, &Failure{Reason: r, Remote: true})
		m.refWait(now, inv)
		return
	}
	m.drop(DropUnmatchedFailure)
}
