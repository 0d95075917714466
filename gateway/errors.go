package gateway

import (
	"errors"
	"fmt"

	"github.com/emersion/go-smtp"
)

// ErrUnknownRecipient is returned by a Receiver for an address it does not
// serve; InboundServer answers 550 5.1.1 at RCPT time.
var ErrUnknownRecipient = errors.New("gateway: unknown recipient")

// ErrRelayDenied is returned by a Receiver for an address in a domain it
// does not serve: InboundServer answers 550 5.7.1 (relaying denied), not
// 5.1.1, so that the sender learns the address went to the wrong server.
var ErrRelayDenied = errors.New("gateway: relaying denied")

// PermanentError marks a failure that retrying cannot fix: a 5xx reply of a
// smarthost to MAIL or DATA (Err then wraps the *smtp.SMTPError), a message
// the smarthost cannot take (size, SMTPUTF8), or a Receiver's refusal of a
// message (InboundServer answers 554 unless Err carries its own 5xx reply).
// Every other error of this package is transient.
type PermanentError struct {
	Err error
}

// Error describes the failure.
func (e *PermanentError) Error() string { return fmt.Sprintf("permanent failure: %v", e.Err) }

// Unwrap returns the cause.
func (e *PermanentError) Unwrap() error { return e.Err }

// IsPermanent reports whether err is, or wraps, a *PermanentError or a 5xx
// SMTP reply.
func IsPermanent(err error) bool {
	if err == nil {
		return false
	}
	var pe *PermanentError
	if errors.As(err, &pe) {
		return true
	}
	var se *smtp.SMTPError
	return errors.As(err, &se) && se.Code/100 == 5
}
