package esro

import (
	"errors"
	"fmt"
)

// PDUType is the value of the three low bits of octet 0 of every ESRO PDU
// (docs/protocol.md ESRO §2.1).
type PDUType uint8

// The five PDU types. Values 5–7 are invalid and dropped on receipt.
const (
	TypeInvoke  PDUType = 0
	TypeResult  PDUType = 1
	TypeError   PDUType = 2
	TypeAck     PDUType = 3
	TypeFailure PDUType = 4
)

var typeNames = [...]string{"INVOKE", "RESULT", "ERROR", "ACK", "FAILURE"}

func (t PDUType) String() string {
	if int(t) < len(typeNames) {
		return typeNames[t]
	}
	return fmt.Sprintf("TYPE%d", uint8(t))
}

// HeaderLen is the header length of a PDU of type t, or 0 for an invalid type
// (docs/protocol.md ESRO §2.1).
func (t PDUType) HeaderLen() int {
	switch t {
	case TypeInvoke, TypeError, TypeFailure:
		return 3
	case TypeResult, TypeAck:
		return 2
	}
	return 0
}

// Encoding is the 2-bit encoding type carried by INVOKE, RESULT and ERROR.
// ESRO passes it through untouched (docs/protocol.md ESRO §1.3, Open Point 19).
type Encoding uint8

// Encoding values. The reference tools use EncodingReserved1 (2) for plain
// ASCII text; EMSD uses EncodingBER.
const (
	EncodingBER       Encoding = 0
	EncodingPER       Encoding = 1
	EncodingReserved1 Encoding = 2
	EncodingReserved2 Encoding = 3
)

// Field limits (docs/protocol.md ESRO §1.3).
const (
	MaxSAP       = 15
	MaxOperation = 63
	MaxEncoding  = 3
)

// Errors returned by ParsePDU. Receivers drop such datagrams silently
// (docs/protocol.md ESRO §2.7, recommendation).
var (
	ErrEmptyPDU   = errors.New("esro: empty datagram")
	ErrBadPDUType = errors.New("esro: invalid PDU type")
	ErrShortPDU   = errors.New("esro: datagram shorter than its PDU header")
)

// PDU is one decoded ESRO protocol data unit. Which fields are meaningful
// depends on Type:
//
//	INVOKE  SAP, Ref, Encoding, Operation, Data
//	RESULT  Ref, Encoding, Data
//	ERROR   Ref, Encoding, Value (error value), Data
//	ACK     Ref
//	FAILURE Ref, Value (failure reason)
type PDU struct {
	Type      PDUType
	SAP       uint8 // destination (performer) SAP selector, INVOKE only
	Ref       uint8 // invoke reference number
	Operation uint8 // 0..63, INVOKE only
	Encoding  Encoding
	Value     uint8  // ERROR: error value; FAILURE: failure reason
	Data      []byte // user data; for ParsePDU it aliases the input
}

// ParsePDU decodes one datagram payload (docs/protocol.md ESRO §2). Reserved bits are
// ignored, octets after an ACK or FAILURE header are ignored, and Data aliases
// b. It never panics; datagrams that are empty, of type 5–7 or shorter than
// their header are rejected with ErrEmptyPDU, ErrBadPDUType or ErrShortPDU.
func ParsePDU(b []byte) (PDU, error) {
	if len(b) == 0 {
		return PDU{}, ErrEmptyPDU
	}
	t := PDUType(b[0] & 7)
	hl := t.HeaderLen()
	if hl == 0 {
		return PDU{}, fmt.Errorf("%w %d", ErrBadPDUType, t)
	}
	if len(b) < hl {
		return PDU{}, fmt.Errorf("%w: %s needs %d octets, got %d", ErrShortPDU, t, hl, len(b))
	}
	p := PDU{Type: t, Ref: b[1]}
	switch t {
	case TypeInvoke:
		p.SAP = b[0] >> 4
		p.Encoding = Encoding(b[2] >> 6)
		p.Operation = b[2] & 0x3f
		p.Data = b[3:]
	case TypeResult:
		p.Encoding = Encoding(b[0] >> 6)
		p.Data = b[2:]
	case TypeError:
		p.Encoding = Encoding(b[0] >> 6)
		p.Value = b[2]
		p.Data = b[3:]
	case TypeFailure:
		p.Value = b[2]
	}
	return p, nil
}

// AppendPDU appends the wire form of p to dst. Out-of-range SAP, operation or
// encoding values are an error rather than silently corrupting neighbouring
// bits as the reference does (docs/protocol.md ESRO §1.3, Open Point 14). Data is
// ignored for ACK and FAILURE.
func AppendPDU(dst []byte, p *PDU) ([]byte, error) {
	if p.Encoding > MaxEncoding {
		return dst, fmt.Errorf("esro: encoding type %d out of range 0..%d", p.Encoding, MaxEncoding)
	}
	switch p.Type {
	case TypeInvoke:
		if p.SAP > MaxSAP {
			return dst, fmt.Errorf("esro: SAP selector %d out of range 0..%d", p.SAP, MaxSAP)
		}
		if p.Operation > MaxOperation {
			return dst, fmt.Errorf("esro: operation value %d out of range 0..%d", p.Operation, MaxOperation)
		}
		dst = append(dst, p.SAP<<4, p.Ref, byte(p.Encoding)<<6|p.Operation)
	case TypeResult:
		dst = append(dst, byte(p.Encoding)<<6|byte(TypeResult), p.Ref)
	case TypeError:
		dst = append(dst, byte(p.Encoding)<<6|byte(TypeError), p.Ref, p.Value)
	case TypeAck:
		return append(dst, byte(TypeAck), p.Ref), nil
	case TypeFailure:
		return append(dst, byte(TypeFailure), p.Ref, p.Value), nil
	default:
		return dst, fmt.Errorf("%w %d", ErrBadPDUType, p.Type)
	}
	return append(dst, p.Data...), nil
}

// String renders the PDU for logs and diagnostics.
func (p PDU) String() string {
	switch p.Type {
	case TypeInvoke:
		return fmt.Sprintf("INVOKE sap=%d ref=%d op=%d enc=%d len=%d", p.SAP, p.Ref, p.Operation, p.Encoding, len(p.Data))
	case TypeResult:
		return fmt.Sprintf("RESULT ref=%d enc=%d len=%d", p.Ref, p.Encoding, len(p.Data))
	case TypeError:
		return fmt.Sprintf("ERROR ref=%d enc=%d value=%d len=%d", p.Ref, p.Encoding, p.Value, len(p.Data))
	case TypeAck:
		return fmt.Sprintf("ACK ref=%d", p.Ref)
	case TypeFailure:
		return fmt.Sprintf("FAILURE ref=%d reason=%d", p.Ref, p.Value)
	}
	return p.Type.String()
}
