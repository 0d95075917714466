package store

import (
	"net/netip"
	"time"
)

// The encodings both backends store values in, written once so that the
// two databases hold the same values: a database moved from one backend
// to the other (or a test comparing them) reads the same.

// Millis is t as stored: Unix milliseconds, 0 for the zero time.
func Millis(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixMilli()
}

// FromMillis reads a Millis value: 0 is the zero time.
func FromMillis(v int64) time.Time {
	if v == 0 {
		return time.Time{}
	}
	return time.UnixMilli(v)
}

// NonNil keeps nil slices out of NOT NULL binary columns.
func NonNil(b []byte) []byte {
	if b == nil {
		return []byte{}
	}
	return b
}

// NullBytes is b for a nullable binary column: NULL (nil) when empty, so
// that no DTLS key is stored as NULL.
func NullBytes(b []byte) any {
	if len(b) == 0 {
		return nil
	}
	return b
}

// FormatIP is a registered IP address as stored: "" for none (ParseIP
// reads it back).
func FormatIP(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

// Columns is c as stored: three nullable integers, nil (NULL) for an
// unrestricted limit, the permissible-operations bit pattern as a signed
// integer (SQL integers are signed).
func (c DeliveryControl) Columns() (ops, maxLen *int64, prio *int16) {
	if c.Operations != nil {
		v := int64(*c.Operations)
		ops = &v
	}
	if c.MaxContentLength != nil {
		v := int64(*c.MaxContentLength)
		maxLen = &v
	}
	if c.LowestPriority != nil {
		v := int16(*c.LowestPriority)
		prio = &v
	}
	return ops, maxLen, prio
}

// ControlFromColumns reads the columns Columns writes.
func ControlFromColumns(ops, maxLen *int64, prio *int16) DeliveryControl {
	var c DeliveryControl
	if ops != nil {
		v := uint64(*ops) // bit pattern
		c.Operations = &v
	}
	if maxLen != nil {
		v := uint32(*maxLen)
		c.MaxContentLength = &v
	}
	if prio != nil {
		v := uint8(*prio)
		c.LowestPriority = &v
	}
	return c
}
