package ports

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// ONC-RPC (RFC 5531) just far enough for a NULL call and its reply.

// rpcProgram is an ONC-RPC program we know how to ping.
type rpcProgram struct {
	Prog, Vers uint32
	Name       string
}

// rpcPrograms are called in this order on a port that is not an ESRO speaker:
// NetInfo first (it is what Mac OS X put on ports 600-1023), then its binder,
// then the portmapper. Program numbers are from Apple's NetInfo headers
// (NETINFOPROG 200100000 v2, NIBINDPROG 200100001 v1) and RFC 1833.
func rpcPrograms() []rpcProgram {
	return []rpcProgram{
		{200100000, 2, "NetInfo (netinfod)"},
		{200100001, 1, "NetInfo binder (nibindd)"},
		{100000, 2, "portmapper"},
	}
}

// RFC 5531 §9 constants.
const (
	rpcCall  = 0
	rpcReply = 1

	msgAccepted = 0
	msgDenied   = 1

	acceptSuccess      = 0
	acceptProgUnavail  = 1
	acceptProgMismatch = 2
	acceptProcUnavail  = 3
	acceptGarbageArgs  = 4
	acceptSystemErr    = 5

	rejectRPCMismatch = 0
	rejectAuthError   = 1

	maxAuthBody = 400 // RFC 5531 §8.2
)

// rpcNullCall encodes a CALL of procedure 0 with AUTH_NONE and no arguments
// (40 octets: binary, mostly zero, not printable text).
func rpcNullCall(xid, prog, vers uint32) []byte {
	b := make([]byte, 0, 40)
	for _, w := range []uint32{xid, rpcCall, 2, prog, vers, 0, 0, 0, 0, 0} {
		b = binary.BigEndian.AppendUint32(b, w)
	}
	return b
}

// rpcXID picks a transaction id whose first octet has its three low bits set.
// Read as ESRO, such a datagram is PDU type 7, which every ESRO engine drops
// without answering (docs/protocol.md ESRO §2.7), so the RPC probe never starts an
// ESRO invocation by accident. No octet is a line end (noLineEnd).
func rpcXID(r uint32) uint32 {
	r |= 0x07000000
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], r)
	for i := range b {
		b[i] = noLineEnd(b[i])
	}
	return binary.BigEndian.Uint32(b[:])
}

// noLineEnd keeps a random octet of a probe off CR and LF, so that no probe
// datagram holds a line end that a line-oriented service (a printer among
// them) could act on.
func noLineEnd(b byte) byte {
	if b == '\n' || b == '\r' {
		return b | 0x80
	}
	return b
}

// rpcReplyMsg is a decoded REPLY.
type rpcReplyMsg struct {
	XID        uint32
	Accepted   bool
	AcceptStat uint32 // when Accepted
	RejectStat uint32 // when !Accepted
	AuthStat   uint32 // when RejectStat == AUTH_ERROR
	Low, High  uint32 // PROG_MISMATCH or RPC_MISMATCH range
}

var errNotRPCReply = errors.New("ports: not an ONC-RPC reply")

// parseRPCReply decodes an RFC 5531 reply_msg. Results after SUCCESS are not
// interpreted (a NULL procedure has none). It never panics.
func parseRPCReply(b []byte) (rpcReplyMsg, error) {
	d := xdr{b: b}
	var m rpcReplyMsg
	m.XID = d.u32()
	if mt := d.u32(); d.err == nil && mt != rpcReply {
		return m, fmt.Errorf("%w: message type %d", errNotRPCReply, mt)
	}
	switch stat := d.u32(); {
	case d.err != nil:
	case stat == msgAccepted:
		m.Accepted = true
		d.opaqueAuth()
		m.AcceptStat = d.u32()
		if d.err == nil && m.AcceptStat > acceptSystemErr {
			return m, fmt.Errorf("%w: accept_stat %d", errNotRPCReply, m.AcceptStat)
		}
		if m.AcceptStat == acceptProgMismatch {
			m.Low, m.High = d.u32(), d.u32()
		}
	case stat == msgDenied:
		m.RejectStat = d.u32()
		switch {
		case d.err != nil:
		case m.RejectStat == rejectRPCMismatch:
			m.Low, m.High = d.u32(), d.u32()
		case m.RejectStat == rejectAuthError:
			m.AuthStat = d.u32()
		default:
			return m, fmt.Errorf("%w: reject_stat %d", errNotRPCReply, m.RejectStat)
		}
	default:
		return m, fmt.Errorf("%w: reply_stat %d", errNotRPCReply, stat)
	}
	if d.err != nil {
		return m, fmt.Errorf("%w: %w", errNotRPCReply, d.err)
	}
	return m, nil
}

func (m rpcReplyMsg) String() string {
	if !m.Accepted {
		switch m.RejectStat {
		case rejectRPCMismatch:
			return fmt.Sprintf("MSG_DENIED RPC_MISMATCH (RPC versions %d..%d)", m.Low, m.High)
		default:
			return fmt.Sprintf("MSG_DENIED AUTH_ERROR (auth_stat %d)", m.AuthStat)
		}
	}
	switch m.AcceptStat {
	case acceptSuccess:
		return "MSG_ACCEPTED SUCCESS"
	case acceptProgUnavail:
		return "MSG_ACCEPTED PROG_UNAVAIL"
	case acceptProgMismatch:
		return fmt.Sprintf("MSG_ACCEPTED PROG_MISMATCH (versions %d..%d)", m.Low, m.High)
	case acceptProcUnavail:
		return "MSG_ACCEPTED PROC_UNAVAIL"
	case acceptGarbageArgs:
		return "MSG_ACCEPTED GARBAGE_ARGS"
	}
	return "MSG_ACCEPTED SYSTEM_ERR"
}

// xdr is a sticky-error XDR reader.
type xdr struct {
	b   []byte
	err error
}

var errShortXDR = errors.New("truncated")

func (d *xdr) u32() uint32 {
	if d.err != nil {
		return 0
	}
	if len(d.b) < 4 {
		d.err = errShortXDR
		return 0
	}
	v := binary.BigEndian.Uint32(d.b)
	d.b = d.b[4:]
	return v
}

// opaqueAuth skips an opaque_auth: flavor, then a body of at most 400 octets
// padded to a multiple of four.
func (d *xdr) opaqueAuth() {
	d.u32()
	n := d.u32()
	if d.err != nil {
		return
	}
	if n > maxAuthBody {
		d.err = fmt.Errorf("verifier body of %d octets", n)
		return
	}
	padded := int(n+3) &^ 3
	if len(d.b) < padded {
		d.err = errShortXDR
		return
	}
	d.b = d.b[padded:]
}

// recordMark frames an RPC message for TCP (RFC 5531 §11): one last fragment.
func recordMark(msg []byte) []byte {
	return append(binary.BigEndian.AppendUint32(nil, 0x80000000|uint32(len(msg))), msg...)
}
