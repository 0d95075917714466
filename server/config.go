package server

import (
	"context"
	_ "embed"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/esro-emsdp/emsdp/decode"
	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/open"
)

//go:embed default.toml
var defaultTOML string

// Duration is a time.Duration written as "90s" or "1h30m" in TOML.
type Duration time.Duration

// UnmarshalText parses a Go duration.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// MarshalText writes the duration in Go syntax.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// Config is every setting of the server; DefaultConfig holds the embedded
// defaults (server/default.toml, which documents each key).
type Config struct {
	Domain   string `toml:"domain"`
	Hostname string `toml:"hostname"`
	Data     string `toml:"data"`
	LogLevel string `toml:"log_level"`
	// LogFormat is how emsdp serve writes its log: LogText or LogJSON.
	LogFormat string         `toml:"log_format"`
	EMSD      EMSDConfig     `toml:"emsd"`
	ESRO      ESROConfig     `toml:"esro"`
	Delivery  DeliveryConfig `toml:"delivery"`
	SMTP      SMTPConfig     `toml:"smtp"`
	Relay     RelayConfig    `toml:"relay"`
	Admin     AdminConfig    `toml:"admin"`
	Store     StoreConfig    `toml:"store"`
	Compat    CompatConfig   `toml:"compat"`
	DTLS      DTLSConfig     `toml:"dtls"`
}

// EMSDConfig is the EMSD service.
type EMSDConfig struct {
	Listen  string   `toml:"listen"`
	Domains []string `toml:"domains"`
	PDUSize int      `toml:"pdu_size"`
	// ReceiveBuffer is the UDP socket's kernel receive buffer in octets
	// (0: the system's default).
	ReceiveBuffer     int      `toml:"receive_buffer"`
	ReassemblyTimeout Duration `toml:"reassembly_timeout"`
	DedupeWindow      Duration `toml:"dedupe_window"`
	// Failed-authentication limits (authlimit.go); rates are per minute.
	AuthFailuresBurst       int     `toml:"auth_failures_burst"`
	AuthFailuresRate        float64 `toml:"auth_failures_rate"`
	DeviceAuthFailuresBurst int     `toml:"device_auth_failures_burst"`
	DeviceAuthFailuresRate  float64 `toml:"device_auth_failures_rate"`
	AuthFailuresTracked     int     `toml:"auth_failures_tracked"`
	// Password checks waiting for a bcrypt worker, and the workers (0:
	// one less than the CPUs).
	AuthQueue   int `toml:"auth_queue"`
	AuthWorkers int `toml:"auth_workers"`
}

// ESROConfig is the ESRO engine under it.
type ESROConfig struct {
	Retransmit     Duration `toml:"retransmit"`
	Roundtrip      Duration `toml:"roundtrip"`
	AckDelay       Duration `toml:"ack_delay"`
	NSDULifetime   Duration `toml:"nsdu_lifetime"`
	Retries        int      `toml:"retries"`
	FixedTimers    bool     `toml:"fixed_timers"`
	IPOnlyPeers    bool     `toml:"ip_only_peers"`
	MaxInvocations int      `toml:"max_invocations"`
	// RetransmitRate and RetransmitBurst pace the engine's retransmissions
	// (esro.Config.RetransmitRate).
	RetransmitRate  float64 `toml:"retransmit_rate"`
	RetransmitBurst int     `toml:"retransmit_burst"`
}

// DeliveryConfig is delivery to devices.
type DeliveryConfig struct {
	Retry        []Duration `toml:"retry"`
	Expiry       Duration   `toml:"expiry"`
	Concurrency  int        `toml:"concurrency"`
	Probes       int        `toml:"probes"`
	Rate         float64    `toml:"rate"`
	Burst        int        `toml:"burst"`
	Reports      string     `toml:"reports"`
	DrainTimeout Duration   `toml:"drain_timeout"`
	// ContactLifetime is how long the address a device was last heard
	// from stays where its deliveries go (contact.go).
	ContactLifetime Duration `toml:"contact_lifetime"`
}

