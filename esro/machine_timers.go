package esro

import "time"

type timerKind uint8

const (
	tNone timerKind = iota
	tRetx
	tLast
	tRef
	tInact
	tNoResp
)

// ---- timers ----

func (m *machine) arm(inv *invocation, k timerKind, now time.Time, d time.Duration) {
	inv.timer = k
	at := int64(now.Sub(m.epoch) + d)
	if k != tRetx {
		if q := m.fifoFor(d, m.slack(inv, k, d)); q > 0 {
			if inv.hidx >= 0 {
				m.timers.remove(inv.hidx)
			}
			if inv.fq > 0 {
				m.fifos[inv.fq-1].clear(inv.fseq)
			}
			inv.fseq, inv.fq = m.fifos[q-1].push(inv, at), q
			return
		}
	}
	if inv.fq > 0 {
		m.fifos[inv.fq-1].clear(inv.fseq)
		inv.fq = 0
	}
	if inv.hidx >= 0 {
		m.timers.fix(inv.hidx, at)
	} else {
		m.timers.push(inv, at)
	}
}

// fifoFor returns 1 + the index of the queue for duration d and slack,
// 0 if none.
func (m *machine) fifoFor(d, slack time.Duration) int8 {
	for i := range m.fifos {
		if m.fifos[i].d == int64(d) && m.fifos[i].slack == int64(slack) {
			return int8(i + 1)
		}
	}
	return 0
}

func (m *machine) disarm(inv *invocation) {
	if inv.hidx >= 0 {
		m.timers.remove(inv.hidx)
	}
	if inv.fq > 0 {
		m.fifos[inv.fq-1].clear(inv.fseq)
		inv.fq = 0
	}
	inv.timer = tNone
}

// earliest finds the next timer to expire: its deadline, and -1 for the
// heap or the index of its queue. The heap wins ties.
func (m *machine) earliest() (at int64, src int, ok bool) {
	src = -1
	if len(m.timers) > 0 {
		at, ok = m.timers[0].at, true
	}
	for i := range m.fifos {
		if e, live := m.fifos[i].first(); live && (!ok || e.at < at) {
			at, src, ok = e.at, i, true
		}
	}
	return at, src, ok
}

// nextDeadline is the earliest pending timer, if any.
func (m *machine) nextDeadline() (time.Time, bool) {
	at, _, ok := m.earliest()
	if !ok {
		return time.Time{}, false
	}
	return m.epoch.Add(time.Duration(at)), true
}

// lenientSlack is the fraction of a reference hold by which its end may
// come late: see slack.
const lenientSlack = 32

// slack is how late inv's timer of kind k, duration d, may expire: the
// end of a reference hold, which only frees a number, 1/lenientSlack of
// the hold; a 2-way performer's T_inact, after which it takes its reply
// for delivered (a guess at any time), 1/lenientSlack of T_inact; a 3-way
// invoker's T_inact, after which it goes on to hold its number
// (re-acknowledging duplicates either way), is the first part of its
// reference hold, and may come as late as the hold's end. The others
// (retransmissions, T_last, the performer timeout) are exact.
func (m *machine) slack(inv *invocation, k timerKind, d time.Duration) time.Duration {
	switch {
	case k == tRef, k == tInact && inv.perf:
		return d / lenientSlack
	case k == tInact:
		return m.td.hold / lenientSlack
	}
	return 0
}

// wakeAt is when the endpoint should run advance at the latest: the
// earliest deadline, where a timer may wait its slack longer. Under load
// such timers expire every few microseconds, one or two per invocation,
// and the endpoint runs advance on every step anyway (Endpoint.readLoop,
// Invoke): with the slack they need no timer firing, goroutine and lock
// each (without it for T_inact, the endpoint's timer fired about once per
// invocation).
func (m *machine) wakeAt() (time.Time, bool) {
	var at int64
	ok := false
	if len(m.timers) > 0 {
		at, ok = m.timers[0].at, true
	}
	for i := range m.fifos {
		q := &m.fifos[i]
		if e, live := q.first(); live {
			if t := e.at + q.slack; !ok || t < at {
				at, ok = t, true
			}
		}
	}
	if !ok {
		return time.Time{}, false
	}
	return m.epoch.Add(time.Duration(at)), true
}

