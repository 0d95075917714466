package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/ua"
)

// natRelay is a userspace NAT between devices (inside) and servers
// (outside), as a home router or a carrier-grade NAT is. A device talks to
// a server through the NAT's front socket for that server (front). The
// first datagram from an inside address opens its binding: one upstream
// socket of its own on the outside address, from which it and every later
// datagram of that inside address leaves. What arrives at an upstream
// socket goes back to the inside address only when it comes from a server
// that inside address has sent to (address and port-dependent filtering,
// RFC 4787), through that server's front, so the device sees the server's
// front as the sender; anything else is dropped and counted. rebind drops
// every binding, as a NAT restart or a new lease does: the next datagram
// opens a new one on another port.
type natRelay struct {
	outside netip.Addr

	mu       sync.Mutex
	fronts   map[netip.AddrPort]*natFront   // by server
	bindings map[netip.AddrPort]*natBinding // by inside address
	closed   bool
	dropped  atomic.Int64
	wg       sync.WaitGroup
}

type natFront struct {
	conn   *net.UDPConn
	server netip.AddrPort
}

type natBinding struct {
	conn   *net.UDPConn
	inside netip.AddrPort
	sentTo map[netip.AddrPort]bool // guarded by natRelay.mu
}

// newNAT starts a NAT whose bindings use the outside loopback address.
func newNAT(t testing.TB, outside string) *natRelay {
	t.Helper()
	n := &natRelay{outside: netip.MustParseAddr(outside), fronts: map[netip.AddrPort]*natFront{},
		bindings: map[netip.AddrPort]*natBinding{}}
	t.Cleanup(n.close)
	return n
}

func (n *natRelay) close() {
	n.mu.Lock()
	n.closed = true
	for _, f := range n.fronts {
		f.conn.Close()
	}
	for _, b := range n.bindings {
		b.conn.Close()
	}
	n.mu.Unlock()
	n.wg.Wait()
}

func unmapAP(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// front returns the address devices use for server: the NAT's socket that
// forwards to it.
func (n *natRelay) front(t testing.TB, server netip.AddrPort) netip.AddrPort {
	t.Helper()
	n.mu.Lock()
	defer n.mu.Unlock()
	if f := n.fronts[server]; f != nil {
		return unmapAP(f.conn.LocalAddr().(*net.UDPAddr).AddrPort())
	}
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	must(t, err)
	f := &natFront{conn: c, server: server}
	n.fronts[server] = f
	n.wg.Go(func() { n.runFront(f) })
	return unmapAP(c.LocalAddr().(*net.UDPAddr).AddrPort())
}

// runFront forwards what devices send to f's server, each inside address
// over its binding.
func (n *natRelay) runFront(f *natFront) {
	buf := make([]byte, 65536)
	for {
		nr, from, err := f.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		from = unmapAP(from)
		n.mu.Lock()
		b := n.bindings[from]
		if b == nil && !n.closed {
			c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: n.outside.AsSlice()})
			if err == nil {
				b = &natBinding{conn: c, inside: from, sentTo: map[netip.AddrPort]bool{}}
				n.bindings[from] = b
				n.wg.Go(func() { n.runBinding(b) })
			}
		}
		if b != nil {
			b.sentTo[f.server] = true
		}
		n.mu.Unlock()
		if b != nil {
			b.conn.WriteToUDPAddrPort(buf[:nr], f.server)
		}
	}
}

// runBinding lets in what comes from the servers b has sent to.
func (n *natRelay) runBinding(b *natBinding) {
	buf := make([]byte, 65536)
	for {
		nr, from, err := b.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		from = unmapAP(from)
		n.mu.Lock()
		f, ok := n.fronts[from], b.sentTo[from]
		n.mu.Unlock()
		if !ok || f == nil {
			n.dropped.Add(1)
			continue
		}
		f.conn.WriteToUDPAddrPort(buf[:nr], b.inside)
	}
}

