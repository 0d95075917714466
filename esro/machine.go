package esro

import (
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"sync"
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

	saps      [MaxSAP + 1]*binding
	ninv      int // invoker invocations, in their peers' tables
	nperf     int // performer invocations, in their peers' tables
	peers     map[netip.AddrPort]*peer
	perfPerIP map[netip.Addr]*ipLoad // performer invocations by source address
	hostile   hostileState
	idlePeers int
	nextRef   uint8
	timers    timerHeap   // timers of variable durations (retransmission)
	retxPace  retxPacer   // Config.RetransmitRate (retxpace.go)
	fifos     []timerFIFO // timers of fixed durations, one queue per duration
	epoch     time.Time   // origin of the timer heap's integer deadlines
	tokens    sync.Pool   // of chan struct{}, see invocation.done

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
		log:       cfg.Logger,
		rng:       rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64())),
		st:        st,
		ev:        ev,
		peers:     make(map[netip.AddrPort]*peer),
		perfPerIP: make(map[netip.Addr]*ipLoad),
		drained:   make(chan struct{}),
		epoch:     time.Now(),
	}
	m.hostile.init()
	for _, q := range []struct {
		d     time.Duration
		slack time.Duration
	}{
		{m.td.ref, m.td.ref / lenientSlack}, {m.td.hold, m.td.hold / lenientSlack},
		{m.td.inact, m.td.inact / lenientSlack}, {m.td.inact, m.td.hold / lenientSlack},
		{m.td.last, 0}, {m.td.noresp, 0},
	} {
		if q.d > 0 && m.fifoFor(q.d, q.slack) == 0 {
			m.fifos = append(m.fifos, timerFIFO{d: int64(q.d), slack: int64(q.slack)})
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
				m.dropIPLoad(q)
				m.idlePeers--
				if m.idlePeers <= maxIdlePeers/2 {
					break
				}
			}
		}
	}
}

func (m *machine) total() int { return m.ninv + m.nperf }

// ipLoad counts the performer invocations from one source address, for
// MaxPeerInvocations. Each peer that ever performed for the address
// points to it (peer.ip), so that an invocation's start and end count
// without a lookup in perfPerIP; the entry goes with the last such peer.
type ipLoad struct {
	n     int // performer invocations
	peers int // peers pointing here
}

// ipLoadOf is p's per-address count, made on p's first performer
// invocation.
func (m *machine) ipLoadOf(p *peer, a netip.Addr) *ipLoad {
	if p.ip == nil {
		l := m.perfPerIP[a]
		if l == nil {
			l = new(ipLoad)
			m.perfPerIP[a] = l
		}
		l.peers++
		p.ip = l
	}
	return p.ip
}

// dropIPLoad lets go of the per-address count of p, which is forgotten.
func (m *machine) dropIPLoad(p *peer) {
	if p.ip == nil {
		return
	}
	if p.ip.peers--; p.ip.peers == 0 {
		delete(m.perfPerIP, p.key.Addr())
	}
	p.ip = nil
}

// invoker and performer find the invocation of key in the given role.
func (m *machine) invoker(key invKey) *invocation {
	if p := m.peers[key.peer]; p != nil {
		return p.inv.get(key.ref)
	}
	return nil
}

func (m *machine) performer(key invKey) *invocation {
	if p := m.peers[key.peer]; p != nil {
		return p.perf.get(key.ref)
	}
	return nil
}

// eachInvocation calls f for every invocation, invokers first; f may not
// add or remove any.
func (m *machine) eachInvocation(invokers, performers bool, f func(*invocation)) {
	for _, p := range m.peers {
		if invokers {
			p.inv.each(f)
		}
		if performers {
			p.perf.each(f)
		}
	}
}

// refWait ends inv's exchange but keeps its reference number held, so
// that a late duplicate is recognised: T_ref for a performer, the
// invoker's hold time for an invoker.
func (m *machine) refWait(now time.Time, inv *invocation) {
	if inv.perf {
		m.setState(inv, stPerformerRefWait)
		m.arm(inv, tRef, now, m.td.ref)
	} else {
		m.setState(inv, stInvokerRefWait)
		m.arm(inv, tRef, now, m.td.hold)
	}
}

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
