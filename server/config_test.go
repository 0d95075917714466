package server

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func writeFile(t *testing.T, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "emsdp.toml")
	must(t, os.WriteFile(p, []byte(text), 0o600))
	return p
}

func TestDefaultConfig(t *testing.T) {
	c, err := LoadConfig("")
	must(t, err)
	for name, tc := range map[string]struct{ got, want any }{
		"emsd.listen":      {c.EMSD.Listen, ":641"},
		"smtp.listen":      {c.SMTP.Listen, "127.0.0.1:2525"},
		"admin.listen":     {c.Admin.Listen, "127.0.0.1:9641"},
		"data":             {c.Data, "./emsdp-data"},
		"relay.smarthost":  {c.Relay.Smarthost, ""},
		"delivery.expiry":  {time.Duration(c.Delivery.Expiry), time.Hour},
		"esro.retransmit":  {time.Duration(c.ESRO.Retransmit), 2 * time.Second},
		"esro.retries":     {c.ESRO.Retries, 8},
		"pdu_size":         {c.EMSD.PDUSize, 1500},
		"reassembly":       {time.Duration(c.EMSD.ReassemblyTimeout), 2 * time.Minute},
		"verify_failure":   {c.Compat.VerifyFailure, "send"},
		"tag 25":           {c.Compat.SubmitResultTag25, true},
		"ip only":          {c.Compat.IPOnlyIdentification, false},
		"delivery retries": {len(c.Delivery.Retry), 5},
		"store.driver":     {c.Store.Driver, StoreSQLite},
		"store.dsn":        {c.Store.Conninfo, ""},
		"busy_timeout":     {c.Store.BusyTimeout, Duration(0)}, // SQLite's 10 s
		"max_connections":  {c.SMTP.MaxConnections, 200},
		"per ip":           {c.SMTP.MaxConnectionsPerIP, 10},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %v, want %v", name, tc.got, tc.want)
		}
	}
}

