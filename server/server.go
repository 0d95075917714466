// Package server is the EMSD message transfer system (MTS) behind
// `emsdp serve`: it performs the server side of EMSD over ESRO (see
// docs/protocol.md EMSD §1.4, §9) for the devices in its registry, relays their mail to
// the Internet through a smarthost and delivers Internet mail received over
// SMTP to them. Every message is in the store before it is acknowledged,
// so queues survive kill -9; the in-memory scheduler is rebuilt from the
// store at start. The store is SQLite in the data directory (one server)
// or a PostgreSQL database that several servers share: each device's
// deliveries are then made by one server at a time (the store's claims),
// whichever server received the message.
//
// Choices where the specification leaves room are documented where they
// are made; the main ones: devices are identified by credentials, then IP
// and port, then IP, and their passwords are checked (ERROR 4 otherwise,
// Open Point 3); delivery control answers a real result (§9.12); delivery
// verify answers from statuses keyed by the exact delivered id (§9.13);
// a submission whose RESULT went unacknowledged and whose verify got no
// answer is sent (Open Point 25); reports go to devices as EMSD reports
// and to Internet senders as RFC 3464 DSNs (Open Point 17).
package server

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/gateway"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/open"
)

// Options are the parts of a server that are not configuration.
type Options struct {
	// Logger receives the server's logs. Nil: slog.Default().
	Logger *slog.Logger
	// Store, when set, is used instead of the store the configuration
	// names; it stays the caller's to close.
	Store store.Store
	// PacketConn, when set, carries EMSD instead of a socket on
	// EMSD.Listen (tests use in-memory networks); the server closes it.
	PacketConn net.PacketConn
	// LogLevel, when set, is the level of Logger's handler: Start and
	// Reconfigure set it to log_level. Without it log_level is left to
	// the caller, and a changed one needs a restart.
	LogLevel *slog.LevelVar

	// rescan replaces the scheduler's full-rescan period (tests).
	rescan time.Duration
	// now replaces time.Now as the failed-authentication limiter's clock
	// (tests).
	now func() time.Time
}

// ListenError is a listener that could not be opened.
type ListenError struct {
	Service string // "emsd", "smtp" or "admin"
	Addr    string
	Err     error
}

// Error names the service, the address and the cause.
func (e *ListenError) Error() string {
	return fmt.Sprintf("%s: listen on %s: %v", e.Service, e.Addr, e.Err)
}

// Unwrap returns the cause.
func (e *ListenError) Unwrap() error { return e.Err }

// Server is a running MTS.
type Server struct {
	// live is the running configuration and what is built from it; a
	// reconfiguration swaps it whole (never edits it), so that readers
	// need no lock and a relay round sees one consistent version.
	live     atomic.Pointer[liveConfig]
	reconfMu sync.Mutex // one Reconfigure at a time
	level    *slog.LevelVar
	log      *slog.Logger
	st       store.Store
	ownStore bool

	domain   string
	hostname string

	devs    *registrar   // the device registry with authentication
	dtls    *dtlsService // nil when dtls.listen is off
	ep      *esro.Endpoint
	smtp    *gateway.InboundServer
	smtpLn  net.Listener
	tlsCert *smtpCert // nil: no STARTTLS
	admin   *http.Server
	adminLn net.Listener

	perf     *performer   // the EMSD operations devices invoke
	contacts *contactBook // where devices are heard from (contact.go)
	seq      emsd.SequenceCounter

	sched     sched
	pace      pacer
	rescan    time.Duration // full rescan period of the scheduler
	relayKick chan struct{}
	pollReset chan struct{} // store.registry_poll changed
	metrics   *metrics
	out       *outcomes // outcome writes and the entries held in flight (outcomes.go)

	// ctx lives until Close: handlers and recording outcomes use it.
	// loopCtx ends the background loops at shutdown; dctx ends deliveries
	// and relays in flight when the drain time is over.
	ctx, loopCtx, dctx          context.Context
	cancel, loopCancel, dcancel context.CancelFunc
	loops                       sync.WaitGroup
	smtpUp                      atomic.Bool
	closeOnce                   sync.Once
}

