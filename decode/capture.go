package decode

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/ip4defrag"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"
)

// Packet is one UDP datagram read from a capture.
type Packet struct {
	Time     time.Time
	Src, Dst netip.AddrPort
	Payload  []byte // valid until the next packet
	// Truncated: the capture kept fewer octets than the datagram had
	// (snap length); Payload is what was kept.
	Truncated bool
}

// ErrNotCapture is returned for input that is neither pcap nor pcapng.
var ErrNotCapture = errors.New("not a pcap or pcapng capture")

type packetSource interface {
	ReadPacketData() ([]byte, gopacket.CaptureInfo, error)
}

// ReadCapture reads a pcap or pcapng stream (told apart by its magic
// number) and calls fn for every UDP datagram over IPv4 or IPv6, IPv4
// fragments reassembled, in capture order. Link types: Ethernet, BSD
// loopback, raw IP, Linux cooked (v1 and v2). Packets that are not UDP
// are skipped; fn's error stops the reading. A capture cut short (a
// truncated last record) ends the reading without error, as tcpdump -r
// does, after the packets before it.
func ReadCapture(r io.Reader, fn func(*Packet) error) error {
	br := bufio.NewReaderSize(r, 1<<16)
	magic, err := br.Peek(4)
	if err != nil {
		return fmt.Errorf("%w: %d octets", ErrNotCapture, len(magic))
	}
	var src packetSource
	var link func(ci gopacket.CaptureInfo) layers.LinkType
	switch binary.BigEndian.Uint32(magic) {
	case 0x0a0d0d0a:
		ng, err := pcapgo.NewNgReader(br, pcapgo.DefaultNgReaderOptions)
		if err != nil {
			return fmt.Errorf("pcapng: %w", err)
		}
		src = ng
		link = func(ci gopacket.CaptureInfo) layers.LinkType {
			if i, err := ng.Interface(ci.InterfaceIndex); err == nil {
				return i.LinkType
			}
			return ng.LinkType()
		}
	case 0xa1b2c3d4, 0xd4c3b2a1, 0xa1b23c4d, 0x4d3cb2a1:
		pr, err := pcapgo.NewReader(br)
		if err != nil {
			return fmt.Errorf("pcap: %w", err)
		}
		src = pr
		lt := pr.LinkType()
		link = func(gopacket.CaptureInfo) layers.LinkType { return lt }
	default:
		return ErrNotCapture
	}
	defrag := ip4defrag.NewIPv4Defragmenter()
	var last time.Time
	for {
		data, ci, err := src.ReadPacketData()
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("reading capture: %w", err)
		}
		p, ok := udpPacket(data, ci, link(ci), defrag)
		if ci.Timestamp.Sub(last) > time.Minute {
			defrag.DiscardOlderThan(ci.Timestamp.Add(-time.Minute))
			last = ci.Timestamp
		}
		if !ok {
			continue
		}
		if err := fn(p); err != nil {
			return err
		}
	}
}

func udpPacket(data []byte, ci gopacket.CaptureInfo, lt layers.LinkType, defrag *ip4defrag.IPv4Defragmenter) (*Packet, bool) {
	pkt := gopacket.NewPacket(data, lt, gopacket.DecodeOptions{Lazy: true, NoCopy: true})
	var src, dst netip.Addr
	var udp *layers.UDP
	if ip4, ok := pkt.Layer(layers.LayerTypeIPv4).(*layers.IPv4); ok {
		src, _ = netip.AddrFromSlice(ip4.SrcIP.To4())
		dst, _ = netip.AddrFromSlice(ip4.DstIP.To4())
		if ip4.Flags&layers.IPv4MoreFragments != 0 || ip4.FragOffset != 0 {
			if ip4.Protocol != layers.IPProtocolUDP {
				return nil, false
			}
			whole, err := defrag.DefragIPv4WithTimestamp(ip4, ci.Timestamp)
			if err != nil || whole == nil {
				return nil, false
			}
			p := gopacket.NewPacket(whole.Payload, layers.LayerTypeUDP, gopacket.Default)
			udp, _ = p.Layer(layers.LayerTypeUDP).(*layers.UDP)
		} else {
			udp, _ = pkt.Layer(layers.LayerTypeUDP).(*layers.UDP)
		}
	} else if ip6, ok := pkt.Layer(layers.LayerTypeIPv6).(*layers.IPv6); ok {
		src, _ = netip.AddrFromSlice(ip6.SrcIP.To16())
		dst, _ = netip.AddrFromSlice(ip6.DstIP.To16())
		udp, _ = pkt.Layer(layers.LayerTypeUDP).(*layers.UDP)
	}
	if udp == nil || !src.IsValid() || !dst.IsValid() {
		return nil, false
	}
	p := &Packet{
		Time:    ci.Timestamp,
		Src:     netip.AddrPortFrom(src.Unmap(), uint16(udp.SrcPort)),
		Dst:     netip.AddrPortFrom(dst.Unmap(), uint16(udp.DstPort)),
		Payload: udp.Payload,
	}
	if want := int(udp.Length) - 8; want > len(p.Payload) || ci.CaptureLength < ci.Length {
		p.Truncated = true
	}
	return p, true
}
