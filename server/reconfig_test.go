package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/internal/testcert"
	"github.com/esro-emsdp/emsdp/internal/testclock"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/ua"
)

// leafKeys are the keys of Config with a setter that changes each one.
func leafKeys(c *Config) map[string]reflect.Value {
	keys := map[string]reflect.Value{}
	var walk func(prefix string, v reflect.Value)
	walk = func(prefix string, v reflect.Value) {
		for i := range v.NumField() {
			name, _, _ := strings.Cut(v.Type().Field(i).Tag.Get("toml"), ",")
			if f := v.Field(i); f.Kind() == reflect.Struct {
				walk(prefix+name+".", f)
			} else {
				keys[prefix+name] = f
			}
		}
	}
	walk("", reflect.ValueOf(c).Elem())
	return keys
}

// change gives v another value of its type (validity does not matter
// to liveFrom).
func change(t *testing.T, v reflect.Value) {
	switch v.Kind() {
	case reflect.String:
		v.SetString(v.String() + "x")
	case reflect.Int, reflect.Int64:
		v.SetInt(v.Int() + 1)
	case reflect.Float64:
		v.SetFloat(v.Float() + 1)
	case reflect.Bool:
		v.SetBool(!v.Bool())
	case reflect.Slice:
		v.Set(reflect.Append(v, reflect.New(v.Type().Elem()).Elem()))
	default:
		t.Fatalf("no change for %s", v.Type())
	}
}

// Which keys Reconfigure applies and which need a restart: every key of
// Config is changed alone and must be either applied or reported.
func TestReconfigureKeys(t *testing.T) {
	live := []string{
		"emsd.auth_failures_burst", "emsd.auth_failures_rate", "emsd.device_auth_failures_burst",
		"emsd.device_auth_failures_rate", "emsd.auth_failures_tracked", "emsd.auth_queue", "emsd.auth_workers",
		"delivery.retry", "delivery.expiry", "delivery.concurrency", "delivery.probes", "delivery.rate", "delivery.burst",
		"delivery.reports", "delivery.drain_timeout", "delivery.contact_lifetime",
		"relay.smarthost", "relay.helo", "relay.username", "relay.password", "relay.tls", "relay.ca_file", "relay.insecure_skip_verify",
		"relay.timeout", "relay.retry", "relay.expiry", "relay.batch",
		"store.retention", "store.status_retention", "store.registry_poll",
		"smtp.oversize", "smtp.max_connections", "smtp.max_connections_per_ip",
		"compat.ip_only_identification", "compat.reference_instance_ids", "compat.delivery_control_error",
		"compat.submit_result_tag_25", "compat.reverse_sequence_of", "compat.verify_failure", "compat.rfc822_delivery_ids",
	}
	tlsKeys := []string{"smtp.tls_cert", "smtp.tls_key", "smtp.require_tls"}
	run := runningTLSConfig()
	for _, tc := range []struct {
		name       string
		level, tls bool
		live       []string
	}{
		{"level and STARTTLS", true, true, slices.Concat(live, tlsKeys, []string{"log_level"})},
		{"no LevelVar", false, true, slices.Concat(live, tlsKeys)},
		{"no STARTTLS", true, false, slices.Concat(live, []string{"log_level"})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nLive := 0
			for key := range leafKeys(run) {
				next := run.clone()
				change(t, leafKeys(next)[key])
				merged := liveFrom(run, next, tc.level, tc.tls)
				restart := diffKeys(merged, next)
				applied := diffKeys(run, merged)
				if slices.Contains(tc.live, key) {
					nLive++
					if restart != nil || !slices.Equal(applied, []string{key}) {
						t.Errorf("%s: applied %v, restart %v; want it applied", key, applied, restart)
					}
				} else if applied != nil || !slices.Equal(restart, []string{key}) {
					t.Errorf("%s: applied %v, restart %v; want it to need a restart", key, applied, restart)
				}
				if !reflect.DeepEqual(run, runningTLSConfig()) {
					t.Fatalf("%s: the running configuration was changed", key)
				}
			}
			if nLive != len(tc.live) {
				t.Errorf("%d live keys found, want %d", nLive, len(tc.live))
			}
		})
	}
}

