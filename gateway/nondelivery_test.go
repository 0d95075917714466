package gateway

import (
	"errors"
	"fmt"
	"testing"

	"github.com/emersion/go-smtp"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/mailconv"
)

func TestStatusAndNonDelivery(t *testing.T) {
	for _, tc := range []struct {
		err    error
		reason emsd.NonDeliveryReason
		diag   emsd.Diagnostic
	}{
		{&smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}}, emsd.ReasonUnableToTransfer, emsd.DiagRecipientUnknown},
		{&smtp.SMTPError{Code: 553, EnhancedCode: smtp.EnhancedCode{5, 1, 3}}, emsd.ReasonUnableToTransfer, emsd.DiagUnrecognizedAddress},
		{&smtp.SMTPError{Code: 552, EnhancedCode: smtp.EnhancedCode{5, 3, 4}}, emsd.ReasonUnableToTransfer, emsd.DiagContentTooLong},
		{&smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1}}, emsd.ReasonRestrictedDelivery, emsd.DiagRecipientRefused},
		{&PermanentError{Err: &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 4, 6}}}, emsd.ReasonUnableToTransfer, emsd.DiagLoopDetected},
		{&smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}}, emsd.ReasonTransferFailure, emsd.DiagTransferAttemptsLimit},
		{&PermanentError{Err: errors.New("needs SMTPUTF8")}, emsd.ReasonUnableToTransfer, emsd.DiagUnableToCompleteTransfer},
		{fmt.Errorf("x: %w", mailconv.ErrBadAddress), emsd.ReasonUnableToTransfer, emsd.DiagUnrecognizedAddress},
		{errors.New("connection refused"), emsd.ReasonTransferFailure, emsd.DiagTransferAttemptsLimit},
	} {
		r, d := NonDeliveryFor(tc.err)
		if r != tc.reason || d != tc.diag {
			t.Errorf("%v: %v/%v, want %v/%v", tc.err, r, d, tc.reason, tc.diag)
		}
	}
	// Every diagnostic has a failure status, and the two mappings agree on
	// the codes they share.
	for d := emsd.Diagnostic(0); d <= 15; d++ {
		s := mailconv.StatusFor(d)
		var a, b, c int
		if n, _ := fmt.Sscanf(s, "%d.%d.%d", &a, &b, &c); n != 3 || a != 5 {
			t.Errorf("%v: %q", d, s)
		}
		if d == emsd.DiagRecipientUnknown || d == emsd.DiagContentTooLong || d == emsd.DiagLoopDetected || d == emsd.DiagRecipientRefused {
			_, back := NonDeliveryFor(&smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{a, b, c}})
			if back != d {
				t.Errorf("%v → %s → %v", d, s, back)
			}
		}
	}
}
