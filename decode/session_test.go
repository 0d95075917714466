package decode_test

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/internal/pcaprec"
	"github.com/esro-emsdp/emsdp/server"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/sqlite"
	"github.com/esro-emsdp/emsdp/ua"
)

// Addresses the capture shows: the server on the project's port, so that
// decode's and the dissector's default port selection applies.
var (
	shownServer = netip.MustParseAddrPort("127.0.0.1:641")
	devicePW    = "s3cret-PW"
)

// sessionBody is long enough to be segmented both ways.
func sessionBody() string {
	var b strings.Builder
	for i := 0; b.Len() < 5000; i++ {
		fmt.Fprintf(&b, "Line %04d of a segmented EMSD message.\n", i)
	}
	return b.String()
}

// dropFirst drops the first datagram written that matches. The recorder
// above it sees the datagram: the capture shows one lost on the way, as a
// capture taken at the sender would.
type dropFirst struct {
	net.PacketConn
	match   func([]byte) bool
	dropped atomic.Bool
}

func (d *dropFirst) WriteTo(b []byte, a net.Addr) (int, error) {
	if d.match(b) && d.dropped.CompareAndSwap(false, true) {
		return len(b), nil
	}
	return d.PacketConn.WriteTo(b, a)
}

var session struct {
	once sync.Once
	path string
	err  error
	dir  string
}

// sessionCapture runs a real server and two real devices on loopback,
// records every datagram at the server's socket, and returns the path of
// the pcap: a short submission whose SubmitResult is lost once (so the
// INVOKE is retransmitted and the RESULT sent again), a segmented
// submission and its segmented delivery, delivery control and delivery
// verify, and a submission with a wrong password (ERROR). It is made once
// per test binary.
func sessionCapture(t *testing.T) string {
	t.Helper()
	session.once.Do(func() {
		dir, err := os.MkdirTemp("", "emsdp-capture")
		if err != nil {
			session.err = err
			return
		}
		session.dir = dir
		session.path = filepath.Join(dir, "session.pcap")
		session.err = runSession(session.path, filepath.Join(dir, "data"))
	})
	if session.err != nil {
		t.Fatalf("capturing a session: %v", session.err)
	}
	return session.path
}

func TestMain(m *testing.M) {
	code := m.Run()
	if session.dir != "" {
		os.RemoveAll(session.dir)
	}
	os.Exit(code)
}

var sessionTimers = esro.Timers{Acknowledgement: 10 * time.Millisecond, Roundtrip: 100 * time.Millisecond,
	Retransmit: 150 * time.Millisecond, NSDULifetime: 100 * time.Millisecond, RetransmitCount: 6}

