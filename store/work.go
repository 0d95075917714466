package store

import "fmt"

// Report says what to report about a delivery or relay and to whom. The
// server builds the reports; the store only keeps these values.
type Report struct {
	Device    uint32 // EMSD originator to send an EMSD report to; 0 = none
	Mail      string // Internet sender to send a DSN to; "" = none
	Flags     uint8  // per-recipient flags of the recipient (bits 5, 6 ask for reports)
	Recipient string // the recipient as the reported message names it
	MessageID string // id of the reported message, as the originator knows it
	Headers   []byte // original header section, for a DSN
	// DSN holds the Internet sender's RFC 3461 parameters for this
	// recipient (NOTIFY, ORCPT, ENVID, RET) in the server's encoding;
	// "" = none given.
	DSN string
}

// Work is new queue entries written atomically with another change.
type Work struct {
	Deliveries []NewDelivery
	Relays     []NewRelay
}

// Empty reports whether w holds nothing.
func (w Work) Empty() bool { return len(w.Deliveries) == 0 && len(w.Relays) == 0 }

// Validate checks what every backend requires of new work before it is
// queued.
func (w Work) Validate() error {
	for _, d := range w.Deliveries {
		if d.Device == 0 || d.Expires.IsZero() || d.MessageID == "" {
			return fmt.Errorf("%w: delivery needs a device, a message id and an expiry", ErrInvalid)
		}
	}
	for _, r := range w.Relays {
		if r.Expires.IsZero() || len(r.Recipients) == 0 {
			return fmt.Errorf("%w: relay needs recipients and an expiry", ErrInvalid)
		}
	}
	return nil
}
