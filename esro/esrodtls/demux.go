package esrodtls

import (
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/extension"
	"github.com/pion/dtls/v3/pkg/protocol/handshake"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
)

// demux shares the server's UDP socket among DTLS associations, each a
// net.PacketConn that pion's server side runs on. It replaces pion's own
// listener for two reasons:
//
//   - A ClientHello from the address of an association whose handshake is
//     complete starts a new association (RFC 6347 §4.2.8). A device that
//     restarts and reuses its port (a fixed port, or a NAT keeping its
//     mapping) is served at once instead of being fed to its dead session
//     until that one idles out.
//   - The limits on handshakes apply before any association exists, and an
//     association whose client never proves its address (no second
//     datagram, the ClientHello with the cookie) is dropped after
//     cookieWait, so forged sources hold little and briefly.
//
// Records carrying a Connection ID are routed by it, whatever their source
// address (RFC 9146); others by source address.
type demux struct {
	sock   *net.UDPConn
	cidLen int
	// admit is asked for each new association; it starts the handshake
	// or returns false to drop the datagram.
	admit func(a *assoc) bool

	mu     sync.Mutex
	byAddr map[netip.AddrPort]*assoc
	byCID  map[string]*assoc
	closed chan struct{}
	wg     sync.WaitGroup
}

// cookieWait is how long an association may wait for its client's second
// datagram. A genuine client answers the HelloVerifyRequest within a round
// trip, or retransmits its ClientHello within pion's first flight
// interval (1 s).
const cookieWait = 3 * time.Second

type inbound struct {
	b    []byte
	from netip.AddrPort
}

func newDemux(sock *net.UDPConn, cidLen int, admit func(*assoc) bool) *demux {
	d := &demux{sock: sock, cidLen: cidLen, admit: admit, byAddr: map[netip.AddrPort]*assoc{},
		byCID: map[string]*assoc{}, closed: make(chan struct{})}
	d.wg.Add(1)
	go d.readLoop()
	return d
}

func (d *demux) close() error {
	select {
	case <-d.closed:
		return nil
	default:
	}
	close(d.closed)
	err := d.sock.Close()
	d.wg.Wait()
	return err
}

func (d *demux) readLoop() {
	defer d.wg.Done()
	buf := make([]byte, 65536)
	for {
		n, from, err := d.sock.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			select {
			case <-d.closed:
				return
			case <-time.After(10 * time.Millisecond): // e.g. an ICMP error report
			}
			continue
		}
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		d.route(append([]byte(nil), buf[:n]...), from)
	}
}

func (d *demux) route(b []byte, from netip.AddrPort) {
	if a := d.lookup(b, from); a != nil {
		a.deliver(inbound{b, from})
		return
	}
	if !isClientHello(b) {
		return // not for any association, and starts none
	}
	a := &assoc{d: d, raddr: from, in: make(chan inbound, 64), done: make(chan struct{}), dlChanged: make(chan struct{})}
	d.mu.Lock()
	select {
	case <-d.closed:
		d.mu.Unlock()
		return
	default:
	}
	d.mu.Unlock()
	if !d.admit(a) {
		return
	}
	d.mu.Lock()
	d.byAddr[from] = a
	d.mu.Unlock()
	a.deliver(inbound{b, from})
	time.AfterFunc(cookieWait, func() {
		if a.received.Load() < 2 && !a.established.Load() {
			a.Close()
		}
	})
}

// lookup finds the association of a datagram: by Connection ID, else by
// source address, unless it is a ClientHello to an association that has
// completed its handshake (a new one, RFC 6347 §4.2.8).
func (d *demux) lookup(b []byte, from netip.AddrPort) *assoc {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cidLen > 0 && len(b) > 0 && b[0] == byte(protocol.ContentTypeConnectionID) {
		if recs, err := recordlayer.ContentAwareUnpackDatagram(b, d.cidLen); err == nil {
			for _, r := range recs {
				h := recordlayer.Header{ConnectionID: make([]byte, d.cidLen)}
				if h.Unmarshal(r) == nil && h.ContentType == protocol.ContentTypeConnectionID {
					return d.byCID[string(h.ConnectionID)] // nil: unknown id, dropped
				}
			}
		}
		return nil
	}
	a := d.byAddr[from]
	if a != nil && a.established.Load() && isClientHello(b) {
		return nil
	}
	return a
}

