package esro

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
)

// Handshake is the functional unit of an invocation: 2-way (INVOKE → reply)
// or 3-way (INVOKE → reply → ACK). It is not carried on the wire; both sides
// must agree, which EMSD does by SAP numbering (docs/protocol.md ESRO §1.1).
type Handshake uint8

// The two functional units.
const (
	TwoWay   Handshake = 2
	ThreeWay Handshake = 3
)

func (h Handshake) valid() bool { return h == TwoWay || h == ThreeWay }

func (h Handshake) String() string {
	switch h {
	case TwoWay:
		return "2-way"
	case ThreeWay:
		return "3-way"
	}
	return fmt.Sprintf("handshake(%d)", uint8(h))
}

// FailureReason is the failure value of a FAILURE PDU or FAILURE.indication.
// The wire and API values are the reference's (docs/protocol.md ESRO §5.6, Open
// Point 2); a peer may send any octet and it is passed through.
type FailureReason uint8

// Defined failure values.
const (
	// Transmission: a 3-way performer's reply was never acknowledged.
	Transmission FailureReason = 0
	// LocalResource: out of resources (reference numbers, invocation
	// records), locally or, when received in a FAILURE PDU, at the peer; also
	// a performer whose handler did not answer in time.
	LocalResource FailureReason = 1
	// UserNotResponding: no answer after every retransmission, or the peer
	// has nothing bound at the SAP.
	UserNotResponding FailureReason = 2
	// RemoteResource is defined but never produced by the reference.
	RemoteResource FailureReason = 3
)

func (r FailureReason) String() string {
	switch r {
	case Transmission:
		return "transmission failure"
	case LocalResource:
		return "out of local resources"
	case UserNotResponding:
		return "user not responding"
	case RemoteResource:
		return "out of remote resources"
	case Unreachable:
		return "unreachable"
	}
	return fmt.Sprintf("failure value %d", uint8(r))
}

// Failure is the error for an invocation that ended without a RESULT or
// ERROR: the provider's FAILURE.indication (docs/protocol.md ESRO §5.6). Err, when
// set, is the local cause (e.g. ErrNoReference).
type Failure struct {
	Reason FailureReason
	// Remote is true when the reason came in a FAILURE PDU from the peer.
	Remote bool
	Err    error
}

func (f *Failure) Error() string {
	s := "esro: failure: " + f.Reason.String()
	if f.Remote {
		s += " (reported by peer)"
	}
	if f.Err != nil {
		s += ": " + f.Err.Error()
	}
	return s
}

func (f *Failure) Unwrap() error { return f.Err }

// ErrorReply is the performer's ERROR: an application error value with its
// encoding type and parameter octets (docs/protocol.md ESRO §2.4).
type ErrorReply struct {
	Value    uint8
	Encoding Encoding
	Data     []byte
}

func (e *ErrorReply) Error() string {
	return fmt.Sprintf("esro: error reply %d (%d octets)", e.Value, len(e.Data))
}

// Local errors.
var (
	ErrClosed   = errors.New("esro: endpoint closed")
	ErrAnswered = errors.New("esro: invocation already answered")
	// ErrInline: Confirmed was called by an inline handler (HandleInline)
	// while it runs on the read loop, which the confirm has to come from.
	ErrInline          = errors.New("esro: Confirmed from a running inline handler")
	ErrInvocationEnded = errors.New("esro: invocation no longer exists")
	ErrTooLarge        = errors.New("esro: user data larger than the PDU size")
	ErrSAPBound        = errors.New("esro: SAP already bound")
	ErrSAPNotBound     = errors.New("esro: SAP not bound")
	ErrTooManyInvokes  = errors.New("esro: invocation limit reached")
	// ErrSuperseded ends a performer invocation whose reference number the
	// invoker re-used for a different INVOKE: it no longer waits for it.
	ErrSuperseded = errors.New("esro: reference number re-used by the invoker")
	// ErrNoResponse is the cause of the Failure a handler's context carries
	// when it did not answer within Config.PerformerTimeout.
	ErrNoResponse = errors.New("esro: handler did not answer in time")
)

// Request is one INVOKE.request (docs/protocol.md ESRO §1.2).
type Request struct {
	To        netip.AddrPort
	SAP       uint8 // destination (performer) SAP selector, 0..15
	Operation uint8 // 0..63
	Encoding  Encoding
	Handshake Handshake
	Data      []byte // the argument, at most Config.PDUSize octets
}

func (r *Request) validate(pduSize int) error {
	switch {
	case !r.To.IsValid() || r.To.Port() == 0:
		return fmt.Errorf("esro: invalid destination %v", r.To)
	case r.SAP > MaxSAP:
		return fmt.Errorf("esro: SAP selector %d out of range 0..%d", r.SAP, MaxSAP)
	case r.Operation > MaxOperation:
		return fmt.Errorf("esro: operation value %d out of range 0..%d", r.Operation, MaxOperation)
	case r.Encoding > MaxEncoding:
		return fmt.Errorf("esro: encoding type %d out of range 0..%d", r.Encoding, MaxEncoding)
	case !r.Handshake.valid():
		return fmt.Errorf("esro: handshake %d is neither 2 nor 3", r.Handshake)
	case len(r.Data) > pduSize:
		return fmt.Errorf("%w: %d > %d", ErrTooLarge, len(r.Data), pduSize)
	}
	return nil
}

// Result is the performer's RESULT.
type Result struct {
	Encoding Encoding
	Data     []byte
}

// Invocation is an INVOKE.indication: what a Handler is asked to perform.
type Invocation struct {
	Peer netip.AddrPort
	// SAP is the local SAP the INVOKE was addressed to.
	SAP uint8
	// RemoteSAP is the invoker's SAP by the "performer − 1" convention; it
	// is not on the wire and only a guess (docs/protocol.md ESRO §3.2).
	RemoteSAP uint8
	Ref       uint8 // invoke reference number chosen by the peer
	Operation uint8
	Encoding  Encoding
	Handshake Handshake
	Data      []byte
}

// ResponseWriter answers one invocation. Only the first Result or Error
// counts; later ones return ErrAnswered (docs/protocol.md ESRO §9 scenario 5001). The
// answer may be given after the handler returns, from any goroutine.
type ResponseWriter interface {
	// Result sends a RESULT.
	Result(enc Encoding, data []byte) error
	// Error sends an ERROR with an application error value.
	Error(enc Encoding, value uint8, data []byte) error
	// Confirmed blocks until the provider confirms the answer, and returns
	// nil for RESULT/ERROR.confirm or the *Failure that ended the
	// invocation. A 3-way confirm means the invoker acknowledged; a 2-way
	// confirm only means no duplicate INVOKE came within T_inact (see
	// docs/protocol.md ESRO Open Point 9).
	Confirmed(ctx context.Context) error
}

// Handler performs invocations addressed to a bound SAP. ctx is cancelled
// when the invocation ends without an answer (performer timeout, unbind,
// Close); context.Cause then tells why.
type Handler interface {
	ServeESRO(ctx context.Context, w ResponseWriter, inv *Invocation)
}

// HandlerFunc adapts a function to a Handler.
type HandlerFunc func(ctx context.Context, w ResponseWriter, inv *Invocation)

// ServeESRO calls f.
func (f HandlerFunc) ServeESRO(ctx context.Context, w ResponseWriter, inv *Invocation) {
	f(ctx, w, inv)
}
