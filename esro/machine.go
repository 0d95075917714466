package esro

import (
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// machine is the protocol engine without I/O: datagrams, timer expiries and
// user requests go in with the current time; datagrams to send accumulate in
// out and indications go to ev. It is not safe for concurrent use; the
// Endpoint serialises every call with its mutex, as the reference serialises
// everything through one event loop (docs/protocol.md ESRO §7).
//
// Choices where the spec leaves room (docs/protocol.md ESRO §10, "Recommend"):
//   - Tables are keyed by (peer, reference number) where peer is IP address
//     and port, or IP only with Config.IPOnlyPeers (Open Point 3).
//   - Performer invocations live in one table for all SAPs; an INVOKE that
//     reuses a live (peer, number) on another SAP is dropped (Open Point 5),
//     and only performer invocations count as duplicates (Open Point 4).
//   - A FAILURE PDU ends an invoker only in InvokePduSent; failing that, a
//     3-way performer in AckPduWait for the same (peer, number) stops
//     retransmitting and fails with the received value (Open Point 1).
//   - The user-response timer runs in both handshakes (Open Point 7); when
//     it expires the invocation is held for T_ref and duplicates are
//     answered with the same FAILURE (Open Points 8 and 27).
//   - A 2-way performer keeps its reply until it releases the invocation
//     and re-answers every duplicate INVOKE, restarting T_inact or T_ref
//     (Open Point 9 goes half this way): otherwise a lost reply followed by
//     one lost retransmission leaves a gap longer than T_inact, after which
//     the reference absorbs every retransmission and the invoker fails
//     although its operation was performed. Its confirm stays a guess.
//   - A 3-way invoker that received the reply re-ACKs duplicates in
//     InvokerRefWait too (Open Point 10), and Shutdown lingers while the
//     performer may still retransmit it (linger.go).
//   - A duplicate INVOKE in AckPduWait resends the reply at once but neither
//     resets the retransmission count nor cancels a running T_last, so the
//     1 + N bound on transmissions holds (Open Point 11).
//   - An invoker holds a reference number for T_ref + max(T_last, T_inact)
//   - L after the last PDU of its invocation, not T_ref: a performer (the
//     reference's too) may keep the number that long after its last reply,
//     and an INVOKE re-using it earlier would be swallowed as a duplicate.
//   - A performer takes an INVOKE for a duplicate only when it repeats the
//     held invocation's operation, encoding and argument; retransmissions
//     are byte-identical (docs/protocol.md ESRO §5.2). It compares them by a keyed
//     64-bit fingerprint (maphash, random seed), so that the argument need
//     not be kept: a forged collision needs the seed, a chance one has a
//     probability of 2^-64. A different INVOKE on a held
//     number means the invoker has released it: the old invocation is
//     superseded and the new one performed.
//   - Requests and answers are validated before any state is created, and
//     reference-number exhaustion makes Invoke wait for a free number
//     rather than park a dead invocation (Open Points 6, 14, 18).
//   - Hostile sources (see hostile.go): as a performer the machine sends an
//     unproven source no more than Config.AmplificationFactor times what it
//     received from it, and INVOKEs from unproven sources beyond their
//     own caps are dropped unanswered. A refused invocation (Refuse), or
//     one whose handler timed out, from an unproven source is kept only
//     as a tombstone for duplicate detection.
//
// The configuration is fixed for the endpoint's life, so the reference's
// per-invocation timer snapshots are the endpoint's durations.
type machine struct {
	cfg Config
	td  durations
	log *slog.Logger
	rng *rand.Rand
	st  *counters
	ev  events

	saps       [MaxSAP + 1]*binding
	invokers   map[invKey]*invocation
	performers map[invKey]*invocation
	peers      map[netip.AddrPort]*peer
	perfPerIP  map[netip.Addr]int // performer invocations by source address
	hostile    hostileState
	idlePeers  int
	nextRef    uint8
	timers     timerHeap   // timers of variable durations (retransmission, user response)
	fifos      []timerFIFO // timers of fixed durations, one queue per duration
	epoch      time.Time   // origin of the timer heap's integer deadlines
	tokens     sync.Pool   // of chan struct{}, see invocation.done

	active  int           // invocations in a state that Shutdown waits for
	drained chan struct{} // closed when closing and active reaches 0
	closing bool
	closed  bool

	out []outgoing

	rx     int            // size of the datagram being received
	rxFrom netip.AddrPort // and its source

	// lingerUntil is when no performer is likely to retransmit a reply
	// this endpoint acknowledged any more (linger.go).
	lingerUntil time.Time
}

// events receives what the machine cannot do itself without I/O.
type events interface {
	// indicate starts the handler for a new performer invocation.
	indicate(inv *invocation, h Handler)
}

type binding struct {
	hs Handshake
	h  Handler
}

// outgoing is one datagram to send. PDUs of at most 3 octets (ACK,
// FAILURE) are kept inline to spare an allocation.
type outgoing struct {
	to    netip.AddrPort
	b     []byte
	small [3]byte
	n     uint8
}

func (o *outgoing) payload() []byte {
	if o.b != nil {
		return o.b
	}
	return o.small[:o.n]
}

type durations struct {
	retx, last, ref, inact, noresp time.Duration
	hold                           time.Duration // invoker's reference hold, see machine
}

type invKey struct {
	peer netip.AddrPort
	ref  uint8
}

type state uint8

const (
	stReleased state = iota
	// invoker
	stInvokeSent     // InvokePduSent
	stAckSent        // AckPduSent (3-way)
	stInvokerRefWait // InvokerRefWait
	// performer
	stInvokeReceived   // InvokePduReceived
	stAckWait          // AckPduWait (3-way)
	stResultSent       // ResultPduRetrans (2-way)
	stPerformerRefWait // PerformerRefWait
	stFailedRefWait    // after the user-response timer: duplicates get FAILURE(2)
)

var stateNames = [...]string{"Released", "InvokePduSent", "AckPduSent", "InvokerRefWait",
	"InvokePduReceived", "AckPduWait", "ResultSent", "PerformerRefWait", "FailedRefWait"}

func (s state) String() string { return stateNames[s] }

// active reports whether Shutdown should wait for an invocation in s: a
// reply is still owed or expected. Whether a peer may still need our ACK
// is the linger's business (linger.go), not the state's.
func (s state) active() bool {
	switch s {
	case stInvokeSent, stInvokeReceived, stAckWait, stResultSent:
		return true
	}
	return false
}

type timerKind uint8

const (
	tNone timerKind = iota
	tRetx
	tLast
	tRef
	tInact
	tNoResp
)

// invocation is one ESRO invocation in either role.
type invocation struct {
	key    invKey
	addr   netip.AddrPort // where its PDUs go: the full address even in IP-only mode
	peer   *peer
	perf   bool
	hs     Handshake
	st     state
	sap    uint8
	kept   []byte // the PDU retransmitted from a copy
	k      int    // timer retransmissions done
	timer  timerKind
	hidx   int       // index in machine.timers, -1 when not there
	fq     int8      // 1 + index in machine.fifos of the queue holding its timer; 0: none
	fseq   uint64    // its entry's sequence number there
	sentAt time.Time // when kept was first sent, for RTT samples
	resent bool      // kept was sent more than once (Karn: no RTT sample)
	// lingerEnd bounds an acknowledged invoker's linger: the end of the
	// performer's retry budget (linger.go).
	lingerEnd time.Time

	// Outcome: invoker result or error; performer confirm error. Written
	// once, before finished is set and done signalled.
	res      *Result
	err      error
	finished bool
	// done signals the outcome. An invoker's carries one token, which the
	// Invoke call waiting for it takes before recycling the channel
	// (machine.tokens): one allocation less per invocation. A performer's
	// is closed, and made only when someone waits (Confirmed), as most
	// handlers do not.
	done chan struct{}
	// result holds the invoker's RESULT, so that it needs no allocation
	// of its own; res points here.
	result Result

	// small holds kept when it fits: one allocation less for the
	// invocations of small PDUs, which most are.
	small [smallPDU]byte

	// invoker
	gotReply bool
	// sent is set by Invoke once the INVOKE's first transmission has
	// left (the kernel copied it): see replyData.
	sent atomic.Bool

	// performer
	sum      uint64     // fingerprint of SAP, operation, encoding and argument, for duplicates
	unproven bool       // counted against the unproven caps
	budget   budget     // what its source sent and was sent, see reply
	call     Invocation // what the handler is given
	resp     responder  // the handler's ResponseWriter, set by the Endpoint
	answered bool
	hctx     handlerCtx // a handler worker's context, see handlerCtx
	inLoop   bool       // an inline handler is running it on the read loop (Endpoint)
}

// smallPDU is the size of the buffer in each invocation for the PDU it
// keeps for retransmission: an INVOKE or reply with up to 125 octets of
// user data needs no allocation of its own.
const smallPDU = 128

// pduBuf returns an empty buffer with room for n octets: the invocation's
// own when it fits and is not in use, else a new one. The kept PDU is
// never modified once sent, and each invocation keeps one PDU in its life.
func (inv *invocation) pduBuf(n int) []byte {
	if n <= smallPDU {
		return inv.small[:0:n]
	}
	return make([]byte, 0, n)
}

// replyData copies an invoker's reply data out of the receive buffer. It
// re-uses the buffer of the INVOKE, which is never sent again once the
// reply is in, when it is large enough and nobody can still be reading
// it: sent exactly once (a retransmission may still be queued or being
// written), and that send complete (a forged or stale reply can come
// before it is). Otherwise the data gets a buffer of its own.
func (inv *invocation) replyData(d []byte) []byte {
	if inv.kept != nil && !inv.resent && cap(inv.kept) >= len(d) && inv.sent.Load() {
		return append(inv.kept[:0], d...)
	}
	return append([]byte(nil), d...)
}

type peer struct {
	key     netip.AddrPort
	held    [4]uint64 // reference numbers held by invoker invocations
	nheld   int
	nperf   int
	srtt    time.Duration
	rttvar  time.Duration
	hasRTT  bool
	waiters []chan struct{} // Invoke calls waiting for a free reference number
	loss    lossEstimate
}

func (p *peer) idle() bool { return p.nheld == 0 && p.nperf == 0 && len(p.waiters) == 0 }

func (p *peer) isHeld(r uint8) bool { return p.held[r>>6]&(1<<(r&63)) != 0 }

// maxIdlePeers bounds the peers kept only for their RTT estimate.
const maxIdlePeers = 1024

func newMachine(cfg Config, st *counters, ev events) *machine {
	m := &machine{
		cfg: cfg,
		td: durations{
			retx:   cfg.Timers.RetransmitInterval(),
			last:   cfg.Timers.LastWait(),
			ref:    cfg.Timers.ReferenceHold(),
			inact:  cfg.Timers.Inactivity(),
			noresp: cfg.PerformerTimeout,
			hold: cfg.Timers.ReferenceHold() + max(cfg.Timers.LastWait(), cfg.Timers.Inactivity()) +
				cfg.Timers.NSDULifetime,
		},
		log:        cfg.Logger,
		rng:        rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64())),
		st:         st,
		ev:         ev,
		invokers:   make(map[invKey]*invocation),
		performers: make(map[invKey]*invocation),
		peers:      make(map[netip.AddrPort]*peer),
		perfPerIP:  make(map[netip.Addr]int),
		drained:    make(chan struct{}),
		epoch:      time.Now(),
	}
	m.hostile.init()
	for _, q := range []struct {
		d    time.Duration
		hold bool
	}{{m.td.ref, true}, {m.td.hold, true}, {m.td.inact, false}, {m.td.last, false}} {
		if m.fifoFor(q.hold, q.d) == 0 {
			f := timerFIFO{d: int64(q.d), hold: q.hold}
			if q.hold {
				f.slack = int64(q.d) / holdSlack
			}
			m.fifos = append(m.fifos, f)
		}
	}
	// A random first number makes re-use of recent numbers after a restart
	// unlikely (docs/protocol.md ESRO §4, Open Point 17).
	m.nextRef = uint8(m.rng.Uint32())
	return m
}