// isClientHello reports whether b starts with an epoch-0 handshake record
// holding a ClientHello.
func isClientHello(b []byte) bool {
	var h recordlayer.Header
	if h.Unmarshal(b) != nil || h.ContentType != protocol.ContentTypeHandshake || h.Epoch != 0 {
		return false
	}
	off := recordlayer.FixedHeaderSize
	return len(b) > off && handshake.Type(b[off]) == handshake.TypeClientHello
}

// serverHelloCID returns the Connection ID a ServerHello in b gives the
// client to use, which routes the client's records to this association.
func serverHelloCID(b []byte) (string, bool) {
	recs, err := recordlayer.UnpackDatagram(b)
	if err != nil {
		return "", false
	}
	for _, r := range recs {
		var h recordlayer.Header
		if h.Unmarshal(r) != nil || h.ContentType != protocol.ContentTypeHandshake || h.Epoch != 0 {
			continue
		}
		var hh handshake.Header
		body := r[recordlayer.FixedHeaderSize:]
		if hh.Unmarshal(body) != nil || hh.Type != handshake.TypeServerHello {
			continue
		}
		var sh handshake.MessageServerHello
		if sh.Unmarshal(body[handshake.HeaderLength:]) != nil {
			continue
		}
		for _, ext := range sh.Extensions {
			if e, ok := ext.(*extension.ConnectionID); ok && len(e.CID) > 0 {
				return string(e.CID), true
			}
		}
	}
	return "", false
}

// assoc is one association's view of the socket.
type assoc struct {
	d           *demux
	raddr       netip.AddrPort // the address its first ClientHello came from
	in          chan inbound
	done        chan struct{}
	once        sync.Once
	established atomic.Bool
	received    atomic.Int64
	cids        []string // routed here; guarded by d.mu

	dlMu      sync.Mutex
	dl        time.Time
	dlChanged chan struct{} // closed and replaced when dl changes
}

func (a *assoc) deliver(p inbound) {
	a.received.Add(1)
	select {
	case a.in <- p:
	case <-a.done:
	default: // the association is not reading: drop, as a full socket buffer would
	}
}

func (a *assoc) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		a.dlMu.Lock()
		dl, changed := a.dl, a.dlChanged
		a.dlMu.Unlock()
		var timeout <-chan time.Time
		if !dl.IsZero() {
			d := time.Until(dl)
			if d <= 0 {
				return 0, nil, &net.OpError{Op: "read", Net: "udp", Err: errTimeout{}}
			}
			t := time.NewTimer(d)
			defer t.Stop()
			timeout = t.C
		}
		select {
		case p := <-a.in:
			return copy(b, p.b), net.UDPAddrFromAddrPort(p.from), nil
		case <-a.done:
			return 0, nil, net.ErrClosed
		case <-timeout:
			return 0, nil, &net.OpError{Op: "read", Net: "udp", Err: errTimeout{}}
		case <-changed:
		}
	}
}

func (a *assoc) WriteTo(b []byte, addr net.Addr) (int, error) {
	select {
	case <-a.done:
		return 0, net.ErrClosed
	default:
	}
	if cid, ok := serverHelloCID(b); ok {
		a.d.mu.Lock()
		if a.d.byCID[cid] != a {
			a.d.byCID[cid] = a
			a.cids = append(a.cids, cid)
		}
		a.d.mu.Unlock()
	}
	return a.d.sock.WriteToUDPAddrPort(b, addrPort(addr))
}

func (a *assoc) Close() error {
	a.once.Do(func() {
		close(a.done)
		a.d.mu.Lock()
		if a.d.byAddr[a.raddr] == a {
			delete(a.d.byAddr, a.raddr)
		}
		for _, k := range a.cids {
			if a.d.byCID[k] == a {
				delete(a.d.byCID, k)
			}
		}
		a.d.mu.Unlock()
	})
	return nil
}

func (a *assoc) LocalAddr() net.Addr { return a.d.sock.LocalAddr() }

func (a *assoc) SetDeadline(t time.Time) error { return a.SetReadDeadline(t) }

func (a *assoc) SetReadDeadline(t time.Time) error {
	a.dlMu.Lock()
	a.dl = t
	close(a.dlChanged)
	a.dlChanged = make(chan struct{})
	a.dlMu.Unlock()
	return nil
}

// SetWriteDeadline has no effect: a UDP send does not wait for the peer.
func (a *assoc) SetWriteDeadline(time.Time) error { return nil }
