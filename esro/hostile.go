package esro

import (
	"bytes"
	"hash/maphash"
	"net"
	"net/netip"
	"time"
)

// Defences against hostile sources. A UDP source address proves nothing,
// so the performer side is built so that forged datagrams can neither
// turn the endpoint into a reflector nor take the room real peers need:
//
//   - Anti-amplification (after QUIC, RFC 9000 §8.1, which allows 3×):
//     toward a source that has not proven itself, every datagram the
//     performer side sends is charged to a budget of what that source
//     sent: the invocation's own INVOKE, its duplicates, ACKs and
//     FAILUREs, or, for a FAILURE sent without keeping state, the one
//     datagram that caused it. Replies, retransmissions and FAILUREs
//     beyond Config.AmplificationFactor times the budget, in bytes or in
//     datagrams, are withheld and counted. An invoker that did not get an
//     answer retransmits its INVOKE, and that earns the retransmission.
//     The invoker side is not limited: it sends only where the user asked.
//   - A source is proven while it answered an invocation this endpoint
//     sent to that address and port (its RESULT, ERROR or FAILURE carried
//     the reference number), or the handler called Prove, for
//     Config.ProvenFor after the last proof.
//   - INVOKEs from unproven sources have caps of their own, in total, per
//     IPv4 /24 or IPv6 /48 and per address, below MaxInvocations: what is
//     left is reserved for proven peers. Beyond them an INVOKE is dropped
//     unanswered; the peer's retransmission gets in once a slot is free.
//   - An unproven source's invocation that is refused (Refuse) or whose
//     handler did not answer in time is released at once and replaced by
//     a tombstone: its key, a fingerprint of the INVOKE, the answer to
//     repeat to duplicates and the budget, about 500 octets of heap with
//     the table's own, for T_ref after the last duplicate, at most
//     Config.MaxTombstones of them (the oldest go first). It keeps duplicates from being performed
//     twice without holding an in-flight slot or a handler.
//   - On an AuthenticatedConn (DTLS sessions) the transport has proven
//     every peer before any of its datagrams reaches the endpoint: every
//     source is proven, and none of the above applies.
type hostileState struct {
	proven map[netip.AddrPort]int64 // proven until, machine clock

	unproven    int // performer invocations from unproven sources
	unprovenPfx map[netip.Prefix]int
	unprovenIP  map[netip.Addr]int

	tombs map[invKey]*tombstone
	tombQ []*tombstone // in order of last activity, lazily (sweepTombs)
	seed  maphash.Seed
}

// maxProven bounds the proven-sources table; beyond it the entries that
// expired go, then an eighth of the rest. Proof needs an answer to our
// own invocation or the handler's word, so a flood cannot fill it.
const maxProven = 1 << 16

func (h *hostileState) init() {
	h.proven = map[netip.AddrPort]int64{}
	h.unprovenPfx = map[netip.Prefix]int{}
	h.unprovenIP = map[netip.Addr]int{}
	h.tombs = map[invKey]*tombstone{}
	h.seed = maphash.MakeSeed()
}

// budget is what a source sent toward an invocation and what was sent
// back to it.
// until caches the proof of the source, so that the replies of a proven
// peer's invocation cost no lookup in the proven table each: proven until
// then (machine clock), as last seen there.
type budget struct {
	inB, inD, outB, outD int
	until                int64
}

func (b *budget) earn(n int) { b.inB += n; b.inD++ }

// rxBudget is the budget of a FAILURE answering the datagram being
// received, without state.
func (m *machine) rxBudget() *budget { return &budget{inB: m.rx, inD: 1} }

func (m *machine) clock(now time.Time) int64 { return int64(now.Sub(m.epoch)) }

func (m *machine) isProven(now time.Time, a netip.AddrPort) bool {
	return m.provenUntil(a) > m.clock(now)
}

// provenUntil is when a's proof runs out (machine clock; 0: never proven).
func (m *machine) provenUntil(a netip.AddrPort) int64 {
	if m.cfg.peersAuthenticated {
		return maxClock
	}
	return m.hostile.proven[a]
}

