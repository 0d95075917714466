// Package esrodtls carries ESRO over DTLS 1.2 with pre-shared keys
// (RFC 7925 profile), as a net.PacketConn that an esro.Endpoint runs on
// unchanged: each ESRO PDU is the payload of one DTLS application-data
// record, and the engine's state machines know nothing of the security layer.
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
	"context"
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

// Cipher suites offered by default: TLS_PSK_WITH_AES_128_CCM_8 is RFC 7925's
// mandatory suite (8-byte tag, the cheapest on the wire); the ECDHE_PSK suite
// adds forward secrecy at the cost of one key exchange per handshake.
var defaultSuites = []dtls.CipherSuiteID{
	dtls.TLS_PSK_WITH_AES_128_CCM_8,
	dtls.TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256,
}

// DefaultCipherSuites returns the suites a zero Config offers, most preferred
// first.
func DefaultCipherSuites() []dtls.CipherSuiteID {
	return append([]dtls.CipherSuiteID(nil), defaultSuites...)
}

// ParseCipherSuite maps a suite's IANA name (as OpenSSL and RFCs spell it, e.g.
// "TLS_PSK_WITH_AES_128_CCM_8") to its id. Only PSK suites are accepted.
func ParseCipherSuite(name string) (dtls.CipherSuiteID, error) {
	for _, id := range pskSuites {
		if id.String() == name {
			return id, nil
		}
	}
	return 0, fmt.Errorf("esrodtls: unknown or non-PSK cipher suite %q", name)
}

var pskSuites = []dtls.CipherSuiteID{
	dtls.TLS_PSK_WITH_AES_128_CCM_8,
	dtls.TLS_PSK_WITH_AES_128_CCM,
	dtls.TLS_PSK_WITH_AES_256_CCM_8,
	dtls.TLS_PSK_WITH_AES_128_GCM_SHA256,
	dtls.TLS_PSK_WITH_CHACHA20_POLY1305_SHA256,
	dtls.TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256,
	dtls.TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA256,
}

// ErrUnknownIdentity is what a PSK lookup returns for an identity it has no
// key for; the handshake then fails and is counted as "unknown_identity".
var ErrUnknownIdentity = errors.New("esrodtls: unknown PSK identity")

// ErrNoSession is returned by WriteTo for a peer with no session, on a Conn
// that cannot open one (no Credentials).
var ErrNoSession = errors.New("esrodtls: no DTLS session with peer")

// Config configures a Conn. Listen needs PSK; opening sessions to peers
// (WriteTo an address without a session) needs Credentials.
type Config struct {
	// PSK returns the key of a client's identity, or ErrUnknownIdentity.
	// The server side calls it during each handshake. It must not log the key.
	PSK func(identity string) ([]byte, error)

	// Credentials returns the identity and key this side presents when it
	// opens a session to peer (the client side).
	Credentials func(peer netip.AddrPort) (identity string, key []byte, err error)

	// CipherSuites in order of preference; DefaultCipherSuites when empty.
	CipherSuites []dtls.CipherSuiteID

	// HandshakeTimeout bounds one handshake (default 10 s).
	HandshakeTimeout time.Duration

	// IdleTimeout closes a session that carried nothing for this long
	// (default 1 h). Devices are expected to keep sessions for long: a
	// handshake costs several round trips, an established session none.
	IdleTimeout time.Duration

	// StaleAfter replaces a session this side opened when it has sent for
	// this long without receiving anything (default 5 s): the server lost
	// it (a restart, a new session from the same address) without a
	// close_notify reaching us. ESRO answers every PDU it sends within a
	// round trip, so silence that long means the session is gone, and the
	// retransmissions then travel in a new one.
	StaleAfter time.Duration

	// MaxHandshakes bounds the handshakes in progress at once on the server
	// side (default 256); further attempts are dropped and counted "busy".
	MaxHandshakes int

	// AllowHandshake, when set, is asked before the server side spends any
	// work on a new source; false drops the attempt (counted "rate_limited").
	AllowHandshake func(src netip.AddrPort) bool

	// NoCookie turns the HelloVerifyRequest cookie exchange off. Only for
	// measurements: without it a forged source address costs the server a
	// handshake and gets a larger answer than its request.
	NoCookie bool

	// NoConnectionID turns Connection IDs off (RFC 9146): a peer whose
	// address changes then needs a new handshake.
	NoConnectionID bool

	// MTU of DTLS records (default 1200, pion's; ESRO PDUs must fit).
	MTU int

	// Logger for session events (never keys); slog.Default when nil.
	Logger *slog.Logger
}