// binding is the outside address of inside's binding (invalid: none).
func (n *natRelay) binding(inside netip.AddrPort) netip.AddrPort {
	n.mu.Lock()
	defer n.mu.Unlock()
	if b := n.bindings[inside]; b != nil {
		return unmapAP(b.conn.LocalAddr().(*net.UDPAddr).AddrPort())
	}
	return netip.AddrPort{}
}

// rebind drops every binding.
func (n *natRelay) rebind() {
	n.mu.Lock()
	defer n.mu.Unlock()
	for k, b := range n.bindings {
		b.conn.Close()
		delete(n.bindings, k)
	}
}

// natDevice is a device UA on its own socket at ip, talking to server (a
// server's address or a NAT's front for it), that keeps polling every
// 100 ms from its socket as emsdp ua receive --poll does.
type natDevice struct {
	ep     *esro.Endpoint
	ua     *ua.Client
	got    chan *ua.Delivery
	stop   func()
	addr   emsd.Address
	pw     string
	ap     netip.AddrPort
	wg     *sync.WaitGroup
	handle func(*ua.Delivery) error
}

func startNATDevice(t testing.TB, ip string, server netip.AddrPort, addr emsd.Address, pw string, handle func(*ua.Delivery) error) *natDevice {
	t.Helper()
	ep := listenESRO(t, ip)
	d := &natDevice{ep: ep, got: make(chan *ua.Delivery, 100), addr: addr, pw: pw, ap: epAddr(ep), wg: &sync.WaitGroup{}, handle: handle}
	d.talkTo(t, server)
	t.Cleanup(func() {
		d.stop()
		d.ua.Close()
	})
	return d
}

// talkTo makes the device poll server (from the same socket).
func (d *natDevice) talkTo(t testing.TB, server netip.AddrPort) {
	t.Helper()
	if d.ua != nil {
		d.stop()
		d.ua.Close()
	}
	c, err := ua.New(d.ep, ua.Config{Server: server, Address: d.addr, Password: d.pw, Logger: slog.New(slog.DiscardHandler),
		Handler: ua.HandlerFunc(func(_ context.Context, del *ua.Delivery) error {
			if d.handle != nil {
				if err := d.handle(del); err != nil {
					return err
				}
			}
			d.got <- del
			return nil
		})})
	must(t, err)
	d.ua = c
	ctx, cancel := context.WithCancel(context.Background())
	d.wg.Go(func() { c.KeepPolling(ctx, 100*time.Millisecond, nil) })
	d.stop = func() {
		cancel()
		d.wg.Wait()
	}
}

// contactOf is a device's contact as the store has it.
func contactOf(t testing.TB, s *Server, a emsd.Address) store.Contact {
	t.Helper()
	c, err := s.st.DeviceContact(context.Background(), uint32(a))
	must(t, err)
	return c
}

// addNATDevice registers a device with a password, at registered (invalid:
// none).
func addNATDevice(t testing.TB, s *Server, a emsd.Address, registered netip.AddrPort) {
	t.Helper()
	if registered.IsValid() {
		addDevice(t, s, a, registered, deviceOpts{password: "pw"})
		return
	}
	addDevice(t, s, a, netip.AddrPort{}, deviceOpts{password: "pw"})
}

// closedUDP returns an address on ip (IPv4 loopback) where nothing
// answers, as at a device that is off: datagrams sent there get ICMP port
// unreachable. Until the test ends the port is held by a socket connected
// to the discard port, which the kernel gives no datagram from anyone
// else; a port found free and closed could be taken by another socket
// meanwhile.
func closedUDP(t testing.TB, ip string) netip.AddrPort {
	t.Helper()
	a := netip.MustParseAddr(ip)
	c, err := net.DialUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(a, 0)),
		net.UDPAddrFromAddrPort(netip.AddrPortFrom(a, 9)))
	must(t, err)
	t.Cleanup(func() { c.Close() })
	return unmapAP(c.LocalAddr().(*net.UDPAddr).AddrPort())
}

