package decode_test

import (
	"bytes"
	"encoding/hex"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"

	"github.com/esro-emsdp/emsdp/decode"
	"github.com/esro-emsdp/emsdp/internal/captures"
	"github.com/esro-emsdp/emsdp/internal/pcaprec"
)

func mustHex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// One datagram at a time, no addresses: the ESRO header of every PDU type
// and the malformed ones.
func TestDatagramHeaders(t *testing.T) {
	for _, c := range []struct{ hex, want string }{
		{"d0 05 02 64 61 74 65", "INVOKE sap=13 ref=5 op=2 enc=BER len=3+4"},
		{"d0 05 42 64 61 74 65", "INVOKE sap=13 ref=5 op=2 enc=PER len=3+4"},
		{"f0 ff ff", "INVOKE sap=15 ref=255 op=63 enc=reserved-2 len=3+0"},
		{"01 06", "RESULT ref=6 enc=BER len=2+0"},
		{"81 01 41 75 67", "RESULT ref=1 enc=reserved-1 len=2+3"},
		{"02 05 02 45 72", "ERROR ref=5 enc=BER error=2 len=3+2"},
		{"03 05", "ACK ref=5 len=2+0"},
		{"04 05 02", "FAILURE ref=5 reason=2 (user not responding) len=3+0"},
		{"04 00 01", "FAILURE ref=0 reason=1 (local resource) len=3+0"},
		{"", "len=0 [malformed: empty datagram]"},
		{"05 01", "len=2 [malformed: invalid PDU type 5]"},
		{"d0 01", "len=2 [malformed: INVOKE shorter than its 3-octet header]"},
		{"01", "len=1 [malformed: RESULT shorter than its 2-octet header]"},
	} {
		r := decode.New().Datagram(time.Time{}, netip.AddrPort{}, netip.AddrPort{}, mustHex(t, c.hex))
		if got := r.Line(); !strings.HasPrefix(got, c.want) {
			t.Errorf("%q: got %q, want prefix %q", c.hex, got, c.want)
		}
	}
}

// Every datagram the C reference exchanged decodes without a panic, and
// what EMSD the reference sent is recognised.
func TestReferenceCaptures(t *testing.T) {
	for _, s := range captures.All() {
		d := decode.New()
		var text bytes.Buffer
		var recs []*decode.Record
		for i, dg := range s.Datagrams {
			src, dst := refAddr(dg.From), refAddr(dg.To)
			r := d.Datagram(time.Unix(1e9, 0).Add(time.Duration(dg.Offset*float64(time.Second))), src, dst, dg.Payload)
			if r.Frame != i+1 {
				t.Errorf("%s: frame %d, want %d", s.Name, r.Frame, i+1)
			}
			r.Write(&text)
			recs = append(recs, r)
		}
		out := text.String()
		switch s.Name {
		case "emsd-submit-segmented":
			last := recs[len(recs)-3] // INVOKE, RESULT, ACK
			if last.EMSD == nil || last.EMSD.Reassembly == nil || !last.EMSD.Reassembly.Complete || last.EMSD.Reassembly.Segments != 3 {
				t.Errorf("%s: not reassembled:\n%s", s.Name, out)
			}
		case "esro-3way-no-performer":
			for _, r := range recs[1:] {
				if len(r.Marks) != 1 || r.Marks[0] != "retransmission" {
					t.Errorf("%s: #%d marks %v, want retransmission", s.Name, r.Frame, r.Marks)
				}
			}
		case "emsd-deliver-report-rejected-by-ua":
			if !strings.Contains(out, "content: delivery-report") || !strings.Contains(out, "error: 7 protocol-violation") {
				t.Errorf("%s: report or error not decoded:\n%s", s.Name, out)
			}
		case "emsd-submit-1":
			if !strings.Contains(out, `subject: "Hello over EMSD"`) || !strings.Contains(out, "recipients: someone@example.com") {
				t.Errorf("%s:\n%s", s.Name, out)
			}
		}
		if testing.Verbose() {
			t.Logf("## %s\n%s", s.Name, out)
		}
	}
}