func (m *machine) peerKey(a netip.AddrPort) netip.AddrPort {
	if m.cfg.IPOnlyPeers {
		return netip.AddrPortFrom(a.Addr(), 0)
	}
	return a
}

func (m *machine) peerFor(k netip.AddrPort) *peer {
	p := m.peers[k]
	if p == nil {
		p = &peer{key: k}
		m.peers[k] = p
		m.idlePeers++
	}
	return p
}

// use and unuse keep the idle-peer count right around a change of p's load.
func (m *machine) use(p *peer) {
	if p.idle() {
		m.idlePeers--
	}
}

func (m *machine) unuse(p *peer) {
	if !p.idle() {
		return
	}
	m.idlePeers++
	if m.idlePeers > maxIdlePeers {
		for k, q := range m.peers {
			if q.idle() {
				delete(m.peers, k)
				m.idlePeers--
				if m.idlePeers <= maxIdlePeers/2 {
					break
				}
			}
		}
	}
}

func (m *machine) total() int { return len(m.invokers) + len(m.performers) }

func (m *machine) setState(inv *invocation, s state) {
	if inv.st.active() != s.active() {
		if s.active() {
			m.active++
		} else {
			m.active--
			if m.active == 0 && m.closing {
				m.signalDrained()
			}
		}
	}
	inv.st = s
}

