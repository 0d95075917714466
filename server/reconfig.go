package server

import (
	"fmt"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/esro-emsdp/emsdp/gateway"
	"github.com/esro-emsdp/emsdp/store"
)

// liveConfig is the running configuration with what is built from it.
// It is never changed once stored: Reconfigure stores a new one.
type liveConfig struct {
	cfg   *Config
	relay relayer // nil: no smarthost
}

// conf is the running configuration. Read it once where one decision
// needs several keys: a reconfiguration may come between two loads.
func (s *Server) conf() *Config { return s.live.Load().cfg }

// Config returns a copy of the running configuration: the one Start was
// given with what Reconfigure applied since.
func (s *Server) Config() *Config { return s.conf().clone() }

// clone copies c, slices included, so that no two configurations share
// memory.
func (c *Config) clone() *Config {
	n := *c
	n.EMSD.Domains = slices.Clone(c.EMSD.Domains)
	n.Delivery.Retry = slices.Clone(c.Delivery.Retry)
	n.Relay.Retry = slices.Clone(c.Relay.Retry)
	return &n
}

// newRelay is the smarthost client of c, nil without a smarthost.
func (s *Server) newRelay(c *Config) relayer {
	if c.Relay.Smarthost == "" {
		return nil
	}
	tlsMode, _ := gateway.ParseTLSMode(c.Relay.TLS) // validated
	helo := c.Relay.Helo
	if helo == "" {
		helo = s.hostname
	}
	return &gateway.Relay{Addr: c.Relay.Smarthost, HeloName: helo, Username: c.Relay.Username,
		Password: c.Relay.Password, TLS: tlsMode, CAFile: c.Relay.CAFile,
		Timeout: time.Duration(c.Relay.Timeout), Log: s.log}
}

// Reconfigure applies next to the running server (SIGHUP with --config),
// as far as that needs no restart:
//
//   - log_level, when Options.LogLevel was given;
//   - emsd.*auth_failures* (the failures on record stay);
//   - all of [delivery] and [relay]: a relay round in progress ends with
//     the settings it began with; expiry applies to mail queued from now;
//   - store.retention, store.status_retention (at the next hourly purge)
//     and store.registry_poll;
//   - all of [compat];
//   - smtp.oversize, for the next message;
//   - smtp.max_connections and smtp.max_connections_per_ip, for new
//     connections (sessions open over a lowered limit stay);
//   - smtp.tls_cert, smtp.tls_key and smtp.require_tls while STARTTLS is
//     on (turning it on or off needs a restart).
//
// Every other key keeps its running value (listeners, data directory and
// store, domains and host name, the ESRO engine, SMTP size limits and
// timeouts): the names of those next changes are returned, in file order,
// and logged in one warning. next is validated first, and the result of
// keeping those keys too; an invalid configuration changes nothing and is
// the error. next stays the caller's.
func (s *Server) Reconfigure(next *Config) (restart []string, err error) {
	if err := next.Validate(); err != nil {
		return nil, err
	}
	s.reconfMu.Lock()
	defer s.reconfMu.Unlock()
	cur := s.live.Load()
	tls := s.tlsCert != nil
	merged := liveFrom(cur.cfg, next, s.level != nil, tls)
	if err := merged.Validate(); err != nil {
		return nil, fmt.Errorf("with the keys that need a restart at their running values: %w", err)
	}
	restart = diffKeys(merged, next)
	changed := diffKeys(cur.cfg, merged)
	if tls && (merged.SMTP.TLSCert != cur.cfg.SMTP.TLSCert || merged.SMTP.TLSKey != cur.cfg.SMTP.TLSKey) {
		// First, as the one step that can still fail (the files may have
		// changed since Validate read them).
		if err := s.tlsCert.loadFiles(merged.SMTP.TLSCert, merged.SMTP.TLSKey, time.Now()); err != nil {
			return nil, err
		}
	}
	if !authLimitsEqual(cur.cfg.EMSD, merged.EMSD) {
		s.devs.auth.SetLimits(merged.EMSD.authLimits())
	}
	s.live.Store(&liveConfig{cfg: merged, relay: s.newRelay(merged)})
	if s.level != nil {
		s.level.Set(merged.logLevel())
	}
	if s.smtp != nil {
		s.smtp.SetRequireTLS(merged.SMTP.RequireTLS)
		s.smtp.SetConnLimits(merged.SMTP.MaxConnections, merged.SMTP.MaxConnectionsPerIP)
	}
	if merged.Store.RegistryPoll != cur.cfg.Store.RegistryPoll {
		select {
		case s.pollReset <- struct{}{}:
		default:
		}
	}
	// Deferred relays are tried again at once: a reload is what follows
	// fixing the smarthost's settings (or the smarthost), and its mail
	// should not wait out its retry schedule of up to hours. A new
	// smarthost takes what is due now, a higher concurrency more devices.
	if merged.Relay.Smarthost != "" {
		if ch, err := s.st.RetryQueued(s.loopCtx, store.QueueSelect{All: true, Kind: store.QueueRelay}, time.Now()); err != nil {
			s.log.Error("re-attempt deferred relays", "err", err)
		} else if ch.Changed > 0 {
			s.log.Info("deferred relays made due", "recipients", ch.Changed)
		}
	}
	s.relay.kick()
	s.sched.kick()
	s.log.Info("configuration reloaded", "changed", keyList(changed))
	if merged.Relay.Smarthost == "" && cur.cfg.Relay.Smarthost != "" {
		s.log.Warn("no smarthost configured: mail for the Internet stays queued until it expires")
	}
	if len(restart) > 0 {
		s.log.Warn("configuration keys changed that take effect only after a restart; running with their old values",
			"keys", keyList(restart))
	}
	return restart, nil
}