// refAddr turns the capture file's "2003" or "127.0.0.10:2002".
func refAddr(s string) netip.AddrPort {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap
	}
	p, _ := strconv.Atoi(s)
	return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(p))
}

// pcapng, Ethernet link type, a fragmented IPv4 datagram, a datagram cut
// by the snap length, and non-UDP packets.
func TestReadCaptureFormats(t *testing.T) {
	src, dst := netip.MustParseAddrPort("192.0.2.1:2002"), netip.MustParseAddrPort("192.0.2.2:641")
	payload := append([]byte{0x50, 0x07, 0x21, 0x00}, bytes.Repeat([]byte{0x30}, 3000)...)
	eth := func(ipPayload gopacket.SerializableLayer, frag *layers.IPv4) []byte {
		buf := gopacket.NewSerializeBuffer()
		e := &layers.Ethernet{SrcMAC: []byte{2, 0, 0, 0, 0, 1}, DstMAC: []byte{2, 0, 0, 0, 0, 2}, EthernetType: layers.EthernetTypeIPv4}
		if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true}, e, frag, ipPayload); err != nil {
			t.Fatal(err)
		}
		return buf.Bytes()
	}
	// The UDP datagram, then cut into two IPv4 fragments.
	udpIP, err := pcaprec.Frame(src, dst, payload)
	if err != nil {
		t.Fatal(err)
	}
	udpPart := udpIP[20:]
	ip := func(off int, more bool, data []byte) []byte {
		l := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolUDP, Id: 77,
			SrcIP: src.Addr().AsSlice(), DstIP: dst.Addr().AsSlice(), FragOffset: uint16(off / 8)}
		if more {
			l.Flags = layers.IPv4MoreFragments
		}
		return eth(gopacket.Payload(data), l)
	}
	var buf bytes.Buffer
	w, err := pcapgo.NewNgWriter(&buf, layers.LinkTypeEthernet)
	if err != nil {
		t.Fatal(err)
	}
	ts := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	write := func(b []byte, capLen int) {
		ci := gopacket.CaptureInfo{Timestamp: ts, CaptureLength: min(capLen, len(b)), Length: len(b)}
		if err := w.WritePacket(ci, b[:ci.CaptureLength]); err != nil {
			t.Fatal(err)
		}
	}
	write(ip(0, true, udpPart[:1480]), 1<<16)
	write(ip(1480, false, udpPart[1480:]), 1<<16)
	small, _ := pcaprec.Frame(src, dst, []byte{0x03, 0x07})
	write(eth(gopacket.Payload(small[20:]), &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolUDP,
		SrcIP: src.Addr().AsSlice(), DstIP: dst.Addr().AsSlice()}), 1<<16)
	write(eth(gopacket.Payload(udpPart), &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolUDP,
		SrcIP: src.Addr().AsSlice(), DstIP: dst.Addr().AsSlice()}), 100) // snap length 100
	write(eth(gopacket.Payload([]byte("tcp?")), &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolTCP,
		SrcIP: src.Addr().AsSlice(), DstIP: dst.Addr().AsSlice()}), 1<<16)
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	var got []decode.Packet
	err = decode.ReadCapture(&buf, func(p *decode.Packet) error {
		c := *p
		c.Payload = bytes.Clone(p.Payload)
		got = append(got, c)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 {
		t.Fatalf("%d datagrams, want 3 (reassembled, ACK, truncated)", len(got))
	}
	if !bytes.Equal(got[0].Payload, payload) || got[0].Src != src || got[0].Dst != dst || !got[0].Time.Equal(ts) || got[0].Truncated {
		t.Errorf("reassembled datagram: %d octets from %v to %v at %v, truncated %v", len(got[0].Payload), got[0].Src, got[0].Dst, got[0].Time, got[0].Truncated)
	}
	if !bytes.Equal(got[1].Payload, []byte{3, 7}) {
		t.Errorf("ACK: % x", got[1].Payload)
	}
	if !got[2].Truncated || len(got[2].Payload) >= len(payload) {
		t.Errorf("cut datagram: truncated %v, %d octets", got[2].Truncated, len(got[2].Payload))
	}

	if err := decode.ReadCapture(strings.NewReader("GET / HTTP/1.1"), func(*decode.Packet) error { return nil }); err == nil {
		t.Error("text accepted as a capture")
	}
	if err := decode.ReadCapture(strings.NewReader(""), func(*decode.Packet) error { return nil }); err == nil {
		t.Error("empty input accepted as a capture")
	}
}

func FuzzDatagram(f *testing.F) {
	for _, s := range captures.All() {
		for _, dg := range s.Datagrams {
			f.Add(dg.Payload, dg.Payload)
		}
	}
	src, dst := netip.MustParseAddrPort("127.0.0.1:2002"), netip.MustParseAddrPort("127.0.0.1:641")
	f.Fuzz(func(t *testing.T, a, b []byte) {
		d := decode.New()
		for _, p := range [][]byte{a, b, a} {
			r := d.Datagram(time.Time{}, src, dst, p)
			r.Line()
			r.Write(&bytes.Buffer{})
			d.Plausible(src, dst, p)
			r = d.Datagram(time.Time{}, dst, src, p)
			r.Line()
		}
	})
}

func FuzzReadCapture(f *testing.F) {
	var buf bytes.Buffer
	rec, _ := pcaprec.New(&buf)
	for _, dg := range captures.Get("emsd-submit-1").Datagrams {
		rec.Write(time.Unix(1, 0), refAddr(dg.From), refAddr(dg.To), dg.Payload)
	}
	f.Add(buf.Bytes())
	f.Add([]byte{0x0a, 0x0d, 0x0d, 0x0a, 0, 0, 0, 28, 0x1a, 0x2b, 0x3c, 0x4d})
	f.Fuzz(func(t *testing.T, b []byte) {
		d := decode.New()
		decode.ReadCapture(bytes.NewReader(b), func(p *decode.Packet) error {
			d.Datagram(p.Time, p.Src, p.Dst, p.Payload).Write(&bytes.Buffer{})
			return nil
		})
	})
}

// A re-invocation (same EMSD argument, instance id included, new
// reference number) is a duplicate; a repeated ACK or FAILURE too; the
// same octets under the same reference are a retransmission.
func TestMarks(t *testing.T) {
	d := decode.New()
	ua, mts := netip.MustParseAddrPort("127.0.0.1:2003"), netip.MustParseAddrPort("127.0.0.1:641")
	arg := "21 00 30 16 a0 11 a0 0f 30 05 04 03 19 80 36 80 06 73 65 63 72 65 74 02 01 20"
	steps := []struct {
		from, to netip.AddrPort
		hex      string
		marks    string
	}{
		{ua, mts, "50 07 " + arg, ""},
		{ua, mts, "50 07 " + arg, "retransmission"},
		{mts, ua, "04 07 01", ""},
		{mts, ua, "04 07 01", "duplicate"},
		{ua, mts, "50 08 " + arg, "duplicate of #1"},
		{mts, ua, "01 08", ""},
		{ua, mts, "03 08", ""},
		{ua, mts, "03 08", "duplicate"},
		{mts, ua, "01 08", "retransmission"},
	}
	for i, s := range steps {
		r := d.Datagram(time.Time{}, s.from, s.to, mustHex(t, s.hex))
		if got := strings.Join(r.Marks, ","); got != s.marks {
			t.Errorf("step %d (%s): marks %q, want %q", i+1, s.hex[:5], got, s.marks)
		}
	}
}
