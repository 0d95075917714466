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
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/gateway"
	"github.com/esro-emsdp/emsdp/server/internal/authlimit"
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

// Server is a running MTS: the wiring of its parts, each in its own
// files with the part of the store it uses (docs/design.md, "server"):
//
//   - registrar: the device registry with authentication (registrar.go,
//     registry.go, identify.go; the limits in internal/authlimit);
//   - contactBook: where devices are heard from (contact.go);
//   - performer: the EMSD operations devices invoke (handlers.go,
//     submit.go, segments.go, release.go);
//   - reporter: reports and DSNs on outcomes (reports.go, dsnparams.go);
//   - receiver: Internet mail in over SMTP (inbound.go, smtptls.go);
//   - relayWorker: Internet mail out to the smarthost (relay.go);
//   - scheduler: the delivery scheduler, attempts to devices with their
//     backoff, expiry, pacing and outcome writes (schedule.go, claim.go,
//     deliver.go, copies.go, expire.go, fleet.go, pace.go, outcomes.go);
//   - the DTLS service (dtls.go), metrics (metrics.go), the admin
//     listener (admin.go), the running configuration (reconfig.go).
//
// parts.go is the Server where it stands behind the parts' interfaces:
// the registry watcher and the delivery routes (with dtls.go).
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
	now      func() time.Time // the failed-authentication limiter's clock

	devs      *registrar    // the device registry with authentication
	pollReset chan struct{} // store.registry_poll changed
	contacts  *contactBook  // where devices are heard from
	perf      *performer    // the EMSD operations devices invoke
	rep       *reporter     // reports and DSNs on outcomes
	inbound   *receiver     // Internet mail for devices
	relay     *relayWorker  // Internet mail to the smarthost
	metrics   *metrics

	dtls    *dtlsService // nil when dtls.listen is off
	ep      *esro.Endpoint
	smtp    *gateway.InboundServer
	smtpLn  net.Listener
	tlsCert *smtpCert // nil: no STARTTLS
	admin   *http.Server
	adminLn net.Listener

	sched  *scheduler    // the delivery scheduler (schedule.go)
	rescan time.Duration // its full rescan period (Options.rescan)

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
	s := newServer(cfg, o)
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	if err := s.openStore(ctx, cfg, o.Store); err != nil {
		return nil, err
	}
	s.wire(cfg)
	if err := s.devs.reload(ctx); err != nil {
		return nil, fmt.Errorf("store: registry: %w", err)
	}
	rec, err := s.st.Recover(ctx)
	if err != nil {
		return nil, fmt.Errorf("store: recover: %w", err)
	}
	if rec.Deliveries+rec.Relays > 0 {
		s.log.Info("re-queued work left in flight", "deliveries", rec.Deliveries, "relays", rec.Relays)
	}
	if cfg.Relay.Smarthost == "" {
		s.log.Warn("no smarthost configured: mail for the Internet stays queued until it expires")
	}
	// Listeners, all before anything is served, so that a busy port is
	// reported before the server does anything.
	if err := s.listen(cfg, o.PacketConn); err != nil {
		return nil, err
	}
	if err := s.perf.recoverSubmissions(ctx, time.Now()); err != nil {
		return nil, fmt.Errorf("store: pending submissions: %w", err)
	}
	if err := s.serve(cfg); err != nil {
		return nil, err
	}
	dtlsAddr := "off"
	if s.dtls != nil {
		dtlsAddr = s.dtls.conn.LocalAddr().String()
	}
	s.log.Info("serving", "emsd", s.ep.LocalAddr(), "dtls", dtlsAddr, "smtp", addrOf(s.smtpLn), "admin", addrOf(s.adminLn),
		"domain", s.domain, "devices", s.devs.current().size(), "store", storeDesc(cfg, o.Store != nil))
	return s, nil
}

// newServer is a server with its configuration and contexts, serving
// nothing yet.
func newServer(cfg *Config, o Options) *Server {
	s := &Server{
		level:     o.LogLevel,
		log:       cmp.Or(o.Logger, slog.Default()),
		domain:    cfg.domain(),
		hostname:  cfg.hostname(),
		now:       o.now,
		pollReset: make(chan struct{}, 1),
		rescan:    o.rescan,
		metrics:   newMetrics(),
	}
	if s.now == nil {
		s.now = time.Now
	}
	if s.level != nil {
		s.level.Set(cfg.logLevel())
	}
	s.live.Store(&liveConfig{cfg: cfg, relay: s.newRelay(cfg)})
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.loopCtx, s.loopCancel = context.WithCancel(s.ctx)
	s.dctx, s.dcancel = context.WithCancel(s.ctx)
	return s
}

