package esrodtls

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/esro"
	"github.com/pion/dtls/v3"
	"go.uber.org/goleak"
)

type dtlsSuite = dtls.CipherSuiteID

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var (
	devKey   = []byte("0123456789abcdef")
	devIdent = "device@example.org"
)

func keys(id string) ([]byte, error) {
	if id == devIdent {
		return devKey, nil
	}
	return nil, ErrUnknownIdentity
}

func listen(t testing.TB, cfg Config) *Conn {
	t.Helper()
	if cfg.PSK == nil {
		cfg.PSK = keys
	}
	c, err := Listen("udp4", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func client(t *testing.T, id string, key []byte, cfg Config) *Conn {
	t.Helper()
	cfg.Credentials = func(netip.AddrPort) (string, []byte, error) { return id, key, nil }
	c, err := NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func addrOf(c *Conn) netip.AddrPort { return addrPort(c.LocalAddr()) }

func readOne(t *testing.T, c *Conn, within time.Duration) ([]byte, netip.AddrPort, error) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(within))
	buf := make([]byte, 2048)
	n, a, err := c.ReadFrom(buf)
	if err != nil {
		return nil, netip.AddrPort{}, err
	}
	return buf[:n], addrPort(a), nil
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestESROOverDTLS runs an esro.Endpoint on each side, unchanged, and checks
// that the performer learns the invoker's PSK identity.
func TestESROOverDTLS(t *testing.T) {
	for _, suite := range DefaultCipherSuites() {
		t.Run(suite.String(), func(t *testing.T) {
			srv := listen(t, Config{CipherSuites: DefaultCipherSuites()})
			sep, err := esro.NewEndpoint(srv, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer sep.Close()
			var gotID atomic.Value
			sep.HandleFunc(2, esro.ThreeWay, func(ctx context.Context, w esro.ResponseWriter, inv *esro.Invocation) {
				p, _ := srv.Peer(inv.Peer)
				gotID.Store(p.Identity)
				w.Result(inv.Encoding, append([]byte("echo:"), inv.Data...))
			})
			cl := client(t, devIdent, devKey, Config{CipherSuites: []dtlsSuite{suite}})
			cep, err := esro.NewEndpoint(cl, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer cep.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			for i := range 3 {
				res, err := cep.Invoke(ctx, &esro.Request{To: addrOf(srv), SAP: 2, Operation: 1, Handshake: esro.ThreeWay, Data: []byte{byte(i), 'x'}})
				if err != nil {
					t.Fatalf("invoke %d: %v", i, err)
				}
				if want := []byte{'e', 'c', 'h', 'o', ':', byte(i), 'x'}; !bytes.Equal(res.Data, want) {
					t.Fatalf("result %q, want %q", res.Data, want)
				}
			}
			if id, _ := gotID.Load().(string); id != devIdent {
				t.Fatalf("performer saw identity %q, want %q", id, devIdent)
			}
			if st := srv.Stats(); st.HandshakesOK != 1 || st.Sessions != 1 {
				t.Fatalf("server stats %+v, want one handshake and one session", st)
			}
			p, ok := srv.Peer(mustSession(t, srv, devIdent))
			if !ok || p.CipherSuite != suite.String() {
				t.Fatalf("peer %+v, want suite %v", p, suite)
			}
		})
	}
}

func mustSession(t *testing.T, c *Conn, id string) netip.AddrPort {
	t.Helper()
	a, ok := c.SessionFor(id)
	if !ok {
		t.Fatalf("no session for %q", id)
	}
	return a
}

// TestHandshakeFailures: a wrong key and an unknown identity never deliver a
// datagram and are counted by reason on the server.
func TestHandshakeFailures(t *testing.T) {
	cases := []struct {
		name, id string
		key      []byte
		reason   string
	}{
		// A Finished that does not decrypt is dropped like any forged
		// record, so a wrong key ends in the handshake timeout.
		{"wrong key", devIdent, []byte("fedcba9876543210"), "timeout"},
		{"unknown identity", "stranger@example.org", devKey, "unknown_identity"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv := listen(t, Config{HandshakeTimeout: 2 * time.Second})
			cl := client(t, tc.id, tc.key, Config{HandshakeTimeout: 2 * time.Second})
			if _, err := cl.WriteTo([]byte("secret mail"), net.UDPAddrFromAddrPort(addrOf(srv))); err != nil {
				t.Fatal(err)
			}
			waitFor(t, tc.reason, func() bool { return srv.Stats().HandshakesFailed[tc.reason] == 1 })
			if _, _, err := readOne(t, srv, 200*time.Millisecond); err == nil {
				t.Fatal("server delivered a datagram from a failed handshake")
			}
			waitFor(t, "client failure", func() bool {
				st := cl.Stats()
				var n uint64
				for _, v := range st.HandshakesFailed {
					n += v
				}
				return n == 1
			})
			if st := srv.Stats(); st.HandshakesOK != 0 || st.Sessions != 0 {
				t.Fatalf("server stats %+v", st)
			}
		})
	}
}

// relay is a UDP man in the middle on loopback: the client talks to its
// address, and it forwards to the server from a socket it can replace (a NAT
// rebinding), and lets a test tamper with client records.
type relay struct {
	t      *testing.T
	front  *net.UDPConn
	target *net.UDPAddr

	mu     sync.Mutex
	back   *net.UDPConn
	client *net.UDPAddr
	tamper func([]byte) [][]byte // client->server datagrams; nil: as is
	mute   bool                  // drop server->client datagrams
	seen   [][]byte              // client->server datagrams, as received
	wg     sync.WaitGroup
}

func newRelay(t *testing.T, target netip.AddrPort) *relay {
	front, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	r := &relay{t: t, front: front, target: net.UDPAddrFromAddrPort(target)}
	r.rebind()
	r.wg.Add(1)
	go r.forward()
	t.Cleanup(r.close)
	return r
}

func (r *relay) addr() netip.AddrPort { return addrPort(r.front.LocalAddr()) }

// rebind replaces the server-facing socket: the server sees a new source.
func (r *relay) rebind() netip.AddrPort {
	back, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		r.t.Fatal(err)
	}
	r.mu.Lock()
	old := r.back
	r.back = back
	r.mu.Unlock()
	r.wg.Add(1)
	go r.backward(back)
	if old != nil {
		old.Close()
	}
	return addrPort(back.LocalAddr())
}

func (r *relay) forward() {
	defer r.wg.Done()
	buf := make([]byte, 65536)
	for {
		n, from, err := r.front.ReadFromUDP(buf)
		if err != nil {
			return
		}
		b := append([]byte(nil), buf[:n]...)
		r.mu.Lock()
		r.client = from
		r.seen = append(r.seen, b)
		back, tamper := r.back, r.tamper
		r.mu.Unlock()
		out := [][]byte{b}
		if tamper != nil {
			out = tamper(b)
		}
		for _, d := range out {
			back.WriteToUDP(d, r.target)
		}
	}
}

func (r *relay) backward(back *net.UDPConn) {
	defer r.wg.Done()
	buf := make([]byte, 65536)
	for {
		n, _, err := back.ReadFromUDP(buf)
		if err != nil {
			return
		}
		r.mu.Lock()
		c, mute := r.client, r.mute
		r.mu.Unlock()
		if c != nil && !mute {
			r.front.WriteToUDP(buf[:n], c)
		}
	}
}

func (r *relay) close() {
	r.front.Close()
	r.mu.Lock()
	r.back.Close()
	r.mu.Unlock()
	r.wg.Wait()
}

func (r *relay) setTamper(f func([]byte) [][]byte) {
	r.mu.Lock()
	r.tamper = f
	r.mu.Unlock()
}

func (r *relay) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.seen)
}

