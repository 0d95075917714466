package esro

import (
	"net/netip"
	"sync/atomic"
	"time"
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
	// retxPaid: its due retransmission was deferred to a slot of the
	// retransmission pacer, already paid for (retxpace.go).
	retxPaid bool
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
	// room is the larger buffer allocated with an invocation whose INVOKE
	// does not fit small (newInvocation), nil otherwise. An invoker's
	// INVOKE goes there; a performer's reply, or the copy of its argument
	// that a handler worker is given (room is nil then).
	room []byte

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
	if n <= cap(inv.room) {
		return inv.room[:0]
	}
	return make([]byte, 0, n)
}

// roomyInvocation is an invocation allocated together with room for a
// PDU of up to roomPDU octets: one allocation rather than two for the
// invocations of larger arguments (up to the default PDU size). An
// invoker's INVOKE goes there, and its reply data then take the same
// buffer (replyData). A performer's reply goes there when it fits: a
// large argument most often has a large answer (an echo, a mail
// submission's report is small but then costs nothing extra). The
// buffer is part of the invocation's allocation, so whoever still holds
// the PDU (a send batch, a retransmission) keeps it alive: nothing is
// recycled by hand. The size fills the allocator's size class of the
// whole.
type roomyInvocation struct {
	invocation
	buf [roomPDU]byte
}

const roomPDU = 1600

// newInvocation allocates an invocation whose INVOKE takes n octets.
func newInvocation(n int) *invocation {
	if n <= smallPDU || n > roomPDU {
		return new(invocation)
	}
	r := new(roomyInvocation)
	r.room = r.buf[:]
	return &r.invocation
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
	srtt    time.Duration
	rttvar  time.Duration
	hasRTT  bool
	waiters []chan struct{} // Invoke calls waiting for a free reference number
	inv     refTable        // its invoker invocations
	perf    refTable        // its performer invocations
	loss    lossEstimate
	ip      *ipLoad // performer invocations from its address, once it had one
}

func (p *peer) idle() bool { return p.nheld == 0 && p.perf.n == 0 && len(p.waiters) == 0 }

func (p *peer) isHeld(r uint8) bool { return p.held[r>>6]&(1<<(r&63)) != 0 }

// refTable holds one peer's invocations of one role by reference number.
// It replaces an engine-wide map keyed by (peer, number): the peer is
// looked up anyway, and after that finding, adding or removing an
// invocation is an array operation, not a hash-map insertion or deletion
// per invocation. Most peers (devices) have an invocation or two at a
// time, which few holds without a 2 KiB array; a busier peer (a gateway,
// a server) gets the array, kept until the table empties.
type refTable struct {
	n   int
	few [4]*invocation
	all *[256]*invocation
}

func (t *refTable) get(r uint8) *invocation {
	if t.all != nil {
		return t.all[r]
	}
	for _, inv := range t.few {
		if inv != nil && inv.key.ref == r {
			return inv
		}
	}
	return nil
}

// put adds inv, whose number is not in t.
func (t *refTable) put(inv *invocation) {
	t.n++
	if t.all == nil {
		for i, x := range t.few {
			if x == nil {
				t.few[i] = inv
				return
			}
		}
		t.all = new([256]*invocation)
		for i, x := range t.few {
			t.all[x.key.ref] = x
			t.few[i] = nil
		}
	}
	t.all[inv.key.ref] = inv
}

// del removes inv, which is in t.
func (t *refTable) del(inv *invocation) {
	t.n--
	if t.all != nil {
		t.all[inv.key.ref] = nil
		if t.n == 0 {
			t.all = nil
		}
		return
	}
	for i, x := range t.few {
		if x == inv {
			t.few[i] = nil
			return
		}
	}
}

// each calls f for every invocation in t; f may not add or remove any.
func (t *refTable) each(f func(*invocation)) {
	if t.n == 0 {
		return
	}
	if t.all != nil {
		for _, inv := range t.all {
			if inv != nil {
				f(inv)
			}
		}
		return
	}
	for _, inv := range t.few {
		if inv != nil {
			f(inv)
		}
	}
}