// runningTLSConfig is TestReconfigureKeys's running configuration.
func runningTLSConfig() *Config {
	c := DefaultConfig()
	c.SMTP.TLSCert, c.SMTP.TLSKey = "a.pem", "a.key"
	return c
}

// submitTo has dev submit a message for an Internet address.
func submitTo(t *testing.T, dev *testDevice, to, subject string) {
	t.Helper()
	_, err := dev.ua.Submit(context.Background(), &ua.Message{To: []string{to}, Subject: subject, Body: []byte("x\n")})
	must(t, err)
}

func reconfigure(t *testing.T, s *Server, edit func(*Config)) {
	t.Helper()
	c := s.Config()
	edit(c)
	restart, err := s.Reconfigure(c)
	must(t, err)
	if restart != nil {
		t.Fatalf("keys that need a restart: %v", restart)
	}
}

// The smarthost changes without a restart: mail queued without one goes
// to the first configured, later mail to the next.
func TestReconfigureSmarthost(t *testing.T) {
	h1, h2 := startSmarthost(t, ""), startSmarthost(t, "")
	s := startServer(t, testConfig(t))
	dev := newDevice(t, s, 198036, deviceOpts{password: "pw"})
	submitTo(t, dev, "bob@example.com", "queued")
	eventually(t, "the relay queued", func() bool { return queueStats(t, s).Relays[store.RelayQueued] == 1 })

	reconfigure(t, s, func(c *Config) { c.Relay.Smarthost = h1.addr })
	if m := h1.next(t); !slices.Equal(m.to, []string{"bob@example.com"}) {
		t.Errorf("first smarthost got mail for %v", m.to)
	}
	reconfigure(t, s, func(c *Config) { c.Relay.Smarthost, c.Relay.Helo = h2.addr, "relay.emsd.test" })
	submitTo(t, dev, "carol@example.org", "later")
	if m := h2.next(t); !slices.Equal(m.to, []string{"carol@example.org"}) {
		t.Errorf("second smarthost got mail for %v", m.to)
	}
	h1.mu.Lock()
	n := len(h1.msgs)
	h1.mu.Unlock()
	if n != 1 {
		t.Errorf("first smarthost got %d messages, want 1", n)
	}
	eventually(t, "both relays sent", func() bool { return queueStats(t, s).Relays[store.RelaySent] == 2 })
}

// A smarthost with a self-signed certificate: tls = "verify" defers the
// mail with an error that says what to do; once relay.ca_file names the
// certificate, the reload re-attempts the deferred mail at once (its next
// retry would be an hour away).
func TestReconfigureRelayTLS(t *testing.T) {
	cert := testcert.New(t, "smarthost")
	h := startSmarthostWith(t, "", func(srv *smtp.Server) {
		srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert.TLS}}
	})
	caFile := filepath.Join(t.TempDir(), "smarthost.pem")
	must(t, os.WriteFile(caFile, cert.CertPEM, 0o644))
	c := testConfig(t)
	c.Relay.Smarthost, c.Relay.TLS = h.addr, "verify"
	c.Relay.Retry = []Duration{Duration(time.Hour)}
	s := startServer(t, c)
	dev := newDevice(t, s, 198036, deviceOpts{password: "pw"})
	submitTo(t, dev, "bob@example.com", "deferred")
	var lastErr string
	eventually(t, "the relay deferred", func() bool {
		l, err := s.st.ListQueue(context.Background(), store.QueueFilter{Kind: store.QueueRelay})
		must(t, err)
		if len(l.Entries) == 1 && l.Entries[0].State == string(store.RelayQueued) {
			lastErr = l.Entries[0].LastError
		}
		return lastErr != ""
	})
	if !strings.Contains(lastErr, "not verified") || !strings.Contains(lastErr, "relay.ca_file") {
		t.Errorf("last error %q", lastErr)
	}
	h.none(t, 200*time.Millisecond)
	reconfigure(t, s, func(c *Config) { c.Relay.CAFile = caFile })
	if m := h.next(t); !m.tls || !slices.Equal(m.to, []string{"bob@example.com"}) {
		t.Errorf("smarthost got %+v", m)
	}
	eventually(t, "the relay sent", func() bool { return queueStats(t, s).Relays[store.RelaySent] == 1 })
}

