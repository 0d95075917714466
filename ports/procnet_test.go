package ports

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"strings"
	"testing"
)

// Rows as a little-endian kernel prints them.
const procNetTCP = `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0281 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0281 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 4243 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:0281 0100007F:D432 06 00000000:00000000 03:00000F9D 00000000     0        0 0 3 0000000000000000
`

const procNetUDP6 = `  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 00000000000000000000000000000000:07D2 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000   108        0 99 2 0000000000000000 0
  101: 00000000000000000000000001000000:0282 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 100 2 0000000000000000 0
  102: 0000000000000000FFFF00000100007F:0101 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 101 2 0000000000000000 0
`

func TestParseProcNet(t *testing.T) {
	tests := []struct {
		name  string
		in    string
		order binary.ByteOrder
		want  []procNetEntry
	}{
		{"tcp little-endian", procNetTCP, binary.LittleEndian, []procNetEntry{
			{Local: netip.MustParseAddrPort("127.0.0.1:641"), Remote: netip.MustParseAddrPort("0.0.0.0:0"), State: tcpListen, UID: 0, Inode: 4242},
			{Local: netip.MustParseAddrPort("127.0.0.1:641"), Remote: netip.MustParseAddrPort("127.0.0.1:54321"), State: 1, UID: 1000, Inode: 4243},
			{Local: netip.MustParseAddrPort("127.0.0.1:641"), Remote: netip.MustParseAddrPort("127.0.0.1:54322"), State: 6, Inode: 0},
		}},
		{"udp6 little-endian", procNetUDP6, binary.LittleEndian, []procNetEntry{
			{Local: netip.MustParseAddrPort("[::]:2002"), Remote: netip.MustParseAddrPort("[::]:0"), State: udpUnconn, UID: 108, Inode: 99},
			{Local: netip.MustParseAddrPort("[::1]:642"), Remote: netip.MustParseAddrPort("[::]:0"), State: udpUnconn, Inode: 100},
			{Local: netip.MustParseAddrPort("[::ffff:127.0.0.1]:257"), Remote: netip.MustParseAddrPort("[::]:0"), State: udpUnconn, Inode: 101},
		}},
		{"big-endian kernel", "   0: 7F000001:0281 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 7 1\n", binary.BigEndian, []procNetEntry{
			{Local: netip.MustParseAddrPort("127.0.0.1:641"), Remote: netip.MustParseAddrPort("0.0.0.0:0"), State: tcpListen, Inode: 7},
		}},
		{"header only", "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n", binary.LittleEndian, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseProcNet(strings.NewReader(tt.in), tt.order)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(tt.want) {
				t.Fatalf("got %d entries %+v, want %d", len(got), got, len(tt.want))
			}
			for i := range got {
				if got[i] != tt.want[i] {
					t.Errorf("entry %d = %+v, want %+v", i, got[i], tt.want[i])
				}
			}
		})
	}
}

func TestParseProcNetRejects(t *testing.T) {
	for _, in := range []string{
		"   0: 0100007F:0281 00000000:0000 0A\n",                                                    // too few fields
		"   0: 0100007G:0281 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 7 1\n",     // bad hex
		"   0: 0100007F:281 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 7 1\n",      // short port
		"   0: 01007F:0281 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 7 1\n",       // 3-octet address
		"   0: 0100007F:0281 00000000:0000 XYZ 00000000:00000000 00:00000000 00000000 0 0 7 1\n",    // bad state
		"   0: 0100007F:0281 00000000:0000 0A 00000000:00000000 00:00000000 00000000 -1 0 7 1\n",    // bad uid
		"   0: 0100007F:0281 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 inode 1\n", // bad inode
		"0100007F:0281 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 7 1 2\n",         // no slot
	} {
		if _, err := parseProcNet(strings.NewReader(in), binary.LittleEndian); !errors.Is(err, errProcNetFormat) {
			t.Errorf("parseProcNet(%q) error = %v, want errProcNetFormat", in, err)
		}
	}
}

func TestStateName(t *testing.T) {
	for _, tt := range []struct {
		proto string
		st    uint8
		want  string
	}{
		{"tcp", tcpListen, "LISTEN"}, {"tcp6", 1, "ESTAB"}, {"tcp", 6, "TIME-WAIT"},
		{"udp", udpUnconn, "UNCONN"}, {"udp6", udpConnected, "ESTAB"}, {"udp", 0x0A, "state-0A"}, {"tcp", 0xEE, "state-EE"},
	} {
		if got := stateName(tt.proto, tt.st); got != tt.want {
			t.Errorf("stateName(%s, %#x) = %q, want %q", tt.proto, tt.st, got, tt.want)
		}
	}
}

func FuzzParseProcNet(f *testing.F) {
	f.Add(procNetTCP)
	f.Add(procNetUDP6)
	f.Add("   0: 0100007F:0281 00000000:0000 0A 0 0 0 0 0 7 1\n")
	f.Fuzz(func(t *testing.T, in string) {
		entries, err := parseProcNet(strings.NewReader(in), binary.LittleEndian)
		if err != nil {
			return
		}
		for _, e := range entries {
			if !e.Local.Addr().IsValid() || !e.Remote.Addr().IsValid() {
				t.Fatalf("invalid address accepted: %+v", e)
			}
		}
	})
}
