package esro

import "time"

// Retransmission pacing (RFC 8085 §3.1: an application that talks to many
// destinations paces its aggregate). With Config.RetransmitRate set, the
// timer-driven retransmissions of all invocations together (INVOKEs as
// invoker, RESULTs and ERRORs as performer) go out at most at that rate
// after a burst of Config.RetransmitBurst: a server whose thousands of
// invocations to switched-off devices all time out together does not
// resend them in one burst.
//
// A retransmission that finds the bucket empty is deferred, never
// dropped: it gets the next free slot (the bucket goes into debt, so
// deferred retransmissions are served in the order they fell due, each
// at its own time, without waking the others) and goes out then without
// paying again. Its invocation keeps its retransmission count, so it
// still makes every one of its retransmissions; its T_last starts after
// the last of them, so pacing makes a silent peer's invocation fail
// later, not sooner. A slot whose invocation ended meanwhile (answered,
// abandoned) is not given to another: the rate is a bound, never
// exceeded. Stats.RetransmissionsDeferred counts the deferrals.
type retxPacer struct {
	tokens float64
	last   time.Time // of the last refill; zero: the bucket is full
}

// paceRetransmission reports whether inv's due retransmission may go out
// now. When not, it has re-armed inv's retransmission timer for its slot
// and counted the deferral. The machine's lock is held.
func (m *machine) paceRetransmission(now time.Time, inv *invocation) bool {
	rate := m.cfg.RetransmitRate
	if rate <= 0 {
		return true
	}
	if inv.retxPaid {
		inv.retxPaid = false // its slot has come
		return true
	}
	p, burst := &m.retxPace, m.cfg.RetransmitBucket()
	if p.last.IsZero() {
		p.tokens = burst
	} else if now.After(p.last) {
		p.tokens = min(p.tokens+now.Sub(p.last).Seconds()*rate, burst)
	}
	if now.After(p.last) {
		p.last = now
	}
	p.tokens--
	if p.tokens >= 0 {
		return true
	}
	inv.retxPaid = true
	m.st.retxDeferred.Add(1)
	m.arm(inv, tRetx, now, time.Duration(-p.tokens/rate*float64(time.Second))+1)
	return false
}