// Failed-authentication limits change in place, the failures on record
// kept; a compat switch changes the answer at once.
func TestReconfigureAuthAndCompat(t *testing.T) {
	clk := testclock.New()
	c := testConfig(t)
	c.EMSD.AuthFailuresBurst = 3
	s := startServerWith(t, c, Options{Logger: testLogger(t), now: clk.Now})
	home := listenESRO(t, "127.0.0.1")
	addDevice(t, s, 198036, epAddr(home), deviceOpts{password: "pw"})
	a := listenESRO(t, "127.0.0.21")
	wrong, ok := answer{"error", 4, "020104"}, answer{kind: "result"}
	limited := answer{"error", 6, "020106"}
	for i, st := range []struct {
		what string
		edit func(*Config) // nil: none
		from []int         // 0 = home, 1 = a
		pw   string
		want answer
	}{
		{"two failures: within a burst of 3", nil, []int{1, 1}, "x", wrong},
		{"still room", nil, []int{1}, "pw", ok},
		{"burst 2: the two failures use it up", func(c *Config) { c.EMSD.AuthFailuresBurst = 2 }, []int{1}, "pw", limited},
		{"the device at home is not that source", nil, []int{0}, "pw", ok},
		{"burst 3 again", func(c *Config) { c.EMSD.AuthFailuresBurst = 3 }, []int{1}, "pw", ok},
		{"limit off", func(c *Config) { c.EMSD.AuthFailuresBurst = 0 }, []int{1, 1, 1, 1, 1}, "x", wrong},
		{"still off", nil, []int{1}, "pw", ok},
		{"delivery control refused", func(c *Config) { c.Compat.DeliveryControlError = true }, []int{0}, "pw", answer{"error", 7, ""}},
		{"and answered again", func(c *Config) { c.Compat.DeliveryControlError = false }, []int{0}, "pw", ok},
	} {
		if st.edit != nil {
			reconfigure(t, s, st.edit)
		}
		for _, from := range st.from {
			ep := []*esro.Endpoint{home, a}[from]
			if got := deliveryControl(t, s, ep, 198036, st.pw); got != st.want {
				t.Fatalf("step %d, %s: %+v, want %+v", i, st.what, got, st.want)
			}
		}
	}
}

// Keys that need a restart are reported and keep their running values;
// the rest of the same configuration is applied.
func TestReconfigureRestartOnly(t *testing.T) {
	s := startServer(t, testConfig(t))
	newDevice(t, s, 198036, deviceOpts{})
	before := s.Config()
	addrs := s.Addrs()
	next := s.Config()
	next.Domain, next.Data = "other.test", t.TempDir()
	next.EMSD.Listen, next.EMSD.PDUSize = "127.0.0.1:1", 1400
	next.ESRO.Retries = 3
	next.SMTP.MaxMessageBytes = 2048
	next.Relay.Batch = 7
	restart, err := s.Reconfigure(next)
	must(t, err)
	want := []string{"domain", "data", "emsd.listen", "emsd.pdu_size", "esro.retries", "smtp.max_message_bytes"}
	if !slices.Equal(restart, want) {
		t.Errorf("restart %v, want %v", restart, want)
	}
	got := s.Config()
	if got.Relay.Batch != 7 {
		t.Errorf("relay.batch %d, want 7 (applied)", got.Relay.Batch)
	}
	got.Relay.Batch = before.Relay.Batch
	if !reflect.DeepEqual(got, before) {
		t.Errorf("running configuration changed beyond relay.batch:\n%+v\nwas\n%+v", got, before)
	}
	if s.Addrs() != addrs {
		t.Errorf("addresses %+v, were %+v", s.Addrs(), addrs)
	}
	// The old domain still serves, the new one not yet.
	must(t, sendMail(s, "carol@example.com", []string{"198.036@emsd.test"}, inboundMsg("198.036@emsd.test", "old", "x")))
	var se *smtp.SMTPError
	if err := sendMail(s, "carol@example.com", []string{"198.036@other.test"}, inboundMsg("198.036@other.test", "new", "x")); !errors.As(err, &se) || se.Code != 550 {
		t.Errorf("mail for the new domain: %v, want 550", err)
	}
}

