package gateway

import (
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/esro-emsdp/emsdp/internal/clientaddr"
)

// The limits a connection can be refused for (InboundOptions.OnRefused).
const (
	LimitTotal = "total" // InboundOptions.MaxConns
	LimitIP    = "ip"    // InboundOptions.MaxConnsPerIP
)

// Defaults of the refusal path.
const (
	// defaultRefuseTimeout bounds the write of a 421. The reply is one
	// short line into an empty socket buffer, so it only waits on a
	// client that advertises no receive window.
	defaultRefuseTimeout = time.Second
	// maxRefusing bounds the refusals being written at once per
	// listener: beyond it a connection is closed without a reply, so that
	// a flood cannot hold more descriptors than this.
	maxRefusing = 64
)

// connLimits counts the sessions of an InboundServer, in all and per
// client, against limits that may change while it serves.
type connLimits struct {
	mu              sync.Mutex
	maxTotal, maxIP int // 0 = no limit
	n               int
	// byIP counts per client key even without a per-client limit, so
	// that one set later (SIGHUP) starts from the true counts. Keys at 0
	// are deleted: the map holds only clients with open sessions.
	byIP map[netip.Addr]int
}

func (l *connLimits) set(total, perIP int) {
	l.mu.Lock()
	l.maxTotal, l.maxIP = max(total, 0), max(perIP, 0)
	l.mu.Unlock()
}

// acquire counts a connection from the client key ip (invalid: not an
// IP connection, which only the total limit applies to) or returns the
// limit it is over, LimitIP before LimitTotal.
func (l *connLimits) acquire(ip netip.Addr) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if ip.IsValid() && l.maxIP > 0 && l.byIP[ip] >= l.maxIP {
		return LimitIP
	}
	if l.maxTotal > 0 && l.n >= l.maxTotal {
		return LimitTotal
	}
	l.n++
	if ip.IsValid() {
		if l.byIP == nil {
			l.byIP = map[netip.Addr]int{}
		}
		l.byIP[ip]++
	}
	return ""
}

// release undoes one acquire of ip.
func (l *connLimits) release(ip netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.n--
	if ip.IsValid() {
		if l.byIP[ip] <= 1 {
			delete(l.byIP, ip)
		} else {
			l.byIP[ip]--
		}
	}
}

// crowded reports whether more than three quarters of the session limit
// are in use: requests then get InboundOptions.StressReadTimeout.
func (l *connLimits) crowded() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.maxTotal > 0 && l.n*4 > l.maxTotal*3
}

func (l *connLimits) sessions() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n
}

// clientKey is what the per-client limit counts a remote address as: an
// IPv4 address, or the /64 prefix of an IPv6 address, since a subscriber
// usually has a whole /64 and can use every address in it. Addresses
// that are not IP (tests' pipes, Unix sockets) give the invalid Addr.
func clientKey(a net.Addr) netip.Addr {
	var ip netip.Addr
	switch a := a.(type) {
	case nil:
		return ip
	case *net.TCPAddr:
		ip, _ = netip.AddrFromSlice(a.IP)
	default:
		if ap, err := netip.ParseAddrPort(a.String()); err == nil {
			ip = ap.Addr()
		}
	}
	return clientaddr.Group(ip)
}

// limitListener counts the connections it accepts in lim; one over a
// limit is answered 421 and closed in a goroutine of its own, bounded by
// timeout, so that it never becomes an SMTP session and never holds up
// the next Accept.
type limitListener struct {
	net.Listener
	lim         *connLimits
	reply       []byte
	timeout     time.Duration
	maxRefusing int
	onRefused   func(limit string) // nil: none
	log         *slog.Logger

	mu       sync.Mutex
	closed   bool
	refusing map[net.Conn]struct{}
	wg       sync.WaitGroup // refusals being written
}

func newLimitListener(ln net.Listener, lim *connLimits, domain string, timeout time.Duration,
	onRefused func(string), log *slog.Logger) *limitListener {
	return &limitListener{
		Listener: ln, lim: lim, timeout: timeout, maxRefusing: maxRefusing, onRefused: onRefused, log: log,
		// RFC 5321 §3.8, §4.2.3: 421 is how a server that cannot serve
		// says so, at the greeting as after any command; the client
		// retries later. The enhanced code is RFC 3463's 4.7.0 (security
		// or policy), as other MTAs give for connection limits.
		reply:    fmt.Appendf(nil, "421 4.7.0 %s Too many connections, try again later\r\n", domain),
		refusing: map[net.Conn]struct{}{},
	}
}

// Accept returns the next connection within the limits.
func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		ip := clientKey(c.RemoteAddr())
		limit := l.lim.acquire(ip)
		if limit == "" {
			return &limitConn{Conn: c, lim: l.lim, ip: ip}, nil
		}
		l.refuse(c, limit)
	}
}

func (l *limitListener) refuse(c net.Conn, limit string) {
	if l.onRefused != nil {
		l.onRefused(limit)
	}
	l.log.Debug("smtp: connection refused", "limit", limit, "remote", c.RemoteAddr())
	l.mu.Lock()
	if l.closed || len(l.refusing) >= l.maxRefusing {
		l.mu.Unlock()
		c.Close()
		return
	}
	l.refusing[c] = struct{}{}
	l.wg.Add(1) // under mu, so never after Close began to Wait
	l.mu.Unlock()
	go func() {
		defer l.wg.Done()
		c.SetWriteDeadline(time.Now().Add(l.timeout))
		c.Write(l.reply) // an error (deadline, reset) leaves nothing to do but close
		c.Close()
		l.mu.Lock()
		delete(l.refusing, c)
		l.mu.Unlock()
	}()
}

// Close closes the listener, aborts the refusals being written and
// waits for their goroutines.
func (l *limitListener) Close() error {
	err := l.Listener.Close()
	l.mu.Lock()
	l.closed = true
	var pending []net.Conn
	for c := range l.refusing {
		pending = append(pending, c)
	}
	l.mu.Unlock()
	for _, c := range pending {
		c.Close()
	}
	l.wg.Wait()
	return err
}

// limitConn is an accepted connection, counted until it is closed.
type limitConn struct {
	net.Conn
	lim  *connLimits
	ip   netip.Addr
	once sync.Once
}

// Close releases the connection's count once, however often it is
// called (go-smtp and InboundServer may both close it), and before the
// socket closes, so that a client that has seen its connection end can
// count on its place being free.
func (c *limitConn) Close() error {
	c.once.Do(func() { c.lim.release(c.ip) })
	return c.Conn.Close()
}