// A device receives its mail at the address it polls from: behind a NAT
// (which lets in only what comes over the binding the device's polls
// opened, from the server it polls), from a source address other than
// the one it registered, or registered without any. The deliveries leave
// from the server it talks to and take no failed attempt.
func TestNATDelivery(t *testing.T) {
	for _, tc := range []struct {
		name       string
		nat        bool
		registered bool
	}{
		{"NAT, registered elsewhere", true, true},
		{"NAT, no registered address", true, false},
		{"other source than registered", false, true},
		{"no registered address", false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := startServer(t, testConfig(t))
			var reg netip.AddrPort
			if tc.registered {
				reg = closedUDP(t, "127.0.0.2") // as registered with --ip 127.0.0.2 --port N: nobody there now
			}
			addNATDevice(t, s, 198002, reg)
			server := s.Addrs().EMSD
			var nat *natRelay
			if tc.nat {
				nat = newNAT(t, "127.0.0.9")
				server = nat.front(t, s.Addrs().EMSD)
			}
			dev := startNATDevice(t, "127.0.0.3", server, 198002, "pw", nil)
			want := dev.ap
			eventually(t, "the device heard", func() bool {
				if nat != nil {
					want = nat.binding(dev.ap)
				}
				return contactOf(t, s, 198002).Addr == want && want.IsValid()
			})
			if c := contactOf(t, s, 198002); c.Via != s.contacts.via || time.Since(c.At) > 10*time.Second {
				t.Errorf("contact %+v, via %q", c, s.contacts.via)
			}

			big := strings.Repeat("A long line, so that the message goes in segments.\n", 100)
			for i, body := range []string{"one\n", big, "three\n"} {
				must(t, sendMail(s, "carol@example.com", []string{"198.002@emsd.test"},
					inboundMsg("198.002@emsd.test", fmt.Sprint("m", i), body)))
			}
			seen := map[string]int{}
			for range 3 {
				select {
				case d := <-dev.got:
					seen[d.IPM.Heading.Subject]++
					if d.From != server {
						t.Errorf("delivered from %v, want %v (where the device polls)", d.From, server)
					}
					if d.IPM.Heading.Subject == "m1" && strings.TrimSpace(string(d.IPM.Body.Text)) != strings.TrimSpace(big) {
						t.Errorf("segmented body: %d octets", len(d.IPM.Body.Text))
					}
				case <-time.After(15 * time.Second):
					t.Fatalf("delivered %v", seen)
				}
			}
			for i := range 3 {
				if n := seen[fmt.Sprint("m", i)]; n != 1 {
					t.Errorf("m%d delivered %d times", i, n)
				}
			}
			if n := s.metrics.counter(t, "emsd_deliveries_total", "deferred"); n != 0 {
				t.Errorf("%v deferred attempts", n)
			}
			if n := s.metrics.counter(t, "emsd_device_address_changes_total", ""); n != 0 {
				t.Errorf("%v address changes", n)
			}
			if nat != nil && nat.dropped.Load() != 0 {
				t.Errorf("the NAT dropped %d datagrams", nat.dropped.Load())
			}
		})
	}
}

