package server

import (
	"context"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"go.uber.org/goleak"
	"golang.org/x/crypto/bcrypt"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/internal/pgtest"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/ua"
)

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) != "" {
		os.Exit(helperServer())
	}
	code := m.Run()
	if err := testPG.stop(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		code = 1
	}
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// testPG is the PostgreSQL cluster of this test binary: started by the
// first test that needs it, stopped by TestMain.
var testPG pgCluster

type pgCluster struct {
	mu  sync.Mutex
	srv *pgtest.Server
	err error
}

// get returns the running cluster. A machine without PostgreSQL fails the
// test rather than skipping it: CI installs it, and a backend that is
// never tested must not look green.
func (c *pgCluster) get(t testing.TB) *pgtest.Server {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.srv == nil && c.err == nil {
		c.srv, c.err = pgtest.Start(context.Background(), pgtest.Options{NoFsync: true})
	}
	if c.err != nil {
		t.Fatalf("PostgreSQL server for the tests: %v", c.err)
	}
	return c.srv
}

func (c *pgCluster) stop() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.srv == nil {
		return nil
	}
	return c.srv.Stop()
}

// pgConfig is testConfig with the store in a fresh PostgreSQL database
// (dropped when the test ends).
func pgConfig(t testing.TB) *Config {
	t.Helper()
	c := testConfig(t)
	c.Store.Driver, c.Store.Conninfo = StorePostgres, testPG.get(t).NewDatabase(t)
	return c
}

// storeConfigs are the configurations of the tests that run on both
// backends.
var storeConfigs = []struct {
	driver string
	config func(testing.TB) *Config
}{{StoreSQLite, testConfig}, {StorePostgres, pgConfig}}

// fastTimers are short ESRO timers for loopback tests, on both ends.
var fastTimers = esro.Timers{Acknowledgement: 5 * time.Millisecond, Roundtrip: 20 * time.Millisecond,
	Retransmit: 30 * time.Millisecond, NSDULifetime: 20 * time.Millisecond, RetransmitCount: 4}

// patientTimers are ESRO timers, for the server and the devices alike,
// for tests whose invocations must be answered whatever the machine's
// load: their performer timeout (T_noresp) is 3.8 s, where fastTimers'
// 290 ms can pass while a busy machine's server checks a password and
// writes the store.
var patientTimers = esro.Timers{Acknowledgement: 5 * time.Millisecond, Roundtrip: 100 * time.Millisecond,
	Retransmit: 300 * time.Millisecond, NSDULifetime: 100 * time.Millisecond, RetransmitCount: 8}

// testWriter sends logs to t.Log while the test runs.
type testWriter struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

// testLogger logs at EMSDP_TEST_LOG level (default warn) to the test.
func testLogger(t testing.TB) *slog.Logger {
	if _, ok := t.(*testing.F); ok {
		return slog.New(slog.DiscardHandler) // f.Log is not allowed inside fuzz targets
	}
	var lv slog.Level = slog.LevelWarn
	if v := os.Getenv("EMSDP_TEST_LOG"); v != "" {
		lv.UnmarshalText([]byte(v))
	}
	w := &testWriter{t: t}
	t.Cleanup(func() {
		w.mu.Lock()
		w.done = true
		w.mu.Unlock()
	})
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: lv}))
}

func setTimers(c *Config, t esro.Timers) {
	c.ESRO.AckDelay, c.ESRO.Roundtrip = Duration(t.Acknowledgement), Duration(t.Roundtrip)
	c.ESRO.Retransmit, c.ESRO.NSDULifetime, c.ESRO.Retries = Duration(t.Retransmit), Duration(t.NSDULifetime), t.RetransmitCount
}

func testConfig(t testing.TB) *Config {
	c := DefaultConfig()
	c.Domain, c.Hostname = "emsd.test", "mts.emsd.test"
	c.Data = t.TempDir()
	c.EMSD.Listen, c.SMTP.Listen, c.Admin.Listen = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
	setTimers(c, fastTimers)
	c.Delivery.Retry = []Duration{Duration(100 * time.Millisecond)}
	c.Relay.Retry = []Duration{Duration(100 * time.Millisecond)}
	c.Store.RegistryPoll = Duration(50 * time.Millisecond)
	c.Delivery.DrainTimeout = Duration(2 * time.Second)
	return c
}

func startServer(t testing.TB, c *Config) *Server {
	t.Helper()
	return startServerWith(t, c, Options{Logger: testLogger(t)})
}

