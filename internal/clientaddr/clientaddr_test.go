package clientaddr

import (
	"net/netip"
	"testing"
)

func TestGroup(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"192.0.2.7", "192.0.2.7"},
		{"::ffff:192.0.2.7", "192.0.2.7"},
		{"2001:db8:1:2:3:4:5:6", "2001:db8:1:2::"},
		{"2001:db8:1:2::1", "2001:db8:1:2::"},
		{"fe80::1%eth0", "fe80::"},
		{"::1", "::"},
	} {
		if got := Group(netip.MustParseAddr(tc.in)); got != netip.MustParseAddr(tc.want) {
			t.Errorf("Group(%s) = %s, want %s", tc.in, got, tc.want)
		}
	}
	if got := Group(netip.Addr{}); got.IsValid() {
		t.Errorf("Group(invalid) = %s", got)
	}
}