// established opens a session from a client through a relay and returns the
// server-side name of the session.
func established(t *testing.T, srv, cl *Conn, r *relay) netip.AddrPort {
	t.Helper()
	if _, err := cl.WriteTo([]byte("hello"), net.UDPAddrFromAddrPort(r.addr())); err != nil {
		t.Fatal(err)
	}
	b, from, err := readOne(t, srv, 15*time.Second)
	if err != nil || string(b) != "hello" {
		t.Fatalf("first datagram %q, %v", b, err)
	}
	return from
}

// TestConnectionIDRebinding: the client's address changes mid-session; its
// records still reach the same session name, the answer follows it, and the
// rebinding is counted.
func TestConnectionIDRebinding(t *testing.T) {
	srv := listen(t, Config{})
	r := newRelay(t, addrOf(srv))
	cl := client(t, devIdent, devKey, Config{})
	name := established(t, srv, cl, r)
	moved := r.rebind()
	if _, err := cl.WriteTo([]byte("after move"), net.UDPAddrFromAddrPort(r.addr())); err != nil {
		t.Fatal(err)
	}
	b, from, err := readOne(t, srv, 10*time.Second)
	if err != nil || string(b) != "after move" || from != name {
		t.Fatalf("after rebinding got %q from %v (%v), want it from session %v", b, from, err, name)
	}
	p, _ := srv.Peer(name)
	if p.Remote != moved {
		t.Fatalf("peer remote %v, want %v", p.Remote, moved)
	}
	if _, err := srv.WriteTo([]byte("reply"), net.UDPAddrFromAddrPort(name)); err != nil {
		t.Fatal(err)
	}
	b, _, err = readOne(t, cl, 10*time.Second)
	if err != nil || string(b) != "reply" {
		t.Fatalf("reply after rebinding %q, %v", b, err)
	}
	if st := srv.Stats(); st.Rebinds != 1 || st.HandshakesOK != 1 {
		t.Fatalf("stats %+v, want 1 rebind and 1 handshake", st)
	}

	t.Run("without connection ids the session is lost", func(t *testing.T) {
		srv := listen(t, Config{NoConnectionID: true})
		r := newRelay(t, addrOf(srv))
		cl := client(t, devIdent, devKey, Config{NoConnectionID: true})
		established(t, srv, cl, r)
		r.rebind()
		cl.WriteTo([]byte("after move"), net.UDPAddrFromAddrPort(r.addr()))
		if b, _, err := readOne(t, srv, 500*time.Millisecond); err == nil {
			t.Fatalf("without CIDs a record from a new address was accepted: %q", b)
		}
	})
}