// startServerWith starts a server with options o, shut down at cleanup.
func startServerWith(t testing.TB, c *Config, o Options) *Server {
	t.Helper()
	s, err := Start(context.Background(), c, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	return s
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// testDevice is a device user agent (package ua) on loopback, registered
// in the server's store.
type testDevice struct {
	addr emsd.Address
	ep   *esro.Endpoint
	ua   *ua.Client
	got  chan *ua.Delivery
}

type deviceOpts struct {
	password string
	version  emsd.Version
	mode     store.Mode
	aliases  []string
	ip       string // loopback address to bind, default 127.0.0.1
	handler  ua.Handler
	uaConfig func(*ua.Config)
	timers   esro.Timers // zero: fastTimers
}

// addDevice registers a device for ap in the server's store.
func addDevice(t testing.TB, s *Server, addr emsd.Address, ap netip.AddrPort, o deviceOpts) {
	t.Helper()
	// The cheapest bcrypt cost: tests run with ESRO timers far shorter
	// than bcrypt's default cost takes on a busy machine.
	hash := ""
	if o.password != "" {
		h, err := bcrypt.GenerateFromPassword([]byte(o.password), bcrypt.MinCost)
		must(t, err)
		hash = string(h)
	}
	mode := o.mode
	if mode == "" {
		mode = store.ModeComplete
	}
	must(t, s.st.AddDevice(context.Background(), &store.Device{Address: uint32(addr), PasswordHash: hash,
		IP: ap.Addr(), Port: ap.Port(), Version: o.version.String(), Mode: mode, Aliases: o.aliases}))
	must(t, s.Reload(context.Background()))
}

func listenESRO(t testing.TB, ip string) *esro.Endpoint {
	return listenESROTimers(t, ip, fastTimers)
}

func listenESROTimers(t testing.TB, ip string, timers esro.Timers) *esro.Endpoint {
	t.Helper()
	if ip == "" {
		ip = "127.0.0.1"
	}
	ep, err := esro.Listen("udp", ip+":0", &esro.Config{Timers: timers, Logger: slog.New(slog.DiscardHandler)})
	must(t, err)
	t.Cleanup(func() { ep.Close() })
	return ep
}

func epAddr(ep *esro.Endpoint) netip.AddrPort {
	return ep.LocalAddr().(*net.UDPAddr).AddrPort()
}

func newDevice(t testing.TB, s *Server, addr emsd.Address, o deviceOpts) *testDevice {
	t.Helper()
	timers := o.timers
	if timers == (esro.Timers{}) {
		timers = fastTimers
	}
	ep := listenESROTimers(t, o.ip, timers)
	addDevice(t, s, addr, epAddr(ep), o)
	d := &testDevice{addr: addr, ep: ep, got: make(chan *ua.Delivery, 100)}
	h := o.handler
	if h == nil {
		h = ua.HandlerFunc(func(_ context.Context, del *ua.Delivery) error {
			d.got <- del
			return nil
		})
	}
	uc := ua.Config{Server: s.Addrs().EMSD, Address: addr, Password: o.password, Version: o.version, Handler: h,
		Logger: slog.New(slog.DiscardHandler)}
	if o.uaConfig != nil {
		o.uaConfig(&uc)
	}
	c, err := ua.New(ep, uc)
	must(t, err)
	t.Cleanup(func() { c.Close() })
	d.ua = c
	return d
}

// next waits for the device's next delivery.
func (d *testDevice) next(t testing.TB) *ua.Delivery {
	t.Helper()
	select {
	case del := <-d.got:
		return del
	case <-time.After(15 * time.Second):
		t.Fatalf("device %s: no delivery", d.addr)
		return nil
	}
}

// none checks that no delivery arrives for a while.
func (d *testDevice) none(t testing.TB, wait time.Duration) {
	t.Helper()
	select {
	case del := <-d.got:
		t.Fatalf("device %s: unexpected delivery %s %q", d.addr, del.MessageID, del.IPM.Heading.Subject)
	case <-time.After(wait):
	}
}

// ---- a smarthost ----

type hostMsg struct {
	from string
	to   []string
	data []byte
	tls  bool // over STARTTLS
	mail smtp.MailOptions
	rcpt []smtp.RcptOptions
}

// smarthost is a go-smtp server on loopback recording what it gets;
// rcptErr refuses recipients.
type smarthost struct {
	mu      sync.Mutex
	msgs    []hostMsg
	rcptErr map[string]error
	got     chan hostMsg
	addr    string
	// onData, when set, runs before the answer to DATA (a test holds a
	// transaction open with it).
	onData func(hostMsg)
}

type hostSession struct {
	h *smarthost
	c *smtp.Conn
	m hostMsg
}

func (h *smarthost) NewSession(c *smtp.Conn) (smtp.Session, error) {
	return &hostSession{h: h, c: c}, nil
}

func (s *hostSession) Mail(from string, o *smtp.MailOptions) error {
	_, tls := s.c.TLSConnectionState()
	s.m = hostMsg{from: from, tls: tls}
	if o != nil {
		s.m.mail = *o
	}
	return nil
}

func (s *hostSession) Rcpt(to string, o *smtp.RcptOptions) error {
	s.h.mu.Lock()
	err := s.h.rcptErr[to]
	s.h.mu.Unlock()
	if err != nil {
		return err
	}
	s.m.to = append(s.m.to, to)
	var ro smtp.RcptOptions
	if o != nil {
		ro = *o
	}
	s.m.rcpt = append(s.m.rcpt, ro)
	return nil
}

func (s *hostSession) Data(r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	s.m.data = b
	s.h.mu.Lock()
	s.h.msgs = append(s.h.msgs, s.m)
	hook := s.h.onData
	s.h.mu.Unlock()
	if hook != nil {
		hook(s.m)
	}
	s.h.got <- s.m
	return nil
}

func (s *hostSession) Reset()        {}
func (s *hostSession) Logout() error { return nil }

func (h *smarthost) setRcptErr(to string, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.rcptErr == nil {
		h.rcptErr = map[string]error{}
	}
	h.rcptErr[to] = err
}

// startSmarthost serves until the test ends; addr is "" to pick a port.
func startSmarthost(t testing.TB, addr string) *smarthost {
	t.Helper()
	return startSmarthostWith(t, addr, nil)
}

// startSmarthostWith is startSmarthost with configure applied to the
// go-smtp server (e.g. a TLS certificate).
func startSmarthostWith(t testing.TB, addr string, configure func(*smtp.Server)) *smarthost {
	t.Helper()
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", addr)
	must(t, err)
	return startSmarthostOn(t, ln, configure)
}

// startSmarthostOn is startSmarthostWith on a listener of the test's.
func startSmarthostOn(t testing.TB, ln net.Listener, configure func(*smtp.Server)) *smarthost {
	t.Helper()
	h := &smarthost{got: make(chan hostMsg, 100), addr: ln.Addr().String()}
	srv := smtp.NewServer(h)
	srv.Domain = "smarthost.test"
	srv.ErrorLog = log.New(io.Discard, "", 0)
	if configure != nil {
		configure(srv)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(ln)
	}()
	t.Cleanup(func() {
		srv.Close()
		ln.Close() // Serve may not have registered it yet
		<-done
	})
	return h
}

func (h *smarthost) next(t testing.TB) hostMsg {
	t.Helper()
	select {
	case m := <-h.got:
		return m
	case <-time.After(15 * time.Second):
		t.Fatal("smarthost: no message")
		return hostMsg{}
	}
}

func (h *smarthost) none(t testing.TB, wait time.Duration) {
	t.Helper()
	select {
	case m := <-h.got:
		t.Fatalf("smarthost: unexpected message from %s to %v", m.from, m.to)
	case <-time.After(wait):
	}
}

// sendMail submits msg over SMTP (plain, no STARTTLS, with the SIZE
// parameter) to the server's inbound listener.
func sendMail(s *Server, from string, to []string, msg string) error {
	return sendMailTo(s.Addrs().SMTP.String(), from, to, msg)
}

func sendMailTo(addr, from string, to []string, msg string) error {
	c, err := smtp.Dial(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.Hello("client.test"); err != nil {
		return err
	}
	if err := c.Mail(from, &smtp.MailOptions{Size: int64(len(msg))}); err != nil {
		return err
	}
	for _, r := range to {
		if err := c.Rcpt(r, nil); err != nil {
			return err
		}
	}
	w, err := c.Data()
	if err != nil {
		return err
	}
	if _, err := w.Write([]byte(msg)); err != nil {
		return err
	}
	if err := w.Close(); err != nil {
		return err
	}
	return c.Quit()
}

// eventually polls cond until it holds or 10 s pass.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

func queueStats(t testing.TB, s *Server) store.Stats {
	t.Helper()
	st, err := s.st.Stats(context.Background())
	must(t, err)
	return st
}

// helperEnv, when set, makes the test binary run a server (see
// restart_test.go) instead of the tests.
const helperEnv = "EMSDP_SERVER_HELPER_CONFIG"

// counter returns the value of a metric sample with a label value of
// label (or without labels when label is ""); 0 when absent.
func (m *metrics) counter(t testing.TB, name, label string) float64 {
	t.Helper()
	mfs, err := m.reg.Gather()
	must(t, err)
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, mt := range mf.Metric {
			match := label == "" && len(mt.Label) == 0
			for _, lp := range mt.Label {
				if lp.GetValue() == label {
					match = true
				}
			}
			if !match {
				continue
			}
			if mt.Counter != nil {
				return mt.Counter.GetValue()
			}
			return mt.Gauge.GetValue()
		}
	}
	return 0
}

// held reports whether the scheduler holds device a, with no attempt of
// its own in flight: another server delivers to it (elsewhere), or its
// attempt failed.
func (s *Server) held(a emsd.Address, elsewhere bool) bool {
	s.sched.mu.Lock()
	defer s.sched.mu.Unlock()
	d := s.sched.fleet.devs[a]
	return d != nil && d.where != fBusy && (d.fails == 0 || !elsewhere) && d.hold.After(time.Now())
}
