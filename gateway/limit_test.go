package gateway

import (
	"bufio"
	"errors"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const tooMany = "421 4.7.0 mx.emsd.example.test Too many connections, try again later"

// lineConn is a raw SMTP client connection.
type lineConn struct {
	c net.Conn
	r *bufio.Reader
}

// dialFrom connects to addr from the local address from (Linux answers
// on all of 127/8, so clients can differ by address on loopback).
func dialFrom(t *testing.T, addr, from string) *lineConn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
	c, err := d.Dial("tcp", addr)
	if errors.Is(err, syscall.EADDRNOTAVAIL) {
		t.Skipf("no local address %s on this system", from)
	}
	if err != nil {
		t.Fatal(err)
	}
	// Only so that a broken server fails the test instead of hanging it.
	c.SetDeadline(time.Now().Add(10 * time.Second))
	t.Cleanup(func() { c.Close() })
	return &lineConn{c, bufio.NewReader(c)}
}

func (l *lineConn) line(t *testing.T) string {
	t.Helper()
	s, err := l.r.ReadString('\n')
	if err != nil {
		t.Fatalf("read: %v (got %q)", err, s)
	}
	return strings.TrimSuffix(s, "\r\n")
}

func (l *lineConn) cmd(t *testing.T, cmd string) string {
	t.Helper()
	if _, err := io.WriteString(l.c, cmd+"\r\n"); err != nil {
		t.Fatal(err)
	}
	return l.line(t)
}

// closed checks that the server closed the connection without another
// reply.
func (l *lineConn) closed(t *testing.T) {
	t.Helper()
	if rest, err := io.ReadAll(l.r); err != nil || len(rest) > 0 {
		t.Fatalf("after the last reply: %q, %v; want the connection closed", rest, err)
	}
}

// quit ends a session; when the client sees the connection closed, the
// server has released its count (limitConn.Close releases first).
func (l *lineConn) quit(t *testing.T) {
	t.Helper()
	if got := l.cmd(t, "QUIT"); !strings.HasPrefix(got, "221 ") {
		t.Fatalf("QUIT: %q", got)
	}
	l.closed(t)
}

// The limits over real connections: a client over its own limit or over
// the total gets 421 and is closed; other clients still get in; a place
// freed is free at once; SetConnLimits applies to the next connection.
func TestInboundConnLimits(t *testing.T) {
	type step struct {
		op     string // "open", "quit", "noop", "set"
		name   string // connection (open, quit, noop)
		from   string // open: local address
		refuse string // open: "" = 220 expected, else the limit refused for
		total  int    // set
		perIP  int    // set
	}
	open := func(name, from, refuse string) step { return step{op: "open", name: name, from: from, refuse: refuse} }
	quit := func(name string) step { return step{op: "quit", name: name} }
	for _, tc := range []struct {
		name         string
		total, perIP int
		steps        []step
	}{
		{"per client", 0, 2, []step{
			open("a1", "127.0.0.1", ""), open("a2", "127.0.0.1", ""), open("a3", "127.0.0.1", LimitIP),
			open("b1", "127.0.0.2", ""), quit("a1"), open("a4", "127.0.0.1", ""), open("a5", "127.0.0.1", LimitIP),
		}},
		{"total", 2, 0, []step{
			open("a1", "127.0.0.1", ""), open("b1", "127.0.0.2", ""), open("c1", "127.0.0.3", LimitTotal),
			quit("b1"), open("c2", "127.0.0.3", ""), open("a2", "127.0.0.1", LimitTotal),
		}},
		{"both: the client's own limit named first", 2, 1, []step{
			open("a1", "127.0.0.1", ""), open("a2", "127.0.0.1", LimitIP), open("b1", "127.0.0.2", ""),
			open("a3", "127.0.0.1", LimitIP), open("c1", "127.0.0.3", LimitTotal),
		}},
		{"no limits", 0, 0, []step{
			open("a1", "127.0.0.1", ""), open("a2", "127.0.0.1", ""), open("a3", "127.0.0.1", ""),
			open("a4", "127.0.0.1", ""), open("a5", "127.0.0.1", ""),
		}},
		{"changed while serving", 1, 0, []step{
			open("a1", "127.0.0.1", ""), open("b1", "127.0.0.2", LimitTotal),
			{op: "set", perIP: 1}, open("b2", "127.0.0.2", ""), open("a2", "127.0.0.1", LimitIP),
			{op: "set", total: 1}, {op: "noop", name: "a1"}, {op: "noop", name: "b2"}, open("c1", "127.0.0.3", LimitTotal),
			quit("a1"), open("c2", "127.0.0.3", LimitTotal), quit("b2"), open("c3", "127.0.0.3", ""),
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			refused := map[string]int{}
			s, addr, _ := startInbound(t, &testReceiver{}, InboundOptions{MaxConns: tc.total, MaxConnsPerIP: tc.perIP,
				OnRefused: func(limit string) {
					mu.Lock()
					refused[limit]++
					mu.Unlock()
				}})
			conns := map[string]*lineConn{}
			wantRefused := map[string]int{}
			for i, st := range tc.steps {
				switch st.op {
				case "open":
					c := dialFrom(t, addr, st.from)
					got := c.line(t)
					if st.refuse == "" {
						if !strings.HasPrefix(got, "220 ") {
							t.Fatalf("step %d: %s from %s: %q, want 220", i, st.name, st.from, got)
						}
						conns[st.name] = c
						break
					}
					if got != tooMany {
						t.Fatalf("step %d: %s from %s: %q, want %q", i, st.name, st.from, got, tooMany)
					}
					c.closed(t)
					wantRefused[st.refuse]++
				case "quit":
					conns[st.name].quit(t)
					delete(conns, st.name)
				case "noop":
					if got := conns[st.name].cmd(t, "NOOP"); !strings.HasPrefix(got, "250 ") {
						t.Fatalf("step %d: NOOP on %s: %q", i, st.name, got)
					}
				case "set":
					s.SetConnLimits(st.total, st.perIP)
				}
				if n := s.Sessions(); n != len(conns) {
					t.Fatalf("step %d: %d sessions, want %d", i, n, len(conns))
				}
			}
			mu.Lock()
			if !maps.Equal(refused, wantRefused) {
				t.Errorf("refused %v, want %v", refused, wantRefused)
			}
			mu.Unlock()
			for _, c := range conns {
				c.quit(t)
			}
			s.lim.mu.Lock()
			defer s.lim.mu.Unlock()
			if s.lim.n != 0 || len(s.lim.byIP) != 0 {
				t.Errorf("after all closed: %d sessions, per client %v", s.lim.n, s.lim.byIP)
			}
		})
	}
}