func TestLoadConfig(t *testing.T) {
	for _, tc := range []struct {
		name, text string
		check      func(*Config) bool
		wantErr    string
	}{
		{"override", "domain = \"Example.NET\"\n[emsd]\nlisten = \":2002\"\n[delivery]\nretry = [\"1s\"]\nexpiry = \"2h\"\n",
			func(c *Config) bool {
				return c.domain() == "example.net" && c.EMSD.Listen == ":2002" && len(c.Delivery.Retry) == 1 &&
					c.Delivery.Retry[0] == Duration(time.Second) && c.Delivery.Expiry == Duration(2*time.Hour) &&
					c.SMTP.Listen == "127.0.0.1:2525"
			}, ""},
		{"listeners off", "[smtp]\nlisten = \"\"\n[admin]\nlisten = \"\"\n",
			func(c *Config) bool { return c.SMTP.Listen == "" && c.Admin.Listen == "" }, ""},
		// As the flags take it (--smtp off, --admin off, --dtls-listen off).
		{"listeners off by name", "[smtp]\nlisten = \"off\"\n[admin]\nlisten = \"off\"\n[dtls]\nlisten = \"off\"\n",
			func(c *Config) bool { return c.SMTP.Listen == "" && c.Admin.Listen == "" && c.DTLS.Listen == "" }, ""},
		{"emsd listen cannot be off", "[emsd]\nlisten = \"off\"\n", nil, "emsd.listen \"off\""},
		{"compat", "[compat]\nip_only_identification = true\nverify_failure = \"drop\"\n",
			func(c *Config) bool { return c.Compat.IPOnlyIdentification && c.Compat.VerifyFailure == "drop" }, ""},
		{"unknown key", "[emsd]\nlisten = \":1\"\nlistne = \":2\"\n", nil, "unknown keys: emsd.listne"},
		{"syntax", "[emsd\n", nil, "emsdp.toml"},
		{"bad duration", "[delivery]\nexpiry = \"soon\"\n", nil, "expiry"},
		{"negative duration", "[delivery]\nexpiry = \"-1h\"\n", nil, "delivery.expiry must be positive"},
		{"bad listen", "[emsd]\nlisten = \"641\"\n", nil, "emsd.listen"},
		{"no emsd listen", "[emsd]\nlisten = \"\"\n", nil, "emsd.listen: address required"},
		{"bad reports", "[delivery]\nreports = \"x\"\n", nil, "delivery.reports"},
		{"bad tls", "[relay]\ntls = \"maybe\"\n", nil, "relay.tls"},
		{"old insecure_skip_verify", "[relay]\ninsecure_skip_verify = true\n",
			func(c *Config) bool { return c.Relay.InsecureSkipVerify && c.Relay.TLS == "opportunistic" }, ""},
		{"insecure_skip_verify with verify", "[relay]\ntls = \"verify\"\ninsecure_skip_verify = true\n", nil,
			"relay.insecure_skip_verify contradicts tls = \"verify\""},
		{"bad verify", "[compat]\nverify_failure = \"ask\"\n", nil, "verify_failure"},
		{"empty retry", "[relay]\nretry = []\n", nil, "relay.retry"},
		{"bad timers", "[esro]\nretries = -5\n", nil, "emsdp.toml: config: esro.retries -5: want 0..255"},
		{"zero retransmit", "[esro]\nretransmit = \"0s\"\n", nil, "esro.retransmit 0s: must be positive"},
		{"port out of range", "[smtp]\nlisten = \"127.0.0.1:99999\"\n", nil, "smtp.listen \"127.0.0.1:99999\": port 99999 out of range 0..65535"},
		{"port no service", "[admin]\nlisten = \"127.0.0.1:nosuchservice\"\n", nil, "neither a number nor a service name"},
		{"ca_file without verification", "[relay]\nca_file = \"/dev/null\"\n", nil, "relay.ca_file is used by tls"},
		{"ca_file not PEM", "[relay]\ntls = \"verify\"\nca_file = \"/dev/null\"\n", nil, "no PEM certificate"},
		{"bad oversize", "[smtp]\noversize = \"cut\"\n", nil, "smtp.oversize"},
		{"tiny pdu", "[emsd]\npdu_size = 10\n", nil, "pdu_size"},
		{"bad log level", "log_level = \"loud\"\n", nil, "log_level"},
		{"bad domain", "domain = \"a@b\"\n", nil, "domain"},
		{"postgres", "[store]\ndriver = \"postgres\"\ndsn = \"postgres://u@db/emsdp?pool_max_conns=4\"\n",
			func(c *Config) bool {
				return c.Store.Driver == StorePostgres && c.Store.Conninfo == "postgres://u@db/emsdp?pool_max_conns=4"
			}, ""},
		{"postgres needs no data", "data = \"\"\n[store]\ndriver = \"postgres\"\ndsn = \"dbname=emsdp\"\n",
			func(c *Config) bool { return c.Data == "" }, ""},
		{"sqlite busy timeout", "[store]\nbusy_timeout = \"3s\"\n",
			func(c *Config) bool { return c.Store.BusyTimeout == Duration(3*time.Second) }, ""},
		{"sqlite needs data", "data = \"\"\n", nil, "data: directory required"},
		{"postgres needs dsn", "[store]\ndriver = \"postgres\"\n", nil, "store.dsn: a PostgreSQL connection string is required"},
		{"dsn for sqlite", "[store]\ndsn = \"dbname=emsdp\"\n", nil, `store.dsn is for store.driver = "postgres"`},
		{"busy timeout for postgres", "[store]\ndriver = \"postgres\"\ndsn = \"dbname=emsdp\"\nbusy_timeout = \"1s\"\n", nil,
			`store.busy_timeout is for store.driver = "sqlite"`},
		{"negative busy timeout", "[store]\nbusy_timeout = \"-1s\"\n", nil, "store.busy_timeout must not be negative"},
		{"bad dsn", "[store]\ndriver = \"postgres\"\ndsn = \"host\"\n", nil, "store.dsn: cannot parse"},
		{"bad pool setting", "[store]\ndriver = \"postgres\"\ndsn = \"dbname=x pool_max_conns=many\"\n", nil, "store.dsn"},
		{"unknown driver", "[store]\ndriver = \"sqlite3\"\n", nil, `store.driver "sqlite3": want "sqlite" or "postgres"`},
		{"connection limits off", "[smtp]\nmax_connections = 0\nmax_connections_per_ip = 0\n",
			func(c *Config) bool { return c.SMTP.MaxConnections == 0 && c.SMTP.MaxConnectionsPerIP == 0 }, ""},
		{"negative max_connections", "[smtp]\nmax_connections = -1\n", nil, "smtp.max_connections must not be negative"},
		{"negative max_connections_per_ip", "[smtp]\nmax_connections_per_ip = -5\n", nil,
			"smtp.max_connections_per_ip must not be negative"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := LoadConfig(writeFile(t, tc.text))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one mentioning %q", err, tc.wantErr)
				}
				var ce *ConfigError
				if !errors.As(err, &ce) {
					t.Errorf("error %T is not a *ConfigError", err)
				}
				return
			}
			must(t, err)
			if !tc.check(c) {
				t.Errorf("config %+v", c)
			}
		})
	}
	if _, err := LoadConfig(filepath.Join(t.TempDir(), "missing.toml")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
}