// openStore opens the store cfg names for serving (with SQLite, the data
// directory locked), or takes the given one.
func (s *Server) openStore(ctx context.Context, cfg *Config, given store.Store) error {
	if given != nil {
		s.st = given
		return nil
	}
	// One server per SQLite store (the opener locks the data directory);
	// with PostgreSQL several servers share the store by design.
	sc := cfg.StoreConfig()
	sc.Serve, sc.Log = true, s.log
	db, err := open.Open(ctx, sc)
	if err != nil {
		return err
	}
	s.st, s.ownStore = db, true
	return nil
}

// wire builds the parts over the store. Each takes the part of the store
// it uses and reaches the others through small interfaces; the Server
// stands behind those that span parts (parts.go). The scheduler is built
// before the performer and the relay worker, which tell it of new work,
// and learns of them after.
func (s *Server) wire(cfg *Config) {
	s.devs = &registrar{st: s.st, log: s.log, watch: s, domains: cfg.domains(), ctx: s.loopCtx,
		ipOnly:  func() bool { return s.conf().Compat.IPOnlyIdentification },
		devices: s.metrics.devices, authLimited: s.metrics.authLimited, auth: authlimit.New(cfg.EMSD.authLimits(), s.now)}
	s.contacts = &contactBook{st: s.st, log: s.log, conf: s.conf, ctx: s.ctx, changes: s.metrics.addressChanges,
		reachable: func(a emsd.Address) { s.sched.touch(a, true) }}
	s.rep = &reporter{st: s.st, log: s.log, metrics: s.metrics, conf: s.conf, devs: s.devs,
		domain: s.domain, hostname: s.hostname}
	s.sched = newScheduler(&scheduler{st: s.st, devs: s.devs, routes: s, contacts: s.contacts, reports: s.rep,
		log: s.log, metrics: s.metrics, conf: s.conf,
		ctx: s.ctx, loopCtx: s.loopCtx, dctx: s.dctx, dcancel: s.dcancel, rescanEvery: s.rescan})
	s.perf = &performer{st: s.st, log: s.log, metrics: s.metrics, conf: s.conf, devs: s.devs, contacts: s.contacts,
		sched: s.sched, reports: s.rep, routes: s, ctx: s.ctx, domain: s.domain, hostname: s.hostname,
		reasm: emsd.NewReassembler[submitter](emsd.ReassemblerConfig{Timeout: time.Duration(cfg.EMSD.ReassemblyTimeout)}),
		segs:  segCache{ttl: time.Duration(cfg.EMSD.DedupeWindow), max: 4096}}
	s.inbound = &receiver{st: s.st, log: s.log, metrics: s.metrics, conf: s.conf, devs: s.devs, sched: s.sched,
		domain: s.domain, hostname: s.hostname}
	s.relay = &relayWorker{st: s.st, log: s.log, metrics: s.metrics, live: s.live.Load, sched: s.sched, out: s.sched, held: s.sched.out,
		kicked: make(chan struct{}, 1), ctx: s.loopCtx, dctx: s.dctx}
	s.sched.subs, s.sched.relays = s.perf, s.relay
	s.metrics.reg.MustRegister(s.devs.auth.Collectors()...)
	s.metrics.reg.MustRegister(s.sched.out.collectors()...)
	s.metrics.reg.MustRegister(newStoreCollector(s.st))
}

// listen binds every listener: EMSD (or takes pc), DTLS, SMTP, admin.
func (s *Server) listen(cfg *Config, pc net.PacketConn) error {
	ecfg, err := cfg.ESROConfig(s.log.With("layer", "esro"))
	if err != nil {
		return err
	}
	s.sched.cutAfter = ecfg.Timers.RetransmitInterval()
	if pc == nil {
		if pc, err = s.listenEMSD(cfg.EMSD); err != nil {
			return err
		}
	}
	if s.ep, err = esro.NewEndpoint(pc, ecfg); err != nil {
		pc.Close()
		return err
	}
	s.contacts.via = viaName(s.ep.LocalAddr().String())
	s.metrics.reg.MustRegister(newESROCollector(s.ep.Stats))
	if err := s.startDTLS(cfg, ecfg); err != nil {
		return err
	}
	if cfg.SMTP.Listen != "" && cfg.SMTP.TLSCert != "" {
		s.tlsCert = &smtpCert{log: s.log.With("layer", "smtp")}
		if err := s.tlsCert.loadFiles(cfg.SMTP.TLSCert, cfg.SMTP.TLSKey, time.Now()); err != nil {
			return err
		}
	}
	if cfg.SMTP.Listen != "" {
		if s.smtpLn, err = net.Listen("tcp", cfg.SMTP.Listen); err != nil {
			return &ListenError{"smtp", cfg.SMTP.Listen, err}
		}
	}
	if cfg.Admin.Listen != "" {
		if s.adminLn, err = net.Listen("tcp", cfg.Admin.Listen); err != nil {
			return &ListenError{"admin", cfg.Admin.Listen, err}
		}
	}
	return nil
}