// AuthenticatedConn is a net.PacketConn whose peers prove their address
// and identity beneath ESRO before any of their datagrams is read, as the
// DTLS sessions of an esrodtls.Conn do (a cookie exchange and a key). An
// Endpoint on one counts every source as proven: a forged source address
// cannot reach it, so the amplification limit and the unproven caps would
// only hold genuine peers back (every session from one address sharing
// the per-address cap, INVOKEs beyond it waiting a retransmission
// interval).
type AuthenticatedConn interface {
	net.PacketConn
	// PeersAuthenticated reports whether every datagram ReadFrom returns
	// comes from an authenticated peer.
	PeersAuthenticated() bool
}

// peersAuthenticated reports whether conn is an AuthenticatedConn that
// vouches for its peers.
func peersAuthenticated(conn net.PacketConn) bool {
	ac, ok := conn.(AuthenticatedConn)
	return ok && ac.PeersAuthenticated()
}

// prove marks a as proven for Config.ProvenFor. A proof that still has
// all but 1/64 of that to run is left as it is: a busy peer proves itself
// on every reply, and one lookup then costs less than a lookup and a
// store, for a proof that may end that much sooner. On an
// AuthenticatedConn every source is proven already: nothing is kept.
func (m *machine) prove(now time.Time, a netip.AddrPort) {
	if m.cfg.peersAuthenticated {
		return
	}
	h := &m.hostile
	until := m.clock(now) + int64(m.cfg.ProvenFor)
	t, ok := h.proven[a]
	if t == maxClock || until-t < int64(m.cfg.ProvenFor)/64 {
		return
	}
	if !ok && len(h.proven) >= maxProven {
		c := m.clock(now)
		for k, t := range h.proven {
			if t <= c {
				delete(h.proven, k)
			}
		}
		for k, t := range h.proven {
			if len(h.proven) < maxProven-maxProven/8 {
				break
			}
			if t != maxClock {
				delete(h.proven, k)
			}
		}
	}
	h.proven[a] = until
}

// proveReply proves the source of a reply to one of our invocations: it
// got our INVOKE at the address we sent it to.
func (m *machine) proveReply(now time.Time, inv *invocation) {
	if m.rxFrom == inv.addr {
		m.prove(now, inv.addr)
	}
}

// proveInvocation is Prove: the handler vouches for inv's source.
func (m *machine) proveInvocation(now time.Time, inv *invocation) {
	if inv.st == stReleased || m.closed {
		return
	}
	m.prove(now, inv.addr)
	if inv.unproven {
		m.countUnproven(inv, -1)
	}
}

// mayReply charges n octets to b unless the amplification limit withholds
// them (counted) or to is proven.
func (m *machine) mayReply(now time.Time, to netip.AddrPort, b *budget, n int) bool {
	f := m.cfg.AmplificationFactor
	if f == 0 {
		return true
	}
	if c := m.clock(now); b.until > c {
		return true
	} else if u := m.provenUntil(to); u > c {
		b.until = u
		return true
	}
	if float64(b.outB+n) > f*float64(b.inB) || float64(b.outD+1) > f*float64(b.inD) {
		m.st.withheld.Add(1)
		m.st.withheldBytes.Add(uint64(n))
		return false
	}
	b.outB += n
	b.outD++
	return true
}

// reply sends one of a performer invocation's PDUs within its budget.
func (m *machine) reply(now time.Time, inv *invocation, b []byte) {
	if m.mayReply(now, inv.addr, &inv.budget, len(b)) {
		m.send(inv.addr, b)
	}
}

// replyFailure sends a FAILURE within budget b.
func (m *machine) replyFailure(now time.Time, to netip.AddrPort, ref uint8, r FailureReason, b *budget) {
	if m.mayReply(now, to, b, 3) {
		m.sendFailure(to, ref, r)
	}
}

func failurePDU(ref uint8, r FailureReason) []byte {
	return []byte{byte(TypeFailure), ref, byte(r)}
}

