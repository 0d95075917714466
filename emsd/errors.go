package emsd

import (
	"errors"
	"strconv"

	"github.com/esro-emsdp/emsdp/internal/ber"
)

// ErrorCode is an EMSD error code (§1.6): the ESRO error value of an EMSD
// error and the value of its ErrorParameter. It implements error so that
// protocol outcomes can be returned and matched with errors.Is.
type ErrorCode uint8

// EMSD error codes (§1.6).
const (
	CodeProtocolVersion    ErrorCode = 1 // protocol version not recognized
	CodeSubmissionControl  ErrorCode = 2 // submission control violated
	CodeMessageID          ErrorCode = 3 // message identifier invalid
	CodeSecurity           ErrorCode = 4 // security error
	CodeDeliveryControl    ErrorCode = 5 // delivery control violated
	CodeResource           ErrorCode = 6 // resource error, the only transient one
	CodeProtocolViolation  ErrorCode = 7 // protocol violation
	maxErrorCodeWithString           = 7
)

var codeNames = [...]string{"", "protocol-version-not-recognized", "submission-control-violated",
	"message-identifier-invalid", "security-error", "delivery-control-violated",
	"resource-error", "protocol-violation"}

func (c ErrorCode) String() string {
	if c >= 1 && c <= maxErrorCodeWithString {
		return codeNames[c]
	}
	return "error-code(" + strconv.Itoa(int(c)) + ")"
}

func (c ErrorCode) Error() string { return "emsd: " + c.String() }

// Transient reports whether the code denotes a transient failure (§1.6:
// only resource error).
func (c ErrorCode) Transient() bool { return c == CodeResource }

// CodeOf returns the EMSD error code an error from this package maps to
// (§1.6). Errors that carry no code map to protocol violation, the
// reference's choice for "everything else"; nil maps to 0.
func CodeOf(err error) ErrorCode {
	if err == nil {
		return 0
	}
	var c ErrorCode
	if errors.As(err, &c) {
		return c
	}
	return CodeProtocolViolation
}

// Causes carried by DecodeError and EncodeError; match with errors.Is.
var (
	ErrTruncated        = ber.ErrTruncated        // element runs past its container
	ErrIndefiniteLength = ber.ErrIndefiniteLength // length octet 0x80
	ErrLongTag          = ber.ErrLongTag          // tag number ≥ 31
	ErrIntegerTooLong   = ber.ErrIntegerTooLong   // INTEGER over 4 octets
	ErrBitString        = ber.ErrBitString        // empty BIT STRING or unused bits > 7
	ErrUnexpectedTag    = errors.New("emsd: unexpected tag")
	ErrTrailingData     = errors.New("emsd: unexpected data after the last component")
	ErrTooLong          = errors.New("emsd: size limit exceeded")
	ErrTooMany          = errors.New("emsd: too many elements")
	ErrBadAddress       = errors.New("emsd: malformed EMSD address")
	ErrBadVersion       = errors.New("emsd: unsupported protocol version")
	ErrInvalid          = errors.New("emsd: invalid value")
	ErrContentType      = errors.New("emsd: unsupported content type")
)

// DecodeError reports malformed or out-of-limit input. Code is
// CodeProtocolViolation, the reference's answer to any undecodable PDU
// (§1.6), or CodeProtocolVersion for an unsupported Options.Version.
// Size-limit violations are permanent, hence 7 rather than the transient 6.
type DecodeError struct {
	Code   ErrorCode // EMSD error to answer with (§1.6)
	PDU    string    // top-level type being decoded
	Field  string    // dotted path of the offending component
	Offset int       // octet offset of the offending element in the input
	Err    error     // cause, one of the Err* variables
}

func (e *DecodeError) Error() string {
	s := "emsd: decoding " + e.PDU
	if e.Field != "" {
		s += "." + e.Field
	}
	return s + " at offset " + strconv.Itoa(e.Offset) + ": " + e.Err.Error()
}

// Unwrap returns the code and the cause, so that both errors.Is(err,
// CodeProtocolViolation) and errors.Is(err, ErrTruncated) work.
func (e *DecodeError) Unwrap() []error { return []error{e.Code, e.Err} }

// EncodeError reports a value that cannot be sent (§12 Open Point 19).
type EncodeError struct {
	PDU   string
	Field string
	Err   error
}

func (e *EncodeError) Error() string {
	s := "emsd: encoding " + e.PDU
	if e.Field != "" {
		s += "." + e.Field
	}
	return s + ": " + e.Err.Error()
}

func (e *EncodeError) Unwrap() error { return e.Err }

// prefix prepends a component name to the Field path of a DecodeError or
// EncodeError while the error unwinds.
func prefix(err error, field string) error {
	switch e := err.(type) {
	case *DecodeError:
		e.Field = join(field, e.Field)
	case *EncodeError:
		e.Field = join(field, e.Field)
	}
	return err
}

func join(a, b string) string {
	switch {
	case a == "":
		return b
	case b == "":
		return a
	}
	return a + "." + b
}

func topLevel(err error, pdu string) error {
	switch e := err.(type) {
	case *DecodeError:
		e.PDU = pdu
	case *EncodeError:
		e.PDU = pdu
	}
	return err
}
