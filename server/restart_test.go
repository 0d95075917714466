package server

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/ua"
)

// closedTCP returns a loopback TCP address that refuses connections until
// open is called, as a smarthost that is down and comes up later at the
// same address. A socket bound but not listening holds the port (the
// kernel answers a connection attempt with a reset), and open listens on
// that very socket: the port is never free for another socket to take.
func closedTCP(t testing.TB) (addr string, open func() net.Listener) {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	must(t, err)
	syscall.CloseOnExec(fd)
	f := os.NewFile(uintptr(fd), "closed-tcp")
	t.Cleanup(func() { f.Close() })
	must(t, syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}))
	sa, err := syscall.Getsockname(fd)
	must(t, err)
	addr = fmt.Sprintf("127.0.0.1:%d", sa.(*syscall.SockaddrInet4).Port)
	return addr, func() net.Listener {
		t.Helper()
		must(t, syscall.Listen(fd, syscall.SOMAXCONN))
		ln, err := net.FileListener(f) // a duplicate: f is closed at the end
		must(t, err)
		return ln
	}
}

// offlineUDP is closedUDP for a device that comes back on line at the
// same address: online connects the held socket to peer, its server,
// instead of the discard port, and returns that very socket, so that the
// port is never free for another socket to take in between. (A device
// that talks to one server needs no other peer; dissolving the
// association instead would give the port back.)
func offlineUDP(t testing.TB, ip string) (ap netip.AddrPort, online func(peer netip.AddrPort) net.PacketConn) {
	t.Helper()
	a := netip.MustParseAddr(ip)
	c, err := net.DialUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(a, 0)),
		net.UDPAddrFromAddrPort(netip.AddrPortFrom(a, 9)))
	must(t, err)
	t.Cleanup(func() { c.Close() })
	ap = c.LocalAddr().(*net.UDPAddr).AddrPort()
	return ap, func(peer netip.AddrPort) net.PacketConn {
		t.Helper()
		rc, err := c.SyscallConn()
		must(t, err)
		var cerr error
		must(t, rc.Control(func(fd uintptr) {
			cerr = syscall.Connect(int(fd), &syscall.SockaddrInet4{Addr: peer.Addr().Unmap().As4(), Port: int(peer.Port())})
		}))
		must(t, cerr)
		// The net package knows c as connected to the discard port, and
		// would refuse WriteTo; a conn made from its file is not.
		f, err := c.File()
		must(t, err)
		defer f.Close()
		pc, err := net.FilePacketConn(f)
		must(t, err)
		c.Close()
		t.Cleanup(func() { pc.Close() })
		if got := pc.LocalAddr().(*net.UDPAddr).AddrPort(); got != ap {
			t.Fatalf("the device's socket is at %v, not %v", got, ap)
		}
		return pc
	}
}

// collect gathers n deliveries of a device and checks no more come.
func collect(t *testing.T, got chan *ua.Delivery, n int) map[string]int {
	t.Helper()
	seen := map[string]int{}
	for i := 0; i < n; i++ {
		select {
		case d := <-got:
			seen[d.IPM.Heading.Subject]++
		case <-time.After(20 * time.Second):
			t.Fatalf("got %d of %d deliveries: %v", i, n, seen)
		}
	}
	select {
	case d := <-got:
		t.Errorf("extra delivery %q after %v", d.IPM.Heading.Subject, seen)
	case <-time.After(500 * time.Millisecond):
	}
	return seen
}

// onlineDevice starts a ua client on pc talking to mts and polls.
func onlineDevice(t *testing.T, pc net.PacketConn, mts netip.AddrPort, addr emsd.Address) chan *ua.Delivery {
	t.Helper()
	ep, err := esro.NewEndpoint(pc, &esro.Config{Timers: fastTimers})
	must(t, err)
	t.Cleanup(func() { ep.Close() })
	got := make(chan *ua.Delivery, 100)
	c, err := ua.New(ep, ua.Config{Server: mts, Address: addr,
		Handler: ua.HandlerFunc(func(_ context.Context, d *ua.Delivery) error { got <- d; return nil })})
	must(t, err)
	t.Cleanup(func() { c.Close() })
	_, err = c.DeliveryControl(context.Background(), nil)
	must(t, err)
	return got
}