// prefixOf is the network an address is counted in: its IPv4 /24 or
// IPv6 /48, a site's usual allocation.
func prefixOf(a netip.Addr) netip.Prefix {
	a = a.Unmap().WithZone("")
	bits := 24
	if a.Is6() {
		bits = 48
	}
	p, _ := a.Prefix(bits)
	return p
}

// admitUnproven reports whether one more invocation from the unproven
// address a fits the unproven caps.
func (m *machine) admitUnproven(a netip.Addr) bool {
	h := &m.hostile
	return h.unproven < m.cfg.MaxUnproven && h.unprovenPfx[prefixOf(a)] < m.cfg.MaxUnprovenPerPrefix &&
		h.unprovenIP[a] < m.cfg.MaxUnprovenPerAddr
}

// countUnproven adds d (±1) to the unproven counts of inv's source.
func (m *machine) countUnproven(inv *invocation, d int) {
	h := &m.hostile
	inv.unproven = d > 0
	h.unproven += d
	m.st.unproven.Store(int64(h.unproven))
	a := inv.addr.Addr()
	add := func(n int) int { return n + d }
	if n := add(h.unprovenIP[a]); n > 0 {
		h.unprovenIP[a] = n
	} else {
		delete(h.unprovenIP, a)
	}
	p := prefixOf(a)
	if n := add(h.unprovenPfx[p]); n > 0 {
		h.unprovenPfx[p] = n
	} else {
		delete(h.unprovenPfx, p)
	}
}

// tombstone is what remains of a refused invocation from an unproven
// source: enough to recognise and re-answer its duplicates.
type tombstone struct {
	key    invKey
	addr   netip.AddrPort
	sap    uint8
	sum    uint64 // fingerprint of operation, encoding and argument
	kept   []byte // the ERROR or FAILURE repeated to duplicates
	acked  bool   // a 3-way invoker acknowledged the ERROR
	budget budget
	until  int64 // machine clock
	moved  bool  // until moved since it was queued
	dead   bool  // no longer in tombs
}

func (m *machine) fingerprint(sap, op uint8, enc Encoding, data []byte) uint64 {
	var h maphash.Hash
	h.SetSeed(m.hostile.seed)
	h.WriteByte(sap)
	h.WriteByte(op)
	h.WriteByte(byte(enc))
	h.Write(data)
	return h.Sum64()
}

// entomb releases inv, whose last PDU was kept, and keeps a tombstone.
func (m *machine) entomb(now time.Time, inv *invocation, kept []byte) {
	h := &m.hostile
	t := &tombstone{
		// A copy: kept may live in the invocation's own buffer, which
		// the tombstone must not hold on to.
		key: inv.key, addr: inv.addr, sap: inv.sap, kept: bytes.Clone(kept), budget: inv.budget,
		sum:   inv.sum,
		until: m.clock(now) + int64(m.td.ref),
	}
	inv.kept = nil
	m.release(inv)
	m.sweepTombs(m.clock(now))
	for len(h.tombs) >= m.cfg.MaxTombstones && len(h.tombQ) > 0 {
		m.popTomb()
	}
	if m.cfg.MaxTombstones == 0 {
		return
	}
	h.tombs[t.key] = t
	h.tombQ = append(h.tombQ, t)
	m.st.tombstones.Store(int64(len(h.tombs)))
}

func (m *machine) popTomb() {
	h := &m.hostile
	t := h.tombQ[0]
	h.tombQ[0] = nil
	h.tombQ = h.tombQ[1:]
	if !t.dead {
		m.buryTomb(t)
	}
}

func (m *machine) buryTomb(t *tombstone) {
	t.dead = true
	delete(m.hostile.tombs, t.key)
	m.st.tombstones.Store(int64(len(m.hostile.tombs)))
}

