// Package pcaprec records the datagrams of a net.PacketConn into a pcap
// file, as if captured on the wire (raw IP link type, IPv4 or IPv6 and UDP
// headers with checksums). It lets tests produce captures of real
// exchanges without privileges or a capture library.
package pcaprec

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"
)

// Recorder writes packets to one pcap stream; it is safe for concurrent
// use by several connections.
type Recorder struct {
	mu    sync.Mutex
	w     *pcapgo.Writer
	err   error
	n     int
	alias map[netip.AddrPort]netip.AddrPort
}

// Alias records every packet from or to real as if it were from or to
// shown: tests listen on free ports and record the well-known one.
func (r *Recorder) Alias(real, shown netip.AddrPort) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.alias == nil {
		r.alias = make(map[netip.AddrPort]netip.AddrPort)
	}
	r.alias[real] = shown
}

// New writes the pcap file header to w and returns a Recorder on it.
func New(w io.Writer) (*Recorder, error) {
	pw := pcapgo.NewWriterNanos(w)
	if err := pw.WriteFileHeader(65535, layers.LinkTypeRaw); err != nil {
		return nil, fmt.Errorf("pcap header: %w", err)
	}
	return &Recorder{w: pw}, nil
}

// Packets returns how many packets were written.
func (r *Recorder) Packets() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n
}

// Err returns the first write error.
func (r *Recorder) Err() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

// Write records one datagram from src to dst at ts.
func (r *Recorder) Write(ts time.Time, src, dst netip.AddrPort, payload []byte) error {
	src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	r.mu.Lock()
	defer r.mu.Unlock()
	if a, ok := r.alias[src]; ok {
		src = a
	}
	if a, ok := r.alias[dst]; ok {
		dst = a
	}
	frame, err := Frame(src, dst, payload)
	if err != nil {
		return err
	}
	if r.err != nil {
		return r.err
	}
	ci := gopacket.CaptureInfo{Timestamp: ts, CaptureLength: len(frame), Length: len(frame)}
	if err := r.w.WritePacket(ci, frame); err != nil {
		r.err = err
		return err
	}
	r.n++
	return nil
}

// Frame returns the raw-IP packet carrying payload from src to dst.
func Frame(src, dst netip.AddrPort, payload []byte) ([]byte, error) {
	udp := &layers.UDP{SrcPort: layers.UDPPort(src.Port()), DstPort: layers.UDPPort(dst.Port())}
	var ip gopacket.SerializableLayer
	s, d := src.Addr().Unmap(), dst.Addr().Unmap()
	if s.Is4() && d.Is4() {
		l := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP,
			SrcIP: s.AsSlice(), DstIP: d.AsSlice()}
		if err := udp.SetNetworkLayerForChecksum(l); err != nil {
			return nil, err
		}
		ip = l
	} else {
		l := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolUDP,
			SrcIP: net.IP(as16(s)), DstIP: net.IP(as16(d))}
		if err := udp.SetNetworkLayerForChecksum(l); err != nil {
			return nil, err
		}
		ip = l
	}
	buf := gopacket.NewSerializeBuffer()
	opts := gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}
	if err := gopacket.SerializeLayers(buf, opts, ip, udp, gopacket.Payload(payload)); err != nil {
		return nil, fmt.Errorf("building packet: %w", err)
	}
	return buf.Bytes(), nil
}

// Conn records every datagram read from or written to a PacketConn. It
// deliberately has only the PacketConn methods, so that users fall back
// to them rather than to batched system calls that would bypass it.
type Conn struct {
	net.PacketConn
	rec   *Recorder
	local netip.AddrPort
}

// Wrap returns c recording into r. c's local address must be a UDP
// address; an unspecified IP is recorded as loopback.
func Wrap(c net.PacketConn, r *Recorder) *Conn {
	var local netip.AddrPort
	if ua, ok := c.LocalAddr().(*net.UDPAddr); ok {
		local = ua.AddrPort()
		if local.Addr().IsUnspecified() {
			lo := netip.IPv6Loopback()
			if local.Addr().Unmap().Is4() || local.Addr().Is4In6() {
				lo = netip.AddrFrom4([4]byte{127, 0, 0, 1})
			}
			local = netip.AddrPortFrom(lo, local.Port())
		}
	}
	return &Conn{PacketConn: c, rec: r, local: local}
}

// ReadFrom reads one datagram and records it.
func (c *Conn) ReadFrom(b []byte) (int, net.Addr, error) {
	n, a, err := c.PacketConn.ReadFrom(b)
	if err == nil {
		if ua, ok := a.(*net.UDPAddr); ok {
			c.rec.Write(time.Now(), ua.AddrPort(), c.local, b[:n])
		}
	}
	return n, a, err
}

// WriteTo records one datagram and writes it.
func (c *Conn) WriteTo(b []byte, a net.Addr) (int, error) {
	if ua, ok := a.(*net.UDPAddr); ok {
		c.rec.Write(time.Now(), c.local, ua.AddrPort(), b)
	}
	return c.PacketConn.WriteTo(b, a)
}

func as16(a netip.Addr) []byte {
	b := a.As16()
	return b[:]
}
