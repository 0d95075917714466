package store

import (
	"errors"
	"net/netip"
	"slices"
	"testing"
)

func TestDeviceValidate(t *testing.T) {
	ok := Device{Address: 198036, IP: netip.MustParseAddr("192.0.2.7"), Version: "1.1", Mode: ModeComplete}
	for _, tc := range []struct {
		name  string
		edit  func(*Device)
		valid bool
	}{
		{"complete", func(*Device) {}, true},
		{"efficient", func(d *Device) { d.Mode = ModeEfficient }, true},
		{"address 0", func(d *Device) { d.Address = 0 }, false},
		{"no IP, no password", func(d *Device) { d.IP = netip.Addr{} }, false},
		{"no IP, password", func(d *Device) { d.IP, d.PasswordHash = netip.Addr{}, "h" }, true},
		// Its DTLS sessions find it (behind a NAT); plain UDP never does.
		{"no IP, DTLS key", func(d *Device) { d.IP, d.PSK = netip.Addr{}, make([]byte, MinPSKLen) }, true},
		{"no IP, DTLS key required", func(d *Device) { d.IP, d.PSK, d.RequireDTLS = netip.Addr{}, make([]byte, MinPSKLen), true }, true},
		{"port without IP", func(d *Device) { d.IP, d.Port, d.PasswordHash = netip.Addr{}, 641, "h" }, false},
		{"no version", func(d *Device) { d.Version = "" }, false},
		{"bad mode", func(d *Device) { d.Mode = "fast" }, false},
	} {
		d := ok
		tc.edit(&d)
		if err := d.Validate(); (err == nil) != tc.valid || (err != nil && !errors.Is(err, ErrInvalid)) {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
}

func TestNormalizeAliases(t *testing.T) {
	got := NormalizeAliases([]string{" Alice@Example.NET", "", "bob@example.net", "alice@example.net ", "  "})
	if want := []string{"alice@example.net", "bob@example.net"}; !slices.Equal(got, want) {
		t.Errorf("got %q, want %q", got, want)
	}
}
