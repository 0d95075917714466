package esrodtls

import (
	"net/netip"
	"testing"
)

// FuzzDemuxRoute: any datagram, from a new or a known source, is routed,
// dropped or offered as a new association without a panic; parsing of
// ServerHellos for Connection IDs likewise.
func FuzzDemuxRoute(f *testing.F) {
	f.Add([]byte{22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 1, 0, 0, 0})
	f.Add([]byte{25, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0})
	f.Add([]byte{23, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		offered := 0
		d := &demux{cidLen: cidSize, byAddr: map[netip.AddrPort]*assoc{}, byCID: map[string]*assoc{},
			closed: make(chan struct{}), admit: func(*assoc) bool { offered++; return false }}
		known := &assoc{d: d, in: make(chan inbound, 1), done: make(chan struct{}), dlChanged: make(chan struct{})}
		src := netip.MustParseAddrPort("192.0.2.1:5000")
		d.byAddr[src] = known
		d.byCID["\x01\x02\x03\x04\x05\x06\x07\x08"] = known
		d.route(b, src)
		d.route(b, netip.MustParseAddrPort("192.0.2.2:5000"))
		if offered > 0 && !isClientHello(b) {
			t.Fatalf("a datagram that is no ClientHello offered a new association: % x", b)
		}
		serverHelloCID(b)
	})
}