// An in-process server is closed abruptly with deliveries and relays
// queued and a submission whose RESULT was never acknowledged; the next
// server on the same store delivers everything exactly once.
func TestRestartInProcess(t *testing.T) {
	for _, sc := range storeConfigs {
		t.Run(sc.driver, func(t *testing.T) { testRestartInProcess(t, sc.config(t)) })
	}
}

func testRestartInProcess(t *testing.T, c *Config) {
	hostAddr, openHost := closedTCP(t)
	c.Relay.Smarthost = hostAddr // nobody listens yet
	s1, err := Start(context.Background(), c, Options{Logger: testLogger(t)})
	must(t, err)
	sender := newDevice(t, s1, 198036, deviceOpts{})
	yAP, online := offlineUDP(t, "127.0.0.1")
	addDevice(t, s1, 198037, yAP, deviceOpts{}) // off-line

	const n = 5
	for i := range n {
		_, err := sender.ua.Submit(context.Background(), &ua.Message{To: []string{"198.037", fmt.Sprintf("r%d@example.com", i)},
			Subject: fmt.Sprintf("sub %d", i), Body: []byte("x\n")})
		must(t, err)
		must(t, sendMail(s1, "carol@example.com", []string{"198.037@emsd.test"},
			inboundMsg("198.037@emsd.test", fmt.Sprintf("in %d", i), "y")))
	}
	// A submission committed and answered, never acknowledged.
	raw := newRawDevice(t, s1, 198038)
	arg := submitArg(t, nil, emsd.ContentIPM, testIPM("198.037"), emsd.Options{})
	raw.send(t, &esro.PDU{Type: esro.TypeInvoke, SAP: 5, Ref: 1, Operation: 33, Data: emsd.PrependInstanceID(0, arg)})
	raw.recv(t, func(p esro.PDU) bool { return p.Type == esro.TypeResult })
	must(t, s1.Close())

	c.EMSD.Listen = "127.0.0.1:0"
	s2 := startServer(t, c)
	host := startSmarthostOn(t, openHost(), nil)
	got := onlineDevice(t, online(s2.Addrs().EMSD), s2.Addrs().EMSD, 198037)
	seen := collect(t, got, 2*n+1)
	for i := range n {
		if seen[fmt.Sprintf("sub %d", i)] != 1 || seen[fmt.Sprintf("in %d", i)] != 1 {
			t.Errorf("deliveries %v", seen)
			break
		}
	}
	if seen["t"] != 1 {
		t.Errorf("the unacknowledged submission was not delivered once: %v", seen)
	}
	relayed := map[string]int{}
	for range n {
		m := host.next(t)
		relayed[strings.Join(m.to, ",")]++
	}
	host.none(t, 300*time.Millisecond)
	for i := range n {
		if relayed[fmt.Sprintf("r%d@example.com", i)] != 1 {
			t.Errorf("relayed %v", relayed)
		}
	}
}

// helperServer runs a server from the TOML configuration named by
// helperEnv until it is killed; it prints its addresses.
func helperServer() int {
	c, err := LoadConfig(os.Getenv(helperEnv))
	if err != nil {
		fmt.Println("config:", err)
		return 1
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: c.logLevel()}))
	s, err := Start(context.Background(), c, Options{Logger: log})
	if err != nil {
		fmt.Println("start:", err)
		return 1
	}
	a := s.Addrs()
	fmt.Printf("ready emsd=%s smtp=%s\n", a.EMSD, a.SMTP)
	select {}
}

type child struct {
	cmd        *exec.Cmd
	emsd, smtp string
}

func startChild(t *testing.T, cfgPath string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+cfgPath)
	out, err := cmd.StdoutPipe()
	must(t, err)
	logs := &testWriter{t: t}
	cmd.Stderr = logs
	must(t, cmd.Start())
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("server process: %v", err)
	}
	m := regexp.MustCompile(`^ready emsd=(\S+) smtp=(\S+)`).FindStringSubmatch(line)
	if m == nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("server process: %q", line)
	}
	ch := &child{cmd: cmd, emsd: m[1], smtp: m[2]}
	t.Cleanup(func() {
		ch.kill()
		logs.mu.Lock()
		logs.done = true
		logs.mu.Unlock()
	})
	return ch
}