func (m *machine) signalDrained() {
	select {
	case <-m.drained:
	default:
		close(m.drained)
	}
}

// ---- sending ----

func (m *machine) send(to netip.AddrPort, b []byte) {
	m.out = append(m.out, outgoing{to: to, b: b})
}

// sendFailure queues a FAILURE PDU; callers check the amplification
// budget first (replyFailure).
func (m *machine) sendFailure(to netip.AddrPort, ref uint8, r FailureReason) {
	m.st.failuresOut[reasonIndex(r)].Add(1)
	m.out = append(m.out, outgoing{to: to, small: [3]byte{byte(TypeFailure), ref, byte(r)}, n: 3})
}

func (m *machine) sendAck(inv *invocation) {
	m.out = append(m.out, outgoing{to: inv.addr, small: [3]byte{byte(TypeAck), inv.key.ref}, n: 2})
}

// ---- timers ----

func (m *machine) arm(inv *invocation, k timerKind, now time.Time, d time.Duration) {
	inv.timer = k
	at := int64(now.Sub(m.epoch) + d)
	if k == tRef || k == tInact || k == tLast {
		if q := m.fifoFor(k == tRef, d); q > 0 {
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

// fifoFor returns 1 + the index of the queue for duration d, of
// reference holds or not, 0 if none.
func (m *machine) fifoFor(hold bool, d time.Duration) int8 {
	for i := range m.fifos {
		if m.fifos[i].d == int64(d) && m.fifos[i].hold == hold {
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

// holdSlack is the fraction of its duration by which the end of a
// reference hold may come late: see wakeAt.
const holdSlack = 32

// wakeAt is when the endpoint should run advance at the latest: the
// earliest deadline, where the end of a reference hold may wait
// 1/holdSlack of the hold longer. A hold's end only frees a reference
// number, which 3% later does no harm; under load holds end every few
// microseconds, and the endpoint runs advance on every step anyway
// (Endpoint.readLoop, Invoke), so that they need no timer firing,
// goroutine and lock each.
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
		inv := m.invokers[key]
		if inv == nil {
			// No invocation: the peer's reply is for a released number
			// (docs/protocol.md ESRO §2.7 step 4).
			m.replyFailure(now, from, p.Ref, LocalResource, m.rxBudget())
			return
		}
		m.onReply(now, inv, &p)
	case TypeAck:
		inv := m.performers[key]
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
	if inv := m.performers[key]; inv != nil {
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
	if m.total() >= m.cfg.MaxInvocations || m.perfPerIP[from.Addr()] >= m.cfg.MaxPeerInvocations {
		m.replyFailure(now, from, p.Ref, LocalResource, m.rxBudget())
		return
	}
	until := m.provenUntil(from)
	unproven := until <= m.clock(now)
	if unproven && !m.admitUnproven(from.Addr()) {
		m.drop(DropUnprovenLimit)
		return
	}
	pr := m.peerFor(key.peer)
	m.use(pr)
	pr.nperf++
	m.perfPerIP[from.Addr()]++
	inv := &invocation{
		key: key, addr: from, peer: pr, perf: true, hs: bd.hs, sap: p.SAP, hidx: -1,
		sum: m.fingerprint(p.SAP, p.Operation, p.Encoding, p.Data),
		call: Invocation{
			Peer: from, SAP: p.SAP, RemoteSAP: p.SAP - 1, Ref: p.Ref,
			Operation: p.Operation, Encoding: p.Encoding, Handshake: bd.hs,
		},
	}
	if _, inline := bd.h.(inlineHandler); inline {
		// Runs before the next read: the argument stays in the receive
		// buffer (HandleInline's contract).
		inv.call.Data = p.Data
	} else {
		inv.call.Data = append([]byte(nil), p.Data...)
	}
	inv.budget.earn(m.rx)
	inv.budget.until = until
	if unproven {
		m.countUnproven(inv, 1)
	}
	m.performers[key] = inv
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
			m.setState(inv, stInvokerRefWait)
			m.arm(inv, tRef, now, m.td.hold)
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
		m.setState(inv, stPerformerRefWait)
		m.arm(inv, tRef, now, m.td.ref)
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
	if inv := m.invokers[key]; inv != nil && inv.st == stInvokeSent {
		m.proveReply(now, inv)
		m.st.failuresIn[reasonIndex(r)].Add(1)
		m.disarm(inv)
		inv.kept = nil
		m.finishInvoker(inv, nil, &Failure{Reason: r, Remote: true})
		m.setState(inv, stInvokerRefWait)
		m.arm(inv, tRef, now, m.td.hold)
		return
	}
	if inv := m.performers[key]; inv != nil && inv.st == stAckWait {
		inv.budget.earn(m.rx)
		// The invoker no longer knows this number (it answers a reply for a
		// released number with FAILURE): stop retransmitting.
		m.log.Debug("esro: FAILURE applied to performer", "peer", inv.addr, "ref", key.ref, "reason", r)
		m.st.failuresIn[reasonIndex(r)].Add(1)
		m.disarm(inv)
		inv.kept = nil
		m.finishPerformer(inv, &Failure{Reason: r, Remote: true})
		m.setState(inv, stPerformerRefWait)
		m.arm(inv, tRef, now, m.td.ref)
		return
	}
	m.drop(DropUnmatchedFailure)
}

// ---- timer expiry (docs/protocol.md ESRO §5.2–§5.5) ----

func (m *machine) expire(now time.Time, inv *invocation, k timerKind) {
	switch k {
	case tRetx:
		if inv.k < m.cfg.Timers.RetransmitCount {
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
			m.setState(inv, stPerformerRefWait)
			m.arm(inv, tRef, now, m.td.ref)
		} else {
			m.finishInvoker(inv, nil, m.localFailure(UserNotResponding, nil))
			m.setState(inv, stInvokerRefWait)
			m.arm(inv, tRef, now, m.td.hold)
		}
	case tInact:
		if inv.perf { // 2-way performer: assume the reply arrived
			m.st.confirms.Add(1)
			m.finishPerformer(inv, nil)
			m.setState(inv, stPerformerRefWait)
			m.arm(inv, tRef, now, m.td.ref)
		} else {
			m.setState(inv, stInvokerRefWait)
			m.arm(inv, tRef, now, m.td.hold)
		}
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
		delete(m.performers, inv.key)
		if inv.unproven {
			m.countUnproven(inv, -1)
		}
		p.nperf--
		if n := m.perfPerIP[inv.addr.Addr()] - 1; n > 0 {
			m.perfPerIP[inv.addr.Addr()] = n
		} else {
			delete(m.perfPerIP, inv.addr.Addr())
		}
		m.st.inflightPerf.Add(-1)
		inv.hctx.cancel(ErrInvocationEnded)
	} else {
		delete(m.invokers, inv.key)
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
	inv := &invocation{key: invKey{pk, ref}, addr: to, peer: p, hs: req.Handshake, hidx: -1, sentAt: now}
	pdu := PDU{Type: TypeInvoke, SAP: req.SAP, Ref: ref, Operation: req.Operation, Encoding: req.Encoding, Data: req.Data}
	kept, err := AppendPDU(inv.pduBuf(3+len(req.Data)), &pdu)
	if err != nil { // validated by the caller; kept for safety
		m.freeRef(p, ref)
		return nil, nil, err
	}
	inv.kept, inv.done = kept, m.token()
	m.invokers[inv.key] = inv
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
		m.setState(inv, stInvokerRefWait)
		m.arm(inv, tRef, now, m.td.hold)
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
	for _, inv := range m.performers {
		if inv.sap != sap || inv.st == stPerformerRefWait || inv.st == stFailedRefWait {
			continue
		}
		inv.kept = nil
		m.finishPerformer(inv, ErrSAPNotBound)
		m.setState(inv, stPerformerRefWait)
		m.arm(inv, tRef, now, m.td.ref)
	}
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
	for _, inv := range m.invokers {
		m.finishInvoker(inv, nil, ErrClosed)
	}
	for _, inv := range m.performers {
		m.finishPerformer(inv, ErrClosed)
		inv.hctx.cancel(ErrClosed)
	}
	for _, p := range m.peers {
		for _, w := range p.waiters {
			close(w)
		}
		p.waiters = nil
	}
	m.signalDrained()
}