// Start opens the store, binds the EMSD, SMTP and admin listeners, rebuilds
// the queues from the store and starts serving. A listener that cannot be
// opened is a *ListenError.
func Start(ctx context.Context, cfg *Config, o Options) (_ *Server, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.clone() // the caller's stays the caller's
	log := o.Logger
	if log == nil {
		log = slog.Default()
	}
	now := o.now
	if now == nil {
		now = time.Now
	}
	s := &Server{
		level:     o.LogLevel,
		log:       log,
		domain:    cfg.domain(),
		hostname:  cfg.hostname(),
		relayKick: make(chan struct{}, 1),
		pollReset: make(chan struct{}, 1),
		rescan:    cmp.Or(o.rescan, defaultRescan),
		metrics:   newMetrics(),
		out:       newOutcomes(),
	}
	s.devs = &registrar{log: log, watch: s, ipOnly: func() bool { return s.conf().Compat.IPOnlyIdentification },
		domains: cfg.domains(), devices: s.metrics.devices, authLimited: s.metrics.authLimited,
		auth: newAuthLimiter(cfg.EMSD, now)}
	s.metrics.reg.MustRegister(s.devs.auth.collectors()...)
	s.metrics.reg.MustRegister(s.out.collectors()...)
	if s.level != nil {
		s.level.Set(cfg.logLevel())
	}
	s.live.Store(&liveConfig{cfg: cfg, relay: s.newRelay(cfg)})
	s.sched = sched{kick: make(chan struct{}, 1), rescan: make(chan struct{}, 1), fleet: newFleet(), inflight: map[emsd.Address]*flight{}}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.loopCtx, s.loopCancel = context.WithCancel(s.ctx)
	s.devs.ctx = s.loopCtx
	s.dctx, s.dcancel = context.WithCancel(s.ctx)
	defer func() {
		if err != nil {
			s.Close()
		}
	}()

	if o.Store != nil {
		s.st = o.Store
	} else {
		// One server per SQLite store (the opener locks the data
		// directory); with PostgreSQL several servers share the store by
		// design.
		sc := cfg.StoreConfig()
		sc.Serve, sc.Log = true, log
		db, err := open.Open(ctx, sc)
		if err != nil {
			return nil, err
		}
		s.st, s.ownStore = db, true
	}
	s.devs.st = s.st
	if err := s.devs.reload(ctx); err != nil {
		return nil, fmt.Errorf("store: registry: %w", err)
	}
	rec, err := s.st.Recover(ctx)
	if err != nil {
		return nil, fmt.Errorf("store: recover: %w", err)
	}
	if rec.Deliveries+rec.Relays > 0 {
		log.Info("re-queued work left in flight", "deliveries", rec.Deliveries, "relays", rec.Relays)
	}
	if cfg.Relay.Smarthost == "" {
		log.Warn("no smarthost configured: mail for the Internet stays queued until it expires")
	}

	// Listeners, all before anything is served, so that a busy port is
	// reported before the server does anything.
	ecfg, err := cfg.ESROConfig(log.With("layer", "esro"))
	if err != nil {
		return nil, err
	}
	s.sched.silentAfter = ecfg.Timers.RetransmitInterval()
	pc := o.PacketConn
	if pc == nil {
		if pc, err = net.ListenPacket("udp", cfg.EMSD.Listen); err != nil {
			return nil, &ListenError{"emsd", cfg.EMSD.Listen, err}
		}
		if want := cfg.EMSD.ReceiveBuffer; want > 0 {
			got, err := esro.SetReceiveBuffer(pc.(*net.UDPConn), want)
			switch {
			case err != nil:
				log.Warn("emsd.receive_buffer not set", "err", err)
			case got < want:
				log.Warn("emsd.receive_buffer capped by the system: raise net.core.rmem_max, or grant CAP_NET_ADMIN",
					"wanted", want, "got", got)
			}
			g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "emsd_receive_buffer_bytes",
				Help: "Kernel receive buffer of the EMSD socket, as granted (emsd.receive_buffer asks)."})
			g.Set(float64(got))
			s.metrics.reg.MustRegister(g)
		}
	}
	if s.ep, err = esro.NewEndpoint(pc, ecfg); err != nil {
		pc.Close()
		return nil, err
	}
	s.contacts = &contactBook{st: s.st, log: log, conf: s.conf, via: viaName(s.ep.LocalAddr().String()),
		reachable: func(a emsd.Address) { s.touch(a, true) }, ctx: s.ctx, changes: s.metrics.addressChanges}
	s.perf = &performer{st: s.st, log: log, metrics: s.metrics, conf: s.conf, devs: s.devs, contacts: s.contacts,
		sched: s, reports: s, routes: s, ctx: s.ctx, domain: s.domain, hostname: s.hostname,
		reasm: emsd.NewReassembler[submitter](emsd.ReassemblerConfig{Timeout: time.Duration(cfg.EMSD.ReassemblyTimeout)}),
		segs:  segCache{ttl: time.Duration(cfg.EMSD.DedupeWindow), max: 4096}}
	if err := s.startDTLS(cfg, ecfg); err != nil {
		return nil, err
	}
	if cfg.SMTP.Listen != "" && cfg.SMTP.TLSCert != "" {
		s.tlsCert = &smtpCert{log: log.With("layer", "smtp")}
		if err := s.tlsCert.loadFiles(cfg.SMTP.TLSCert, cfg.SMTP.TLSKey, time.Now()); err != nil {
			return nil, err
		}
	}
	if cfg.SMTP.Listen != "" {
		if s.smtpLn, err = net.Listen("tcp", cfg.SMTP.Listen); err != nil {
			return nil, &ListenError{"smtp", cfg.SMTP.Listen, err}
		}
	}
	if cfg.Admin.Listen != "" {
		if s.adminLn, err = net.Listen("tcp", cfg.Admin.Listen); err != nil {
			return nil, &ListenError{"admin", cfg.Admin.Listen, err}
		}
	}
	s.metrics.reg.MustRegister(newStoreCollector(s.st), newESROCollector(s.ep.Stats))

	if err := s.perf.recoverSubmissions(ctx, time.Now()); err != nil {
		return nil, fmt.Errorf("store: pending submissions: %w", err)
	}
	for _, sap := range []struct {
		sap emsd.SAP
		hs  esro.Handshake
	}{{emsd.SAPMTSPerformer3Way, esro.ThreeWay}, {emsd.SAPMTSPerformer2Way, esro.TwoWay}} {
		if err := s.ep.HandleFunc(uint8(sap.sap), sap.hs, s.perf.serve); err != nil {
			return nil, err
		}
	}
	s.loops.Go(s.runScheduler)
	s.loops.Go(s.runRelay)
	s.loops.Go(s.pollRegistry)
	if s.smtpLn != nil {
		inOpts := gateway.InboundOptions{
			Domain: s.hostname, MaxMessageBytes: cfg.SMTP.MaxMessageBytes, MaxRecipients: cfg.SMTP.MaxRecipients,
			ReadTimeout: time.Duration(cfg.SMTP.ReadTimeout), WriteTimeout: time.Duration(cfg.SMTP.WriteTimeout),
			MinDataRate: cmp.Or(cfg.SMTP.MinDataRate, -1), StressReadTimeout: time.Duration(cfg.SMTP.StressReadTimeout),
			SessionTimeout: time.Duration(cfg.SMTP.SessionTimeout),
			MaxConns:       cfg.SMTP.MaxConnections, MaxConnsPerIP: cfg.SMTP.MaxConnectionsPerIP,
			OnRefused: func(limit string) { s.metrics.refused.WithLabelValues(limit).Inc() },
			Logger:    log.With("layer", "smtp"),
		}
		if s.tlsCert != nil {
			inOpts.TLSConfig, inOpts.RequireTLS = s.tlsCert.tlsConfig(), cfg.SMTP.RequireTLS
			inOpts.OnTLS = func(tls.ConnectionState) { s.metrics.starttls.Inc() }
		}
		s.smtp = gateway.NewInboundServer(receiver{s}, inOpts)
		s.metrics.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "gateway_inbound_sessions",
			Help: "Inbound SMTP connections open (smtp.max_connections bounds them)."},
			func() float64 { return float64(s.smtp.Sessions()) }))
		s.smtpUp.Store(true)
		s.loops.Go(func() {
			if err := s.smtp.Serve(s.smtpLn); err != nil && !errors.Is(err, gateway.ErrServerClosed) {
				log.Error("smtp listener", "err", err)
			}
			s.smtpUp.Store(false)
		})
	}
	if s.adminLn != nil {
		s.admin = &http.Server{Handler: s.adminHandler(), ReadHeaderTimeout: 10 * time.Second}
		s.loops.Go(func() {
			if err := s.admin.Serve(s.adminLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("admin listener", "err", err)
			}
		})
	}
	dtlsAddr := "off"
	if s.dtls != nil {
		dtlsAddr = s.dtls.conn.LocalAddr().String()
	}
	log.Info("serving", "emsd", s.ep.LocalAddr(), "dtls", dtlsAddr, "smtp", addrOf(s.smtpLn), "admin", addrOf(s.adminLn),
		"domain", s.domain, "devices", s.devs.current().size(), "store", storeDesc(cfg, o.Store != nil))
	return s, nil
}