// listenEMSD opens the EMSD socket with the receive buffer c asks for.
func (s *Server) listenEMSD(c EMSDConfig) (net.PacketConn, error) {
	pc, err := net.ListenPacket("udp", c.Listen)
	if err != nil {
		return nil, &ListenError{"emsd", c.Listen, err}
	}
	if want := c.ReceiveBuffer; want > 0 {
		got, err := esro.SetReceiveBuffer(pc.(*net.UDPConn), want)
		switch {
		case err != nil:
			s.log.Warn("emsd.receive_buffer not set", "err", err)
		case got < want:
			s.log.Warn("emsd.receive_buffer capped by the system: raise net.core.rmem_max, or grant CAP_NET_ADMIN",
				"wanted", want, "got", got)
		}
		g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "emsd_receive_buffer_bytes",
			Help: "Kernel receive buffer of the EMSD socket, as granted (emsd.receive_buffer asks)."})
		g.Set(float64(got))
		s.metrics.reg.MustRegister(g)
	}
	return pc, nil
}

// serve starts serving: the EMSD operations, the background loops, SMTP
// and the admin listener.
func (s *Server) serve(cfg *Config) error {
	for _, sap := range []struct {
		sap emsd.SAP
		hs  esro.Handshake
	}{{emsd.SAPMTSPerformer3Way, esro.ThreeWay}, {emsd.SAPMTSPerformer2Way, esro.TwoWay}} {
		if err := s.ep.HandleFunc(uint8(sap.sap), sap.hs, s.perf.serve); err != nil {
			return err
		}
	}
	s.loops.Go(s.sched.runScheduler)
	s.loops.Go(s.relay.run)
	s.loops.Go(func() {
		s.devs.poll(func() time.Duration { return time.Duration(s.conf().Store.RegistryPoll) }, s.pollReset)
	})
	if s.smtpLn != nil {
		s.serveSMTP(cfg)
	}
	if s.adminLn != nil {
		s.admin = &http.Server{Handler: s.adminHandler(), ReadHeaderTimeout: 10 * time.Second}
		s.loops.Go(func() {
			if err := s.admin.Serve(s.adminLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				s.log.Error("admin listener", "err", err)
			}
		})
	}
	return nil
}

// serveSMTP serves inbound SMTP on smtpLn.
func (s *Server) serveSMTP(cfg *Config) {
	inOpts := gateway.InboundOptions{
		Domain: s.hostname, MaxMessageBytes: cfg.SMTP.MaxMessageBytes, MaxRecipients: cfg.SMTP.MaxRecipients,
		ReadTimeout: time.Duration(cfg.SMTP.ReadTimeout), WriteTimeout: time.Duration(cfg.SMTP.WriteTimeout),
		MinDataRate: cmp.Or(cfg.SMTP.MinDataRate, -1), StressReadTimeout: time.Duration(cfg.SMTP.StressReadTimeout),
		SessionTimeout: time.Duration(cfg.SMTP.SessionTimeout),
		MaxConns:       cfg.SMTP.MaxConnections, MaxConnsPerIP: cfg.SMTP.MaxConnectionsPerIP,
		OnRefused: func(limit string) { s.metrics.refused.WithLabelValues(limit).Inc() },
		Logger:    s.log.With("layer", "smtp"),
	}
	if s.tlsCert != nil {
		inOpts.TLSConfig, inOpts.RequireTLS = s.tlsCert.tlsConfig(), cfg.SMTP.RequireTLS
		inOpts.OnTLS = func(tls.ConnectionState) { s.metrics.starttls.Inc() }
	}
	s.smtp = gateway.NewInboundServer(s.inbound, inOpts)
	s.metrics.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "gateway_inbound_sessions",
		Help: "Inbound SMTP connections open (smtp.max_connections bounds them)."},
		func() float64 { return float64(s.smtp.Sessions()) }))
	s.smtpUp.Store(true)
	s.loops.Go(func() {
		if err := s.smtp.Serve(s.smtpLn); err != nil && !errors.Is(err, gateway.ErrServerClosed) {
			s.log.Error("smtp listener", "err", err)
		}
		s.smtpUp.Store(false)
	})
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
	s.sched.drainDeliveries(dctx)
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
		if s.sched != nil {
			s.sched.stop()
		}
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
		if s.sched != nil {
			s.sched.workers.Wait()
		}
		s.cancel()
		if s.ownStore && s.st != nil {
			err = s.st.Close()
		}
	})
	return err
}
