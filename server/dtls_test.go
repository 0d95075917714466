package server

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/esro/esrodtls"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/ua"
)

// dtlsDevice is a device whose ESRO endpoint runs over DTLS: it listens
// (the server opens a session to deliver) and opens sessions itself (to
// submit), with one identity and key.
type dtlsTestDevice struct {
	addr emsd.Address
	conn *esrodtls.Conn
	ep   *esro.Endpoint
	ua   *ua.Client
	got  chan *ua.Delivery
}

func newDTLSDevice(t *testing.T, s *Server, addr emsd.Address, key []byte, requireDTLS bool) *dtlsTestDevice {
	t.Helper()
	id := addr.String()
	conn, err := esrodtls.Listen("udp4", "127.0.0.1:0", esrodtls.Config{
		PSK: func(got string) ([]byte, error) {
			if got != id {
				return nil, esrodtls.ErrUnknownIdentity
			}
			return key, nil
		},
		Credentials: func(netip.AddrPort) (string, []byte, error) { return id, key, nil },
		Logger:      slog.New(slog.DiscardHandler),
	})
	must(t, err)
	ep, err := esro.NewEndpoint(conn, &esro.Config{Timers: fastTimers, Logger: slog.New(slog.DiscardHandler)})
	must(t, err)
	t.Cleanup(func() { ep.Close() })
	ap := conn.LocalAddr().(interface{ AddrPort() netip.AddrPort }).AddrPort()
	must(t, s.st.AddDevice(context.Background(), &store.Device{Address: uint32(addr), IP: ap.Addr(), Port: ap.Port(),
		Version: "1.1", Mode: store.ModeComplete, PSK: key, RequireDTLS: requireDTLS}))
	must(t, s.Reload(context.Background()))
	d := &dtlsTestDevice{addr: addr, conn: conn, ep: ep, got: make(chan *ua.Delivery, 16)}
	d.ua, err = ua.New(ep, ua.Config{Server: s.Addrs().DTLS, Address: addr, Logger: slog.New(slog.DiscardHandler),
		Handler: ua.HandlerFunc(func(_ context.Context, del *ua.Delivery) error {
			d.got <- del
			return nil
		})})
	must(t, err)
	t.Cleanup(func() { d.ua.Close() })
	return d
}

func (d *dtlsTestDevice) next(t *testing.T) *ua.Delivery {
	t.Helper()
	select {
	case del := <-d.got:
		return del
	case <-time.After(20 * time.Second):
		t.Fatalf("device %s: no delivery", d.addr)
		return nil
	}
}

func dtlsConfig(t *testing.T) *Config {
	c := testConfig(t)
	c.DTLS.Listen = "127.0.0.1:0"
	return c
}