// advance fires every timer due at now.
func (m *machine) advance(now time.Time) {
	due := int64(now.Sub(m.epoch))
	m.sweepTombs(due)
	for {
		at, src, ok := m.earliest()
		if !ok || at > due {
			return
		}
		var inv *invocation
		if src < 0 {
			inv = m.timers.pop()
		} else {
			inv = m.fifos[src].pop()
		}
		k := inv.timer
		inv.timer = tNone
		m.expire(now, inv, k)
	}
}

// rto is the wait before retransmission number k+1 (k = 0 after the first
// send): T_retx with fixed timers, else the peer's RFC 6298 estimate with
// exponential backoff and jitter, clamped to [MinRTO, MaxRTO].
func (m *machine) rto(p *peer, k int) time.Duration {
	if m.cfg.FixedTimers {
		return m.td.retx
	}
	d := m.td.retx
	if p.hasRTT {
		d = p.srtt + max(4*p.rttvar, time.Millisecond)
	}
	for i := 0; i < k && d < m.cfg.MaxRTO; i++ {
		d *= 2
	}
	if m.cfg.Jitter > 0 {
		d = time.Duration(float64(d) * (1 + m.cfg.Jitter*(2*m.rng.Float64()-1)))
	}
	return min(max(d, m.cfg.MinRTO), m.cfg.MaxRTO)
}

// sample feeds one round-trip measurement to p's estimator (RFC 6298 §2).
func (m *machine) sample(inv *invocation, now time.Time) {
	if inv.resent || inv.sentAt.IsZero() {
		return // Karn's rule: ambiguous sample
	}
	r := now.Sub(inv.sentAt)
	p := inv.peer
	if !p.hasRTT {
		p.srtt, p.rttvar, p.hasRTT = r, r/2, true
		return
	}
	diff := p.srtt - r
	if diff < 0 {
		diff = -diff
	}
	p.rttvar = (3*p.rttvar + diff) / 4
	p.srtt = (7*p.srtt + r) / 8
}

// ---- timer expiry (docs/protocol.md ESRO §5.2–§5.5) ----

func (m *machine) expire(now time.Time, inv *invocation, k timerKind) {
	switch k {
	case tRetx:
		if inv.k < m.cfg.Timers.RetransmitCount {
			if !m.paceRetransmission(now, inv) {
				return // deferred to its slot (retxpace.go)
			}
			inv.k++
			inv.resent = true
			inv.peer.loss.lost()
			m.st.retransmissions.Add(1)
			if inv.perf {
				m.reply(now, inv, inv.kept)
			} else {
				m.send(inv.addr, inv.kept)
			}
			m.arm(inv, tRetx, now, m.rto(inv.peer, inv.k))
		} else {
			m.arm(inv, tLast, now, m.td.last)
		}
	case tLast:
		inv.kept = nil
		if inv.perf {
			m.finishPerformer(inv, m.localFailure(Transmission, nil))
		} else {
			m.finishInvoker(inv, nil, m.localFailure(UserNotResponding, nil))
		}
		m.refWait(now, inv)
	case tInact:
		if inv.perf { // 2-way performer: assume the reply arrived
			m.st.confirms.Add(1)
			m.finishPerformer(inv, nil)
		}
		m.refWait(now, inv)
	case tNoResp:
		m.replyFailure(now, inv.addr, inv.key.ref, UserNotResponding, &inv.budget)
		m.finishPerformer(inv, m.localFailure(LocalResource, ErrNoResponse))
		if inv.unproven {
			m.entomb(now, inv, failurePDU(inv.key.ref, UserNotResponding))
			return
		}
		m.setState(inv, stFailedRefWait)
		m.arm(inv, tRef, now, m.td.ref)
	case tRef:
		m.release(inv)
	}
}

func (m *machine) localFailure(r FailureReason, cause error) *Failure {
	m.st.localFailures[reasonIndex(r)].Add(1)
	return &Failure{Reason: r, Err: cause}
}