// storeDesc names the store for the log, without its password.
func storeDesc(cfg *Config, given bool) string {
	if given {
		return "given"
	}
	return cfg.StoreConfig().String()
}

func addrOf(ln net.Listener) string {
	if ln == nil {
		return "off"
	}
	return ln.Addr().String()
}

// ESROStats returns the counters of the server's ESRO endpoint.
func (s *Server) ESROStats() esro.Stats { return s.ep.Stats() }

// Addrs are the addresses a server listens on.
type Addrs struct {
	EMSD  netip.AddrPort
	DTLS  netip.AddrPort // invalid when off
	SMTP  net.Addr       // nil when off
	Admin net.Addr       // nil when off
}

// Addrs returns the listening addresses (with the ports the system chose
// for ":0").
func (s *Server) Addrs() Addrs {
	a := Addrs{}
	if ua, ok := s.ep.LocalAddr().(*net.UDPAddr); ok {
		a.EMSD = ua.AddrPort()
	}
	if s.dtls != nil {
		if ua, ok := s.dtls.conn.LocalAddr().(*net.UDPAddr); ok {
			a.DTLS = ua.AddrPort()
		}
	}
	if s.smtpLn != nil {
		a.SMTP = s.smtpLn.Addr()
	}
	if s.adminLn != nil {
		a.Admin = s.adminLn.Addr()
	}
	return a
}

