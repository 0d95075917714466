package esro

import (
	"fmt"
	"log/slog"
	"net/netip"
	"time"
)

// Timers are the five timer inputs of the reference engine (docs/protocol.md ESRO §5.1,
// ini section [Timer Values]). Every protocol timer is derived from them.
type Timers struct {
	Acknowledgement time.Duration // A, "Acknowledgement"
	Roundtrip       time.Duration // RT, "Roundtrip"
	Retransmit      time.Duration // R, "Retransmit"
	NSDULifetime    time.Duration // L, "Max NSDU Life Time"
	RetransmitCount int           // N, "Retransmit Count"
}

// ShippedTimers returns the values of the reference's shipped erop.ini,
// the defaults of this implementation (docs/protocol.md ESRO §5.1).
func ShippedTimers() Timers {
	return Timers{
		Acknowledgement: 100 * time.Millisecond,
		Roundtrip:       1000 * time.Millisecond,
		Retransmit:      2000 * time.Millisecond,
		NSDULifetime:    3000 * time.Millisecond,
		RetransmitCount: 8,
	}
}

// CompiledTimers returns the reference engine's compiled-in defaults, used
// when its ini file lacks a value (docs/protocol.md ESRO §5.1).
func CompiledTimers() Timers {
	return Timers{
		Acknowledgement: 1000 * time.Millisecond,
		Roundtrip:       5000 * time.Millisecond,
		Retransmit:      10000 * time.Millisecond,
		NSDULifetime:    15000 * time.Millisecond,
		RetransmitCount: 4,
	}
}

// Limits on timer inputs accepted by Validate: beyond an hour per value the
// derived hold times become meaningless for a datagram protocol.
const (
	maxTimerInput      = time.Hour
	MaxRetransmitCount = 255
)

// Validate reports whether every input is usable.
func (t Timers) Validate() error {
	for _, v := range []struct {
		name string
		d    time.Duration
		zero bool
	}{
		{"acknowledgement delay", t.Acknowledgement, true},
		{"roundtrip", t.Roundtrip, false},
		{"retransmit interval", t.Retransmit, false},
		{"NSDU lifetime", t.NSDULifetime, true},
	} {
		if v.d < 0 || (!v.zero && v.d == 0) || v.d > maxTimerInput {
			return fmt.Errorf("esro: %s %v out of range", v.name, v.d)
		}
	}
	if t.RetransmitCount < 0 || t.RetransmitCount > MaxRetransmitCount {
		return fmt.Errorf("esro: retransmit count %d out of range 0..%d", t.RetransmitCount, MaxRetransmitCount)
	}
	return nil
}

// Durations derived from Timers by the reference formulas (docs/protocol.md ESRO §5.1).

// RetransmitInterval is T_retx = R + RT.
func (t Timers) RetransmitInterval() time.Duration { return t.Retransmit + t.Roundtrip }

// LastWait is T_last = 2 × (A + R), the wait after the last retransmission.
func (t Timers) LastWait() time.Duration { return 2 * (t.Acknowledgement + t.Retransmit) }

// ReferenceHold is T_ref = 2 × L + N × R.
func (t Timers) ReferenceHold() time.Duration {
	return 2*t.NSDULifetime + time.Duration(t.RetransmitCount)*t.Retransmit
}

// Inactivity is T_inact = 4 × RT.
func (t Timers) Inactivity() time.Duration { return 4 * t.Roundtrip }

// NoResponse is T_noresp = 2 × L + (N + 1) × (R + RT).
func (t Timers) NoResponse() time.Duration {
	return 2*t.NSDULifetime + time.Duration(t.RetransmitCount+1)*t.RetransmitInterval()
}