func keyList(keys []string) string {
	if len(keys) == 0 {
		return "none"
	}
	return strings.Join(keys, ",")
}

// liveFrom is run with the keys Reconfigure applies taken from next;
// level says whether log_level can change, tls whether STARTTLS is on.
// Keys are restart-only unless listed here, so that a key added later is
// never applied by accident to something built once at start.
func liveFrom(run, next *Config, level, tls bool) *Config {
	m, n := run.clone(), next.clone()
	if level {
		m.LogLevel = n.LogLevel
	}
	m.EMSD.AuthFailuresBurst, m.EMSD.AuthFailuresRate = n.EMSD.AuthFailuresBurst, n.EMSD.AuthFailuresRate
	m.EMSD.DeviceAuthFailuresBurst, m.EMSD.DeviceAuthFailuresRate = n.EMSD.DeviceAuthFailuresBurst, n.EMSD.DeviceAuthFailuresRate
	m.EMSD.AuthFailuresTracked = n.EMSD.AuthFailuresTracked
	m.EMSD.AuthQueue, m.EMSD.AuthWorkers = n.EMSD.AuthQueue, n.EMSD.AuthWorkers
	m.Delivery = n.Delivery
	m.Relay = n.Relay
	m.Store.Retention, m.Store.StatusRetention, m.Store.RegistryPoll = n.Store.Retention, n.Store.StatusRetention, n.Store.RegistryPoll
	m.Compat = n.Compat
	m.SMTP.Oversize = n.SMTP.Oversize // read per message
	// The listener reads its limits at each accept.
	m.SMTP.MaxConnections, m.SMTP.MaxConnectionsPerIP = n.SMTP.MaxConnections, n.SMTP.MaxConnectionsPerIP
	if tls {
		// The listener offers STARTTLS or not from its start; while it
		// does, the pair can change, and require_tls with it.
		m.SMTP.RequireTLS = n.SMTP.RequireTLS
		if n.SMTP.TLSCert != "" && n.SMTP.TLSKey != "" {
			m.SMTP.TLSCert, m.SMTP.TLSKey = n.SMTP.TLSCert, n.SMTP.TLSKey
		}
	}
	return m
}

func authLimitsEqual(a, b EMSDConfig) bool { return a.authLimits() == b.authLimits() }

// diffKeys names the keys ("relay.smarthost") whose values differ between
// a and b, in the order of Config.
func diffKeys(a, b *Config) []string {
	var keys []string
	var walk func(prefix string, a, b reflect.Value)
	walk = func(prefix string, a, b reflect.Value) {
		for i := range a.NumField() {
			f := a.Type().Field(i)
			name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
			if name == "" || name == "-" {
				continue
			}
			av, bv := a.Field(i), b.Field(i)
			if f.Type.Kind() == reflect.Struct {
				walk(prefix+name+".", av, bv)
				continue
			}
			if !sameValue(av, bv) {
				keys = append(keys, prefix+name)
			}
		}
	}
	walk("", reflect.ValueOf(a).Elem(), reflect.ValueOf(b).Elem())
	return keys
}

// sameValue is reflect.DeepEqual except that a nil and an empty list are
// the same list.
func sameValue(a, b reflect.Value) bool {
	if a.Kind() == reflect.Slice && a.Len() == 0 && b.Len() == 0 {
		return true
	}
	return reflect.DeepEqual(a.Interface(), b.Interface())
}