// pollRegistry reloads the registry when another process (emsdp device)
// changed it.
func (s *Server) pollRegistry() {
	t := time.NewTicker(time.Duration(s.conf().Store.RegistryPoll))
	defer t.Stop()
	for {
		select {
		case <-s.loopCtx.Done():
			return
		case <-s.pollReset:
			t.Reset(time.Duration(s.conf().Store.RegistryPoll))
			continue
		case <-t.C:
		}
		s.devs.reloadIfChanged(s.loopCtx, "registry_poll")
	}
}

// Shutdown drains: no new SMTP sessions or deliveries, SMTP transactions
// and ESRO invocations in progress finish, deliveries in flight get
// delivery.drain_timeout (within ctx) and are then cancelled and
// re-queued. Then everything is closed.
func (s *Server) Shutdown(ctx context.Context) error {
	var errs []error
	if s.smtp != nil {
		if err := s.smtp.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("smtp: %w", err))
		}
	}
	dctx, cancel := context.WithTimeout(ctx, time.Duration(s.conf().Delivery.DrainTimeout))
	s.drainDeliveries(dctx)
	cancel()
	s.dcancel()
	if st := s.ep.Stats(); st.InFlightInvoker+st.InFlightPerformer > 0 {
		deadline, _ := ctx.Deadline()
		s.log.Info("shutdown: waiting for the ESRO exchanges still open (answers owed or awaited, acknowledgements)",
			"invoker", st.InFlightInvoker, "performer", st.InFlightPerformer, "until", deadline.Round(time.Second))
	}
	if err := s.ep.Shutdown(ctx); err != nil {
		errs = append(errs, fmt.Errorf("esro: %w", err))
	}
	if s.dtls != nil {
		if err := s.dtls.ep.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("esro over dtls: %w", err))
		}
	}
	if s.admin != nil {
		if err := s.admin.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("admin: %w", err))
		}
	}
	if err := s.Close(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Close stops everything at once. Work in flight is re-queued at the next
// start (nothing acknowledged is lost: it is in the store).
func (s *Server) Close() error {
	var err error
	s.closeOnce.Do(func() {
		s.sched.mu.Lock()
		s.sched.draining = true
		s.sched.mu.Unlock()
		s.dcancel()
		if s.smtp != nil {
			s.smtp.Close()
		} else if s.smtpLn != nil {
			s.smtpLn.Close()
		}
		if s.admin != nil {
			s.admin.Close()
		} else if s.adminLn != nil {
			s.adminLn.Close()
		}
		if s.ep != nil {
			s.ep.Close()
		}
		if s.dtls != nil {
			s.dtls.ep.Close()
		}
		s.loopCancel()
		s.loops.Wait()
		s.sched.workers.Wait()
		s.cancel()
		if s.ownStore && s.st != nil {
			err = s.st.Close()
		}
	})
	return err
}

// adminHandler serves /metrics, /healthz and, unless admin.pprof is
// false, /debug/pprof.
func (s *Server) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(s.metrics.reg, promhttp.HandlerOpts{Registry: s.metrics.reg}))
	mux.HandleFunc("/healthz", s.healthz)
	if !s.conf().Admin.PProf {
		return mux
	}
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