// Config configures an Endpoint. The zero value is usable: every zero field
// takes the default named in its comment.
type Config struct {
	// Timers are the reference timer inputs. Zero: ShippedTimers().
	Timers Timers

	// FixedTimers disables the adaptive retransmission timer and uses T_retx
	// for every retransmission, exactly as the reference does.
	FixedTimers bool

	// MinRTO and MaxRTO bound the adaptive retransmission timeout, including
	// backoff and jitter. Zero: 200 ms (at most MaxRTO) and T_retx. Keeping MaxRTO at T_retx
	// keeps every gap between retransmissions shorter than the peer's
	// derived inactivity and hold timers, so its duplicate detection holds.
	MinRTO, MaxRTO time.Duration

	// Jitter is the fraction (0..0.5) by which each adaptive retransmission
	// interval is randomly stretched or shrunk. Zero: 0.1. Negative: none.
	Jitter float64

	// PerformerTimeout is how long a handler may take to answer before the
	// invocation fails with FAILURE(2) to the invoker. Zero: T_noresp.
	// Negative: wait forever, as the reference's 3-way performer does (see
	// docs/protocol.md ESRO Open Point 7).
	PerformerTimeout time.Duration

	// PDUSize is the largest user data accepted in a request or answer
	// (docs/protocol.md ESRO §6). Zero: 1500.
	PDUSize int

	// MaxInvocations caps the invocations (both roles, including those only
	// held for duplicate detection) the endpoint keeps. Beyond it Invoke
	// fails with a local-resource Failure and incoming INVOKEs are answered
	// FAILURE(1) (docs/protocol.md ESRO §6). Zero: 65536.
	MaxInvocations int

	// MaxPeerInvocations caps the performer invocations held for one source
	// IP address, all ports together, so that a flood from one address
	// (with forged ports) cannot take the whole MaxInvocations budget. One
	// port can never hold more than 256 (the reference numbers). Zero:
	// 16384 (a quarter of the default MaxInvocations): room for a NAT
	// gateway or one host standing in for many devices, each on its own
	// port.
	MaxPeerInvocations int

	// AmplificationFactor bounds what the endpoint sends, as a performer,
	// toward a source address that has not proven itself: at most this
	// many times the bytes, and the datagrams, it received from that
	// address for the invocation (or, for a FAILURE sent without keeping
	// state, in the datagram that caused it), retransmissions included.
	// What the limit withholds is counted (Stats.Withheld). A peer that
	// retransmits its INVOKE earns the replies it missed. A source proves
	// itself by answering an invocation this endpoint sent it, or when
	// the handler calls Prove (after checking a password, say). QUIC
	// allows 3 (RFC 9000 §8.1). Zero: 1. Negative: no limit, as the
	// reference. On an AuthenticatedConn every source is proven, so
	// neither this nor the unproven caps below apply.
	AmplificationFactor float64

	// ProvenFor is how long a proven source stays proven after its last
	// proof. Zero: 10 minutes.
	ProvenFor time.Duration

	// MaxUnproven caps the performer invocations in flight for sources
	// that have not proven themselves, so that the rest of MaxInvocations
	// stays for proven peers whatever arrives from forged addresses.
	// Beyond it, and beyond MaxUnprovenPerPrefix (per IPv4 /24 or IPv6
	// /48) and MaxUnprovenPerAddr (per IP address), INVOKEs from unproven
	// sources are dropped without an answer: a real invoker retransmits
	// and gets in once a slot frees, while answering would only feed a
	// reflection. Zero: min(MaxInvocations, 4096), a quarter of that per
	// prefix, an eighth per address.
	MaxUnproven, MaxUnprovenPerPrefix, MaxUnprovenPerAddr int

	// MaxTombstones caps the refused invocations remembered for
	// duplicate detection only (see Refuse), about 500 octets each. The
	// oldest go first: a duplicate of a forgotten one is refused again.
	// Zero: 16384.
	MaxTombstones int

	// IPOnlyPeers identifies peers by IP address alone, ignoring the UDP
	// port, as the reference does (docs/protocol.md ESRO §3.1, Open Point 3). The
	// default keys every table by IP address and port.
	IPOnlyPeers bool

	// NoLinger makes Shutdown close as soon as no answer is owed or
	// awaited, without staying to re-acknowledge replies that performers
	// may retransmit because an ACK was lost (see Endpoint.Shutdown). A
	// performer that commits only on confirmation may then fail an
	// operation whose result was reported here.
	NoLinger bool

	// RetransmitRate, when positive, paces the timer-driven
	// retransmissions of all invocations together to at most this many a
	// second, after a burst of RetransmitBurst (zero: a tenth of a
	// second's worth, at least 1). A retransmission over the rate is
	// deferred to the next free slot, never dropped (retxpace.go). Zero:
	// no limit.
	RetransmitRate  float64
	RetransmitBurst int

	// Logger receives protocol diagnostics. Nil: slog.Default().
	Logger *slog.Logger

	// Trace, when set, sees every datagram: each one received before the
	// engine does (out false) and each one sent just before it is written
	// (out true), with the peer's address. pdu must not be retained. It
	// is called from several goroutines at once. Nil: no tracing.
	Trace func(out bool, peer netip.AddrPort, pdu []byte)

	// peersAuthenticated is set by NewEndpoint on an AuthenticatedConn:
	// every source counts as proven (hostile.go).
	peersAuthenticated bool
}

