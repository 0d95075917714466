package esrodtls

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/pion/dtls/v3"
)

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
