package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	piondtls "github.com/pion/dtls/v3"
	coapdtls "github.com/plgd-dev/go-coap/v3/dtls"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/mux"
	coapnet "github.com/plgd-dev/go-coap/v3/net"
	"github.com/plgd-dev/go-coap/v3/options"
	udpclient "github.com/plgd-dev/go-coap/v3/udp/client"
	"golang.org/x/crypto/bcrypt"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/esro/esrodtls"
	"github.com/esro-emsdp/emsdp/server"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/sqlite"
	"github.com/esro-emsdp/emsdp/ua"
)

// The DTLS section's devices: one submits over plain UDP with a password,
// one over DTLS with its key and no password.
const (
	plainDevice = emsd.Address(198036)
	dtlsDevice  = emsd.Address(198039)
)

var dtlsKey = []byte("0123456789abcdef")

func runDTLS(ctx context.Context, o *benchOptions) (*report, error) {
	wire, err := dtlsWire(ctx, o)
	if err != nil {
		return nil, err
	}
	rate, err := dtlsRate(ctx, o)
	if err != nil {
		return nil, err
	}
	return &report{tables: []table{
		{caption: "One submission on the wire: plain EMSD, EMSD over DTLS, SMTP submission with STARTTLS.", results: wire},
		{caption: "ESRO 3-way invocations per second over loopback: plain UDP, DTLS, and CoAP over DTLS.", results: rate},
	}, notes: []string{
		"Submission: a real `server.Start` (SQLite store) with `emsd.listen` and `dtls.listen`, and a `ua.Client`; every datagram between them " +
			"counted at a relay on the path, both directions, from the first datagram to the last ACK. Plain: the device's security element " +
			"carries address and password. DTLS: TLS_PSK_WITH_AES_128_CCM_8, Connection IDs on, cookie exchange on, the device's address as PSK " +
			"identity and no password. Fresh = a new session (cookie exchange and full PSK handshake) before the submission; established = the " +
			fmt.Sprintf("next submission on a session already open (the normal case). Smallest of %d runs.", mailReps),
		"SMTP: go-smtp client and server, TCP handshake, EHLO, STARTTLS (TLS 1.3, ECDSA P-256 certificate, X25519), EHLO again, AUTH PLAIN, " +
			"MAIL, RCPT, DATA, QUIT and teardown; octets at the sockets, TCP segments from /proc/net/snmp as in the mail section.",
		fmt.Sprintf("Invocations: 64-octet echo, closed loop as in the esro section, ESRO timers A 1 ms, RT 2 ms, R 50 ms, L 1 ms, N 5. "+
			"Plain UDP: the esro section's setup (%d client sockets, the performer's socket with a 4 MiB receive buffer, the echo inline on its read loop). "+
			"Over DTLS, ESRO and CoAP alike: %d client sockets, one DTLS session each (TLS_PSK_WITH_AES_128_CCM_8, opened before measuring), "+
			"the server's socket with the system's default receive buffer; the ESRO echo on a handler worker (`HandleFunc`). "+
			"CoAP: go-coap v3 over pion/dtls, confirmable POST.", esroSockets, clientSockets),
	}}, nil
}

// ---- bytes on the wire ----

// udpRelay forwards between one client (whoever wrote last) and a target,
// logging every datagram it passes.
type udpRelay struct {
	front, back *net.UDPConn
	to          *net.UDPAddr
	log         datagramLog
	mu          sync.Mutex
	client      *net.UDPAddr
	last        time.Time
	wg          sync.WaitGroup
}

func newUDPRelay(target netip.AddrPort) (*udpRelay, error) {
	front, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, err
	}
	back, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		front.Close()
		return nil, err
	}
	r := &udpRelay{front: front, back: back, to: net.UDPAddrFromAddrPort(target)}
	r.wg.Add(2)
	go func() {
		defer r.wg.Done()
		buf := make([]byte, 65536)
		for {
			n, from, err := front.ReadFromUDP(buf)
			if err != nil {
				return
			}
			r.mu.Lock()
			r.client, r.last = from, time.Now()
			r.mu.Unlock()
			r.log.add(true, n)
			back.WriteToUDP(buf[:n], r.to)
		}
	}()
	go func() {
		defer r.wg.Done()
		buf := make([]byte, 65536)
		for {
			n, _, err := back.ReadFromUDP(buf)
			if err != nil {
				return
			}
			r.mu.Lock()
			c := r.client
			r.last = time.Now()
			r.mu.Unlock()
			if c != nil {
				r.log.add(false, n)
				front.WriteToUDP(buf[:n], c)
			}
		}
	}()
	return r, nil
}