// The device's NAT binding changes in the middle of its queue (a new
// lease, a NAT restart): the deliveries queued while it was never heard
// wait unattempted (offline); it takes two, refuses the third for now,
// and moves; the server learns the new address from its next poll and
// delivers the rest there, each message once.
func TestNATNewLeaseMidQueue(t *testing.T) {
	s := startServer(t, testConfig(t))
	addNATDevice(t, s, 198002, netip.AddrPort{})
	const total = 6
	for i := range total {
		must(t, sendMail(s, "carol@example.com", []string{"198.002@emsd.test"},
			inboundMsg("198.002@emsd.test", fmt.Sprint("m", i), "hi\n")))
	}
	time.Sleep(300 * time.Millisecond) // several delivery.retry periods
	l, err := s.st.ListQueue(context.Background(), store.QueueFilter{Device: 198002})
	must(t, err)
	if len(l.Entries) != total {
		t.Fatalf("queued %d", len(l.Entries))
	}
	for _, e := range l.Entries {
		if e.State != string(store.DeliveryQueued) || e.Attempts != 0 {
			t.Errorf("delivery to a device never heard: %s, %d attempts", e.State, e.Attempts)
		}
	}

	nat := newNAT(t, "127.0.0.9")
	var accepted atomic.Int32
	var moved atomic.Bool
	moveNow := make(chan struct{}, 1)
	dev := startNATDevice(t, "127.0.0.3", nat.front(t, s.Addrs().EMSD), 198002, "pw", func(*ua.Delivery) error {
		if !moved.Load() && accepted.Load() >= 2 {
			select {
			case moveNow <- struct{}{}:
			default:
			}
			return errors.New("busy") // ERROR 6: the server keeps it
		}
		accepted.Add(1)
		return nil
	})
	seen := map[string]int{}
	receive := func(n int) {
		t.Helper()
		for range n {
			select {
			case d := <-dev.got:
				seen[d.IPM.Heading.Subject]++
			case <-time.After(15 * time.Second):
				t.Fatalf("delivered %v", seen)
			}
		}
	}
	receive(2)
	select {
	case <-moveNow:
	case <-time.After(15 * time.Second):
		t.Fatal("no third delivery")
	}
	old := nat.binding(dev.ap)
	nat.rebind()
	moved.Store(true)
	receive(total - 2)
	for i := range total {
		if n := seen[fmt.Sprint("m", i)]; n != 1 {
			t.Errorf("m%d delivered %d times (all %v)", i, n, seen)
		}
	}
	now := nat.binding(dev.ap)
	if c := contactOf(t, s, 198002); c.Addr != now || now == old || !old.IsValid() {
		t.Errorf("contact %v; binding before %v, now %v", c.Addr, old, now)
	}
	if n := s.metrics.counter(t, "emsd_device_address_changes_total", ""); n < 1 {
		t.Errorf("%v address changes", n)
	}
}

// Two servers on one PostgreSQL: a device behind a NAT polls one of them;
// mail for it that reaches either server is delivered by that one, from
// the address the NAT lets in (the other never sends to the binding).
// When the device moves to the other server, so do its deliveries.
func TestNATTwoServers(t *testing.T) {
	c1 := pgConfig(t)
	c2 := *c1
	s1, s2 := startServer(t, c1), startServer(t, &c2)
	addNATDevice(t, s1, 198040, netip.AddrPort{})
	must(t, s2.Reload(context.Background()))
	nat := newNAT(t, "127.0.0.9")
	f1, f2 := nat.front(t, s1.Addrs().EMSD), nat.front(t, s2.Addrs().EMSD)
	dev := startNATDevice(t, "127.0.0.3", f2, 198040, "pw", nil)
	eventually(t, "the device heard by s2", func() bool { return contactOf(t, s1, 198040).Via == s2.contacts.via })

	send := func(s *Server, subj string) {
		must(t, sendMail(s, "carol@example.com", []string{"198.040@emsd.test"}, inboundMsg("198.040@emsd.test", subj, "hi\n")))
	}
	expect := func(from netip.AddrPort, subjects ...string) {
		t.Helper()
		seen := map[string]int{}
		for range subjects {
			select {
			case d := <-dev.got:
				seen[d.IPM.Heading.Subject]++
				if d.From != from {
					t.Errorf("%q delivered from %v, want %v", d.IPM.Heading.Subject, d.From, from)
				}
			case <-time.After(20 * time.Second):
				t.Fatalf("delivered %v", seen)
			}
		}
		for _, subj := range subjects {
			if seen[subj] != 1 {
				t.Errorf("%q delivered %d times", subj, seen[subj])
			}
		}
	}
	// While the device is quiet (its contact fresh), mail reaching s1
	// waits: s1 must not send from where the NAT does not let it in, and
	// s2 does not know of it yet. The device's next poll of s2 brings it.
	dev.stop()
	time.Sleep(300 * time.Millisecond) // a poll s2 was still answering has ended
	send(s1, "via s1")
	select {
	case d := <-dev.got:
		t.Fatalf("%q delivered from %v without a poll", d.IPM.Heading.Subject, d.From)
	case <-time.After(500 * time.Millisecond):
	}
	dev.talkTo(t, f2)
	expect(f2, "via s1")
	send(s2, "via s2")
	send(s1, "via s1 again")
	expect(f2, "via s2", "via s1 again")
	if n := s1.metrics.counter(t, "emsd_deliveries_total", "delivered"); n != 0 {
		t.Errorf("s1, which the device does not talk to, delivered %v", n)
	}
	if n := nat.dropped.Load(); n != 0 {
		t.Errorf("the NAT dropped %d datagrams: a server sent from where the device does not talk to", n)
	}

	// The device moves to s1 (same socket, same binding).
	dev.talkTo(t, f1)
	eventually(t, "the device heard by s1", func() bool { return contactOf(t, s2, 198040).Via == s1.contacts.via })
	send(s2, "after the move")
	expect(f1, "after the move")
	if n := s1.metrics.counter(t, "emsd_device_address_changes_total", ""); n != 1 {
		t.Errorf("s1 counted %v address changes", n)
	}
}