// TestDTLSDelivery: mail for a DTLS device that has no session with the
// server goes over a session the server opens to its registered address;
// mail between two DTLS devices flows without passwords; metrics count
// the handshakes and sessions.
func TestDTLSDelivery(t *testing.T) {
	s := startServer(t, dtlsConfig(t))
	if !s.Addrs().DTLS.IsValid() {
		t.Fatal("no DTLS address")
	}
	a := newDTLSDevice(t, s, 198036, []byte("key-of-device-36"), true)
	b := newDTLSDevice(t, s, 198037, []byte("key-of-device-37"), false)

	must(t, sendMail(s, "carol@example.com", []string{"198.037@emsd.test"}, inboundMsg("198.037@emsd.test", "over dtls", "hello")))
	if del := b.next(t); del.IPM.Heading.Subject != "over dtls" {
		t.Fatalf("delivered %q", del.IPM.Heading.Subject)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := a.ua.Submit(ctx, &ua.Message{To: []string{"198.037"}, Subject: "device to device", Body: []byte("x\n")}); err != nil {
		t.Fatalf("submit over DTLS: %v", err)
	}
	if del := b.next(t); del.IPM.Heading.Subject != "device to device" {
		t.Fatalf("delivered %q", del.IPM.Heading.Subject)
	}
	if n := s.metrics.counter(t, "dtls_handshakes_total", ""); n < 2 {
		t.Fatalf("dtls_handshakes_total %v, want at least 2", n)
	}
	if n := s.metrics.counter(t, "dtls_sessions", ""); n < 2 {
		t.Fatalf("dtls_sessions %v", n)
	}
}

// TestDTLSRequiredAndIdentity: a require_dtls device is refused on plain
// UDP even with the right password; over DTLS, a security element naming
// another device is refused; a device without a key gets no handshake.
func TestDTLSRequiredAndIdentity(t *testing.T) {
	s := startServer(t, dtlsConfig(t))
	newDTLSDevice(t, s, 198036, []byte("key-of-device-36"), true)
	other := newDevice(t, s, 198040, deviceOpts{password: "pw"})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	// Plain UDP from the device's own address.
	plain, err := ua.New(listenESRO(t, ""), ua.Config{Server: s.Addrs().EMSD, Address: 198036, Logger: slog.New(slog.DiscardHandler)})
	must(t, err)
	defer plain.Close()
	var uerr *ua.Error
	if _, err := plain.Submit(ctx, &ua.Message{To: []string{"198.040"}, Body: []byte("x\n")}); !errors.As(err, &uerr) || uerr.Code != emsd.CodeSecurity {
		t.Fatalf("plain submission of a require_dtls device: %v", err)
	}

	// Over DTLS, but claiming to be 198.040.
	cc, err := esrodtls.NewClient(esrodtls.Config{Credentials: func(netip.AddrPort) (string, []byte, error) {
		return "198.036", []byte("key-of-device-36"), nil
	}})
	must(t, err)
	cep, err := esro.NewEndpoint(cc, &esro.Config{Timers: fastTimers, Logger: slog.New(slog.DiscardHandler)})
	must(t, err)
	defer cep.Close()
	imp, err := ua.New(cep, ua.Config{Server: s.Addrs().DTLS, Address: 198040, Password: "pw", Logger: slog.New(slog.DiscardHandler)})
	must(t, err)
	defer imp.Close()
	if _, err := imp.Submit(ctx, &ua.Message{To: []string{"198.036"}, Body: []byte("x\n")}); !errors.As(err, &uerr) || uerr.Code != emsd.CodeSecurity {
		t.Fatalf("DTLS session of 198.036 acting as 198.040: %v", err)
	}
	other.none(t, 200*time.Millisecond)

	// A device with no key: unknown identity.
	k, err := s.dtls.devicePSK("198.040")
	if !errors.Is(err, esrodtls.ErrUnknownIdentity) || k != nil {
		t.Fatalf("key of a device without one: %v", err)
	}
	if _, err := s.dtls.devicePSK("198036"); !errors.Is(err, esrodtls.ErrUnknownIdentity) {
		t.Fatalf("identity not in canonical form accepted: %v", err)
	}
}

// TestDTLSKeyRotation: a new key ends the sessions made with the old one.
func TestDTLSKeyRotation(t *testing.T) {
	s := startServer(t, dtlsConfig(t))
	a := newDTLSDevice(t, s, 198036, []byte("key-of-device-36"), false)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := a.ua.DeliveryControl(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if _, ok := s.dtls.conn.SessionFor("198.036"); !ok {
		t.Fatal("no session after an invocation")
	}
	d, err := s.st.Device(ctx, 198036)
	must(t, err)
	d.PSK = []byte("the-rotated-key!")
	must(t, s.st.UpdateDevice(ctx, d))
	must(t, s.Reload(ctx))
	if _, ok := s.dtls.conn.SessionFor("198.036"); ok {
		t.Fatal("session of the old key survived the rotation")
	}
}

func TestDTLSConfigValidation(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(*DTLSConfig)
	}{
		{"bad suite", func(d *DTLSConfig) { d.CipherSuites = []string{"TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"} }},
		{"bad listen", func(d *DTLSConfig) { d.Listen = "nowhere" }},
		{"no timeout", func(d *DTLSConfig) { d.HandshakeTimeout = 0 }},
		{"burst without rate", func(d *DTLSConfig) { d.HandshakesRate = 0 }},
		{"no handshakes", func(d *DTLSConfig) { d.MaxHandshakes = 0 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dtlsConfig(t)
			tc.edit(&c.DTLS)
			if err := c.Validate(); err == nil {
				t.Fatal("accepted")
			}
		})
	}
	c := dtlsConfig(t)
	c.DTLS.CipherSuites = []string{"TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256"}
	must(t, c.Validate())
}

// TestDTLSDeliveryFollowsPoll: a device receives over the session it polls
// on, not over a later one it opened only to submit (ua send beside ua
// receive --poll), as a plain submission does not move a polled contact.
func TestDTLSDeliveryFollowsPoll(t *testing.T) {
	s := startServer(t, dtlsConfig(t))
	key := []byte("key-of-device-36")
	must(t, s.st.AddDevice(context.Background(), &store.Device{Address: 198036, Version: "1.1", Mode: store.ModeComplete, PSK: key}))
	must(t, s.Reload(context.Background()))
	client := func(h ua.Handler) *ua.Client {
		cc, err := esrodtls.NewClient(esrodtls.Config{Credentials: func(netip.AddrPort) (string, []byte, error) {
			return "198.036", key, nil
		}, Logger: slog.New(slog.DiscardHandler)})
		must(t, err)
		ep, err := esro.NewEndpoint(cc, &esro.Config{Timers: fastTimers, Logger: slog.New(slog.DiscardHandler)})
		must(t, err)
		t.Cleanup(func() { ep.Close() })
		c, err := ua.New(ep, ua.Config{Server: s.Addrs().DTLS, Address: 198036, Handler: h, Logger: slog.New(slog.DiscardHandler)})
		must(t, err)
		t.Cleanup(func() { c.Close() })
		return c
	}
	got := make(chan *ua.Delivery, 4)
	rx := client(ua.HandlerFunc(func(_ context.Context, d *ua.Delivery) error { got <- d; return nil }))
	tx := client(nil) // takes no deliveries, as ua send
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := rx.DeliveryControl(ctx, nil); err != nil {
		t.Fatalf("poll over DTLS: %v", err)
	}
	if _, err := tx.Submit(ctx, &ua.Message{To: []string{"198.036"}, Subject: "to myself", Body: []byte("x\n")}); err != nil {
		t.Fatalf("submit over DTLS: %v", err)
	}
	select {
	case d := <-got:
		if d.IPM.Heading.Subject != "to myself" {
			t.Fatalf("delivered %q", d.IPM.Heading.Subject)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no delivery over the polling session within 5 s")
	}
}