// SMTPConfig is the inbound SMTP listener.
type SMTPConfig struct {
	Listen          string `toml:"listen"`
	MaxMessageBytes int64  `toml:"max_message_bytes"`
	MaxRecipients   int    `toml:"max_recipients"`
	// Oversize is what happens to mail whose text is more than a device
	// can take: OversizeRefuse or OversizeTruncate.
	Oversize     string   `toml:"oversize"`
	ReadTimeout  Duration `toml:"read_timeout"`
	WriteTimeout Duration `toml:"write_timeout"`
	// Against slow clients holding sessions (gateway.InboundOptions):
	// octets a second that extend a request (0: none), the read timeout
	// while the server is crowded, and the bound on a whole session.
	MinDataRate       int      `toml:"min_data_rate"`
	StressReadTimeout Duration `toml:"stress_read_timeout"`
	SessionTimeout    Duration `toml:"session_timeout"`
	// MaxConnections bounds the sessions open at once, and
	// MaxConnectionsPerIP those of one client (an IPv4 address or an IPv6
	// /64); 0 = no limit.
	MaxConnections      int `toml:"max_connections"`
	MaxConnectionsPerIP int `toml:"max_connections_per_ip"`
	// TLSCert and TLSKey are PEM files (both or neither): with them
	// STARTTLS is offered, and they are read again on SIGHUP.
	TLSCert    string `toml:"tls_cert"`
	TLSKey     string `toml:"tls_key"`
	RequireTLS bool   `toml:"require_tls"`
}

// RelayConfig is outbound mail to the smarthost.
type RelayConfig struct {
	Smarthost string `toml:"smarthost"`
	Helo      string `toml:"helo"`
	Username  string `toml:"username"`
	Password  string `toml:"password"`
	TLS       string `toml:"tls"`
	CAFile    string `toml:"ca_file"`
	// InsecureSkipVerify is the setting of earlier versions, when
	// "opportunistic" verified certificates; it is accepted so that their
	// configuration files still load. Opportunistic TLS no longer
	// verifies, so it changes nothing there; with "verify" or "required"
	// it is refused, since it would contradict them.
	InsecureSkipVerify bool       `toml:"insecure_skip_verify,omitempty"`
	Timeout            Duration   `toml:"timeout"`
	Retry              []Duration `toml:"retry"`
	Expiry             Duration   `toml:"expiry"`
	Batch              int        `toml:"batch"`
}

// AdminConfig is the HTTP admin listener.
type AdminConfig struct {
	Listen string `toml:"listen"`
	// PProf serves /debug/pprof next to /metrics; false leaves only
	// /metrics and /healthz (profiles show internals an operator may not
	// want on a shared admin port).
	PProf bool `toml:"pprof"`
}

// StoreConfig is the store (which backend, where) and its housekeeping.
type StoreConfig struct {
	// Driver is StoreSQLite (the database in Config.Data, one server) or
	// StorePostgres (a database several servers share, at Conninfo: a
	// PostgreSQL connection string, keyword/value or URL; the key is
	// store.dsn).
	Driver          string   `toml:"driver"`
	Conninfo        string   `toml:"dsn,omitempty"`
	Retention       Duration `toml:"retention"`
	StatusRetention Duration `toml:"status_retention"`
	RegistryPoll    Duration `toml:"registry_poll"`
	// BusyTimeout is SQLite's wait for another process's lock; 0 = 10 s.
	// The key is for driver sqlite only, hence no default in the file.
	BusyTimeout Duration `toml:"busy_timeout,omitzero"`
}

// Log formats (log_format): logfmt-style key=value lines for people, or
// one JSON object per line for log collectors.
const (
	LogText = "text"
	LogJSON = "json"
)