// A wrong password, or none, never moves a device's address, whatever the
// source; neither does identification by source address. The device's
// mail keeps going to the device.
func TestContactNotRedirected(t *testing.T) {
	for _, tc := range []struct {
		name     string
		password string // the device's
		ipOnly   bool
		attacker string // the attacker's IP
		pw       string // the attacker's password
	}{
		{"wrong password", "pw", false, "127.0.0.66", "guess"},
		{"no password", "pw", false, "127.0.0.66", ""},
		{"wrong password from the device's IP", "pw", false, "127.0.0.3", "guess"},
		{"device without password, known by its IP", "", false, "127.0.0.3", ""},
		{"compat.ip_only_identification", "pw", true, "127.0.0.3", "guess"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// What is asserted is where mail goes, not how fast: every
			// invocation gets its answer on a loaded machine.
			c := testConfig(t)
			setTimers(c, patientTimers)
			c.Compat.IPOnlyIdentification = tc.ipOnly
			s := startServer(t, c)
			dev := listenESROTimers(t, "127.0.0.3", patientTimers)
			got := make(chan *ua.Delivery, 10)
			addDevice(t, s, 198036, epAddr(dev), deviceOpts{password: tc.password})
			dc, err := ua.New(dev, ua.Config{Server: s.Addrs().EMSD, Address: 198036, Password: tc.password,
				ReferenceSecurity: tc.ipOnly, Logger: slog.New(slog.DiscardHandler),
				Handler: ua.HandlerFunc(func(_ context.Context, d *ua.Delivery) error { got <- d; return nil })})
			must(t, err)
			defer dc.Close()
			_, err = dc.DeliveryControl(context.Background(), nil)
			if tc.ipOnly {
				var e *ua.Error // the reference's ERROR 7 is not what this server answers; either is an answer
				if err != nil && !errors.As(err, &e) {
					t.Fatal(err)
				}
			} else {
				must(t, err)
			}
			before := contactOf(t, s, 198036)
			if tc.password != "" && !tc.ipOnly && before.Addr != epAddr(dev) {
				t.Fatalf("device not heard: %+v", before)
			}

			atk := listenESROTimers(t, tc.attacker, patientTimers)
			stolen := make(chan *ua.Delivery, 10)
			ac, err := ua.New(atk, ua.Config{Server: s.Addrs().EMSD, Address: 198036, Password: tc.pw,
				Logger: slog.New(slog.DiscardHandler), Handler: ua.HandlerFunc(func(_ context.Context, d *ua.Delivery) error {
					stolen <- d
					return nil
				})})
			must(t, err)
			defer ac.Close()
			for range 3 {
				ac.DeliveryControl(context.Background(), nil)
			}
			ac.Submit(context.Background(), &ua.Message{To: []string{"x@example.com"}, Subject: "x", Body: []byte("x\n")})
			if after := contactOf(t, s, 198036); after != before {
				t.Errorf("contact moved from %+v to %+v", before, after)
			}
			must(t, sendMail(s, "carol@example.com", []string{"198.036@emsd.test"}, inboundMsg("198.036@emsd.test", "mine", "hi\n")))
			select {
			case d := <-got:
				if d.IPM.Heading.Subject != "mine" {
					t.Errorf("got %q", d.IPM.Heading.Subject)
				}
			case d := <-stolen:
				t.Fatalf("the attacker got %q", d.IPM.Heading.Subject)
			case <-time.After(15 * time.Second):
				t.Fatal("no delivery")
			}
			select {
			case d := <-stolen:
				t.Errorf("the attacker got %q", d.IPM.Heading.Subject)
			case <-time.After(200 * time.Millisecond):
			}
			if n := s.metrics.counter(t, "emsd_device_address_changes_total", ""); n != 0 {
				t.Errorf("%v address changes", n)
			}
		})
	}
}

