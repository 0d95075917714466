package ua

import (
	"errors"
	"fmt"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
)

// Errors a caller branches on.
var (
	// ErrInvalidMessage marks a message that cannot be submitted as given:
	// bad addresses, no recipients, text over the §5 limits, content beyond
	// 32 segments. It is detected before anything is sent.
	ErrInvalidMessage = errors.New("ua: invalid message")
	// ErrNoServer: the operation needs Config.Server.
	ErrNoServer = errors.New("ua: no MTS address configured")
	// ErrBadResult: the MTS answered with a RESULT that does not decode.
	ErrBadResult = errors.New("ua: undecodable result from the MTS")
)

// Error is an EMSD error the MTS answered with (§1.6): an ESRO ERROR whose
// value is the EMSD error code, optionally with an ErrorParameter.
// errors.Is(err, emsd.CodeSecurity) and the like match Code.
type Error struct {
	Operation emsd.Operation
	Code      emsd.ErrorCode
	// Parameter is the decoded ErrorParameter; nil when the ERROR carried
	// none (or one that does not decode).
	Parameter *emsd.ErrorCode
}

func (e *Error) Error() string {
	s := fmt.Sprintf("EMSD error %d (%s) on %s", uint8(e.Code), e.Code.String(), e.Operation.String())
	if e.Parameter != nil {
		s += fmt.Sprintf(", parameter %d", uint8(*e.Parameter))
	} else {
		s += ", no parameter"
	}
	return s
}

// Unwrap returns the code.
func (e *Error) Unwrap() error { return e.Code }

// Transient reports whether the error is worth retrying later: the UA's
// rule of §1.6 is "no parameter, or parameter resource error (6)".
func (e *Error) Transient() bool {
	return e.Parameter == nil || *e.Parameter == emsd.CodeResource
}

// fromErrorReply turns an ESRO ERROR into an *Error.
func fromErrorReply(op emsd.Operation, er *esro.ErrorReply, o emsd.Options) *Error {
	e := &Error{Operation: op, Code: emsd.ErrorCode(er.Value)}
	if len(er.Data) > 0 {
		var p emsd.ErrorParameter
		if p.Unmarshal(er.Data, o) == nil {
			c := p.Code()
			e.Parameter = &c
		}
	}
	return e
}

// invokeError maps an error from esro.Endpoint.Invoke for operation op:
// an ERROR becomes *Error; failures and context errors are wrapped as they
// are (errors.As(err, new(*esro.Failure)) finds the ESRO failure).
func invokeError(op emsd.Operation, err error, o emsd.Options) error {
	var er *esro.ErrorReply
	if errors.As(err, &er) {
		return fromErrorReply(op, er, o)
	}
	return fmt.Errorf("ua: %v: %w", op, err)
}