// sweepTombs forgets tombstones held T_ref since their last activity.
// One whose hold was extended goes to the back of the queue when it
// reaches the front, so the queue stays about in expiry order.
func (m *machine) sweepTombs(now int64) {
	h := &m.hostile
	for len(h.tombQ) > 0 {
		t := h.tombQ[0]
		switch {
		case t.dead || t.until <= now:
			m.popTomb()
		case t.moved:
			t.moved = false
			h.tombQ[0] = nil
			h.tombQ = append(h.tombQ[1:], t)
		default:
			return
		}
	}
}

// tombInvoke handles an INVOKE on a tombstone's key, and reports whether
// it was consumed: a duplicate is re-answered within the budget, an
// INVOKE for another SAP is dropped as for live invocations, and a new
// INVOKE on the number supersedes the tombstone.
func (m *machine) tombInvoke(now time.Time, p *PDU, key invKey) bool {
	t := m.hostile.tombs[key]
	if t == nil {
		return false
	}
	switch {
	case t.sap != p.SAP:
		m.drop(DropSAPMismatch)
		return true
	case t.sum != m.fingerprint(p.SAP, p.Operation, p.Encoding, p.Data):
		m.buryTomb(t)
		return false
	}
	m.st.duplicates.Add(1)
	t.budget.earn(m.rx)
	if !t.acked && m.mayReply(now, t.addr, &t.budget, len(t.kept)) {
		m.send(t.addr, t.kept)
	}
	t.until, t.moved = m.clock(now)+int64(m.td.ref), true
	return true
}

// tombAck takes an ACK for a tombstone's ERROR.
func (m *machine) tombAck(key invKey) bool {
	t := m.hostile.tombs[key]
	if t == nil || t.kept[0]&7 != byte(TypeError) {
		return false
	}
	m.st.duplicates.Add(1)
	t.budget.earn(m.rx)
	t.acked = true
	return true
}

// refuse is ERROR.request for an invocation refused: from an unproven
// source it leaves only a tombstone.
func (m *machine) refuse(now time.Time, inv *invocation, enc Encoding, value uint8, data []byte) error {
	if err := m.answer(now, inv, true, enc, value, data); err != nil {
		return err
	}
	if inv.unproven {
		m.finishPerformer(inv, nil)
		m.entomb(now, inv, inv.kept)
	}
	return nil
}

// Refuse answers the invocation with an ERROR, like w.Error, and tells
// the endpoint that it was refused (unknown invoker, bad credentials,
// malformed request): when its source has not proven itself, the
// invocation is released at once and only a tombstone remains to answer
// duplicates, so that refused work holds no in-flight slot. Confirmed then
// returns nil without waiting for an acknowledgement. For a ResponseWriter
// not made by an Endpoint, Refuse is w.Error.
func Refuse(w ResponseWriter, enc Encoding, value uint8, data []byte) error {
	r, ok := w.(*responder)
	if !ok {
		return w.Error(enc, value, data)
	}
	now := time.Now()
	e := r.e
	e.mu.Lock()
	err := e.m.refuse(now, r.inv, enc, value, data)
	out := e.takeOut()
	e.rearm(now)
	e.mu.Unlock()
	e.flush(out)
	return err
}

// Prove marks the source address and port of the invocation w answers as
// proven: the handler has checked that the invoker is who it claims to be
// (a password, say). Replies to it are then not limited by
// Config.AmplificationFactor, and its invocations no longer count against
// the unproven caps, for Config.ProvenFor. For a ResponseWriter not made
// by an Endpoint, Prove does nothing.
func Prove(w ResponseWriter) {
	r, ok := w.(*responder)
	if !ok {
		return
	}
	r.e.mu.Lock()
	r.e.m.proveInvocation(time.Now(), r.inv)
	r.e.mu.Unlock()
}

// Trust marks addr as proven for the endpoint's life: a peer the
// application was configured to talk to (a device's MTS, say), whose
// invocations it expects before it has sent any of its own.
func (e *Endpoint) Trust(addr netip.AddrPort) {
	addr = netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port())
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.m.closed {
		e.m.hostile.proven[addr] = maxClock
	}
}

// maxClock never passes: the proof of a trusted peer.
const maxClock = int64(^uint64(0) >> 1)