func (r *udpRelay) addr() netip.AddrPort { return r.front.LocalAddr().(*net.UDPAddr).AddrPort() }

func (r *udpRelay) Close() { r.front.Close(); r.back.Close(); r.wg.Wait() }

// quiet waits until nothing passed for a while.
func (r *udpRelay) quiet(ctx context.Context) error {
	for {
		r.mu.Lock()
		idle := time.Since(r.last)
		r.mu.Unlock()
		if idle > 60*time.Millisecond {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// measure runs do and returns what passed the relay meanwhile.
func (r *udpRelay) measure(ctx context.Context, do func(context.Context) error) (exchange, error) {
	if err := r.quiet(ctx); err != nil {
		return exchange{}, err
	}
	r.log.take()
	if err := do(ctx); err != nil {
		return exchange{}, err
	}
	if err := r.quiet(ctx); err != nil {
		return exchange{}, err
	}
	sent, recv := r.log.take()
	all := append(sent, recv...)
	x := exchange{units: len(all)}
	for _, n := range all {
		x.payload += n
	}
	x.packets, x.wire = udpWire(all)
	return x, nil
}

func dtlsWire(ctx context.Context, o *benchOptions) ([]Result, error) {
	dir, err := os.MkdirTemp("", "emsdp-bench-dtls-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	db, err := sqlite.OpenDir(ctx, dir, nil)
	if err != nil {
		return nil, err
	}
	hash, _ := bcrypt.GenerateFromPassword([]byte(devPassword), bcrypt.MinCost)
	lo := netip.MustParseAddr("127.0.0.1")
	err = errors.Join(
		db.AddDevice(ctx, &store.Device{Address: uint32(plainDevice), PasswordHash: string(hash), IP: lo, Port: 9, Version: "1.1", Mode: store.ModeComplete}),
		db.AddDevice(ctx, &store.Device{Address: uint32(dtlsDevice), IP: lo, Port: 9, Version: "1.1", Mode: store.ModeComplete, PSK: dtlsKey}),
		db.Close())
	if err != nil {
		return nil, err
	}
	cfg := server.DefaultConfig()
	cfg.Domain, cfg.Hostname, cfg.Data = benchDomain, "mts."+benchDomain, dir
	cfg.EMSD.Listen, cfg.DTLS.Listen, cfg.Admin.Listen, cfg.SMTP.Listen = "127.0.0.1:0", "127.0.0.1:0", "", ""
	t := mailTimers
	cfg.ESRO.AckDelay, cfg.ESRO.Roundtrip = server.Duration(t.Acknowledgement), server.Duration(t.Roundtrip)
	cfg.ESRO.Retransmit, cfg.ESRO.NSDULifetime = server.Duration(t.Retransmit), server.Duration(t.NSDULifetime)
	cfg.ESRO.Retries = t.RetransmitCount
	srv, err := server.Start(ctx, cfg, server.Options{Logger: o.srvLog})
	if err != nil {
		return nil, err
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	plainRelay, err := newUDPRelay(srv.Addrs().EMSD)
	if err != nil {
		return nil, err
	}
	defer plainRelay.Close()
	// Fresh sessions come through a relay of their own: all come from its
	// one address, so each new one replaces the last (as a restarted
	// device's does), and the established session must not be that.
	dtlsRelay, err := newUDPRelay(srv.Addrs().DTLS)
	if err != nil {
		return nil, err
	}
	defer dtlsRelay.Close()
	freshRelay, err := newUDPRelay(srv.Addrs().DTLS)
	if err != nil {
		return nil, err
	}
	defer freshRelay.Close()

	ecfg := &esro.Config{Timers: mailTimers, Logger: o.srvLog}
	plainEP, err := esro.Listen("udp4", "127.0.0.1:0", ecfg)
	if err != nil {
		return nil, err
	}
	defer plainEP.Close()
	plainUA, err := ua.New(plainEP, ua.Config{Server: plainRelay.addr(), Address: plainDevice, Password: devPassword, Logger: o.srvLog})
	if err != nil {
		return nil, err
	}
	defer plainUA.Close()
	dtlsClient := func(relay *udpRelay) (*esro.Endpoint, *ua.Client, error) {
		conn, err := esrodtls.NewClient(esrodtls.Config{Logger: o.srvLog,
			Credentials: func(netip.AddrPort) (string, []byte, error) { return dtlsDevice.String(), dtlsKey, nil }})
		if err != nil {
			return nil, nil, err
		}
		ep, err := esro.NewEndpoint(conn, ecfg)
		if err != nil {
			conn.Close()
			return nil, nil, err
		}
		c, err := ua.New(ep, ua.Config{Server: relay.addr(), Address: dtlsDevice, Logger: o.srvLog})
		if err != nil {
			ep.Close()
			return nil, nil, err
		}
		return ep, c, nil
	}
	estEP, estUA, err := dtlsClient(dtlsRelay)
	if err != nil {
		return nil, err
	}
	defer estEP.Close()
	defer estUA.Close()

	sink, cert, err := startTLSSink(ctx)
	if err != nil {
		return nil, err
	}
	defer sink.Close()
	_, segErr := tcpOutSegs()

	var out []Result
	for _, size := range []int{200, 5000} {
		m := &ua.Message{To: []string{internetRcp}, Subject: subject, Body: textBody(size)}
		submit := func(c *ua.Client) func(context.Context) error {
			return func(ctx context.Context) error { _, err := c.Submit(ctx, m); return err }
		}
		plain, err := minExchange(ctx, func(ctx context.Context) (exchange, error) {
			return plainRelay.measure(ctx, submit(plainUA))
		})
		if err != nil {
			return nil, fmt.Errorf("plain submission: %w", err)
		}
		fresh, err := minExchange(ctx, func(ctx context.Context) (exchange, error) {
			ep, c, err := dtlsClient(freshRelay)
			if err != nil {
				return exchange{}, err
			}
			defer ep.Close()
			defer c.Close()
			return freshRelay.measure(ctx, submit(c))
		})
		if err != nil {
			return nil, fmt.Errorf("DTLS submission, fresh session: %w", err)
		}
		if _, err := estUA.Submit(ctx, m); err != nil { // the session opens
			return nil, err
		}
		est, err := minExchange(ctx, func(ctx context.Context) (exchange, error) {
			return dtlsRelay.measure(ctx, submit(estUA))
		})
		if err != nil {
			return nil, fmt.Errorf("DTLS submission, established session: %w", err)
		}
		rfc, err := rfc5322(m, plainDevice, "<EMSD.00000001.00000001@"+benchDomain+">")
		if err != nil {
			return nil, err
		}
		smtpX, err := minExchange(ctx, func(ctx context.Context) (exchange, error) {
			return smtpTLSExchange(ctx, sink, cert, plainDevice.String()+"@"+benchDomain, internetRcp, rfc, segErr)
		})
		if err != nil {
			return nil, fmt.Errorf("SMTP submission with STARTTLS: %w", err)
		}
		for _, row := range []struct {
			name string
			x    exchange
		}{
			{"EMSD plain UDP, password", plain},
			{"EMSD over DTLS, fresh session", fresh},
			{"EMSD over DTLS, established session", est},
			{"SMTP submission, STARTTLS + AUTH PLAIN", smtpX},
		} {
			r := newResult("dtls", row.name, "body", fmt.Sprintf("%d B", size), "message (RFC 5322)", fmt.Sprintf("%d B", len(rfc)))
			r.set("datagrams/segments", float64(row.x.units), "")
			r.set("payload", float64(row.x.payload), "B")
			if row.x.wire > 0 {
				r.set("on the wire", float64(row.x.wire), "B")
				r.set("vs plain EMSD", float64(row.x.wire)/float64(plain.wire), "×")
				if smtpX.wire > 0 {
					r.set("vs SMTP+TLS", float64(row.x.wire)/float64(smtpX.wire), "×")
				}
			}
			out = append(out, r)
		}
	}
	return out, nil
}

// startTLSSink is a submission sink that offers STARTTLS and requires it
// before AUTH, as a submission server on the Internet does.
func startTLSSink(ctx context.Context) (*smtpSink, *x509.CertPool, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "mx.example.net"},
		DNSNames: []string{"mx.example.net"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	s, err := startSMTPSink(ctx, &sinkCreds{user: plainDevice.String(), pass: devPassword})
	if err != nil {
		return nil, nil, err
	}
	s.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}}}
	s.srv.AllowInsecureAuth = false
	return s, pool, nil
}

// smtpTLSExchange is smtpExchange with STARTTLS before AUTH.
func smtpTLSExchange(ctx context.Context, sink *smtpSink, roots *x509.CertPool, from, to string, msg []byte, segErr error) (exchange, error) {
	select {
	case <-sink.ln.closed:
	default:
	}
	var seg0 uint64
	if segErr == nil {
		seg0, _ = tcpOutSegs()
	}
	d := net.Dialer{Control: clampMSS}
	conn, err := d.DialContext(ctx, "tcp", sink.addr())
	if err != nil {
		return exchange{}, err
	}
	cc := &countingConn{Conn: conn}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	err = func() error {
		// EHLO, STARTTLS, then EHLO again inside TLS (go-smtp sends it
		// before the next command).
		c, err := smtp.NewClientStartTLS(cc, &tls.Config{ServerName: "mx.example.net", RootCAs: roots})
		if err != nil {
			return err
		}
		defer c.Close()
		return smtpTransaction(c, sasl.NewPlainClient("", plainDevice.String(), devPassword), from, to, msg)
	}()
	if err != nil {
		return exchange{}, fmt.Errorf("smtp: %w", err)
	}
	cc.mu.Lock()
	in, out := cc.in, cc.out
	cc.mu.Unlock()
	select {
	case <-sink.ln.closed:
	case <-ctx.Done():
		return exchange{}, ctx.Err()
	}
	return tcpExchange(ctx, in+out, seg0, segErr)
}

// ---- invocations per second ----

func dtlsRate(ctx context.Context, o *benchOptions) ([]Result, error) {
	var out []Result
	for _, conc := range []int{1, 16, 256} {
		plain, err := esroLoad(ctx, o, esro.ThreeWay, 64, conc)
		if err != nil {
			return nil, err
		}
		sec, err := esroDTLSLoad(ctx, o, 64, conc)
		if err != nil {
			return nil, fmt.Errorf("esro over dtls: %w", err)
		}
		coap, err := coapDTLSLoad(ctx, o, 64, conc)
		if err != nil {
			return nil, fmt.Errorf("coap over dtls: %w", err)
		}
		for _, row := range []struct {
			name string
			st   loadStats
		}{{"ESRO 3-way, plain UDP", plain}, {"ESRO 3-way over DTLS", sec}, {"CoAP CON POST over DTLS", coap}} {
			r := newResult("dtls", row.name, "payload", "64 B", "concurrency", fmt.Sprint(conc))
			fill(&r, row.st)
			r.set("ratio to plain ESRO", row.st.rate()/plain.rate(), "×")
			out = append(out, r)
		}
	}
	return out, nil
}

func benchPSK(id string) ([]byte, error) {
	if id != dtlsDevice.String() {
		return nil, esrodtls.ErrUnknownIdentity
	}
	return dtlsKey, nil
}

func esroDTLSLoad(ctx context.Context, o *benchOptions, size, conc int) (loadStats, error) {
	cfg := &esro.Config{Timers: loopbackTimers, PerformerTimeout: 5 * time.Second, Logger: o.log, MaxPeerInvocations: 65536}
	sconn, err := esrodtls.Listen("udp4", "127.0.0.1:0", esrodtls.Config{PSK: benchPSK, Logger: o.srvLog,
		MaxHandshakes: 1024, CipherSuites: []piondtls.CipherSuiteID{piondtls.TLS_PSK_WITH_AES_128_CCM_8}})
	if err != nil {
		return loadStats{}, err
	}
	perf, err := esro.NewEndpoint(sconn, cfg)
	if err != nil {
		sconn.Close()
		return loadStats{}, err
	}
	defer perf.Close()
	perf.HandleFunc(13, esro.ThreeWay, func(_ context.Context, w esro.ResponseWriter, inv *esro.Invocation) {
		w.Result(inv.Encoding, inv.Data)
	})
	to := sconn.LocalAddr().(*net.UDPAddr).AddrPort()
	clients := make([]*esro.Endpoint, clientSockets)
	for i := range clients {
		c, err := esrodtls.NewClient(esrodtls.Config{Logger: o.srvLog, CipherSuites: []piondtls.CipherSuiteID{piondtls.TLS_PSK_WITH_AES_128_CCM_8},
			Credentials: func(netip.AddrPort) (string, []byte, error) { return dtlsDevice.String(), dtlsKey, nil }})
		if err != nil {
			return loadStats{}, err
		}
		if clients[i], err = esro.NewEndpoint(c, cfg); err != nil {
			c.Close()
			return loadStats{}, err
		}
		defer clients[i].Close()
		// The session opens before the clock starts.
		ictx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err = clients[i].Invoke(ictx, &esro.Request{To: to, SAP: 13, Handshake: esro.ThreeWay, Data: []byte("open")})
		cancel()
		if err != nil {
			return loadStats{}, fmt.Errorf("opening session %d: %w", i, err)
		}
	}
	data := make([]byte, size)
	st := closedLoop(ctx, conc, o.duration/4, o.duration, func(ctx context.Context, _ int, seq int64) error {
		_, err := clients[seq%clientSockets].Invoke(ctx, &esro.Request{To: to, SAP: 13, Handshake: esro.ThreeWay, Operation: 2, Data: data})
		return err
	})
	// The sessions' peers are authenticated (esro.AuthenticatedConn): an
	// INVOKE dropped over the caps meant for unproven sources would mean
	// those caps, not DTLS, set the rate, as they once did (about 1 800/s
	// at any concurrency).
	if d := perf.Stats().Drops[esro.DropUnprovenLimit]; d > 0 {
		return st, fmt.Errorf("the performer dropped %d INVOKEs over its caps on unproven sources", d)
	}
	return st, nil
}

func coapDTLSLoad(ctx context.Context, o *benchOptions, size, conc int) (loadStats, error) {
	r := mux.NewRouter()
	if err := r.Handle("/echo", mux.HandlerFunc(func(w mux.ResponseWriter, m *mux.Message) {
		body, _ := m.ReadBody()
		w.SetResponse(codes.Changed, message.AppOctets, bytes.NewReader(body))
	})); err != nil {
		return loadStats{}, err
	}
	suites := []piondtls.CipherSuiteID{piondtls.TLS_PSK_WITH_AES_128_CCM_8}
	l, err := coapnet.NewDTLSListener("udp4", "127.0.0.1:0", &piondtls.Config{CipherSuites: suites,
		PSK: func(hint []byte) ([]byte, error) { return benchPSK(string(hint)) }, PSKIdentityHint: []byte{}})
	if err != nil {
		return loadStats{}, err
	}
	s := coapdtls.NewServer(options.WithMux(r), options.WithBlockwise(false, 0, 0))
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	defer func() { s.Stop(); <-done; l.Close() }()
	addr := l.Addr().String()
	clients := make([]*udpclient.Conn, clientSockets)
	for i := range clients {
		if clients[i], err = coapdtls.Dial(addr, &piondtls.Config{CipherSuites: suites,
			PSK: func([]byte) ([]byte, error) { return dtlsKey, nil }, PSKIdentityHint: []byte(dtlsDevice.String())},
			options.WithBlockwise(false, 0, 0)); err != nil {
			return loadStats{}, err
		}
		defer clients[i].Close()
	}
	payload := make([]byte, size)
	return closedLoop(ctx, conc, o.duration/4, o.duration, func(ctx context.Context, _ int, seq int64) error {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		c := clients[seq%clientSockets]
		resp, err := c.Post(ctx, "/echo", message.AppOctets, bytes.NewReader(payload))
		if err != nil {
			return err
		}
		c.ReleaseMessage(resp)
		return nil
	}), nil
}