// chanListener accepts the connections sent on conns.
type chanListener struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func newChanListener() *chanListener {
	return &chanListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *chanListener) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 25} }

// remoteConn gives a pipe a client address.
type remoteConn struct {
	net.Conn
	remote net.Addr
}

func (c remoteConn) RemoteAddr() net.Addr { return c.remote }

// pipeListener is a limitListener over a chanListener, with its Accept
// results on accepted (closed when Accept fails).
type pipeListener struct {
	ll       *limitListener
	in       *chanListener
	accepted chan net.Conn
	mu       sync.Mutex
	refused  []string
}

func newPipeListener(t *testing.T, lim *connLimits, timeout time.Duration, refusing int) *pipeListener {
	p := &pipeListener{in: newChanListener(), accepted: make(chan net.Conn)}
	p.ll = newLimitListener(p.in, lim, "mx.emsd.example.test", timeout, func(limit string) {
		p.mu.Lock()
		p.refused = append(p.refused, limit)
		p.mu.Unlock()
	}, slog.New(slog.DiscardHandler))
	p.ll.maxRefusing = refusing
	go func() {
		defer close(p.accepted)
		for {
			c, err := p.ll.Accept()
			if err != nil {
				return
			}
			p.accepted <- c
		}
	}()
	t.Cleanup(func() {
		p.ll.Close()
		for c := range p.accepted { // until Accept has returned
			c.Close()
		}
	})
	return p
}

// connect hands the listener a connection from ip and returns the
// client's end.
func (p *pipeListener) connect(t *testing.T, ip string) net.Conn {
	t.Helper()
	server, client := net.Pipe()
	client.SetDeadline(time.Now().Add(10 * time.Second)) // a broken server fails the test, not hangs it
	t.Cleanup(func() { client.Close() })
	addr := net.TCPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(ip), 4000))
	select {
	case p.in.conns <- remoteConn{server, addr}:
	case <-time.After(10 * time.Second):
		t.Fatal("the listener does not accept")
	}
	return client
}

func (p *pipeListener) next(t *testing.T) net.Conn {
	t.Helper()
	select {
	case c := <-p.accepted:
		return c
	case <-time.After(10 * time.Second):
		t.Fatal("Accept did not return")
	}
	return nil
}

// within waits for f to return; the bound only keeps a broken refusal
// path from hanging the test.
func within(t *testing.T, what string, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: still blocked", what)
	}
}

// A client that never reads holds a refusal only until the write
// deadline: the server then closes the connection, which the client's
// own blocked write sees.
func TestLimitListenerRefusalDeadline(t *testing.T) {
	lim := &connLimits{}
	lim.set(1, 0)
	p := newPipeListener(t, lim, time.Millisecond, maxRefusing)
	p.connect(t, "192.0.2.1")
	first := p.next(t)
	defer first.Close()
	quiet := p.connect(t, "192.0.2.2") // never reads: the 421 cannot be written
	within(t, "the refused client's write", func() {
		// A pipe write completes only when the other end reads or closes;
		// the server reads nothing from a refused connection.
		if _, err := quiet.Write([]byte("EHLO quiet.example\r\n")); !errors.Is(err, io.ErrClosedPipe) {
			t.Errorf("write: %v, want the server to have closed", err)
		}
	})
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.refused) != 1 || p.refused[0] != LimitTotal {
		t.Errorf("refused %v", p.refused)
	}
}