// An invalid configuration changes nothing: the old one keeps running.
func TestReconfigureInvalid(t *testing.T) {
	h1, h2 := startSmarthost(t, ""), startSmarthost(t, "")
	c := testConfig(t)
	c.Relay.Smarthost = h1.addr
	s := startServer(t, c)
	dev := newDevice(t, s, 198036, deviceOpts{})
	before := s.Config()
	for _, tc := range []struct {
		name, wantErr string
		edit          func(*Config)
	}{
		{"bad batch", "relay.batch must be at least 1", func(c *Config) { c.Relay.Batch = 0 }},
		{"bad smarthost", "relay.smarthost", func(c *Config) { c.Relay.Smarthost = "nope" }},
		{"bad level", "log_level", func(c *Config) { c.LogLevel = "loud" }},
		// Valid as a file, but not with the running dedupe window.
		{"invalid with the running values", "store.retention must be at least emsd.dedupe_window", func(c *Config) {
			c.EMSD.DedupeWindow, c.Store.Retention = Duration(10*time.Minute), Duration(30*time.Minute)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			next := s.Config()
			next.Relay.Smarthost, next.Delivery.Concurrency = h2.addr, 1
			tc.edit(next)
			restart, err := s.Reconfigure(next)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error %v, want one with %q", err, tc.wantErr)
			}
			if restart != nil {
				t.Errorf("restart %v with an error", restart)
			}
			if got := s.Config(); !reflect.DeepEqual(got, before) {
				t.Errorf("running configuration changed:\n%+v\nwas\n%+v", got, before)
			}
		})
	}
	submitTo(t, dev, "bob@example.com", "still h1")
	h1.next(t)
	h2.mu.Lock()
	defer h2.mu.Unlock()
	if len(h2.msgs) != 0 {
		t.Errorf("the refused smarthost got %d messages", len(h2.msgs))
	}
}

// With STARTTLS on, require_tls and the key pair change without a
// restart (and Reload then re-reads the new files); turning STARTTLS off
// needs one.
func TestReconfigureSMTPTLS(t *testing.T) {
	first, second := testcert.New(t, "first"), testcert.New(t, "second")
	f1, k1 := first.Files(t)
	f2, k2 := second.Files(t)
	c := testConfig(t)
	c.SMTP.TLSCert, c.SMTP.TLSKey = f1, k1
	s := startServer(t, c)
	newDevice(t, s, 198036, deviceOpts{})
	addr := s.Addrs().SMTP.String()
	client := trusting(first, second)
	send := func(tls bool) (*x509.Certificate, error) {
		cc := client
		if !tls {
			cc = nil
		}
		st, err := sendTLS(addr, cc, "carol@example.com", "198.036@emsd.test", inboundMsg("198.036@emsd.test", "t", "x"))
		if len(st.PeerCertificates) == 0 {
			return nil, err
		}
		return st.PeerCertificates[0], err
	}
	if _, err := send(false); err != nil {
		t.Fatalf("plaintext before: %v", err)
	}
	reconfigure(t, s, func(c *Config) { c.SMTP.RequireTLS, c.SMTP.TLSCert, c.SMTP.TLSKey = true, f2, k2 })
	if _, err := send(false); err == nil || !strings.Contains(err.Error(), "530") {
		t.Errorf("plaintext with require_tls: %v, want 530", err)
	}
	peer, err := send(true)
	must(t, err)
	if !peer.Equal(second.Leaf) {
		t.Errorf("serving %q, want second", peer.Subject.CommonName)
	}
	must(t, s.Reload(context.Background()))
	if peer, err := send(true); err != nil || !peer.Equal(second.Leaf) {
		t.Errorf("after Reload: %v, %v; want second", peer, err)
	}

	next := s.Config()
	next.SMTP.TLSCert, next.SMTP.TLSKey, next.SMTP.RequireTLS = "", "", false
	restart, err := s.Reconfigure(next)
	must(t, err)
	if want := []string{"smtp.tls_cert", "smtp.tls_key"}; !slices.Equal(restart, want) {
		t.Errorf("restart %v, want %v", restart, want)
	}
	if !offersSTARTTLS(t, addr) {
		t.Error("STARTTLS no longer offered")
	}
	if _, err := send(false); err != nil {
		t.Errorf("plaintext with require_tls off: %v", err)
	}
}