func runSession(path, data string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	rec, err := pcaprec.New(f)
	if err != nil {
		return err
	}
	quiet := slog.New(slog.DiscardHandler)

	db, err := sqlite.OpenDir(ctx, data, nil)
	if err != nil {
		return err
	}
	defer db.Close()
	conn, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	real := conn.LocalAddr().(*net.UDPAddr).AddrPort()
	rec.Alias(real, shownServer)
	// The first non-empty SubmitResult (RESULT with data, 01 xx 30 ...)
	// is lost once.
	lossy := &dropFirst{PacketConn: conn, match: func(b []byte) bool {
		return len(b) > 2 && b[0] == 0x01 && b[2] == 0x30
	}}

	c := server.DefaultConfig()
	c.Domain, c.Hostname = "emsd.test", "mts.emsd.test"
	c.Data = data
	c.EMSD.Listen, c.SMTP.Listen, c.Admin.Listen = real.String(), "127.0.0.1:0", "127.0.0.1:0"
	c.ESRO.AckDelay, c.ESRO.Roundtrip = server.Duration(sessionTimers.Acknowledgement), server.Duration(sessionTimers.Roundtrip)
	c.ESRO.Retransmit, c.ESRO.NSDULifetime = server.Duration(sessionTimers.Retransmit), server.Duration(sessionTimers.NSDULifetime)
	c.ESRO.Retries = sessionTimers.RetransmitCount
	s, err := server.Start(ctx, c, server.Options{Logger: quiet, Store: db, PacketConn: pcaprec.Wrap(lossy, rec)})
	if err != nil {
		return err
	}
	defer s.Shutdown(context.Background())

	type device struct {
		ep  *esro.Endpoint
		ua  *ua.Client
		got chan *ua.Delivery
	}
	newDevice := func(addr emsd.Address, pw, register string) (*device, error) {
		ep, err := esro.Listen("udp", "127.0.0.1:0", &esro.Config{Timers: sessionTimers, Logger: quiet})
		if err != nil {
			return nil, err
		}
		ap := ep.LocalAddr().(*net.UDPAddr).AddrPort()
		hash, err := store.HashPassword(register)
		if err != nil {
			return nil, err
		}
		if err := db.AddDevice(ctx, &store.Device{Address: uint32(addr), PasswordHash: hash, IP: ap.Addr(), Port: ap.Port(),
			Version: "1.1", Mode: store.ModeComplete}); err != nil {
			return nil, err
		}
		d := &device{ep: ep, got: make(chan *ua.Delivery, 10)}
		d.ua, err = ua.New(ep, ua.Config{Server: real, Address: addr, Password: pw, Logger: quiet,
			Handler: ua.HandlerFunc(func(_ context.Context, del *ua.Delivery) error { d.got <- del; return nil })})
		return d, err
	}
	a, err := newDevice(198036, devicePW, devicePW)
	if err != nil {
		return err
	}
	defer a.ep.Close()
	b, err := newDevice(198037, devicePW, devicePW)
	if err != nil {
		return err
	}
	defer b.ep.Close()
	bad, err := newDevice(198038, "wrong-password", devicePW)
	if err != nil {
		return err
	}
	defer bad.ep.Close()
	if err := s.Reload(ctx); err != nil {
		return err
	}

	// A short submission, whose first SubmitResult is lost.
	if _, err := a.ua.Submit(ctx, &ua.Message{To: []string{"198.037"}, Subject: "Short", Body: []byte("Hello.\n")}); err != nil {
		return fmt.Errorf("short submission: %w", err)
	}
	if _, err := recv(ctx, b.got); err != nil {
		return err
	}
	// A segmented submission, delivered in segments.
	id, err := a.ua.Submit(ctx, &ua.Message{To: []string{"198.037", "carol@example.com"}, Subject: "Segmented", Body: []byte(sessionBody())})
	if err != nil {
		return fmt.Errorf("segmented submission: %w", err)
	}
	if _, err := recv(ctx, b.got); err != nil {
		return err
	}
	if _, err := b.ua.DeliveryControl(ctx, &emsd.DeliveryControlArgument{}); err != nil {
		return fmt.Errorf("delivery control: %w", err)
	}
	if _, err := a.ua.DeliveryVerify(ctx, emsd.MessageID{IsLocal: true, Local: id}); err != nil {
		return fmt.Errorf("delivery verify: %w", err)
	}
	// A wrong password: ERROR security.
	if _, err := bad.ua.Submit(ctx, &ua.Message{To: []string{"198.036"}, Subject: "Refused", Body: []byte("x\n")}); err == nil {
		return fmt.Errorf("submission with a wrong password was accepted")
	}
	// Let the last ACKs arrive before the socket closes.
	time.Sleep(300 * time.Millisecond)
	if err := rec.Err(); err != nil {
		return err
	}
	if !lossy.dropped.Load() {
		return fmt.Errorf("no SubmitResult was dropped")
	}
	return nil
}

func recv(ctx context.Context, ch chan *ua.Delivery) (*ua.Delivery, error) {
	select {
	case d := <-ch:
		return d, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("waiting for a delivery: %w", ctx.Err())
	}
}