// A refusal being written holds up neither the next Accept nor Close;
// beyond maxRefusing refusals at once a connection is closed without a
// reply; Close aborts the refusals it finds and waits for them.
func TestLimitListenerRefusalsDoNotBlock(t *testing.T) {
	lim := &connLimits{}
	lim.set(1, 0)
	p := newPipeListener(t, lim, time.Hour, 1)
	p.connect(t, "192.0.2.1")
	first := p.next(t)
	quiet := p.connect(t, "192.0.2.2") // its 421 waits for a read that never comes
	dropped := p.connect(t, "192.0.2.3")
	within(t, "the second refused client's read", func() {
		if b, err := io.ReadAll(dropped); err != nil || len(b) > 0 {
			t.Errorf("read %q, %v; want the connection closed without a reply (one refusal at a time)", b, err)
		}
	})
	first.Close()
	p.connect(t, "192.0.2.4")
	p.next(t).Close() // accepted while the first refusal is still pending
	within(t, "Close", func() { p.ll.Close() })
	p.ll.mu.Lock()
	pending := len(p.ll.refusing)
	p.ll.mu.Unlock()
	if pending != 0 {
		t.Errorf("%d refusals left after Close", pending)
	}
	if b, err := io.ReadAll(quiet); err != nil || len(b) > 0 {
		t.Errorf("refused client read %q, %v; want the connection closed by Close", b, err)
	}
	if n := lim.sessions(); n != 0 {
		t.Errorf("%d sessions after all closed", n)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if want := []string{LimitTotal, LimitTotal}; !slices.Equal(p.refused, want) {
		t.Errorf("refused %v, want %v", p.refused, want)
	}
}

// Closing a connection twice releases its place once; IPv6 clients are
// counted per /64, IPv4 clients per address.
func TestLimitConnRelease(t *testing.T) {
	for _, tc := range []struct {
		name         string
		first        string
		closes       int
		next         []string // connected in turn after first is closed
		wantRefusals []string // "" = accepted
	}{
		{"closed twice, then two from the same address", "192.0.2.1", 2, []string{"192.0.2.1", "192.0.2.1"}, []string{"", LimitIP}},
		{"closed once", "192.0.2.1", 1, []string{"192.0.2.1", "192.0.2.1"}, []string{"", LimitIP}},
		{"IPv6: the /64 counts", "2001:db8::1", 3, []string{"2001:db8::2", "2001:db8::ffff:3", "2001:db8:0:1::1"},
			[]string{"", LimitIP, ""}},
		{"IPv4: each address counts", "192.0.2.1", 2, []string{"192.0.2.1", "192.0.2.2", "192.0.2.1"}, []string{"", "", LimitIP}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lim := &connLimits{}
			lim.set(0, 1)
			p := newPipeListener(t, lim, time.Hour, maxRefusing)
			p.connect(t, tc.first)
			c := p.next(t)
			for range tc.closes {
				c.Close()
			}
			if n := lim.sessions(); n != 0 {
				t.Fatalf("%d sessions after %d closes, want 0", n, tc.closes)
			}
			var open []net.Conn
			for i, ip := range tc.next {
				client := p.connect(t, ip)
				if tc.wantRefusals[i] == "" {
					open = append(open, p.next(t))
					continue
				}
				r := bufio.NewReader(client)
				if got, err := r.ReadString('\n'); got != tooMany+"\r\n" || err != nil {
					t.Fatalf("%s: %q, %v; want %q", ip, got, err, tooMany)
				}
			}
			if n := lim.sessions(); n != len(open) {
				t.Errorf("%d sessions, want %d", n, len(open))
			}
			for _, c := range open {
				c.Close()
				c.Close()
			}
			lim.mu.Lock()
			defer lim.mu.Unlock()
			if lim.n != 0 || len(lim.byIP) != 0 {
				t.Errorf("after all closed: %d sessions, per client %v", lim.n, lim.byIP)
			}
		})
	}
}

func TestClientKey(t *testing.T) {
	for _, tc := range []struct {
		addr net.Addr
		want string // "" = invalid: no per-client limit
	}{
		{&net.TCPAddr{IP: net.ParseIP("192.0.2.1"), Port: 25}, "192.0.2.1"},
		{&net.TCPAddr{IP: net.ParseIP("::ffff:192.0.2.1"), Port: 25}, "192.0.2.1"},
		{&net.TCPAddr{IP: net.ParseIP("2001:db8:1:2:3:4:5:6"), Port: 25}, "2001:db8:1:2::"},
		{&net.TCPAddr{IP: net.ParseIP("fe80::1:2"), Port: 25, Zone: "eth0"}, "fe80::"},
		{&net.UDPAddr{IP: net.ParseIP("2001:db8::1"), Port: 25}, "2001:db8::"},
		{&net.UnixAddr{Name: "/run/smtp.sock", Net: "unix"}, ""},
		{nil, ""},
	} {
		got := clientKey(tc.addr)
		if (tc.want == "" && got.IsValid()) || (tc.want != "" && got != netip.MustParseAddr(tc.want)) {
			t.Errorf("%v: %v, want %q", tc.addr, got, tc.want)
		}
	}
}
