package server

import (
	"crypto/x509"
	"errors"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/esro-emsdp/emsdp/decode"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/gateway"
	"github.com/esro-emsdp/emsdp/store/open"
)

// The checks of Validate: every key of a Config, alone and with the keys it
// depends on.

func validListen(name, addr string, optional bool) error {
	if addr == "" {
		if optional {
			return nil
		}
		return configErr("%s: address required", name)
	}
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return configErr("%s %q: %v", name, addr, err)
	}
	if n, err := strconv.ParseUint(port, 10, 64); err == nil {
		if n > 65535 {
			return configErr("%s %q: port %d out of range 0..65535", name, addr, n)
		}
	} else if _, err := net.LookupPort("udp", port); err != nil {
		if _, err := net.LookupPort("tcp", port); err != nil {
			return configErr("%s %q: port %q is neither a number nor a service name", name, addr, port)
		}
	}
	return nil
}

// Validate checks every setting.
func (c *Config) Validate() error {
	var errs []error
	add := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	add(validListen("emsd.listen", c.EMSD.Listen, false))
	add(c.validAuthLimits())
	add(validListen("smtp.listen", c.SMTP.Listen, true))
	add(c.validSMTPTLS())
	add(validListen("admin.listen", c.Admin.Listen, true))
	add(c.validDTLS())
	if c.Relay.Smarthost != "" {
		add(validListen("relay.smarthost", c.Relay.Smarthost, false))
	}
	add(c.validStore())
	if _, err := decode.ParseLevel(c.LogLevel); err != nil {
		add(configErr("log_level %q: want trace, debug, info, warn or error", c.LogLevel))
	}
	if c.LogFormat != LogText && c.LogFormat != LogJSON {
		add(configErr("log_format %q: want %q or %q", c.LogFormat, LogText, LogJSON))
	}
	add(c.validESRO())
	if c.SMTP.MinDataRate < 0 {
		add(configErr("smtp.min_data_rate %d: want 0 (none) or more octets a second", c.SMTP.MinDataRate))
	}
	if c.EMSD.ReceiveBuffer < 0 || c.EMSD.ReceiveBuffer > 1<<30 {
		add(configErr("emsd.receive_buffer %d: want 0 (the system's default) to 1 GiB", c.EMSD.ReceiveBuffer))
	}
	if c.EMSD.PDUSize < 256 || c.EMSD.PDUSize > 65000 {
		add(configErr("emsd.pdu_size %d: want 256..65000", c.EMSD.PDUSize))
	}
	for name, d := range map[string]Duration{
		"emsd.reassembly_timeout": c.EMSD.ReassemblyTimeout, "emsd.dedupe_window": c.EMSD.DedupeWindow,
		"delivery.expiry": c.Delivery.Expiry, "relay.expiry": c.Relay.Expiry, "relay.timeout": c.Relay.Timeout,
		"smtp.read_timeout": c.SMTP.ReadTimeout, "smtp.write_timeout": c.SMTP.WriteTimeout,
		"smtp.stress_read_timeout": c.SMTP.StressReadTimeout, "smtp.session_timeout": c.SMTP.SessionTimeout,
		"store.retention": c.Store.Retention, "store.status_retention": c.Store.StatusRetention,
		"store.registry_poll": c.Store.RegistryPoll, "delivery.contact_lifetime": c.Delivery.ContactLifetime,
	} {
		if d <= 0 {
			add(configErr("%s must be positive", name))
		}
	}
	if c.Delivery.DrainTimeout < 0 {
		add(configErr("delivery.drain_timeout must not be negative"))
	}
	for name, list := range map[string][]Duration{"delivery.retry": c.Delivery.Retry, "relay.retry": c.Relay.Retry} {
		if len(list) == 0 {
			add(configErr("%s: at least one delay", name))
		}
		for _, d := range list {
			if d <= 0 {
				add(configErr("%s: delays must be positive", name))
				break
			}
		}
	}
	if c.Store.Retention < c.EMSD.DedupeWindow {
		add(configErr("store.retention must be at least emsd.dedupe_window"))
	}
	if c.Delivery.Concurrency < 1 {
		add(configErr("delivery.concurrency must be at least 1"))
	}
	if c.Delivery.Rate < 0 || c.Delivery.Burst < 0 {
		add(configErr("delivery.rate and delivery.burst must not be negative (rate 0 = no limit)"))
	}
	if c.Delivery.Probes < 0 {
		add(configErr("delivery.probes must not be negative (0 = a quarter of delivery.concurrency)"))
	}
	if c.Relay.Batch < 1 {
		add(configErr("relay.batch must be at least 1"))
	}
	if c.SMTP.MaxMessageBytes < 1024 || c.SMTP.MaxRecipients < 1 {
		add(configErr("smtp.max_message_bytes must be at least 1024 and smtp.max_recipients at least 1"))
	}
	if c.SMTP.MaxConnections < 0 {
		add(configErr("smtp.max_connections must not be negative (0 = no limit)"))
	}
	if c.SMTP.MaxConnectionsPerIP < 0 {
		add(configErr("smtp.max_connections_per_ip must not be negative (0 = no limit)"))
	}
	if c.SMTP.Oversize != OversizeRefuse && c.SMTP.Oversize != OversizeTruncate {
		add(configErr("smtp.oversize %q: want %q or %q", c.SMTP.Oversize, OversizeRefuse, OversizeTruncate))
	}
	switch c.Delivery.Reports {
	case "report", "ipm", "auto":
	default:
		add(configErr("delivery.reports %q: want report, ipm or auto", c.Delivery.Reports))
	}
	if m, err := gateway.ParseTLSMode(c.Relay.TLS); err != nil {
		add(configErr("relay.tls: %v", err))
	} else {
		if c.Relay.CAFile != "" {
			add(validCAFile(c.Relay.CAFile, m))
		}
		if c.Relay.InsecureSkipVerify && (m == gateway.TLSVerify || m == gateway.TLSRequired) {
			add(configErr("relay.insecure_skip_verify contradicts tls = %q: remove it (tls = \"opportunistic\" encrypts without verifying; for a private CA set ca_file)", c.Relay.TLS))
		}
	}
	switch c.Compat.VerifyFailure {
	case "send", "drop":
	default:
		add(configErr("compat.verify_failure %q: want send or drop", c.Compat.VerifyFailure))
	}
	for _, d := range append([]string{c.Domain}, c.EMSD.Domains...) {
		if strings.ContainsAny(d, "@ \t<>") {
			add(configErr("domain %q is not a domain name", d))
		}
	}
	return errors.Join(errs...)
}

