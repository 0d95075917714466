package store

import (
	"fmt"
	"slices"
	"strings"
)

// Validate checks what every backend requires of a device before it is
// written.
func (d *Device) Validate() error {
	switch {
	case d.Address == 0:
		return fmt.Errorf("%w: device address 0", ErrInvalid)
	case !d.IP.IsValid():
		return fmt.Errorf("%w: device IP address missing", ErrInvalid)
	case d.Version == "":
		return fmt.Errorf("%w: device protocol version missing", ErrInvalid)
	case d.Mode != ModeComplete && d.Mode != ModeEfficient:
		return fmt.Errorf("%w: delivery mode %q", ErrInvalid, d.Mode)
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
