package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/pion/dtls/v3"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/esro/esrodtls"
	"github.com/esro-emsdp/emsdp/server/internal/authlimit"
	"github.com/esro-emsdp/emsdp/store"
)

// DefaultDTLSPort is the documented port of the DTLS service when
// [dtls] listen names only a host (":" + port): 641 + 4000, beside the
// plain service's 641, and clear of CoAP's 5684.
const DefaultDTLSPort = 4641

// DTLSConfig is EMSD over DTLS (esro/esrodtls): the same operations as on
// [emsd] listen, each device authenticated by its pre-shared key.
type DTLSConfig struct {
	// Listen is the UDP address; "" = off (the default).
	Listen string `toml:"listen"`
	// CipherSuites offered, by IANA name; empty = TLS_PSK_WITH_AES_128_CCM_8
	// (RFC 7925) then TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256 (forward
	// secrecy).
	CipherSuites []string `toml:"cipher_suites"`
	// HandshakeTimeout bounds one handshake.
	HandshakeTimeout Duration `toml:"handshake_timeout"`
	// IdleTimeout ends a session unused this long.
	IdleTimeout Duration `toml:"idle_timeout"`
	// Handshakes per source (an IPv4 address or an IPv6 /64): a burst,
	// then a rate per minute; beyond it a source's ClientHellos are
	// dropped unanswered. A burst of 0 turns the limit off.
	HandshakesBurst int     `toml:"handshakes_burst"`
	HandshakesRate  float64 `toml:"handshakes_rate"`
	// MaxHandshakes in progress at once, all sources together.
	MaxHandshakes int `toml:"max_handshakes"`
}

func (c *Config) validDTLS() error {
	d := c.DTLS
	if d.Listen == "" {
		return nil
	}
	var errs []error
	if err := validListen("dtls.listen", d.Listen, false); err != nil {
		errs = append(errs, err)
	}
	if _, err := d.suites(); err != nil {
		errs = append(errs, fmt.Errorf("dtls.cipher_suites: %w", err))
	}
	if d.HandshakeTimeout <= 0 || d.IdleTimeout <= 0 {
		errs = append(errs, errors.New("dtls.handshake_timeout and dtls.idle_timeout must be positive"))
	}
	if d.HandshakesBurst < 0 || (d.HandshakesBurst > 0 && !(d.HandshakesRate > 0)) {
		errs = append(errs, errors.New("dtls.handshakes_burst must be ≥ 0, and dtls.handshakes_rate > 0 with it"))
	}
	if d.MaxHandshakes < 1 {
		errs = append(errs, errors.New("dtls.max_handshakes must be at least 1"))
	}
	return errors.Join(errs...)
}

func (d DTLSConfig) suites() ([]dtls.CipherSuiteID, error) {
	var out []dtls.CipherSuiteID
	for _, name := range d.CipherSuites {
		id, err := esrodtls.ParseCipherSuite(name)
		if err != nil {
			return nil, err
		}
		out = append(out, id)
	}
	return out, nil
}

// dtlsService is the DTLS listener with its own ESRO endpoint. Its
// handlers are the plain service's (perf), told the device by the
// session; the keys come from the registry.
type dtlsService struct {
	conn *esrodtls.Conn
	ep   *esro.Endpoint
	devs *registrar
	perf *performer
	// reachable tells the delivery scheduler that a device's deliveries
	// may go now (it invoked over its session).
	reachable func(emsd.Address)

	mu    sync.Mutex
	limit authlimit.Buckets[authlimit.Key]
	epoch time.Time
	// polls is the session each device last polled over (delivery
	// control): where it receives, as a plain contact heard in a poll.
	polls map[emsd.Address]netip.AddrPort
}

// polled records that device a polled over the session named peer.
func (d *dtlsService) polled(a emsd.Address, peer netip.AddrPort) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.polls == nil {
		d.polls = make(map[emsd.Address]netip.AddrPort)
	}
	d.polls[a] = peer
}

