// Package lossynet is an in-memory datagram network for tests: PacketConns
// that lose, duplicate, delay and reorder datagrams on purpose. Delivery
// uses time.AfterFunc and channels only, so inside a testing/synctest bubble
// it runs on the bubble's fake clock and idles deterministically.
package lossynet

import (
	"errors"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"
)

// Config sets the network's faults. Probabilities apply to each datagram
// independently, so a 0.3 loss is 30% each way.
type Config struct {
	Loss      float64       // probability a datagram is lost
	Duplicate float64       // probability it is delivered twice
	Reorder   float64       // probability it is held back by up to MaxDelay
	Delay     time.Duration // base one-way delay
	MaxDelay  time.Duration // extra delay of a reordered datagram; default 10 × Delay or 50 ms
	Seed      uint64
	QueueLen  int // per-socket receive queue; overflow drops. Default 4096.
}

// Network connects the Conns created by Listen.
type Network struct {
	cfg   Config
	mu    sync.Mutex
	rng   *rand.Rand
	conns map[netip.AddrPort]*Conn
	trace []Event
	keep  bool
	stats Stats
}

// Stats counts datagram fates.
type Stats struct {
	Sent, Delivered, Lost, Duplicated, Reordered, Overflow, NoRoute int
}

// Event is one datagram send as recorded by Trace.
type Event struct {
	At       time.Time
	From, To netip.AddrPort
	Payload  []byte
	Lost     bool
}

// New creates a network.
func New(cfg Config) *Network {
	if cfg.QueueLen == 0 {
		cfg.QueueLen = 4096
	}
	if cfg.MaxDelay == 0 {
		cfg.MaxDelay = max(10*cfg.Delay, 50*time.Millisecond)
	}
	return &Network{cfg: cfg, rng: rand.New(rand.NewPCG(cfg.Seed, cfg.Seed^0x9e3779b97f4a7c15)), conns: map[netip.AddrPort]*Conn{}}
}

// Record starts keeping every send for Trace.
func (n *Network) Record() {
	n.mu.Lock()
	n.keep = true
	n.mu.Unlock()
}

// Trace returns the sends recorded since Record.
func (n *Network) Trace() []Event {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]Event(nil), n.trace...)
}

// Stats returns the counts so far.
func (n *Network) Stats() Stats {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.stats
}

// Listen creates a socket at addr ("127.0.0.1:2002"); port 0 picks one.
func (n *Network) Listen(addr string) (*Conn, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if ap.Port() == 0 {
		for p := uint16(40000); ; p++ {
			if _, used := n.conns[netip.AddrPortFrom(ap.Addr(), p)]; !used {
				ap = netip.AddrPortFrom(ap.Addr(), p)
				break
			}
		}
	}
	if _, used := n.conns[ap]; used {
		return nil, &net.OpError{Op: "listen", Net: "udp", Addr: net.UDPAddrFromAddrPort(ap), Err: errors.New("address in use")}
	}
	c := &Conn{net: n, addr: ap, queue: make(chan packet, n.cfg.QueueLen), done: make(chan struct{})}
	n.conns[ap] = c
	return c, nil
}

type packet struct {
	from netip.AddrPort
	b    []byte
}

// Conn is one socket. It implements net.PacketConn and the AddrPort
// variants of *net.UDPConn.
type Conn struct {
	net   *Network
	addr  netip.AddrPort
	queue chan packet
	done  chan struct{}
	once  sync.Once

	mu           sync.Mutex
	dropSent     int
	dropReceived int
	dropMatching []dropRule
	deadline     time.Time
}

type dropRule struct {
	n     int
	match func([]byte) bool
}

// DropNextSent makes the next k datagrams sent from c vanish, and
// DropNextReceived the next k datagrams that would reach c: the reference
// tester's "point of control" (docs/protocol.md ESRO §9).
func (c *Conn) DropNextSent(k int) {
	c.mu.Lock()
	c.dropSent += k
	c.mu.Unlock()
}

// DropNextReceived: see DropNextSent.
func (c *Conn) DropNextReceived(k int) {
	c.mu.Lock()
	c.dropReceived += k
	c.mu.Unlock()
}

// DropNextReceivedIf makes the next k datagrams that would reach c and
// satisfy match vanish: "the first two ACKs" rather than "the next two
// datagrams". match sees the payload and must not keep it.
func (c *Conn) DropNextReceivedIf(k int, match func(payload []byte) bool) {
	c.mu.Lock()
	c.dropMatching = append(c.dropMatching, dropRule{k, match})
	c.mu.Unlock()
}

// takeMatching reports whether b is dropped by a DropNextReceivedIf rule.
func (c *Conn) takeMatching(b []byte) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range c.dropMatching {
		if r := &c.dropMatching[i]; r.n > 0 && r.match(b) {
			r.n--
			return true
		}
	}
	return false
}

