package main

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
)

// Header sizes for bytes "on the wire", without link-layer framing.
const (
	ipv4Header = 20
	udpHeader  = 8
	// tcpHeaderTS is a TCP header with the timestamp option (12 octets
	// padded), which Linux puts on every segment after the SYN.
	tcpHeaderTS = 32
	// linkMTU is the link the per-packet figures assume: Ethernet.
	linkMTU = 1500
	// tcpMSS is the MSS announced on such a link; with timestamps a
	// segment carries 12 octets less payload.
	tcpMSS = linkMTU - ipv4Header - 20
)

// datagramLog records the sizes of the datagrams a socket sent and
// received, so that IP fragmentation on a 1500-octet link can be computed
// per datagram. It is safe for concurrent use.
type datagramLog struct {
	mu         sync.Mutex
	sent, recv []int
}

func (l *datagramLog) add(sent bool, n int) {
	l.mu.Lock()
	if sent {
		l.sent = append(l.sent, n)
	} else {
		l.recv = append(l.recv, n)
	}
	l.mu.Unlock()
}

// counts returns how many datagrams were sent and received so far.
func (l *datagramLog) counts() (sent, recv int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.sent), len(l.recv)
}

// take returns the sizes logged since the last take and starts afresh.
func (l *datagramLog) take() (sent, recv []int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	sent, recv = l.sent, l.recv
	l.sent, l.recv = nil, nil
	return sent, recv
}

// countingUDPConn is a UDP socket that logs every datagram. It keeps the
// allocation-free AddrPort methods the ESRO endpoint prefers, so that
// counting does not change the code path being measured more than
// necessary.
type countingUDPConn struct {
	*net.UDPConn
	log *datagramLog
}

func listenCountingUDP(addr string) (*countingUDPConn, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(ap))
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	return &countingUDPConn{UDPConn: c, log: &datagramLog{}}, nil
}

func (c *countingUDPConn) addrPort() netip.AddrPort {
	return c.LocalAddr().(*net.UDPAddr).AddrPort()
}

func (c *countingUDPConn) ReadFrom(b []byte) (int, net.Addr, error) {
	n, a, err := c.UDPConn.ReadFrom(b)
	if err == nil {
		c.log.add(false, n)
	}
	return n, a, err
}

func (c *countingUDPConn) WriteTo(b []byte, a net.Addr) (int, error) {
	n, err := c.UDPConn.WriteTo(b, a)
	if err == nil {
		c.log.add(true, n)
	}
	return n, err
}

func (c *countingUDPConn) ReadFromUDPAddrPort(b []byte) (int, netip.AddrPort, error) {
	n, a, err := c.UDPConn.ReadFromUDPAddrPort(b)
	if err == nil {
		c.log.add(false, n)
	}
	return n, a, err
}

func (c *countingUDPConn) WriteToUDPAddrPort(b []byte, a netip.AddrPort) (int, error) {
	n, err := c.UDPConn.WriteToUDPAddrPort(b, a)
	if err == nil {
		c.log.add(true, n)
	}
	return n, err
}

// udpWire is what a set of UDP datagrams costs on a 1500-octet IPv4 link:
// IP packets (a datagram over the MTU is fragmented) and octets including
// the UDP and IP headers.
func udpWire(sizes []int) (packets, octets int) {
	for _, n := range sizes {
		// Every fragment but the last carries a multiple of 8 octets.
		per := (linkMTU - ipv4Header) &^ 7
		frags := (n + udpHeader + per - 1) / per
		packets += frags
		octets += n + udpHeader + frags*ipv4Header
	}
	return packets, octets
}

// countingConn is a TCP connection that counts the payload octets it
// reads and writes.
type countingConn struct {
	net.Conn
	mu       sync.Mutex
	in, out  int
	onClose  func(in, out int)
	closeOne sync.Once
}

func (c *countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.mu.Lock()
	c.in += n
	c.mu.Unlock()
	return n, err
}

func (c *countingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.mu.Lock()
	c.out += n
	c.mu.Unlock()
	return n, err
}

func (c *countingConn) Close() error {
	err := c.Conn.Close()
	c.closeOne.Do(func() {
		if c.onClose != nil {
			c.mu.Lock()
			in, out := c.in, c.out
			c.mu.Unlock()
			c.onClose(in, out)
		}
	})
	return err
}

// countingListener wraps accepted connections in countingConns and reports
// their totals when the server closes them.
type countingListener struct {
	net.Listener
	closed chan [2]int // in, out of each closed connection
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &countingConn{Conn: c, onClose: func(in, out int) {
		select {
		case l.closed <- [2]int{in, out}:
		default: // nobody measuring this connection
		}
	}}, nil
}

// tcpOutSegs reads the kernel's count of TCP segments sent (Tcp OutSegs in
// /proc/net/snmp, for this network namespace), including retransmissions.
func tcpOutSegs() (uint64, error) {
	b, err := os.ReadFile("/proc/net/snmp")
	if err != nil {
		return 0, fmt.Errorf("tcp segment counter: %w", err)
	}
	return parseSNMP(b, "Tcp", "OutSegs")
}

// parseSNMP finds a counter in the /proc/net/snmp format: for each
// protocol a line of names followed by a line of values.
func parseSNMP(b []byte, proto, name string) (uint64, error) {
	sc := bufio.NewScanner(bytes.NewReader(b))
	var names []string
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 || f[0] != proto+":" {
			continue
		}
		if names == nil {
			names = f[1:]
			continue
		}
		for i, n := range names {
			if n == name && i+1 < len(f) {
				v, err := strconv.ParseUint(f[i+1], 10, 64)
				if err != nil {
					return 0, fmt.Errorf("snmp %s %s: %w", proto, name, err)
				}
				return v, nil
			}
		}
		break
	}
	return 0, fmt.Errorf("snmp: no %s %s counter", proto, name)
}
