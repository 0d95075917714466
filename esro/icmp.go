package esro

import (
	"bytes"
	"fmt"
	"net/netip"
	"time"
)

// Unreachable is a local failure value, never sent: an ICMP error (port
// or host unreachable) said the INVOKE cannot reach its peer, so the
// invocation ended at once rather than after every retransmission. A
// peer's FAILURE PDU with value 255 reads the same, with Remote set.
const Unreachable FailureReason = 255

// UnreachableError is the cause of an Unreachable failure: the ICMP
// error the kernel reported for a datagram to Addr.
type UnreachableError struct {
	Addr netip.AddrPort
	Err  error // the errno, e.g. syscall.ECONNREFUSED for port unreachable
}

func (e *UnreachableError) Error() string {
	return fmt.Sprintf("esro: %v unreachable: %v", e.Addr, e.Err)
}

func (e *UnreachableError) Unwrap() error { return e.Err }

// icmpReport is one ICMP error the socket reported: the destination and
// the (possibly truncated) payload of the datagram that caused it.
type icmpReport struct {
	to      netip.AddrPort
	payload []byte
	err     error
}

// unreachable ends the invoker invocation whose INVOKE an ICMP error
// came back for. The report must quote the INVOKE as sent (its first
// octets at least), so that a forged ICMP message needs the reference
// number and the argument, not only the addresses. Errors about other
// PDUs (replies, ACKs) change nothing: the peer's own timers handle
// those.
func (m *machine) unreachable(now time.Time, r icmpReport) {
	p := r.payload
	if len(p) < 3 || PDUType(p[0]&7) != TypeInvoke {
		return
	}
	to := netip.AddrPortFrom(r.to.Addr().Unmap(), r.to.Port())
	inv := m.invoker(invKey{m.peerKey(to), p[1]})
	if inv == nil || inv.st != stInvokeSent || inv.addr != to || !bytes.HasPrefix(inv.kept, p) {
		return
	}
	m.st.unreachable.Add(1)
	m.disarm(inv)
	inv.kept = nil
	m.finishInvoker(inv, nil, m.localFailure(Unreachable, &UnreachableError{Addr: to, Err: r.err}))
	m.refWait(now, inv)
}

// icmpSource is a batchIO that reports ICMP errors (Linux, IP_RECVERR)
// and kernel drops.
type icmpSource interface {
	// takeICMP returns the reports collected since the last call.
	takeICMP() []icmpReport
	// afterSendError reads the reports when a send failed with an ICMP
	// error, and then says to send again, once.
	afterSendError(err error) bool
	// setCounters gives the endpoint's counters for the drop count.
	setCounters(*counters)
	// refreshDrops brings the drop count up to date.
	refreshDrops()
}

// wireICMP connects the batch I/O's reports to the counters.
func (e *Endpoint) wireICMP() {
	if src, ok := e.batch.(icmpSource); ok {
		src.setCounters(&e.st)
	}
}

// retrySend reports whether a send that failed with err should be tried
// again: the error was an ICMP report about an earlier datagram.
func (e *Endpoint) retrySend(err error) bool {
	src, ok := e.batch.(icmpSource)
	return ok && src.afterSendError(err)
}

// applyICMPLocked feeds collected ICMP reports to the machine. Called
// with mu held.
func (e *Endpoint) applyICMPLocked(now time.Time) {
	src, ok := e.batch.(icmpSource)
	if !ok {
		return
	}
	for _, r := range src.takeICMP() {
		e.m.unreachable(now, r)
	}
}

// applyICMP is applyICMPLocked for reports a send collected, outside
// the read loop. Called without mu.
func (e *Endpoint) applyICMP() {
	src, ok := e.batch.(icmpSource)
	if !ok {
		return
	}
	rs := src.takeICMP()
	if len(rs) == 0 {
		return
	}
	now := time.Now()
	e.mu.Lock()
	if e.m.closed {
		e.mu.Unlock()
		return
	}
	for _, r := range rs {
		e.m.unreachable(now, r)
	}
	out := e.takeOut()
	e.rearm(now)
	e.mu.Unlock()
	e.flush(out)
}
