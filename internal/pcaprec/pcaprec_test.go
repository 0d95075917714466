package pcaprec

import (
	"bytes"
	"net"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"
)

// What Recorder writes reads back as the same datagrams, with valid UDP
// checksums, over IPv4 and IPv6, aliases applied; Conn records both
// directions of a real socket.
func TestRecorder(t *testing.T) {
	var buf bytes.Buffer
	r, err := New(&buf)
	if err != nil {
		t.Fatal(err)
	}
	a4, b4 := netip.MustParseAddrPort("127.0.0.1:2003"), netip.MustParseAddrPort("127.0.0.1:41000")
	a6, b6 := netip.MustParseAddrPort("[::1]:2003"), netip.MustParseAddrPort("[::1]:641")
	r.Alias(b4, netip.MustParseAddrPort("127.0.0.1:641"))
	ts := time.Date(2026, 12, 7, 12, 0, 0, 123456789, time.UTC)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(r.Write(ts, a4, b4, []byte{0xd0, 0x05, 0x02, 'd', 'a', 't', 'e'}))
	must(r.Write(ts, b6, a6, []byte{0x03, 0x05}))

	// A real socket pair, recorded at one end.
	c1, err := net.ListenPacket("udp", "127.0.0.1:0")
	must(err)
	defer c1.Close()
	c2, err := net.ListenPacket("udp", "127.0.0.1:0")
	must(err)
	defer c2.Close()
	rc := Wrap(c1, r)
	_, err = rc.WriteTo([]byte("ping"), c2.LocalAddr())
	must(err)
	p := make([]byte, 16)
	n, from, err := c2.ReadFrom(p)
	must(err)
	_, err = c2.WriteTo(p[:n], from)
	must(err)
	rc.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, _, err = rc.ReadFrom(p)
	must(err)
	if r.Packets() != 4 || r.Err() != nil {
		t.Fatalf("%d packets, err %v", r.Packets(), r.Err())
	}

	rd, err := pcapgo.NewReader(&buf)
	must(err)
	if rd.LinkType() != layers.LinkTypeRaw {
		t.Errorf("link type %v", rd.LinkType())
	}
	type got struct {
		src, dst string
		payload  string
	}
	var all []got
	for {
		data, ci, err := rd.ReadPacketData()
		if err != nil {
			break
		}
		pkt := gopacket.NewPacket(data, layers.LayerTypeIPv4, gopacket.Default)
		if data[0]>>4 == 6 {
			pkt = gopacket.NewPacket(data, layers.LayerTypeIPv6, gopacket.Default)
		}
		udp, _ := pkt.Layer(layers.LayerTypeUDP).(*layers.UDP)
		if udp == nil || pkt.ErrorLayer() != nil {
			t.Fatalf("packet %d does not decode: %v", len(all), pkt)
		}
		var src, dst string
		if ip4, ok := pkt.NetworkLayer().(*layers.IPv4); ok {
			src, dst = ip4.SrcIP.String(), ip4.DstIP.String()
			// The checksum the writer computed verifies.
			c := *udp
			c.SetNetworkLayerForChecksum(ip4)
			sb := gopacket.NewSerializeBuffer()
			gopacket.SerializeLayers(sb, gopacket.SerializeOptions{ComputeChecksums: true}, &c, gopacket.Payload(udp.Payload))
			if c.Checksum != udp.Checksum {
				t.Errorf("packet %d: checksum %04x, want %04x", len(all), udp.Checksum, c.Checksum)
			}
		} else {
			ip6 := pkt.NetworkLayer().(*layers.IPv6)
			src, dst = "["+ip6.SrcIP.String()+"]", "["+ip6.DstIP.String()+"]"
		}
		if len(all) == 0 && !ci.Timestamp.Equal(ts) {
			t.Errorf("timestamp %v, want %v", ci.Timestamp, ts)
		}
		all = append(all, got{src + ":" + strconv.Itoa(int(udp.SrcPort)), dst + ":" + strconv.Itoa(int(udp.DstPort)), string(udp.Payload)})
	}
	if len(all) != 4 || all[0].dst != "127.0.0.1:641" || all[0].payload != "\xd0\x05\x02date" ||
		all[1].src != "[::1]:641" || all[2].payload != "ping" || all[3].payload != "ping" || all[2].src != all[3].dst {
		t.Errorf("read back %+v", all)
	}
}