// TestTamperedRecords: replayed records are delivered once, altered ones not
// at all, and a replay from a forged source address neither delivers nor
// moves the session.
func TestTamperedRecords(t *testing.T) {
	srv := listen(t, Config{})
	r := newRelay(t, addrOf(srv))
	cl := client(t, devIdent, devKey, Config{})
	name := established(t, srv, cl, r)
	to := net.UDPAddrFromAddrPort(r.addr())
	send := func(s string) {
		t.Helper()
		if _, err := cl.WriteTo([]byte(s), to); err != nil {
			t.Fatal(err)
		}
	}
	expect := func(want string) {
		t.Helper()
		b, from, err := readOne(t, srv, 10*time.Second)
		if err != nil || string(b) != want || from != name {
			t.Fatalf("got %q from %v (%v), want %q from %v", b, from, err, want, name)
		}
	}

	// Replayed: every record twice.
	r.setTamper(func(b []byte) [][]byte { return [][]byte{b, b} })
	send("one")
	expect("one")
	r.setTamper(nil)
	send("two")
	expect("two")

	// Altered: one byte of the ciphertext flipped.
	r.setTamper(func(b []byte) [][]byte {
		a := append([]byte(nil), b...)
		a[len(a)-3] ^= 0x40
		return [][]byte{a}
	})
	n := r.count()
	send("altered")
	waitFor(t, "the altered record relayed", func() bool { return r.count() > n })
	r.setTamper(nil)
	send("three")
	expect("three")

	// Forged source: the last record again, from another address.
	r.mu.Lock()
	last := r.seen[len(r.seen)-1]
	r.mu.Unlock()
	forger, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer forger.Close()
	forger.WriteToUDP(last, net.UDPAddrFromAddrPort(addrOf(srv)))
	time.Sleep(50 * time.Millisecond)
	send("four")
	expect("four")
	if p, _ := srv.Peer(name); p.Remote == addrPort(forger.LocalAddr()) {
		t.Fatal("a replayed record from a forged source moved the session")
	}
	if st := srv.Stats(); st.DatagramsReceived != 5 || st.Rebinds != 0 {
		t.Fatalf("stats %+v, want 5 datagrams and no rebinding", st)
	}
}

// TestHandshakeFlood: ClientHellos from many sources are answered with a
// HelloVerifyRequest no larger than themselves, refused sources are counted,
// and a real device still gets through.
func TestHandshakeFlood(t *testing.T) {
	var attempts atomic.Int64
	srv := listen(t, Config{AllowHandshake: func(netip.AddrPort) bool { return attempts.Add(1) <= 40 }})
	// Capture a genuine first ClientHello through a relay.
	r := newRelay(t, addrOf(srv))
	probe := client(t, devIdent, devKey, Config{})
	established(t, srv, probe, r)
	r.mu.Lock()
	hello := r.seen[0]
	r.mu.Unlock()

	var socks []*net.UDPConn
	for range 60 {
		s, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		socks = append(socks, s)
		s.WriteToUDP(hello, net.UDPAddrFromAddrPort(addrOf(srv)))
	}
	answered := 0
	buf := make([]byte, 4096)
	for _, s := range socks {
		s.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		n, _, err := s.ReadFromUDP(buf)
		if err != nil {
			continue
		}
		answered++
		// content type 22 (handshake), handshake type 3 (hello_verify_request)
		if buf[0] != 22 || buf[13] != 3 {
			t.Fatalf("answer to a cookie-less ClientHello is not a HelloVerifyRequest: % x", buf[:min(n, 20)])
		}
		if n > len(hello) {
			t.Fatalf("HelloVerifyRequest of %d bytes for a %d-byte ClientHello: amplification", n, len(hello))
		}
	}
	waitFor(t, "refusals counted", func() bool { return srv.Stats().HandshakesFailed["rate_limited"] >= 20 })
	if answered > 40 {
		t.Fatalf("%d floods answered, the limit allows 39", answered)
	}
	if st := srv.Stats(); st.HandshakesOK != 1 {
		t.Fatalf("flood completed handshakes: %+v", st)
	}
	// The admitted forged sources never return with the cookie: their
	// associations go after cookieWait.
	waitFor(t, "forged associations dropped", func() bool { return srv.Stats().HandshakesFailed["no_cookie"] >= 30 })
	for _, s := range socks {
		s.Close()
	}
}

