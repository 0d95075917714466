// Package esrodtls carries ESRO over DTLS 1.2 with pre-shared keys
// (RFC 7925 profile), as a net.PacketConn that an esro.Endpoint runs on
// unchanged: each ESRO PDU is the payload of one DTLS application-data
// record, and the engine's state machines know nothing of the security layer
// beyond what PeersAuthenticated tells them: every peer proved itself.
//
// One Conn holds many DTLS sessions. Each session appears to the engine as
// one peer address: the address the session's handshake came from (server
// side) or was sent to (client side). That address stays the session's name
// for its whole life, so when Connection IDs (RFC 9146) let a device's
// records arrive from a new address after a NAT rebinding, the engine still
// sees the same peer and its invocations carry on; replies follow the
// device to wherever its latest authenticated record came from.
//
// The cryptography is github.com/pion/dtls/v3's. This package adds the
// session table, the identity of each session's peer (the PSK identity,
// which the EMSD server takes as the device's address), limits on
// handshakes, and counters.
package esrodtls

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/esro-emsdp/emsdp/esro"
	"github.com/pion/dtls/v3"
)

type packet struct {
	b    []byte
	from netip.AddrPort
}

// Conn is a net.PacketConn over DTLS sessions. All methods are safe for
// concurrent use.
type Conn struct {
	cfg   Config
	log   *slog.Logger
	dm    *demux // nil for a client-only Conn
	laddr net.Addr

	in     chan packet
	closed chan struct{}
	once   sync.Once
	wg     sync.WaitGroup
	hsSem  chan struct{}

	mu       sync.Mutex
	sessions map[netip.AddrPort]*session
	byID     map[string]*session // latest established session per identity

	rdl atomic.Pointer[time.Time] // read deadline

	st counters
}

// Listen starts a server-side Conn on a UDP address ("host:port").
func Listen(network, address string, cfg Config) (*Conn, error) {
	if cfg.PSK == nil {
		return nil, errors.New("esrodtls: Listen needs Config.PSK")
	}
	ua, err := net.ResolveUDPAddr(network, address)
	if err != nil {
		return nil, fmt.Errorf("esrodtls: listen: %w", err)
	}
	c := newConn(cfg)
	dc, err := c.dtlsConfig(true, "", nil)
	if err != nil {
		return nil, err
	}
	sock, err := net.ListenUDP(network, ua)
	if err != nil {
		return nil, fmt.Errorf("esrodtls: listen: %w", err)
	}
	c.laddr = sock.LocalAddr()
	cidLen := cidSize
	if cfg.NoConnectionID {
		cidLen = 0
	}
	c.wg.Add(1)
	go c.reapLoop()
	c.dm = newDemux(sock, cidLen, func(a *assoc) bool { return c.admit(a, dc) })
	return c, nil
}

// NewClient returns a client-only Conn: writing to an address opens a
// session to it with the identity and key Credentials gives.
func NewClient(cfg Config) (*Conn, error) {
	if cfg.Credentials == nil {
		return nil, errors.New("esrodtls: NewClient needs Config.Credentials")
	}
	c := newConn(cfg)
	if _, err := c.dtlsConfig(false, "x", []byte{0}); err != nil {
		return nil, err
	}
	c.laddr = &net.UDPAddr{}
	c.wg.Add(1)
	go c.reapLoop()
	return c, nil
}

func newConn(cfg Config) *Conn {
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 10 * time.Second
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = time.Hour
	}
	if cfg.StaleAfter <= 0 {
		cfg.StaleAfter = 5 * time.Second
	}
	if cfg.MaxHandshakes <= 0 {
		cfg.MaxHandshakes = 256
	}
	if len(cfg.CipherSuites) == 0 {
		cfg.CipherSuites = DefaultCipherSuites()
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Conn{
		cfg:      cfg,
		log:      log,
		in:       make(chan packet, 256),
		closed:   make(chan struct{}),
		hsSem:    make(chan struct{}, cfg.MaxHandshakes),
		sessions: make(map[netip.AddrPort]*session),
		byID:     make(map[string]*session),
	}
}