// NewLogHandler returns the slog handler log_format names, writing to w.
// The trace level (each PDU) is named TRACE.
func (c *Config) NewLogHandler(w io.Writer, opts *slog.HandlerOptions) slog.Handler {
	if opts == nil {
		opts = &slog.HandlerOptions{}
	}
	if opts.ReplaceAttr == nil {
		o := *opts
		o.ReplaceAttr = decode.ReplaceLevel
		opts = &o
	}
	if c.LogFormat == LogJSON {
		return slog.NewJSONHandler(w, opts)
	}
	return slog.NewTextHandler(w, opts)
}

// What smtp.oversize does with mail too big for a device.
const (
	// OversizeRefuse answers DATA with 552 5.3.4: the sender's server
	// bounces it, and nothing is lost silently.
	OversizeRefuse = "refuse"
	// OversizeTruncate delivers the text cut to fit and sends the sender a
	// DSN saying so.
	OversizeTruncate = "truncate"
)

// Store drivers (store.driver).
const (
	StoreSQLite   = open.SQLite
	StorePostgres = open.Postgres
)

// CompatConfig switches reference behaviour on where this server differs.
type CompatConfig struct {
	IPOnlyIdentification bool   `toml:"ip_only_identification"`
	ReferenceInstanceIDs bool   `toml:"reference_instance_ids"`
	DeliveryControlError bool   `toml:"delivery_control_error"`
	SubmitResultTag25    bool   `toml:"submit_result_tag_25"`
	ReverseSequenceOf    bool   `toml:"reverse_sequence_of"`
	VerifyFailure        string `toml:"verify_failure"`
	// RFC822DeliveryIDs delivers Internet mail under the sender's
	// Message-ID (rfc822 MessageId), as the reference MTS does, instead of
	// a local id the server assigns. A device that drops re-deliveries by
	// message id and content then merges two identical mails that reuse a
	// Message-ID.
	RFC822DeliveryIDs bool `toml:"rfc822_delivery_ids"`
}

// ConfigError reports an unusable configuration.
type ConfigError struct{ Msg string }

// Error returns the message.
func (e *ConfigError) Error() string { return "config: " + e.Msg }

func configErr(format string, a ...any) error { return &ConfigError{fmt.Sprintf(format, a...)} }

// DefaultConfig returns the embedded defaults.
func DefaultConfig() *Config {
	c := &Config{}
	if _, err := toml.Decode(defaultTOML, c); err != nil {
		panic("server: embedded default.toml: " + err.Error()) // a build defect, caught by every test
	}
	return c
}