// RetransmitBucket is how many retransmissions the pacing lets out at
// once: RetransmitBurst, or its default when zero. Meaningful only with
// RetransmitRate > 0.
func (c *Config) RetransmitBucket() float64 {
	if c.RetransmitBurst > 0 {
		return float64(c.RetransmitBurst)
	}
	return max(1, c.RetransmitRate/10) // a tenth of a second's worth
}

// Validate reports whether c can configure an Endpoint.
func (c *Config) Validate() error {
	_, err := c.resolved()
	return err
}

// resolved returns c with defaults filled in, or an error for bad values.
func (c *Config) resolved() (Config, error) {
	var r Config
	if c != nil {
		r = *c
	}
	if r.Timers == (Timers{}) {
		r.Timers = ShippedTimers()
	}
	if err := r.Timers.Validate(); err != nil {
		return r, err
	}
	if r.MaxRTO == 0 {
		r.MaxRTO = r.Timers.RetransmitInterval()
	}
	if r.MinRTO == 0 {
		r.MinRTO = min(200*time.Millisecond, r.MaxRTO)
	}
	if r.MinRTO < 0 || r.MaxRTO < r.MinRTO {
		return r, fmt.Errorf("esro: RTO bounds %v..%v invalid", r.MinRTO, r.MaxRTO)
	}
	switch {
	case r.Jitter == 0:
		r.Jitter = 0.1
	case r.Jitter < 0:
		r.Jitter = 0
	case r.Jitter > 0.5:
		return r, fmt.Errorf("esro: jitter %v out of range 0..0.5", r.Jitter)
	}
	if r.RetransmitRate < 0 || r.RetransmitBurst < 0 {
		return r, fmt.Errorf("esro: retransmission rate %v, burst %d: must not be negative", r.RetransmitRate, r.RetransmitBurst)
	}
	if r.PerformerTimeout == 0 {
		r.PerformerTimeout = r.Timers.NoResponse()
	}
	if r.PDUSize == 0 {
		r.PDUSize = 1500
	}
	if r.PDUSize < 0 || r.PDUSize > maxDatagram-3 {
		return r, fmt.Errorf("esro: PDU size %d out of range 0..%d", r.PDUSize, maxDatagram-3)
	}
	if r.MaxInvocations == 0 {
		r.MaxInvocations = 65536
	}
	if r.MaxPeerInvocations == 0 {
		r.MaxPeerInvocations = 16384
	}
	switch {
	case r.AmplificationFactor == 0:
		r.AmplificationFactor = 1
	case r.AmplificationFactor < 0:
		r.AmplificationFactor = 0 // no limit
	}
	if r.ProvenFor == 0 {
		r.ProvenFor = 10 * time.Minute
	}
	if r.MaxUnproven == 0 {
		r.MaxUnproven = min(r.MaxInvocations, 4096)
	}
	if r.MaxUnprovenPerPrefix == 0 {
		r.MaxUnprovenPerPrefix = max(r.MaxUnproven/4, 1)
	}
	if r.MaxUnprovenPerAddr == 0 {
		r.MaxUnprovenPerAddr = max(r.MaxUnproven/8, 1)
	}
	if r.MaxTombstones == 0 {
		r.MaxTombstones = 16384
	}
	if r.MaxInvocations < 0 || r.MaxPeerInvocations < 0 || r.MaxUnproven < 0 || r.MaxUnprovenPerPrefix < 0 ||
		r.MaxUnprovenPerAddr < 0 || r.MaxTombstones < 0 || r.ProvenFor < 0 {
		return r, fmt.Errorf("esro: negative invocation limit")
	}
	if r.Logger == nil {
		r.Logger = slog.Default()
	}
	return r, nil
}

// maxDatagram is the largest UDP payload over IPv4.
const maxDatagram = 65507