// session is the session to deliver to device a over: the one it last
// polled over while that is still open, else its latest. A device that
// polls with "ua receive --poll" and submits with a one-shot "ua send"
// opens a second session, and the latest would be that one, which takes
// no deliveries and is gone a few seconds later.
func (d *dtlsService) session(a emsd.Address) (netip.AddrPort, bool) {
	d.mu.Lock()
	name, ok := d.polls[a]
	d.mu.Unlock()
	if ok {
		if p, open := d.conn.Peer(name); open && p.Identity == a.String() {
			return name, true
		}
		d.mu.Lock()
		if d.polls[a] == name {
			delete(d.polls, a)
		}
		d.mu.Unlock()
	}
	return d.conn.SessionFor(a.String())
}

type dtlsIdentityKey struct{}

// dtlsDevice returns the device a DTLS session authenticated, if the
// invocation came over one.
func dtlsDevice(ctx context.Context) (emsd.Address, bool) {
	a, ok := ctx.Value(dtlsIdentityKey{}).(emsd.Address)
	return a, ok
}

var errDTLSRequired = errors.New("device requires DTLS")

// errNoRoute: a device that requires DTLS while dtls.listen is off is
// never sent anything in clear.
var errNoRoute = &esro.Failure{Reason: esro.LocalResource, Err: fmt.Errorf("%w, and dtls.listen is off", errDTLSRequired)}

// startDTLS opens [dtls] listen. Called by Start after the plain endpoint.
func (s *Server) startDTLS(cfg *Config, ecfg *esro.Config) error {
	if cfg.DTLS.Listen == "" {
		return nil
	}
	d, err := newDTLSService(cfg, ecfg, s.log, s.devs, s.perf, func(a emsd.Address) { s.sched.touch(a, true) })
	if err != nil {
		return err
	}
	s.dtls = d
	s.metrics.reg.MustRegister(newDTLSCollector(d.conn.Stats))
	return nil
}

// newDTLSService opens [dtls] listen and serves the EMSD operations on it.
func newDTLSService(cfg *Config, ecfg *esro.Config, log *slog.Logger, devs *registrar, perf *performer,
	reachable func(emsd.Address)) (*dtlsService, error) {
	suites, _ := cfg.DTLS.suites()
	d := &dtlsService{
		devs:      devs,
		perf:      perf,
		reachable: reachable,
		limit:     authlimit.NewBuckets[authlimit.Key](cfg.DTLS.HandshakesBurst, cfg.DTLS.HandshakesRate, cfg.EMSD.AuthFailuresTracked),
		epoch:     time.Now(),
	}
	conn, err := esrodtls.Listen("udp", cfg.DTLS.Listen, esrodtls.Config{
		PSK:              d.devicePSK,
		Credentials:      d.deliveryCredentials,
		CipherSuites:     suites,
		HandshakeTimeout: time.Duration(cfg.DTLS.HandshakeTimeout),
		IdleTimeout:      time.Duration(cfg.DTLS.IdleTimeout),
		MaxHandshakes:    cfg.DTLS.MaxHandshakes,
		AllowHandshake:   d.allow,
		Logger:           log.With("layer", "dtls"),
	})
	if err != nil {
		var oe *net.OpError
		if errors.As(err, &oe) {
			return nil, &ListenError{"dtls", cfg.DTLS.Listen, err}
		}
		return nil, err
	}
	d.conn = conn
	if d.ep, err = esro.NewEndpoint(conn, ecfg); err != nil {
		conn.Close()
		return nil, err
	}
	for _, sap := range []struct {
		sap emsd.SAP
		hs  esro.Handshake
	}{{emsd.SAPMTSPerformer3Way, esro.ThreeWay}, {emsd.SAPMTSPerformer2Way, esro.TwoWay}} {
		if err := d.ep.HandleFunc(uint8(sap.sap), sap.hs, d.serve); err != nil {
			d.ep.Close()
			return nil, err
		}
	}
	return d, nil
}