// Write produces a file LoadConfig reads back to the same settings, with
// the relay password and the DSN's password masked, and only the keys of
// the configured store driver.
func TestWriteConfig(t *testing.T) {
	sqliteConf := DefaultConfig()
	sqliteConf.Relay.Password = "hunter2"
	sqliteConf.Relay.Smarthost = "smtp.example.com:587"
	sqliteConf.Store.BusyTimeout = Duration(3 * time.Second)
	pgConf := DefaultConfig()
	pgConf.Store.Driver, pgConf.Store.Conninfo = StorePostgres, "host=db.example.net dbname=emsdp user=emsdp password=hunter2"
	for _, tc := range []struct {
		name         string
		c            *Config
		want, absent []string
	}{
		{"sqlite", sqliteConf, []string{`driver = "sqlite"`, `busy_timeout = "3s"`}, []string{"hunter2", "dsn"}},
		{"postgres", pgConf, []string{`driver = "postgres"`, `dsn = "host=db.example.net dbname=emsdp user=emsdp password=********"`},
			[]string{"hunter2", "busy_timeout"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b bytes.Buffer
			must(t, tc.c.Write(&b))
			for _, w := range tc.want {
				if !strings.Contains(b.String(), w) {
					t.Errorf("written config lacks %s:\n%s", w, b.String())
				}
			}
			for _, a := range tc.absent {
				if strings.Contains(b.String(), a) {
					t.Errorf("written config has %s:\n%s", a, b.String())
				}
			}
			back, err := LoadConfig(writeFile(t, b.String()))
			must(t, err)
			back.Relay.Password, back.Store.Conninfo = tc.c.Relay.Password, tc.c.Store.Conninfo
			// Written absolute, so that the file names the same store
			// wherever it is saved.
			if abs, _ := filepath.Abs(tc.c.Data); back.Data != abs {
				t.Errorf("data %q, want %q", back.Data, abs)
			}
			back.Data = tc.c.Data
			if !reflect.DeepEqual(back, tc.c) {
				t.Errorf("round trip:\n%+v\n%+v", back, tc.c)
			}
		})
	}
}

func FuzzParseConfig(f *testing.F) {
	f.Add([]byte("[emsd]\nlisten = \":641\"\n"))
	f.Add([]byte("[delivery]\nretry = [\"1s\", \"2s\"]\n"))
	f.Add([]byte(defaultTOML))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := parseConfig(b, "fuzz")
		if err == nil {
			if err := c.Validate(); err == nil && c.EMSD.Listen == "" {
				t.Error("validated without an EMSD listener")
			}
		}
	})
}
