package gateway

import (
	"errors"

	"github.com/emersion/go-smtp"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/mailconv"
)

// NonDeliveryFor maps a final relay failure (a RecipientResult error or a
// Send error) to the EMSD non-delivery reason and diagnostic (§5) for a
// report to the device. A transient error is taken to have exhausted its
// retries.
func NonDeliveryFor(err error) (emsd.NonDeliveryReason, emsd.Diagnostic) {
	if errors.Is(err, mailconv.ErrBadAddress) {
		return emsd.ReasonUnableToTransfer, emsd.DiagUnrecognizedAddress
	}
	var se *smtp.SMTPError
	if !errors.As(err, &se) || se.Code/100 != 5 {
		if IsPermanent(err) {
			return emsd.ReasonUnableToTransfer, emsd.DiagUnableToCompleteTransfer
		}
		return emsd.ReasonTransferFailure, emsd.DiagTransferAttemptsLimit
	}
	subject, detail := se.EnhancedCode[1], se.EnhancedCode[2]
	switch {
	case subject == 1 && detail == 1:
		return emsd.ReasonUnableToTransfer, emsd.DiagRecipientUnknown
	case subject == 1:
		return emsd.ReasonUnableToTransfer, emsd.DiagUnrecognizedAddress
	case subject == 2 && detail == 3:
		return emsd.ReasonUnableToTransfer, emsd.DiagSizeConstraintViolated
	case subject == 2:
		return emsd.ReasonUnableToTransfer, emsd.DiagRecipientUnavailable
	case subject == 3 && detail == 4:
		return emsd.ReasonUnableToTransfer, emsd.DiagContentTooLong
	case subject == 4 && detail == 6:
		return emsd.ReasonUnableToTransfer, emsd.DiagLoopDetected
	case subject == 4 && detail == 7:
		return emsd.ReasonUnableToTransfer, emsd.DiagMaximumTimeExpired
	case subject == 5 && detail == 3:
		return emsd.ReasonUnableToTransfer, emsd.DiagTooManyRecipients
	case subject == 6:
		return emsd.ReasonUnableToTransfer, emsd.DiagContentTypeNotSupported
	case subject == 7:
		return emsd.ReasonRestrictedDelivery, emsd.DiagRecipientRefused
	}
	return emsd.ReasonUnableToTransfer, emsd.DiagUnableToCompleteTransfer
}