// healthz answers 200 when the store answers, every configured listener
// serves, no outcome write is failing and no queue entry is stuck in
// flight past its deadline; 503 with the reasons otherwise.
func (s *Server) healthz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 3*time.Second)
	defer cancel()
	var bad []string
	if err := s.st.Ping(ctx); err != nil {
		bad = append(bad, "store: "+err.Error())
	}
	if s.ctx.Err() != nil {
		bad = append(bad, "emsd: closed")
	}
	if s.smtpLn != nil && !s.smtpUp.Load() {
		bad = append(bad, "smtp: not serving")
	}
	bad = append(bad, s.out.health()...)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if len(bad) > 0 {
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintln(w, strings.Join(bad, "\n"))
		return
	}
	fmt.Fprintln(w, "ok")
}

// Reload is SIGHUP: it re-reads the device registry from the store and
// the SMTP certificate files (a renewed certificate takes effect for new
// STARTTLS handshakes; one that fails to load leaves the old one in use),
// and makes the delivery scheduler and the relay worker look at the queues
// at once, so that entries another process changed (emsdp queue retry)
// are taken up now rather than at the next rescan (rescan, relayIdle):
// the scheduler re-reads every device's due time and lifts the holds of
// devices whose attempts failed.
// The configuration file is Reconfigure's.
func (s *Server) Reload(ctx context.Context) error {
	var errs []error
	if err := s.devs.reload(ctx); err != nil {
		errs = append(errs, fmt.Errorf("registry: %w", err))
	}
	if err := s.rescanFleet(ctx, time.Time{}); err != nil {
		errs = append(errs, fmt.Errorf("delivery queue: %w", err))
	}
	s.sched.mu.Lock()
	s.sched.fleet.release(time.Now())
	s.sched.mu.Unlock()
	s.kick()
	s.kickRelay()
	if s.tlsCert != nil {
		if err := s.tlsCert.load(time.Now()); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// registry is the device registry as last loaded.
func (s *Server) registry() *registry { return s.devs.current() }

// registryReplaced: the whole registry was read again.
func (s *Server) registryReplaced(old, cur *registry) {
	s.dtlsKeysChanged(old, cur)
	s.unparkAll()
}

// devicesChanged: the registry entries of some devices changed; the
// sessions of keys that changed end, and the devices' deliveries are
// looked at again.
func (s *Server) devicesChanged(old map[emsd.Address]*device, cur map[emsd.Address]*store.Device) {
	if s.dtls != nil {
		for a, o := range old {
			if n := cur[a]; o.PSK != nil && (n == nil || string(n.PSK) != string(o.PSK)) {
				s.dtls.conn.CloseIdentity(a.String())
			}
		}
	}
	s.unpark(slices.Collect(maps.Keys(cur)))
}

// targetOf chooses where deliveries to dev go now: over DTLS for a
// device with a key (dtls.go), else in clear (contactBook.target).
func (s *Server) targetOf(dev *device) (t target, why string) {
	if t, why, ok := s.dtlsTarget(dev); ok {
		return t, why
	}
	return s.contacts.target(s.dctx, dev)
}

// alive and contactFailed are the delivery scheduler's news of a contact.
func (s *Server) alive(a emsd.Address, to netip.AddrPort) { s.contacts.alive(a, to) }

func (s *Server) contactFailed(a emsd.Address, ap netip.AddrPort) { s.contacts.failed(a, ap) }

// opts are the codec options for a device of version v.
func (s *Server) opts(v emsd.Version) emsd.Options { return s.conf().emsdOptions(v) }

// recoverSubmissions is the scheduler's periodic look at submissions left
// pending (performer.recoverSubmissions).
func (s *Server) recoverSubmissions(ctx context.Context, before time.Time) error {
	return s.perf.recoverSubmissions(ctx, before)
}