// cidSize is 8 bytes: enough that a guessed id is hopeless, short enough
// that it costs little in every record.
const cidSize = 8

// maxPending is how many datagrams wait for a session being opened; ESRO
// retransmits anything dropped beyond that.
const maxPending = 16

// Peer describes the DTLS session behind one peer address.
type Peer struct {
	// Identity is the PSK identity: the client's on the server side, the
	// one this side presented on the client side.
	Identity string
	// Remote is the address the peer's latest authenticated record came
	// from (it differs from the session's name after a rebinding).
	Remote netip.AddrPort
	// CipherSuite negotiated.
	CipherSuite string
	// Server is true when the peer opened the session.
	Server bool
}

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

type session struct {
	name     netip.AddrPort
	server   bool
	identity string
	conn     *dtls.Conn
	remote   atomic.Pointer[netip.AddrPort]
	suite    string
	lastUsed atomic.Int64 // unix nanoseconds
	// unanswered is when this side started sending without receiving
	// anything since (unix nanoseconds; 0: all answered).
	unanswered atomic.Int64

	// Client sessions being opened queue their first datagrams here.
	ready   bool
	pending [][]byte
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

func (c *Conn) dtlsConfig(server bool, identity string, key []byte) (*dtls.Config, error) {
	for _, s := range c.cfg.CipherSuites {
		if !isPSKSuite(s) {
			return nil, fmt.Errorf("esrodtls: cipher suite %v is not a PSK suite", s)
		}
	}
	dc := &dtls.Config{
		CipherSuites:         c.cfg.CipherSuites,
		ExtendedMasterSecret: dtls.RequestExtendedMasterSecret,
		MTU:                  c.cfg.MTU,
		// pion's own logger stays silent: it would print handshake errors
		// per source, which a flood would turn into a log flood.
		LoggerFactory: quietLogger{},
	}
	if server {
		dc.PSK = func(hint []byte) ([]byte, error) {
			k, err := c.cfg.PSK(string(hint))
			if err != nil {
				return nil, err
			}
			return k, nil
		}
		// An empty hint: the identity is the client's to name.
		dc.PSKIdentityHint = []byte{}
		dc.InsecureSkipVerifyHello = c.cfg.NoCookie
		if !c.cfg.NoConnectionID {
			dc.ConnectionIDGenerator = dtls.RandomCIDGenerator(cidSize)
		}
	} else {
		dc.PSK = func([]byte) ([]byte, error) { return key, nil }
		dc.PSKIdentityHint = []byte(identity)
		if !c.cfg.NoConnectionID {
			// The client asks the server to tag its records with the
			// server's id; the server's own address does not move.
			dc.ConnectionIDGenerator = dtls.OnlySendCIDGenerator()
		}
	}
	return dc, nil
}

func isPSKSuite(id dtls.CipherSuiteID) bool {
	for _, s := range pskSuites {
		if s == id {
			return true
		}
	}
	return false
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
// or a new one from a source whose session is established) and starts its
// handshake.
func (c *Conn) admit(a *assoc, dc *dtls.Config) bool {
	select {
	case <-c.closed:
		return false
	default:
	}
	if c.cfg.AllowHandshake != nil && !c.cfg.AllowHandshake(a.raddr) {
		c.st.hsFailed[reasonRateLimited].Add(1)
		return false
	}
	select {
	case c.hsSem <- struct{}{}:
	default:
		c.st.hsFailed[reasonBusy].Add(1)
		return false
	}
	c.wg.Add(1)
	go c.serverHandshake(a, dc)
	return true
}

func (c *Conn) serverHandshake(a *assoc, cfg *dtls.Config) {
	defer c.wg.Done()
	name := a.raddr
	dc, err := dtls.Server(a, net.UDPAddrFromAddrPort(name), cfg)
	if err != nil {
		<-c.hsSem
		a.Close()
		c.countFailure(err)
		return
	}
	ctx, cancel := context.WithTimeout(c.ctx(), c.cfg.HandshakeTimeout)
	err = dc.HandshakeContext(ctx)
	cancel()
	<-c.hsSem
	if err != nil {
		if a.received.Load() < 2 {
			// The client never came back with the cookie: a forged
			// source, or a client gone.
			c.st.hsFailed[reasonNoCookie].Add(1)
		} else {
			c.countFailure(err)
		}
		dc.Close()
		a.Close()
		return
	}
	a.established.Store(true)
	st, _ := dc.ConnectionState()
	s := &session{name: name, server: true, identity: string(st.IdentityHint), conn: dc, suite: st.CipherSuiteID.String(), ready: true}
	s.remote.Store(&name)
	s.lastUsed.Store(time.Now().UnixNano())
	c.st.hsOK.Add(1)
	if !c.add(s) {
		dc.Close()
		a.Close()
		return
	}
	c.log.Debug("esrodtls: session", "peer", name, "identity", s.identity, "suite", s.suite)
	c.readLoop(s)
	a.Close()
}

// ctx is cancelled when the Conn closes.
func (c *Conn) ctx() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		select {
		case <-c.closed:
		case <-ctx.Done():
		}
		cancel()
	}()
	return ctx
}