// allow charges one handshake to its source and says whether the source
// is within its limit.
func (d *dtlsService) allow(src netip.AddrPort) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := int64(time.Since(d.epoch))
	k := authlimit.Source(src.Addr())
	if d.limit.Over(k, now, 0) {
		return false
	}
	d.limit.Fail(k, now)
	return true
}

// devicePSK is the key of a PSK identity: the EMSD address of a device
// that has one. The identity is parsed strictly, as the address is shown
// (NNN.NNN), so that one device has one identity.
func (d *dtlsService) devicePSK(identity string) ([]byte, error) {
	a, err := emsd.ParseAddress(identity)
	if err != nil || a.String() != identity {
		return nil, esrodtls.ErrUnknownIdentity
	}
	dev := d.devs.current().get(a)
	if dev == nil && d.devs.fresh() {
		dev = d.devs.current().get(a)
	}
	if dev == nil || dev.PSK == nil {
		return nil, esrodtls.ErrUnknownIdentity
	}
	return dev.PSK, nil
}

// deliveryCredentials are what the server presents when it opens a session
// to a device's registered address: the device's own identity and key.
func (d *dtlsService) deliveryCredentials(peer netip.AddrPort) (string, []byte, error) {
	dev := d.devs.current().atAP(peer)
	if dev == nil || dev.PSK == nil {
		return "", nil, fmt.Errorf("no DTLS device registered at %v", peer)
	}
	return dev.addr.String(), dev.PSK, nil
}

// serve is performer.serve for invocations over a DTLS session: the session's
// identity is the device. Its deliveries may be waiting for it to be
// reachable (dtlsTarget): any invocation lets them go.
func (d *dtlsService) serve(ctx context.Context, w esro.ResponseWriter, inv *esro.Invocation) {
	p, ok := d.conn.Peer(inv.Peer)
	if !ok {
		d.perf.refuse(w, "any", emsd.CodeSecurity, "DTLS session gone")
		return
	}
	a, err := emsd.ParseAddress(p.Identity)
	if err != nil {
		d.perf.refuse(w, "any", emsd.CodeSecurity, "DTLS identity")
		return
	}
	d.reachable(a) // the session's key proved the device
	d.perf.serve(context.WithValue(ctx, dtlsIdentityKey{}, a), w, inv)
}

// dtlsTarget is targetOf for a device with a key while DTLS is on:
// deliveries follow its sessions, not contacts. Over the session it last
// polled over, else its latest session, else a session the server opens
// to its registered address (also the fallback when the session does not
// answer); with neither it is
// offline until it opens a session. ok is false for other devices.
func (s *Server) dtlsTarget(dev *device) (t target, why string, ok bool) {
	if dev.PSK == nil {
		return t, "", false
	}
	if s.dtls == nil {
		if dev.RequireDTLS {
			return t, targetOffline, true // never in clear; waits for DTLS or expiry
		}
		return t, "", false
	}
	if name, ok := s.dtls.session(dev.addr); ok {
		t = target{to: name, dtls: true}
		if dev.ap.IsValid() && dev.ap != name {
			t.fallback = dev.ap
		}
		return t, "", true
	}
	if dev.ap.IsValid() {
		return target{to: dev.ap, dtls: true}, "", true
	}
	return t, targetOffline, true
}

// endpointOf is the endpoint a target is reached through.
func (s *Server) endpointOf(t *target) *esro.Endpoint {
	if t.dtls {
		return s.dtls.ep
	}
	return s.ep
}

// polledOverDTLS: device a polled over its DTLS session from peer.
func (s *Server) polledOverDTLS(a emsd.Address, peer netip.AddrPort) { s.dtls.polled(a, peer) }

