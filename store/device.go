// Types of the device registry, and the checks every backend makes on them.

package store

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// Mode is a device's delivery mode (docs/protocol.md EMSD §9.2).
type Mode string

// Delivery modes.
const (
	ModeComplete  Mode = "complete"  // 3-way deliveries, SAP 2 -> 3
	ModeEfficient Mode = "efficient" // 2-way deliveries, SAP 6 -> 7
)

// Device is one registry entry.
type Device struct {
	Address      uint32 // EMSD address (subscriber number), never 0
	PasswordHash string // HashPassword output; "" = no password
	// IP and Port are the registered network address: where a device
	// without password is identified from, and where deliveries go while
	// no fresh Contact is known. IP is optional for a device with a
	// password (the zero netip.Addr, Port 0): it is reached only at the
	// address it is heard from; and for a device with a DTLS key: it is
	// reached through the sessions it opens.
	IP      netip.Addr
	Port    uint16
	Version string   // "1.1" or "1.0"
	Mode    Mode     // delivery mode
	Aliases []string // lower-case mail addresses, unique over all devices
	Control DeliveryControl
	// PSK is the device's DTLS pre-shared key (its identity is its EMSD
	// address); nil = none. A secret: kept beside the password hash, and
	// never logged or shown after it is set.
	PSK []byte
	// RequireDTLS refuses the device's operations over plain UDP.
	RequireDTLS bool
	// Contact is where the device was last heard from (SetContact); it
	// is not part of the registry: UpdateDevice keeps it, and changing it
	// does not change RegistryVersion.
	Contact Contact
	Created time.Time
	Updated time.Time
}

// Contact is the address a device was last heard from in authenticated
// traffic: behind a NAT or on a changing lease, the only address at which
// datagrams reach it (RFC 4787: a NAT lets in only what comes over the
// binding the device opened, from the address the device sent to).
type Contact struct {
	Addr netip.AddrPort // the source address and port; invalid = never heard
	// Via names the server endpoint that heard it (Server.Via): a NAT
	// with address-dependent filtering passes deliveries from there only.
	Via string
	At  time.Time // when it was last heard (milliseconds)
	// Polled: heard in a delivery control (a poll), the operation a
	// device sends from where it receives; else in a submission, which a
	// device may send from a passing socket.
	Polled bool
}

// Known reports whether c holds an address.
func (c Contact) Known() bool { return c.Addr.IsValid() }

// DeliveryControl holds the limits a device set with delivery control
// (docs/protocol.md EMSD §9.12); nil fields are unrestricted.
type DeliveryControl struct {
	Operations       *uint64 // permissible-operations, bit i = operation value i
	MaxContentLength *uint32
	LowestPriority   *uint8 // 0 non-urgent, 1 normal, 2 urgent
}

// ImportResult is what ImportDevices did with one device: Err nil means
// written (added, or replaced when Updated).
type ImportResult struct {
	Updated bool
	Err     error
}

// RegistryLogVersions is how many registry versions RegistryChanges can
// look back over. A server further behind reads the whole registry.
const RegistryLogVersions = 4096

// Bounds of a device's DTLS key: at least 128 bits (RFC 7925 §4.2), at
// most what a TLS PSK may be (RFC 4279 §5.3 allows 64 KB; 64 bytes is
// far beyond any security need).
const (
	MinPSKLen = 16
	MaxPSKLen = 64
)

// Validate checks what every backend requires of a device before it is
// written.
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