// The SMTP connection limits change without a restart, for the next
// connection; sessions open over a lowered limit stay open.
func TestReconfigureSMTPConnLimits(t *testing.T) {
	c := testConfig(t)
	c.SMTP.MaxConnections = 1
	s := startServer(t, c)
	a := wantGreeting(t, s, "127.0.0.1", false)
	wantGreeting(t, s, "127.0.0.2", true)
	reconfigure(t, s, func(c *Config) { c.SMTP.MaxConnections = 2 })
	b := wantGreeting(t, s, "127.0.0.2", false)
	wantGreeting(t, s, "127.0.0.3", true)
	reconfigure(t, s, func(c *Config) { c.SMTP.MaxConnections, c.SMTP.MaxConnectionsPerIP = 0, 1 })
	wantGreeting(t, s, "127.0.0.1", true)
	d := wantGreeting(t, s, "127.0.0.3", false)
	reconfigure(t, s, func(c *Config) { c.SMTP.MaxConnections, c.SMTP.MaxConnectionsPerIP = 1, 0 })
	wantGreeting(t, s, "127.0.0.4", true)
	if got := s.smtp.Sessions(); got != 3 {
		t.Errorf("%d sessions, want the 3 open before the limit was lowered", got)
	}
	for _, c := range []*rawSMTP{a, b, d} {
		c.quit(t)
	}
	wantGreeting(t, s, "127.0.0.4", false).quit(t)
	if ip, total := s.metrics.counter(t, "gateway_inbound_refused_total", "ip"),
		s.metrics.counter(t, "gateway_inbound_refused_total", "total"); ip != 1 || total != 3 {
		t.Errorf("refused ip %v, total %v; want 1, 3", ip, total)
	}
}

// log_level changes the caller's LevelVar; without one it needs a
// restart.
func TestReconfigureLogLevel(t *testing.T) {
	for _, tc := range []struct {
		name    string
		level   *slog.LevelVar
		restart []string
	}{
		{"LevelVar", new(slog.LevelVar), nil},
		{"none", nil, []string{"log_level"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := startServerWith(t, testConfig(t), Options{Logger: testLogger(t), LogLevel: tc.level})
			if tc.level != nil && tc.level.Level() != slog.LevelInfo {
				t.Fatalf("level at start %v", tc.level.Level())
			}
			next := s.Config()
			next.LogLevel = "debug"
			restart, err := s.Reconfigure(next)
			must(t, err)
			if !slices.Equal(restart, tc.restart) {
				t.Errorf("restart %v, want %v", restart, tc.restart)
			}
			if tc.level != nil && tc.level.Level() != slog.LevelDebug {
				t.Errorf("level %v, want debug", tc.level.Level())
			}
		})
	}
}

// A shorter registry_poll takes effect without waiting for the long one.
func TestReconfigureRegistryPoll(t *testing.T) {
	c := testConfig(t)
	c.Store.RegistryPoll = Duration(time.Hour)
	s := startServer(t, c)
	must(t, s.st.AddDevice(context.Background(), &store.Device{Address: 198036, IP: netip.MustParseAddr("127.0.0.1"),
		Port: 7000, Version: "1.1", Mode: store.ModeComplete}))
	reconfigure(t, s, func(c *Config) { c.Store.RegistryPoll = Duration(20 * time.Millisecond) })
	eventually(t, "the device added elsewhere known", func() bool { return s.devs.current().get(198036) != nil })
}