// A device that goes quiet is offline, not retried at a dead binding: its
// contact, once it stops answering or once older than
// delivery.contact_lifetime, takes no more attempts until the device is
// heard again.
func TestQuietDeviceOffline(t *testing.T) {
	// The polls must be answered on a loaded machine: what is timed here
	// is the contact's lifetime and delivery.retry, not ESRO.
	c := testConfig(t)
	setTimers(c, patientTimers)
	c.Delivery.ContactLifetime = Duration(time.Second)
	s := startServer(t, c)
	addNATDevice(t, s, 198002, netip.AddrPort{})
	queued := func() []store.QueueEntry {
		l, err := s.st.ListQueue(context.Background(), store.QueueFilter{Device: 198002, States: []string{"queued", "inflight"}})
		must(t, err)
		return l.Entries
	}
	attempts := func() int {
		q := queued()
		if len(q) != 1 {
			t.Fatalf("%d queued", len(q))
		}
		return q[0].Attempts
	}
	poll := func(ep *esro.Endpoint, got chan *ua.Delivery) *ua.Client {
		cl, err := ua.New(ep, ua.Config{Server: s.Addrs().EMSD, Address: 198002, Password: "pw", Logger: slog.New(slog.DiscardHandler),
			Handler: ua.HandlerFunc(func(_ context.Context, d *ua.Delivery) error { got <- d; return nil })})
		must(t, err)
		_, err = cl.DeliveryControl(context.Background(), nil)
		must(t, err)
		return cl
	}

	// Heard once, then silent past the lifetime.
	ep := listenESROTimers(t, "127.0.0.3", patientTimers)
	got := make(chan *ua.Delivery, 10)
	cl := poll(ep, got)
	time.Sleep(1200 * time.Millisecond)
	must(t, sendMail(s, "carol@example.com", []string{"198.002@emsd.test"}, inboundMsg("198.002@emsd.test", "late", "hi\n")))
	time.Sleep(500 * time.Millisecond)
	if n := attempts(); n != 0 {
		t.Errorf("%d attempts to a device not heard within the lifetime", n)
	}
	_, err := cl.DeliveryControl(context.Background(), nil) // heard again
	must(t, err)
	select {
	case <-got:
	case <-time.After(15 * time.Second):
		t.Fatal("not delivered once heard again")
	}
	// The device stores before it answers: the client stays until the
	// server has the answer (closing it would drop an answer not yet
	// sent), and "late" is off the queue before "gone" is counted.
	eventually(t, "the delivery recorded", func() bool { return len(queued()) == 0 })
	cl.Close()

	// Heard, then gone at once (its socket closed): one attempt, then
	// offline although the contact is still fresh.
	c.Delivery.ContactLifetime = Duration(time.Minute)
	_, err = s.Reconfigure(c)
	must(t, err)
	ep2 := listenESROTimers(t, "127.0.0.3", patientTimers)
	cl2 := poll(ep2, make(chan *ua.Delivery, 10))
	cl2.Close()
	ep2.Close()
	must(t, sendMail(s, "carol@example.com", []string{"198.002@emsd.test"}, inboundMsg("198.002@emsd.test", "gone", "hi\n")))
	eventually(t, "an attempt", func() bool { return attempts() >= 1 })
	time.Sleep(500 * time.Millisecond) // five delivery.retry periods, within the lifetime
	if n := attempts(); n != 1 {
		t.Errorf("%d attempts to a dead contact", n)
	}
	got3 := make(chan *ua.Delivery, 10)
	cl3 := poll(listenESROTimers(t, "127.0.0.3", patientTimers), got3)
	defer cl3.Close()
	select {
	case d := <-got3:
		if d.IPM.Heading.Subject != "gone" {
			t.Errorf("got %q", d.IPM.Heading.Subject)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("not delivered once heard again")
	}
}

// A device that polls from one socket and submits from others (emsdp ua
// receive --poll beside emsdp ua send) keeps receiving where it polls: a
// submission does not move a fresh poll's contact. A device that only
// submits is reached where it submits from, and a submission refreshes
// the contact at the poll's own address.
func TestSubmitFromAnotherSocket(t *testing.T) {
	s := startServer(t, testConfig(t))
	addNATDevice(t, s, 198002, netip.AddrPort{})
	addNATDevice(t, s, 198003, netip.AddrPort{})
	recv := startNATDevice(t, "127.0.0.3", s.Addrs().EMSD, 198002, "pw", nil)
	eventually(t, "the poll heard", func() bool { return contactOf(t, s, 198002).Addr == recv.ap })

	submit := func(a emsd.Address, ep *esro.Endpoint, to string) {
		t.Helper()
		c, err := ua.New(ep, ua.Config{Server: s.Addrs().EMSD, Address: a, Password: "pw", Logger: slog.New(slog.DiscardHandler)})
		must(t, err)
		defer c.Close()
		_, err = c.Submit(context.Background(), &ua.Message{To: []string{to}, Subject: "from " + a.String(), Body: []byte("x\n")})
		must(t, err)
	}
	sender := listenESRO(t, "127.0.0.3")
	submit(198002, sender, "198.003")
	sender.Close() // emsdp ua send has exited
	if c := contactOf(t, s, 198002); c.Addr != recv.ap || !c.Polled {
		t.Errorf("a submission moved the poll's contact to %+v", c)
	}
	// 198.003 only submits: it is reached where it submitted from.
	other := listenESRO(t, "127.0.0.4")
	got3 := make(chan *ua.Delivery, 10)
	c3, err := ua.New(other, ua.Config{Server: s.Addrs().EMSD, Address: 198003, Password: "pw", Logger: slog.New(slog.DiscardHandler),
		Handler: ua.HandlerFunc(func(_ context.Context, d *ua.Delivery) error { got3 <- d; return nil })})
	must(t, err)
	defer c3.Close()
	_, err = c3.Submit(context.Background(), &ua.Message{To: []string{"198.002"}, Subject: "from 198.003", Body: []byte("x\n")})
	must(t, err)
	if c := contactOf(t, s, 198003); c.Addr != epAddr(other) || c.Polled {
		t.Errorf("contact of a device that submitted: %+v", c)
	}
	for _, ch := range []chan *ua.Delivery{recv.got, got3} {
		select {
		case d := <-ch:
			if !strings.HasPrefix(d.IPM.Heading.Subject, "from ") {
				t.Errorf("got %q", d.IPM.Heading.Subject)
			}
		case <-time.After(15 * time.Second):
			t.Fatal("not delivered")
		}
	}
	if n := s.metrics.counter(t, "emsd_deliveries_total", "deferred"); n != 0 {
		t.Errorf("%v deferred attempts", n)
	}
}