func (c *child) kill() {
	if c.cmd.ProcessState == nil {
		c.cmd.Process.Signal(syscall.SIGKILL)
		c.cmd.Wait()
	}
}

// The server process is killed with SIGKILL while mail waits in its
// queues; a new process on the same store delivers and relays everything
// that was acknowledged, exactly once. (With PostgreSQL the killed
// process's session, and with it its node lock, ends with it: its work is
// no live server's.)
func TestKillRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("runs server processes")
	}
	for _, sc := range storeConfigs {
		t.Run(sc.driver, func(t *testing.T) { testKillRestart(t, sc.config(t)) })
	}
}

func testKillRestart(t *testing.T, c *Config) {
	dir := t.TempDir()
	hostAddr, openHost := closedTCP(t)
	c.Data = filepath.Join(dir, "data")
	c.Relay.Smarthost = hostAddr
	c.Admin.Listen = ""
	c.LogLevel = "info"
	cfgPath := filepath.Join(dir, "emsdp.toml")
	f, err := os.Create(cfgPath)
	must(t, err)
	must(t, toml.NewEncoder(f).Encode(c))
	f.Close()

	p1 := startChild(t, cfgPath)
	// Register the devices through the store, as 'emsdp device add' does
	// while the server runs; the server notices within registry_poll.
	db, err := c.OpenStore(context.Background())
	must(t, err)
	defer db.Close()
	senderEP := listenESRO(t, "127.0.0.1")
	yAP, online := offlineUDP(t, "127.0.0.1")
	// The recipient first: once the server knows the sender (and so takes
	// its submissions), it knows the recipient too.
	for _, d := range []*store.Device{
		{Address: 198037, IP: yAP.Addr(), Port: yAP.Port(), Version: "1.1", Mode: store.ModeEfficient},
		{Address: 198036, IP: epAddr(senderEP).Addr(), Port: epAddr(senderEP).Port(), Version: "1.1", Mode: store.ModeComplete},
	} {
		must(t, db.AddDevice(context.Background(), d))
	}
	mts1 := netip.MustParseAddrPort(p1.emsd)
	sender, err := ua.New(senderEP, ua.Config{Server: mts1, Address: 198036})
	must(t, err)
	defer sender.Close()
	const n = 5
	for i := range n {
		eventuallyErr(t, func() error {
			_, err := sender.Submit(context.Background(), &ua.Message{To: []string{"198.037", fmt.Sprintf("r%d@example.com", i)},
				Subject: fmt.Sprintf("sub %d", i), Body: []byte("x\n")})
			return err
		})
		must(t, sendMailTo(p1.smtp, "carol@example.com", []string{"198.037@emsd.test"},
			inboundMsg("198.037@emsd.test", fmt.Sprintf("in %d", i), "y")))
	}
	p1.kill()

	p2 := startChild(t, cfgPath)
	host := startSmarthostOn(t, openHost(), nil)
	mts2 := netip.MustParseAddrPort(p2.emsd)
	got := onlineDevice(t, online(mts2), mts2, 198037)
	seen := collect(t, got, 2*n)
	for i := range n {
		if seen[fmt.Sprintf("sub %d", i)] != 1 || seen[fmt.Sprintf("in %d", i)] != 1 {
			t.Errorf("deliveries after kill -9: %v", seen)
			break
		}
	}
	relayed := map[string]int{}
	for range n {
		m := host.next(t)
		relayed[strings.Join(m.to, ",")]++
	}
	host.none(t, 300*time.Millisecond)
	if len(relayed) != n {
		t.Errorf("relayed after kill -9: %v", relayed)
	}
}

// eventuallyErr retries f (the server may not know a device yet).
func eventuallyErr(t *testing.T, f func() error) {
	t.Helper()
	var err error
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if err = f(); err == nil {
			return
		}
	}
	t.Fatal(err)
}
