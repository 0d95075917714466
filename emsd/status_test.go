package emsd

import "testing"

// The tools print "status=N NAME": a value the protocol does not define
// must not print as a bare number twice ("status=7 7").
func TestStatusNames(t *testing.T) {
	for _, c := range []struct {
		got, want string
	}{
		{NoReportSent.String(), "no-report-sent"},
		{DeliveryReportSent.String(), "delivery-report-sent"},
		{NonDeliveryReportSent.String(), "non-delivery-report-sent"},
		{DeliveryStatus(7).String(), "unknown-7"},
		{SendMessage.String(), "send-message"},
		{DropMessage.String(), "drop-message"},
		{SubmissionStatus(0).String(), "unknown-0"},
	} {
		if c.got != c.want {
			t.Errorf("got %q, want %q", c.got, c.want)
		}
	}
}