// validESRO checks the [esro] keys by name, then what the engine makes
// of them together.
func (c *Config) validESRO() error {
	var errs []error
	for _, v := range []struct {
		key       string
		d         Duration
		zeroValid bool
	}{
		{"esro.retransmit", c.ESRO.Retransmit, false}, {"esro.roundtrip", c.ESRO.Roundtrip, false},
		{"esro.ack_delay", c.ESRO.AckDelay, true}, {"esro.nsdu_lifetime", c.ESRO.NSDULifetime, true},
	} {
		if v.d < 0 || (v.d == 0 && !v.zeroValid) {
			errs = append(errs, configErr("%s %v: must be positive", v.key, time.Duration(v.d)))
		}
	}
	if c.ESRO.Retries < 0 || c.ESRO.Retries > esro.MaxRetransmitCount {
		errs = append(errs, configErr("esro.retries %d: want 0..%d", c.ESRO.Retries, esro.MaxRetransmitCount))
	}
	if c.ESRO.RetransmitRate < 0 || c.ESRO.RetransmitBurst < 0 {
		errs = append(errs, configErr("esro.retransmit_rate %v, retransmit_burst %d: must not be negative (0 = no limit, and the default burst)",
			c.ESRO.RetransmitRate, c.ESRO.RetransmitBurst))
	}
	if c.ESRO.MaxInvocations < 0 {
		errs = append(errs, configErr("esro.max_invocations %d: must not be negative (0 = the default)", c.ESRO.MaxInvocations))
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if _, err := c.ESROConfig(nil); err != nil {
		return configErr("[esro] and emsd.pdu_size: %s", strings.TrimPrefix(err.Error(), "esro: "))
	}
	return nil
}

// validCAFile checks that relay.ca_file holds PEM certificates and is
// used by the TLS mode.
func validCAFile(path string, m gateway.TLSMode) error {
	if m != gateway.TLSVerify && m != gateway.TLSRequired {
		return configErr("relay.ca_file is used by tls = \"verify\" or \"required\" (tls is %q, which does not verify)", m)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return configErr("relay.ca_file: %v", err)
	}
	if !x509.NewCertPool().AppendCertsFromPEM(b) {
		return configErr("relay.ca_file %s: no PEM certificate in it", path)
	}
	return nil
}

// validStore checks the [store] keys that depend on the driver: each
// driver refuses the other's keys rather than ignore them silently.
func (c *Config) validStore() error {
	var errs []error
	switch c.Store.Driver {
	case StoreSQLite:
		if c.Data == "" {
			errs = append(errs, configErr("data: directory required (store.driver = %q)", StoreSQLite))
		}
		if c.Store.Conninfo != "" {
			errs = append(errs, configErr("store.dsn is for store.driver = %q (the store is %q)", StorePostgres, StoreSQLite))
		}
		if c.Store.BusyTimeout < 0 {
			errs = append(errs, configErr("store.busy_timeout must not be negative"))
		}
	case StorePostgres:
		if c.Store.Conninfo == "" {
			errs = append(errs, configErr("store.dsn: a PostgreSQL connection string is required (store.driver = %q)", StorePostgres))
		} else if err := open.CheckConninfo(c.Store.Conninfo); err != nil {
			// pgx's message masks the password.
			errs = append(errs, configErr("store.dsn: %v", err))
		}
		if c.Store.BusyTimeout != 0 {
			errs = append(errs, configErr("store.busy_timeout is for store.driver = %q (the store is %q)", StoreSQLite, StorePostgres))
		}
	default:
		errs = append(errs, configErr("store.driver %q: want %q or %q", c.Store.Driver, StoreSQLite, StorePostgres))
	}
	return errors.Join(errs...)
}
