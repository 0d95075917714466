package store

import (
	"errors"
	"math"
	"net/netip"
	"reflect"
	"testing"
	"time"
)

func TestMillis(t *testing.T) {
	for _, tc := range []time.Time{{}, time.UnixMilli(1), time.UnixMilli(1_700_000_000_123), time.UnixMilli(-5)} {
		if got := FromMillis(Millis(tc)); !got.Equal(tc) || got.IsZero() != tc.IsZero() {
			t.Errorf("FromMillis(Millis(%v)) = %v", tc, got)
		}
	}
	if Millis(time.Time{}) != 0 {
		t.Errorf("zero time stored as %d, want 0", Millis(time.Time{}))
	}
	if got := Millis(time.UnixMilli(7).Add(999 * time.Microsecond)); got != 7 {
		t.Errorf("sub-millisecond part kept: %d", got)
	}
}

func TestControlColumns(t *testing.T) {
	ops, ln, prio := uint64(math.MaxUint64), uint32(math.MaxUint32), uint8(2)
	for _, c := range []DeliveryControl{{}, {Operations: &ops}, {MaxContentLength: &ln, LowestPriority: &prio}} {
		o, l, p := c.Columns()
		if (o == nil) != (c.Operations == nil) || (l == nil) != (c.MaxContentLength == nil) || (p == nil) != (c.LowestPriority == nil) {
			t.Errorf("%+v: NULLs %v %v %v", c, o, l, p)
		}
		if got := ControlFromColumns(o, l, p); !reflect.DeepEqual(got, c) {
			t.Errorf("round trip of %+v: %+v", c, got)
		}
	}
}

func TestEncodings(t *testing.T) {
	if b := NonNil(nil); b == nil || len(b) != 0 {
		t.Errorf("NonNil(nil) = %#v", b)
	}
	if NullBytes(nil) != nil || NullBytes([]byte{}) != nil || NullBytes([]byte{1}) == nil {
		t.Error("NullBytes: NULL for empty only")
	}
	for _, s := range []string{"", "192.0.2.1", "2001:db8::1"} {
		a, err := ParseIP(s)
		if err != nil || FormatIP(a) != s {
			t.Errorf("ParseIP(%q) = %v, %v; back %q", s, a, err, FormatIP(a))
		}
	}
	if FormatIP(netip.Addr{}) != "" {
		t.Error("no address stored as non-empty")
	}
}

func TestWorkValidate(t *testing.T) {
	exp := time.Now().Add(time.Hour)
	for _, tc := range []struct {
		w  Work
		ok bool
	}{
		{Work{}, true},
		{Work{Deliveries: []NewDelivery{{Device: 1, MessageID: "m", Expires: exp}}}, true},
		{Work{Deliveries: []NewDelivery{{Device: 0, MessageID: "m", Expires: exp}}}, false},
		{Work{Deliveries: []NewDelivery{{Device: 1, Expires: exp}}}, false},
		{Work{Deliveries: []NewDelivery{{Device: 1, MessageID: "m"}}}, false},
		{Work{Relays: []NewRelay{{Recipients: []RelayRecipient{{Addr: "a@b"}}, Expires: exp}}}, true},
		{Work{Relays: []NewRelay{{Expires: exp}}}, false},
		{Work{Relays: []NewRelay{{Recipients: []RelayRecipient{{Addr: "a@b"}}}}}, false},
	} {
		err := tc.w.Validate()
		if (err == nil) != tc.ok || (err != nil && !errors.Is(err, ErrInvalid)) {
			t.Errorf("%+v: %v, want ok %v", tc.w, err, tc.ok)
		}
	}
}
