package esro

import "time"

// The linger. A 3-way invoker that has acknowledged a reply cannot know
// whether its ACK arrived. A performer that missed it retransmits the reply
// every T_retx, at most N times, and then ends the operation with a
// transmission failure (docs/protocol.md ESRO §5.3): a performer that
// commits only on confirmation, as the reference MTS does with
// submissions, drops an operation whose result the invoker has already
// reported. While the endpoint is open, the machine re-ACKs every
// duplicate reply (in AckPduSent, then in InvokerRefWait); Shutdown
// carries that on for an invoker about to exit, until
// machine.lingerUntil.
//
// Every ACK sent (for the reply or for a duplicate of it) moves that
// deadline to at least
//
//	min(now + k·T_retx + grace, first reply + N·T_retx + grace)
//
// where
//   - T_retx is the longest a conforming performer waits between two
//     transmissions of its reply: the reference always waits exactly that,
//     and this package's adaptive timer is capped at MaxRTO, T_retx by
//     default.
//   - grace, max(2·RT, srtt + 4·rttvar), allows for the network's delay
//     and its variation, and for the reference's timer granularity: it
//     scans its timers once a second, so its first retransmission comes
//     anywhere from T_retx − 1 s to T_retx + 1 s after its reply
//     (docs/protocol.md ESRO §5.1; the later ones keep the interval). One
//     RT (1 s with the shipped timers) would race that second, as the
//     3-way invoker's T_inact, 4·RT = T_retx + RT with the shipped timers,
//     does.
//   - k is the number of retransmission intervals the performer must have
//     been quiet: 1 on a link that has shown no loss, more as it has. With
//     a loss ratio q seen towards the peer, the performer is still
//     unconfirmed after k quiet intervals only if the ACK and the k
//     retransmissions after it were all lost, about q^(k+1); k is the
//     smallest with q^(k+1) ≤ lingerRisk, at most N.
//   - the second bound is the performer's whole retry budget: it sends
//     nothing after its Nth retransmission, and the reply it answers came
//     no later than the first one that arrived here. In-flight copies of
//     our INVOKE may restart the reference's count (Open Point 11); they
//     arrive within grace.
//
// So a performer that stays quiet for k intervals after the last duplicate
// ends the linger early, and every duplicate extends it. With the shipped
// timers a clean link lingers 5 s (3 s + 2 s), one more than the 3-way
// invoker's T_inact held a shutting-down endpoint before; a lossy one up
// to 8·3 + 2 = 26 s.
//
// The loss ratio comes from the peer's own exchanges (INVOKEs and replies
// retransmitted, duplicates that show an answer of ours lost), so an
// exchange that lost nothing counts as a clean link: on a link losing a
// fraction p of datagrams, a one-shot invoker whose exchange went through
// untouched still misses a lost ACK followed by a lost retransmission, with
// probability about p² (more quiet intervals would cost every clean-link
// caller another T_retx each). Unasked-for ACKs sent while lingering would
// lower that risk without the wait, but the linger only answers replies
// that came to this socket: a reference performer matches ACKs by IP
// address alone (Open Point 3), and an ACK sent blind could confirm the
// invocation of another device behind the same address.

// lingerRisk is the accepted chance, per acknowledged reply and for the
// loss seen on the link, that the performer is still retransmitting when
// the linger ends.
const lingerRisk = 1e-4

// lossEstimate counts, for one peer, the datagrams this endpoint sent that
// the peer should answer or acknowledge, and the evidence that one of them
// or its answer was lost: a retransmission timer that expired, a duplicate
// that the lost datagram would have stopped. Duplicates made by the
// network count as losses too, which errs on the side of lingering.
type lossEstimate struct {
	trials, losses uint32
}

// lossWindow is the number of trials after which old ones count half, so
// that the estimate follows a link whose quality changes.
const lossWindow = 4096

func (l *lossEstimate) sent() {
	l.trials++
	if l.trials >= lossWindow {
		l.trials /= 2
		l.losses /= 2
	}
}

// lost records a loss and the datagram sent again because of it.
func (l *lossEstimate) lost() {
	l.losses++
	l.sent()
}

// quietIntervals is k above: how many retransmission intervals without a
// duplicate end the linger, between 1 and n.
func (l *lossEstimate) quietIntervals(n int) int {
	k := 1
	if l.losses == 0 || l.trials == 0 {
		return k
	}
	q := min(float64(l.losses)/float64(l.trials), 1)
	for r := q * q; r > lingerRisk && k < n; r *= q {
		k++
	}
	return k
}

// lingerGrace is the allowance for delay and timer granularity on top of
// the peer's retransmission intervals.
func (m *machine) lingerGrace(p *peer) time.Duration {
	g := 2 * m.cfg.Timers.Roundtrip
	if p.hasRTT {
		g = max(g, p.srtt+4*p.rttvar)
	}
	return g
}

// linger records that an ACK for inv was just sent.
func (m *machine) linger(now time.Time, inv *invocation) {
	p := inv.peer
	retx, n := m.td.retx, m.cfg.Timers.RetransmitCount
	grace := m.lingerGrace(p)
	if inv.lingerEnd.IsZero() {
		inv.lingerEnd = now.Add(time.Duration(n)*retx + grace)
	}
	until := now.Add(time.Duration(p.loss.quietIntervals(n))*retx + grace)
	if until.After(inv.lingerEnd) {
		until = inv.lingerEnd
	}
	if until.After(m.lingerUntil) {
		m.lingerUntil = until
	}
}