// verifyRoute is where a submission verify to dev goes: plain, the
// addresses given; a device with a key, its session and then its
// registered address over DTLS. A nil endpoint: nowhere (the device
// requires DTLS and it is off).
func (s *Server) verifyRoute(dev *device, plain []netip.AddrPort) (*esro.Endpoint, []netip.AddrPort) {
	t, why, ok := s.dtlsTarget(dev)
	switch {
	case !ok:
		return s.ep, plain
	case why != "":
		return nil, nil
	}
	to := []netip.AddrPort{t.to}
	if t.fallback.IsValid() {
		to = append(to, t.fallback)
	}
	return s.dtls.ep, to
}

// registryReplaced ends the sessions of devices whose key changed or
// went in a whole reload, so that a rotated key takes effect at once.
func (d *dtlsService) registryReplaced(old, cur *registry) {
	if old == nil {
		return
	}
	for a, o := range old.byAddr {
		if o.PSK == nil {
			continue
		}
		if n := cur.byAddr[a]; n == nil || string(n.PSK) != string(o.PSK) {
			d.conn.CloseIdentity(a.String())
		}
	}
}

// devicesChanged is registryReplaced for the devices the store's change
// log named: old are their entries before, cur after (nil: removed).
func (d *dtlsService) devicesChanged(old map[emsd.Address]*device, cur map[emsd.Address]*store.Device) {
	for a, o := range old {
		if n := cur[a]; o.PSK != nil && (n == nil || string(n.PSK) != string(o.PSK)) {
			d.conn.CloseIdentity(a.String())
		}
	}
}

type dtlsCollector struct {
	stats                                               func() esrodtls.Stats
	ok, failed, sessions, rebinds, reopened, sent, recv *prometheus.Desc
}

func newDTLSCollector(stats func() esrodtls.Stats) *dtlsCollector {
	return &dtlsCollector{
		stats:    stats,
		ok:       prometheus.NewDesc("dtls_handshakes_total", "DTLS handshakes completed.", nil, nil),
		failed:   prometheus.NewDesc("dtls_handshakes_failed_total", "DTLS handshakes failed or refused, by reason.", []string{"reason"}, nil),
		sessions: prometheus.NewDesc("dtls_sessions", "DTLS sessions established.", nil, nil),
		rebinds:  prometheus.NewDesc("dtls_cid_rebinds_total", "Sessions continued from a new peer address (Connection IDs).", nil, nil),
		reopened: prometheus.NewDesc("dtls_sessions_reopened_total", "Sessions the server opened to devices and replaced after they fell silent.", nil, nil),
		sent:     prometheus.NewDesc("dtls_datagrams_sent_total", "ESRO datagrams sent over DTLS.", nil, nil),
		recv:     prometheus.NewDesc("dtls_datagrams_received_total", "ESRO datagrams received over DTLS.", nil, nil),
	}
}

func (c *dtlsCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.ok, c.failed, c.sessions, c.rebinds, c.reopened, c.sent, c.recv} {
		ch <- d
	}
}

func (c *dtlsCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.stats()
	ch <- prometheus.MustNewConstMetric(c.ok, prometheus.CounterValue, float64(st.HandshakesOK))
	for _, r := range esrodtls.FailureReasons {
		ch <- prometheus.MustNewConstMetric(c.failed, prometheus.CounterValue, float64(st.HandshakesFailed[r]), r)
	}
	ch <- prometheus.MustNewConstMetric(c.sessions, prometheus.GaugeValue, float64(st.Sessions))
	ch <- prometheus.MustNewConstMetric(c.rebinds, prometheus.CounterValue, float64(st.Rebinds))
	ch <- prometheus.MustNewConstMetric(c.reopened, prometheus.CounterValue, float64(st.Reopened))
	ch <- prometheus.MustNewConstMetric(c.sent, prometheus.CounterValue, float64(st.DatagramsSent))
	ch <- prometheus.MustNewConstMetric(c.recv, prometheus.CounterValue, float64(st.DatagramsReceived))
}