// TestRestartSamePort: a client that lost its session (a device restarted)
// handshakes again from the same address and port; the server starts a new
// session at once instead of feeding the new handshake to the old one.
func TestRestartSamePort(t *testing.T) {
	srv := listen(t, Config{})
	r := newRelay(t, addrOf(srv)) // the server sees the relay's fixed address
	first := client(t, devIdent, devKey, Config{})
	name := established(t, srv, first, r)
	// The device dies: its close_notify never reaches the server.
	r.setTamper(func([]byte) [][]byte { return nil })
	n := r.count()
	first.Close()
	waitFor(t, "the close_notify dropped", func() bool { return r.count() > n })
	r.setTamper(nil)
	if _, ok := srv.Peer(name); !ok {
		t.Fatal("the old session is already gone: the test proves nothing")
	}
	second := client(t, devIdent, devKey, Config{})
	if _, err := second.WriteTo([]byte("after restart"), net.UDPAddrFromAddrPort(r.addr())); err != nil {
		t.Fatal(err)
	}
	b, from, err := readOne(t, srv, 15*time.Second)
	if err != nil || string(b) != "after restart" || from != name {
		t.Fatalf("after restart got %q from %v (%v)", b, from, err)
	}
	if st := srv.Stats(); st.HandshakesOK != 2 || st.Sessions != 1 {
		t.Fatalf("stats %+v, want 2 handshakes and 1 session", st)
	}
}

// TestSilentSessionReopened: the server dropped the client's session and
// its close_notify was lost; the client notices the silence and sends its
// next datagrams in a new session.
func TestSilentSessionReopened(t *testing.T) {
	srv := listen(t, Config{})
	r := newRelay(t, addrOf(srv))
	cl := client(t, devIdent, devKey, Config{StaleAfter: 300 * time.Millisecond})
	established(t, srv, cl, r)
	srv.mu.Lock()
	var back []*session
	for _, s := range srv.sessions {
		back = append(back, s)
	}
	srv.mu.Unlock()
	// The server's close_notify is lost.
	r.mu.Lock()
	r.mute = true
	r.mu.Unlock()
	srv.CloseIdentity(devIdent)
	for _, s := range back {
		waitFor(t, "server session closed", func() bool { _, ok := srv.Peer(s.name); return !ok })
	}
	time.Sleep(200 * time.Millisecond) // the close_notify reached the relay
	r.mu.Lock()
	r.mute = false
	r.mu.Unlock()
	to := net.UDPAddrFromAddrPort(r.addr())
	deadline := time.Now().Add(15 * time.Second)
	for {
		cl.WriteTo([]byte("retry"), to) // as ESRO retransmits
		if b, _, err := readOne(t, srv, 100*time.Millisecond); err == nil && string(b) == "retry" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the client never reopened its session")
		}
	}
	if st := cl.Stats(); st.Reopened != 1 || st.HandshakesOK != 2 {
		t.Fatalf("client stats %+v", st)
	}
}

func TestConfigErrors(t *testing.T) {
	if _, err := Listen("udp4", "127.0.0.1:0", Config{}); err == nil {
		t.Fatal("Listen without PSK accepted")
	}
	if _, err := NewClient(Config{}); err == nil {
		t.Fatal("NewClient without Credentials accepted")
	}
	_, err := Listen("udp4", "127.0.0.1:0", Config{PSK: keys, CipherSuites: []dtlsSuite{0xc02b}})
	if err == nil {
		t.Fatal("a certificate suite was accepted")
	}
	if _, err := ParseCipherSuite("TLS_PSK_WITH_AES_128_CCM_8"); err != nil {
		t.Fatal(err)
	}
	if _, err := ParseCipherSuite("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"); err == nil {
		t.Fatal("non-PSK suite parsed")
	}
	srv := listen(t, Config{})
	if _, err := srv.WriteTo([]byte("x"), &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 9}); !errors.Is(err, ErrNoSession) {
		t.Fatalf("write without session: %v", err)
	}
}