func (c *Conn) countFailure(err error) {
	switch {
	case errors.Is(err, ErrUnknownIdentity):
		c.st.hsFailed[reasonUnknownIdentity].Add(1)
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		c.st.hsFailed[reasonTimeout].Add(1)
	default:
		// Alerts and protocol errors (a wrong key mostly times out).
		c.st.hsFailed[reasonBadKey].Add(1)
	}
}

// add enters an established session; a session already named by the same
// address is replaced (the peer handshook again from it). It reports false
// when the Conn is closed.
func (c *Conn) add(s *session) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	select {
	case <-c.closed:
		return false
	default:
	}
	if old, ok := c.sessions[s.name]; ok && old != s {
		c.dropLocked(old)
		go old.conn.Close()
	}
	c.sessions[s.name] = s
	c.byID[s.identity] = s
	c.st.sessions.Add(1)
	return true
}

func (c *Conn) dropLocked(s *session) {
	if c.sessions[s.name] == s {
		delete(c.sessions, s.name)
		if s.ready {
			c.st.sessions.Add(-1)
		}
	}
	if c.byID[s.identity] == s {
		delete(c.byID, s.identity)
	}
}

func (c *Conn) remove(s *session) {
	c.mu.Lock()
	c.dropLocked(s)
	c.mu.Unlock()
}

func (c *Conn) readLoop(s *session) {
	defer c.remove(s)
	defer s.conn.Close()
	buf := make([]byte, 65536)
	for {
		n, err := s.conn.Read(buf)
		if err != nil {
			// Records that fail authentication or replay checks are
			// dropped inside pion without surfacing here; an error is the
			// end of the session (close alert, Close, idle reap).
			return
		}
		s.lastUsed.Store(time.Now().UnixNano())
		s.unanswered.Store(0)
		if ra := addrPort(s.conn.RemoteAddr()); ra != *s.remote.Load() {
			s.remote.Store(&ra)
			c.st.rebinds.Add(1)
			c.log.Debug("esrodtls: peer moved", "peer", s.name, "identity", s.identity, "to", ra)
		}
		p := packet{b: append([]byte(nil), buf[:n]...), from: s.name}
		select {
		case c.in <- p:
			c.st.recv.Add(1)
		case <-c.closed:
			return
		}
	}
}

