// Package clientaddr groups remote addresses the way per-client limits
// count them.
package clientaddr

import "net/netip"

// Group returns the client a is counted as: an IPv4 address (v4-mapped
// IPv6 included), or the /64 prefix of an IPv6 address, since a
// subscriber usually has a whole /64 and can use every address in it.
// Zones are dropped. The invalid Addr stays invalid.
func Group(a netip.Addr) netip.Addr {
	a = a.Unmap().WithZone("")
	if a.Is6() {
		p, _ := a.Prefix(64)
		a = p.Addr()
	}
	return a
}
