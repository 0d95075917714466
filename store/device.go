package store

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// Validate checks what every backend requires of a device before it is
// written.
// Bounds of a device's DTLS key: at least 128 bits (RFC 7925 §4.2), at
// most what a TLS PSK may be (RFC 4279 §5.3 allows 64 KB; 64 bytes is
// far beyond any security need).
const (
	MinPSKLen = 16
	MaxPSKLen = 64
)

func (d *Device) Validate() error {
	switch {
	case d.Address == 0:
		return fmt.Errorf("%w: device address 0", ErrInvalid)
	case !d.IP.IsValid() && d.PasswordHash == "" && len(d.PSK) == 0:
		// Nothing could identify it: no password, no key, no address.
		return fmt.Errorf("%w: a device without IP address needs a password or a DTLS key", ErrInvalid)
	case !d.IP.IsValid() && d.Port != 0:
		return fmt.Errorf("%w: device port %d without IP address", ErrInvalid, d.Port)
	case d.Version == "":
		return fmt.Errorf("%w: device protocol version missing", ErrInvalid)
	case d.Mode != ModeComplete && d.Mode != ModeEfficient:
		return fmt.Errorf("%w: delivery mode %q", ErrInvalid, d.Mode)
	case len(d.PSK) != 0 && (len(d.PSK) < MinPSKLen || len(d.PSK) > MaxPSKLen):
		return fmt.Errorf("%w: DTLS key of %d bytes (%d..%d)", ErrInvalid, len(d.PSK), MinPSKLen, MaxPSKLen)
	case d.RequireDTLS && len(d.PSK) == 0:
		return fmt.Errorf("%w: require_dtls without a DTLS key", ErrInvalid)
	}
	return nil
}

// NormalizeAliases returns the aliases as stored: trimmed, lower case,
// without empty ones or repeats, in their first order.
func NormalizeAliases(a []string) []string {
	out := make([]string, 0, len(a))
	for _, s := range a {
		s = strings.ToLower(strings.TrimSpace(s))
		if s != "" && !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	return out
}

// ParseIP reads a registered IP address as backends store it: "" for
// none.
func ParseIP(s string) (netip.Addr, error) {
	if s == "" {
		return netip.Addr{}, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("bad IP address %q", s)
	}
	return a, nil
}

// ParseContact reads a contact as backends store it: addr "" for none.
func ParseContact(addr, via string, at time.Time, polled bool) (Contact, error) {
	if addr == "" {
		return Contact{}, nil
	}
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return Contact{}, fmt.Errorf("bad contact address %q", addr)
	}
	return Contact{Addr: ap, Via: via, At: at, Polled: polled}, nil
}