// reapLoop closes idle sessions.
func (c *Conn) reapLoop() {
	defer c.wg.Done()
	tick := time.NewTicker(min(c.cfg.IdleTimeout/4, time.Minute))
	defer tick.Stop()
	for {
		select {
		case <-c.closed:
			return
		case now := <-tick.C:
			var idle []*session
			c.mu.Lock()
			for _, s := range c.sessions {
				if s.ready && now.Sub(time.Unix(0, s.lastUsed.Load())) > c.cfg.IdleTimeout {
					c.dropLocked(s)
					idle = append(idle, s)
				}
			}
			c.mu.Unlock()
			for _, s := range idle {
				s.conn.Close()
			}
		}
	}
}

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

func (c *Conn) dial(s *session) {
	defer c.wg.Done()
	fail := func(err error) {
		c.countFailure(err)
		c.log.Debug("esrodtls: open session", "peer", s.name, "err", err)
		c.remove(s)
	}
	identity, key, err := c.cfg.Credentials(s.name)
	if err != nil {
		fail(err)
		return
	}
	s.identity = identity
	dc, err := c.dtlsConfig(false, identity, key)
	if err != nil {
		fail(err)
		return
	}
	network := "udp4"
	if s.name.Addr().Is6() {
		network = "udp6"
	}
	pc, err := net.ListenUDP(network, nil)
	if err != nil {
		fail(err)
		return
	}
	conn, err := dtls.Client(pc, net.UDPAddrFromAddrPort(s.name), dc)
	if err != nil {
		pc.Close()
		fail(err)
		return
	}
	ctx, cancel := context.WithTimeout(c.ctx(), c.cfg.HandshakeTimeout)
	err = conn.HandshakeContext(ctx)
	cancel()
	if err != nil {
		conn.Close()
		fail(err)
		return
	}
	st, _ := conn.ConnectionState()
	c.st.hsOK.Add(1)
	c.mu.Lock()
	select {
	case <-c.closed:
		c.mu.Unlock()
		conn.Close()
		return
	default:
	}
	s.conn, s.suite, s.ready = conn, st.CipherSuiteID.String(), true
	s.lastUsed.Store(time.Now().UnixNano())
	pending := s.pending
	s.pending = nil
	c.byID[s.identity] = s
	c.st.sessions.Add(1)
	c.mu.Unlock()
	for _, b := range pending {
		if _, err := conn.Write(b); err == nil {
			c.st.sent.Add(1)
		}
	}
	c.readLoop(s)
}

// Peer returns the session named addr (as ReadFrom reported it).
func (c *Conn) Peer(addr netip.AddrPort) (Peer, bool) {
	addr = netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port())
	c.mu.Lock()
	s, ok := c.sessions[addr]
	c.mu.Unlock()
	if !ok || !s.ready {
		return Peer{}, false
	}
	return Peer{Identity: s.identity, Remote: *s.remote.Load(), CipherSuite: s.suite, Server: s.server}, true
}

// SessionFor returns the name of the latest established session whose peer
// has identity, to send to it without a new handshake.
func (c *Conn) SessionFor(identity string) (netip.AddrPort, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s, ok := c.byID[identity]
	if !ok {
		return netip.AddrPort{}, false
	}
	return s.name, true
}

// CloseIdentity ends every session of identity (after its key changed).
func (c *Conn) CloseIdentity(identity string) {
	var gone []*session
	c.mu.Lock()
	for _, s := range c.sessions {
		if s.identity == identity && s.ready {
			c.dropLocked(s)
			gone = append(gone, s)
		}
	}
	c.mu.Unlock()
	for _, s := range gone {
		s.conn.Close()
	}
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

var _ net.PacketConn = (*Conn)(nil)

// EndpointConfig returns a copy of cfg for an esro.Endpoint on a Conn:
// the engine's defences against reflection from forged source addresses
// (the amplification limit and the caps on unproven sources) are off,
// since every peer of a Conn proved its address in the handshake's
// cookie exchange and holds the key; records from anyone else never reach
// the engine. Everything else is cfg's.
func EndpointConfig(cfg *esro.Config) *esro.Config {
	var c esro.Config
	if cfg != nil {
		c = *cfg
	}
	c.AmplificationFactor = -1
	limit := c.MaxInvocations
	if limit <= 0 {
		limit = 65536
	}
	c.MaxUnproven, c.MaxUnprovenPerPrefix, c.MaxUnprovenPerAddr = limit, limit, limit
	return &c
}