// LoadConfig reads a TOML file over the defaults (path "" = defaults only)
// and validates the result.
func LoadConfig(path string) (*Config, error) {
	if path == "" {
		c := DefaultConfig()
		return c, c.Validate()
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	c, err := parseConfig(b, path)
	if err != nil {
		return nil, err
	}
	if err := c.Validate(); err != nil {
		return c, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// dataRelativeTo makes a relative data directory the file sets relative to
// the file's directory, so that emsdp serve and the operator's commands
// given the same --config find the same store from any working
// directory.
func (c *Config) dataRelativeTo(path string) {
	if c.Data != "" && !filepath.IsAbs(c.Data) {
		c.Data = filepath.Join(filepath.Dir(path), c.Data)
	}
}

// parseConfig decodes a TOML document over the defaults; unknown keys are
// an error (a misspelt key must not silently keep its default).
func parseConfig(b []byte, name string) (*Config, error) {
	c := DefaultConfig()
	md, err := toml.Decode(string(b), c)
	if err != nil {
		return nil, configErr("%s: %v", name, err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		keys := make([]string, len(und))
		for i, k := range und {
			keys[i] = k.String()
		}
		return nil, configErr("%s: unknown keys: %s", name, strings.Join(keys, ", "))
	}
	if md.IsDefined("data") {
		c.dataRelativeTo(name)
	}
	// "off" turns an optional listener off, as the flags say it.
	for _, l := range []*string{&c.SMTP.Listen, &c.Admin.Listen, &c.DTLS.Listen} {
		if *l == "off" {
			*l = ""
		}
	}
	return c, nil
}

// Write writes c as TOML, with the relay password and any password in
// the store conninfo masked, and the data directory absolute: a relative one
// in a file is relative to the file, and the output may be saved anywhere.
func (c *Config) Write(w io.Writer) error {
	cc := *c
	if abs, err := filepath.Abs(cc.Data); err == nil && cc.Data != "" {
		cc.Data = abs
	}
	if cc.Relay.Password != "" {
		cc.Relay.Password = "********"
	}
	cc.Store.Conninfo = open.MaskConninfo(cc.Store.Conninfo)
	return toml.NewEncoder(w).Encode(&cc)
}

// StoreConfig is how store/open opens the store the configuration names:
// the SQLite database in Data, or the PostgreSQL database at
// Store.Conninfo; its Access is open.Create.
func (c *Config) StoreConfig() open.Config {
	return open.Config{Driver: c.Store.Driver, Dir: c.Data, Conninfo: c.Store.Conninfo,
		BusyTimeout: time.Duration(c.Store.BusyTimeout)}
}

// StoreLocation names the store for people: the SQLite database file
// (absolute), or the PostgreSQL conninfo with its password masked.
func (c *Config) StoreLocation() string { return c.StoreConfig().Location() }

// OpenStore opens the store the configuration names, creating it if need
// be. Unlike Start it takes no lock on the data directory: the device
// commands use it beside a running server.
func (c *Config) OpenStore(ctx context.Context) (store.Store, error) {
	return open.Open(ctx, c.StoreConfig())
}

// ESROConfig returns the endpoint configuration the settings describe.
func (c *Config) ESROConfig(log *slog.Logger) (*esro.Config, error) {
	ec := &esro.Config{
		Timers: esro.Timers{
			Acknowledgement: time.Duration(c.ESRO.AckDelay),
			Roundtrip:       time.Duration(c.ESRO.Roundtrip),
			Retransmit:      time.Duration(c.ESRO.Retransmit),
			NSDULifetime:    time.Duration(c.ESRO.NSDULifetime),
			RetransmitCount: c.ESRO.Retries,
		},
		FixedTimers:     c.ESRO.FixedTimers,
		PDUSize:         c.EMSD.PDUSize,
		IPOnlyPeers:     c.ESRO.IPOnlyPeers,
		MaxInvocations:  c.ESRO.MaxInvocations,
		RetransmitRate:  c.ESRO.RetransmitRate,
		RetransmitBurst: c.ESRO.RetransmitBurst,
		Logger:          log,
		Trace:           decode.NewTracer(log),
	}
	return ec, ec.Validate()
}

// domain is the device mail domain, defaulting to the host name.
func (c *Config) domain() string {
	if c.Domain != "" {
		return strings.ToLower(c.Domain)
	}
	h, err := os.Hostname()
	if err != nil || h == "" {
		return "localhost"
	}
	return strings.ToLower(h)
}

// emsdOptions are the codec options for a device of version v.
func (c *Config) emsdOptions(v emsd.Version) emsd.Options {
	return emsd.Options{Version: v, ReverseSequenceOf: c.Compat.ReverseSequenceOf}
}

// domains are the EMSD domains, lower case, the device mail domain first.
func (c *Config) domains() []string {
	ds := []string{c.domain()}
	for _, d := range c.EMSD.Domains {
		ds = append(ds, strings.ToLower(d))
	}
	return ds
}

func (c *Config) hostname() string {
	if c.Hostname != "" {
		return c.Hostname
	}
	return c.domain()
}

func (c *Config) logLevel() slog.Level {
	lv, _ := decode.ParseLevel(c.LogLevel)
	return lv
}