func (c *Conn) take(p *int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if *p > 0 {
		*p--
		return true
	}
	return false
}

// WriteToUDPAddrPort sends b to addr through the network's faults.
func (c *Conn) WriteToUDPAddrPort(b []byte, to netip.AddrPort) (int, error) {
	select {
	case <-c.done:
		return 0, net.ErrClosed
	default:
	}
	n := c.net
	payload := append([]byte(nil), b...)
	lost := c.take(&c.dropSent)
	n.mu.Lock()
	n.stats.Sent++
	cfg := n.cfg
	if !lost && cfg.Loss > 0 && n.rng.Float64() < cfg.Loss {
		lost = true
	}
	copies := 1
	if !lost && cfg.Duplicate > 0 && n.rng.Float64() < cfg.Duplicate {
		copies = 2
		n.stats.Duplicated++
	}
	var delays [2]time.Duration
	for i := range copies {
		delays[i] = cfg.Delay
		if cfg.Reorder > 0 && n.rng.Float64() < cfg.Reorder {
			delays[i] += time.Duration(n.rng.Int64N(int64(cfg.MaxDelay)) + 1)
			n.stats.Reordered++
		}
	}
	if lost {
		n.stats.Lost++
	}
	if n.keep {
		n.trace = append(n.trace, Event{At: time.Now(), From: c.addr, To: to, Payload: payload, Lost: lost})
	}
	n.mu.Unlock()
	if lost {
		return len(b), nil
	}
	for i := range copies {
		if delays[i] <= 0 {
			n.deliver(c.addr, to, payload)
			continue
		}
		time.AfterFunc(delays[i], func() { n.deliver(c.addr, to, payload) })
	}
	return len(b), nil
}

func (n *Network) deliver(from, to netip.AddrPort, b []byte) {
	n.mu.Lock()
	dst := n.conns[to]
	if dst == nil {
		n.stats.NoRoute++
		n.mu.Unlock()
		return
	}
	n.mu.Unlock()
	if dst.take(&dst.dropReceived) || dst.takeMatching(b) {
		n.count(func(s *Stats) { s.Lost++ })
		return
	}
	select {
	case <-dst.done:
	case dst.queue <- packet{from, b}:
		n.count(func(s *Stats) { s.Delivered++ })
	default:
		n.count(func(s *Stats) { s.Overflow++ })
	}
}

func (n *Network) count(f func(*Stats)) {
	n.mu.Lock()
	f(&n.stats)
	n.mu.Unlock()
}

// ReadFromUDPAddrPort blocks for the next datagram.
func (c *Conn) ReadFromUDPAddrPort(b []byte) (int, netip.AddrPort, error) {
	c.mu.Lock()
	dl := c.deadline
	c.mu.Unlock()
	var timeout <-chan time.Time
	if !dl.IsZero() {
		d := time.Until(dl)
		if d <= 0 {
			return 0, netip.AddrPort{}, os.ErrDeadlineExceeded
		}
		t := time.NewTimer(d)
		defer t.Stop()
		timeout = t.C
	}
	select {
	case p := <-c.queue:
		return copy(b, p.b), p.from, nil
	case <-c.done:
		return 0, netip.AddrPort{}, net.ErrClosed
	case <-timeout:
		return 0, netip.AddrPort{}, os.ErrDeadlineExceeded
	}
}

// ReadFrom implements net.PacketConn.
func (c *Conn) ReadFrom(b []byte) (int, net.Addr, error) {
	n, from, err := c.ReadFromUDPAddrPort(b)
	if err != nil {
		return 0, nil, err
	}
	return n, net.UDPAddrFromAddrPort(from), nil
}

// WriteTo implements net.PacketConn.
func (c *Conn) WriteTo(b []byte, addr net.Addr) (int, error) {
	ua, ok := addr.(*net.UDPAddr)
	if !ok {
		return 0, errors.New("lossynet: not a UDP address")
	}
	return c.WriteToUDPAddrPort(b, ua.AddrPort())
}

// Close removes the socket from the network.
func (c *Conn) Close() error {
	c.once.Do(func() {
		close(c.done)
		c.net.mu.Lock()
		delete(c.net.conns, c.addr)
		c.net.mu.Unlock()
	})
	return nil
}

// LocalAddr implements net.PacketConn.
func (c *Conn) LocalAddr() net.Addr { return net.UDPAddrFromAddrPort(c.addr) }

// AddrPort is the socket's address.
func (c *Conn) AddrPort() netip.AddrPort { return c.addr }

// SetDeadline sets the read deadline; writes never block.
func (c *Conn) SetDeadline(t time.Time) error { return c.SetReadDeadline(t) }

// SetReadDeadline takes effect at the next read.
func (c *Conn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	c.deadline = t
	c.mu.Unlock()
	return nil
}

// SetWriteDeadline is a no-op: writes never block.
func (c *Conn) SetWriteDeadline(time.Time) error { return nil }