func addrPort(a net.Addr) netip.AddrPort {
	if ua, ok := a.(*net.UDPAddr); ok {
		ap := ua.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// admit decides on a new association (a ClientHello from a new source,
// ReadFrom returns the next ESRO PDU from any session, with the session's
// name as its source.
func (c *Conn) ReadFrom(b []byte) (int, net.Addr, error) {
	var timeout <-chan time.Time
	if d := c.rdl.Load(); d != nil && !d.IsZero() {
		t := time.NewTimer(time.Until(*d))
		defer t.Stop()
		timeout = t.C
	}
	select {
	case p := <-c.in:
		n := copy(b, p.b)
		return n, net.UDPAddrFromAddrPort(p.from), nil
	case <-c.closed:
		return 0, nil, net.ErrClosed
	case <-timeout:
		return 0, nil, &net.OpError{Op: "read", Net: "dtls", Err: errTimeout{}}
	}
}

type errTimeout struct{}

func (errTimeout) Error() string   { return "i/o timeout" }
func (errTimeout) Timeout() bool   { return true }
func (errTimeout) Temporary() bool { return true }

// WriteTo sends b in one DTLS record on the session named addr. Without one,
// a client-capable Conn opens it and sends b (and the next few datagrams)
// once the handshake completes; ESRO's retransmission covers a handshake
// that fails.
func (c *Conn) WriteTo(b []byte, addr net.Addr) (int, error) {
	to := addrPort(addr)
	now := time.Now().UnixNano()
	c.mu.Lock()
	s, ok := c.sessions[to]
	if ok && s.ready && !s.server {
		if u := s.unanswered.Load(); u != 0 && now-u > int64(c.cfg.StaleAfter) {
			c.dropLocked(s)
			c.st.stale.Add(1)
			go s.conn.Close()
			c.log.Debug("esrodtls: session silent, opening a new one", "peer", to)
			ok = false
		}
	}
	if ok && !s.ready {
		if len(s.pending) < maxPending {
			s.pending = append(s.pending, append([]byte(nil), b...))
		}
		c.mu.Unlock()
		return len(b), nil
	}
	if !ok {
		select {
		case <-c.closed:
			c.mu.Unlock()
			return 0, net.ErrClosed
		default:
		}
		if c.cfg.Credentials == nil {
			c.mu.Unlock()
			return 0, fmt.Errorf("%w %v", ErrNoSession, to)
		}
		s = &session{name: to, pending: [][]byte{append([]byte(nil), b...)}}
		s.remote.Store(&to)
		c.sessions[to] = s
		c.wg.Add(1)
		go c.dial(s)
		c.mu.Unlock()
		return len(b), nil
	}
	c.mu.Unlock()
	s.lastUsed.Store(now)
	s.unanswered.CompareAndSwap(0, now)
	n, err := s.conn.Write(b)
	if err != nil {
		return n, fmt.Errorf("esrodtls: write to %v: %w", to, err)
	}
	c.st.sent.Add(1)
	return n, nil
}

// Close ends every session and the listener, and waits for its goroutines.
func (c *Conn) Close() error {
	var err error
	c.once.Do(func() {
		close(c.closed)
		if c.dm != nil {
			err = c.dm.close()
		}
		c.mu.Lock()
		all := make([]*dtls.Conn, 0, len(c.sessions))
		for _, s := range c.sessions {
			if s.conn != nil {
				all = append(all, s.conn)
			}
		}
		c.mu.Unlock()
		for _, dc := range all {
			dc.Close()
		}
		c.wg.Wait()
	})
	return err
}

// LocalAddr is the listening address (unspecified for a client-only Conn).
func (c *Conn) LocalAddr() net.Addr { return c.laddr }

// SetDeadline sets the read deadline; writes do not block on the network.
func (c *Conn) SetDeadline(t time.Time) error { return c.SetReadDeadline(t) }

// SetReadDeadline bounds ReadFrom calls that start after it.
func (c *Conn) SetReadDeadline(t time.Time) error { c.rdl.Store(&t); return nil }

// SetWriteDeadline is accepted and has no effect: WriteTo never waits for
// the peer.
func (c *Conn) SetWriteDeadline(time.Time) error { return nil }

// PeersAuthenticated is true: ReadFrom returns only what came in a
// session's authenticated records, and a session exists only once its peer
// completed the handshake with a key, which takes answers received at its
// address. An esro.Endpoint on a Conn therefore counts every peer as proven
// (esro.AuthenticatedConn): the engine's defences against forged source
// addresses would only hold back genuine sessions, all those from one
// address sharing one address's cap.
func (c *Conn) PeersAuthenticated() bool { return true }

var _ esro.AuthenticatedConn = (*Conn)(nil)
