package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"go.uber.org/goleak"

	"github.com/esro-emsdp/emsdp/internal/testcert"
)

func serveNoLeaks(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, ignore) })
}

// serveConfig writes a configuration with the test timers of `fast`
// (esro_test.go), so that the ua commands given `fast` agree with it.
func serveConfig(t *testing.T, extra string) string {
	t.Helper()
	return serveConfigTimers(t, extra, "roundtrip = \"20ms\"\nretransmit = \"30ms\"\nnsdu_lifetime = \"20ms\"\nack_delay = \"5ms\"\nretries = 3\n")
}

// uaE2EConfigTimers is the [esro] section of uaE2ETimers (ua_test.go).
const uaE2EConfigTimers = "ack_delay = \"10ms\"\nroundtrip = \"100ms\"\nretransmit = \"300ms\"\nnsdu_lifetime = \"100ms\"\nretries = 8\n"

// serveConfigTimers is serveConfig with the [esro] section's keys esro.
func serveConfigTimers(t *testing.T, extra, esro string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "emsdp.toml")
	text := "domain = \"emsd.test\"\n" + extra + "\n[esro]\n" + esro +
		"[store]\nregistry_poll = \"50ms\"\n[delivery]\nretry = [\"100ms\"]\ndrain_timeout = \"2s\"\n"
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

type serveAddrs struct{ emsd, smtp, admin string }

// startServe runs "emsdp serve ARGS" until the test ends; it must exit 0.
func startServe(t *testing.T, args ...string) (serveAddrs, *syncBuffer) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	env, _, errb := testEnv()
	done := make(chan int, 1)
	go func() { done <- run(ctx, env, append([]string{"serve"}, args...)) }()
	t.Cleanup(func() {
		cancel()
		if code := <-done; code != exitOK {
			t.Errorf("serve exited %d: %s", code, errb.String())
		}
	})
	re := regexp.MustCompile(`emsdp serve: listening emsd=(\S+) smtp=(\S+) admin=(\S+)`)
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if m := re.FindStringSubmatch(errb.String()); m != nil {
			return serveAddrs{m[1], m[2], m[3]}, errb
		}
		select {
		case code := <-done:
			done <- code
			t.Fatalf("serve exited %d: %s", code, errb.String())
		default:
		}
	}
	t.Fatalf("serve did not start: %s", errb.String())
	return serveAddrs{}, nil
}

func runCmd(t *testing.T, stdin string, args ...string) (int, string, string) {
	t.Helper()
	env, out, errb := testEnv()
	env.stdin = strings.NewReader(stdin)
	code := run(t.Context(), env, args)
	return code, out.String(), errb.String()
}

func smtpSend(addr, from, to, msg string) error {
	c, err := smtp.Dial(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.Hello("client.test"); err != nil {
		return err
	}
	if err := c.Mail(from, nil); err != nil {
		return err
	}
	if err := c.Rcpt(to, nil); err != nil {
		return err
	}
	w, err := c.Data()
	if err != nil {
		return err
	}
	if _, err := io.WriteString(w, msg); err != nil {
		return err
	}
	if err := w.Close(); err != nil {
		return err
	}
	return c.Quit()
}

// waitFor polls cond for up to 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

func maildirCount(dir string) int {
	es, _ := os.ReadDir(filepath.Join(dir, "new"))
	return len(es)
}

// The README quick start: start the server, add devices while it runs,
// send a mail from one device to another with the device client, receive
// one through SMTP inbound, see the metrics, stop with a signal (exit 0).
func TestServeQuickStart(t *testing.T) {
	serveNoLeaks(t)
	data := filepath.Join(t.TempDir(), "data")
	// Timers with a performer timeout of seconds on every end: the first
	// submission's password check is bcrypt at its default cost, which a
	// loaded machine takes longer for than the 240 ms of `fast`.
	timers := strings.Fields(uaE2ETimers)
	a, _ := startServe(t, "--config", serveConfigTimers(t, "", uaE2EConfigTimers), "--listen", "127.0.0.1:0", "--smtp", "127.0.0.1:0",
		"--admin", "127.0.0.1:0", "--data", data)
	// The device's client first, on a port of its own: a port found free
	// and closed for "device add" to name may be taken by then.
	maildir := filepath.Join(t.TempDir(), "mail")
	m, _, _ := uaBackground(t, regexp.MustCompile(`listening on (\S+),`), append([]string{"ua", "receive", "--listen", "127.0.0.1:0",
		"--maildir", maildir, "--server", a.emsd, "--address", "198.037", "--domain", "emsd.test", "--poll"},
		timers...)...)
	_, port, _ := net.SplitHostPort(m[1])
	for _, args := range [][]string{
		{"device", "add", "--data", data, "--address", "198.036", "--password", "secret", "--ip", "127.0.0.1"},
		{"device", "add", "--data", data, "--address", "198.037", "--password", "", "--ip", "127.0.0.1",
			"--port", port, "--mode", "efficient", "--alias", "alice@example.net"},
	} {
		if code, _, errs := runCmd(t, "", args...); code != exitOK {
			t.Fatalf("%v: exit %d: %s", args, code, errs)
		}
	}
	// The server learns of the devices by polling its store. One send: a
	// submission that timed out on the device may still have been
	// accepted, and sending again would send the mail twice.
	waitMetrics(t, a.admin, "emsd_devices 2")
	if code, out, errs := runCmd(t, "Hello from the device.\n", append([]string{"ua", "send", "--server", a.emsd,
		"--address", "198.036", "--password", "secret", "--to", "198.037", "--subject", "First EMSD mail"},
		timers...)...); code != exitOK {
		t.Fatalf("ua send: exit %d %q %q", code, out, errs)
	}
	waitFor(t, "the device's mail in the Maildir", func() bool { return maildirCount(maildir) == 1 })
	msg := "From: Carol <carol@example.com>\r\nTo: alice@example.net\r\nSubject: Hello device\r\n\r\nHi from the Internet.\r\n"
	if err := smtpSend(a.smtp, "carol@example.com", "alice@example.net", msg); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the Internet mail in the Maildir", func() bool { return maildirCount(maildir) == 2 })
	// A device stores a delivery before it answers RESULT, so the Maildir
	// can be ahead of the server's counters for a moment.
	wants := []string{`emsd_submissions_total{result="accepted"} 1`, `emsd_deliveries_total{outcome="delivered"} 2`,
		`gateway_inbound_total{result="accepted"} 1`, "esro_invokes_received_total"}
	waitMetrics(t, a.admin, wants...)
}

// waitMetrics waits until the admin listener's /metrics shows every want.
func waitMetrics(t *testing.T, admin string, wants ...string) {
	t.Helper()
	waitFor(t, fmt.Sprintf("/metrics to show %q", wants), func() bool {
		resp, err := http.Get("http://" + admin + "/metrics")
		if err != nil {
			return false
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		for _, want := range wants {
			if !strings.Contains(string(b), want) {
				return false
			}
		}
		return true
	})
}

// SIGHUP reloads the registry (here the store is not polled in time).
func TestServeSIGHUP(t *testing.T) {
	serveNoLeaks(t)
	data := filepath.Join(t.TempDir(), "data")
	cfg := serveConfig(t, "")
	text, _ := os.ReadFile(cfg)
	os.WriteFile(cfg, []byte(strings.Replace(string(text), `registry_poll = "50ms"`, `registry_poll = "1h"`, 1)), 0o600)
	a, errb := startServe(t, "--config", cfg, "--listen", "127.0.0.1:0", "--smtp", "off", "--admin", "off", "--data", data, "--log-level", "debug")
	if code, _, errs := runCmd(t, "", "device", "add", "--data", data, "--address", "198.036", "--password", "",
		"--ip", "127.0.0.1"); code != exitOK {
		t.Fatalf("device add: %d %s", code, errs)
	}
	send := func() int {
		code, _, _ := runCmd(t, "x\n", append([]string{"ua", "send", "--server", a.emsd, "--address", "198.036",
			"--to", "bob@example.com"}, strings.Fields(fast)...)...)
		return code
	}
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "reload", func() bool { return strings.Contains(errb.String(), "registry reloaded (SIGHUP)") })
	if code := send(); code != exitOK {
		t.Errorf("send after the reload: exit %d\n%s", code, errb.String())
	}
	// Known through SIGHUP, not through the reload an unknown device causes.
	if strings.Contains(errb.String(), `why="unknown device"`) {
		t.Errorf("the device was unknown after SIGHUP:\n%s", errb.String())
	}
}

// SIGHUP re-reads --config with the flags on top: log_level applies at
// once (unless --log-level overrides it), a key that needs a restart is
// named in a warning, and an invalid file is refused, the server running
// on as it was.
func TestServeSIGHUPConfig(t *testing.T) {
	serveNoLeaks(t)
	for _, tc := range []struct {
		name      string
		flags     []string
		wantDebug bool // after the reload
	}{
		{"file", nil, true},
		{"--log-level wins", []string{"--log-level", "info"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := serveConfig(t, `log_level = "info"`)
			a, errb := startServe(t, append([]string{"--config", cfg, "--listen", "127.0.0.1:0", "--smtp", "off",
				"--admin", "off", "--data", t.TempDir()}, tc.flags...)...)
			// An unknown device is refused: "refused" at info, "emsd error"
			// at debug, both logged before the answer.
			refused := func() {
				t.Helper()
				code, _, errs := runCmd(t, "x\n", append([]string{"ua", "send", "--server", a.emsd, "--address", "198.036",
					"--to", "bob@example.com"}, strings.Fields(fast)...)...)
				if code != exitError {
					t.Fatalf("send from an unknown device: exit %d: %s", code, errs)
				}
			}
			hup := func(wait string, n int) {
				t.Helper()
				if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
					t.Fatal(err)
				}
				waitFor(t, wait, func() bool { return strings.Count(errb.String(), wait) == n })
			}
			edit := func(extra string) {
				t.Helper()
				text, err := os.ReadFile(serveConfig(t, extra))
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(cfg, text, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			refused()
			if strings.Contains(errb.String(), "emsd error") {
				t.Fatalf("debug lines at level info:\n%s", errb.String())
			}

			edit("log_level = \"debug\"\n[emsd]\npdu_size = 1400")
			hup("configuration reloaded", 1)
			refused()
			if got := strings.Contains(errb.String(), "emsd error"); got != tc.wantDebug {
				t.Errorf("debug lines after the reload: %v, want %v\n%s", got, tc.wantDebug, errb.String())
			}
			if !regexp.MustCompile(`level=WARN msg="configuration keys changed that take effect only after a restart.*" keys=emsd.pdu_size\n`).
				MatchString(errb.String()) {
				t.Errorf("no warning naming emsd.pdu_size alone:\n%s", errb.String())
			}

			edit("log_level = \"debug\"\n[relay]\nbatch = 0")
			hup("configuration not reloaded", 1)
			waitFor(t, "the registry reloaded all the same", func() bool {
				return strings.Count(errb.String(), "device registry reloaded (SIGHUP)") == 2
			})
			if !strings.Contains(errb.String(), "relay.batch must be at least 1") {
				t.Errorf("the error does not name the key:\n%s", errb.String())
			}
			before := strings.Count(errb.String(), "emsd error")
			refused()
			if got := strings.Count(errb.String(), "emsd error") > before; got != tc.wantDebug {
				t.Errorf("debug lines after the refused file: %v, want %v (the level as before)", got, tc.wantDebug)
			}
		})
	}
}

func TestServeCheckConfig(t *testing.T) {
	bad := filepath.Join(t.TempDir(), "bad.toml")
	os.WriteFile(bad, []byte("[emsd]\nlisten = \"nope\"\n"), 0o600)
	unknown := filepath.Join(t.TempDir(), "unknown.toml")
	os.WriteFile(unknown, []byte("[emsd]\nlistne = \":1\"\n"), 0o600)
	file := func(text string) string {
		p := filepath.Join(t.TempDir(), "emsdp.toml")
		os.WriteFile(p, []byte(text), 0o600)
		return p
	}
	pg := file("[store]\ndriver = \"postgres\"\ndsn = \"postgres://emsdp:s3cret@db.example.net/emsdp?sslmode=require\"\n")
	certFile, keyFile := writeTestCert(t)
	missingCert := filepath.Join(t.TempDir(), "missing.pem")
	for _, tc := range []struct {
		name   string
		args   []string
		code   int
		stdout string // substring
		stderr string // substring
	}{
		{"defaults", []string{"--check-config"}, exitOK, `listen = ":641"`, "configuration OK"},
		{"flags", []string{"--check-config", "--listen", "127.0.0.1:2002", "--smtp", "off", "--smarthost", "mx.example.com:25"},
			exitOK, `smarthost = "mx.example.com:25"`, "configuration OK"},
		{"pprof off, trace", []string{"--check-config", "-pprof=false", "--trace"}, exitOK, "pprof = false", "configuration OK"},
		{"trace level", []string{"--check-config", "--trace"}, exitOK, `log_level = "trace"`, "configuration OK"},
		{"invalid file", []string{"--check-config", "--config", bad}, exitUsage, "", "emsd.listen"},
		{"invalid file names the file and the key", []string{"--check-config", "--config",
			file("[smtp]\nlisten = \"127.0.0.1:99999\"\n[esro]\nretries = -5\n")}, exitUsage, "",
			"emsdp.toml (with the flags given): config: smtp.listen \"127.0.0.1:99999\": port 99999 out of range 0..65535\nconfig: esro.retries -5: want 0..255"},
		{"invalid file, fixed by a flag", []string{"--check-config", "--config", bad, "--listen", ":2002"}, exitOK, `listen = ":2002"`, ""},
		{"unknown key", []string{"--check-config", "--config", unknown}, exitUsage, "", "unknown keys: emsd.listne"},
		{"missing file", []string{"--config", filepath.Join(t.TempDir(), "none.toml")}, exitFailed, "", "no such file"},
		{"bad flag", []string{"--nope"}, exitUsage, "", "flag provided but not defined"},
		{"bad level", []string{"--check-config", "--log-level", "loud"}, exitUsage, "", "log_level"},
		{"json log", []string{"--check-config", "--log-format", "json"}, exitOK, "log_format = \"json\"\n", "configuration OK"},
		{"bad log format", []string{"--check-config", "--log-format", "xml"}, exitUsage, "", "log_format \"xml\""},
		{"sqlite by default", []string{"--check-config"}, exitOK, "[store]\n  driver = \"sqlite\"\n", ""},
		{"postgres", []string{"--check-config", "--config", pg}, exitOK,
			"driver = \"postgres\"\n  dsn = \"postgres://emsdp:********@db.example.net/emsdp?sslmode=require\"\n", "configuration OK"},
		{"dsn flag", []string{"--check-config", "--dsn", "host=/run/postgresql dbname=emsdp password='a b'"}, exitOK,
			"dsn = \"host=/run/postgresql dbname=emsdp password=********\"", "configuration OK"},
		{"dsn flag and data", []string{"--check-config", "--dsn", "dbname=emsdp", "--data", "x"}, exitUsage, "", "--data is for the SQLite store"},
		{"postgres without dsn", []string{"--check-config", "--config", file("[store]\ndriver = \"postgres\"\n")}, exitUsage, "",
			"store.dsn: a PostgreSQL connection string is required"},
		{"dsn for sqlite", []string{"--check-config", "--config", file("[store]\ndsn = \"dbname=x\"\n")}, exitUsage, "",
			"store.dsn is for store.driver = \"postgres\""},
		{"busy timeout for postgres", []string{"--check-config", "--config",
			file("[store]\ndriver = \"postgres\"\ndsn = \"dbname=x\"\nbusy_timeout = \"5s\"\n")}, exitUsage, "",
			"store.busy_timeout is for store.driver = \"sqlite\""},
		{"busy timeout for sqlite", []string{"--check-config", "--config", file("[store]\nbusy_timeout = \"5s\"\n")}, exitOK,
			"busy_timeout = \"5s\"", ""},
		{"unknown driver", []string{"--check-config", "--config", file("[store]\ndriver = \"mysql\"\n")}, exitUsage, "", "store.driver \"mysql\""},
		{"bad dsn", []string{"--check-config", "--dsn", "host=x password='zq9x"}, exitUsage, "", "store.dsn"},
		{"smtp without TLS by default", []string{"--check-config"}, exitOK,
			"tls_cert = \"\"\n  tls_key = \"\"\n  require_tls = false\n", ""},
		{"smtp TLS", []string{"--check-config", "--config",
			file("[smtp]\ntls_cert = \"" + certFile + "\"\ntls_key = \"" + keyFile + "\"\nrequire_tls = true\n")}, exitOK,
			"tls_cert = \"" + certFile + "\"\n  tls_key = \"" + keyFile + "\"\n  require_tls = true\n", "configuration OK"},
		{"smtp TLS, missing certificate", []string{"--check-config", "--config",
			file("[smtp]\ntls_cert = \"" + missingCert + "\"\ntls_key = \"" + keyFile + "\"\n")}, exitUsage, "",
			"smtp.tls_cert \"" + missingCert + "\""},
		{"require_tls without certificate", []string{"--check-config", "--config", file("[smtp]\nrequire_tls = true\n")},
			exitUsage, "", "smtp.require_tls needs smtp.tls_cert and smtp.tls_key"},
		{"smtp connection limits by default", []string{"--check-config"}, exitOK,
			"max_connections = 200\n  max_connections_per_ip = 10\n", "configuration OK"},
		{"smtp connection limits off", []string{"--check-config", "--config",
			file("[smtp]\nmax_connections = 0\nmax_connections_per_ip = 0\n")}, exitOK,
			"max_connections = 0\n  max_connections_per_ip = 0\n", "configuration OK"},
		{"negative max_connections", []string{"--check-config", "--config", file("[smtp]\nmax_connections = -1\n")},
			exitUsage, "", "smtp.max_connections must not be negative (0 = no limit)"},
		{"negative max_connections_per_ip", []string{"--check-config", "--config", file("[smtp]\nmax_connections_per_ip = -1\n")},
			exitUsage, "", "smtp.max_connections_per_ip must not be negative (0 = no limit)"},
		{"max_connections not a number", []string{"--check-config", "--config", file("[smtp]\nmax_connections = \"many\"\n")},
			exitUsage, "", "max_connections"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errs := runCmd(t, "", append([]string{"serve"}, tc.args...)...)
			if code != tc.code || !strings.Contains(out, tc.stdout) || !strings.Contains(errs, tc.stderr) {
				t.Errorf("exit %d, stdout %q, stderr %q", code, out, errs)
			}
			for _, secret := range []string{"s3cret", "a b", "zq9x"} {
				if strings.Contains(out+errs, secret) {
					t.Errorf("password %q shown: %s%s", secret, out, errs)
				}
			}
		})
	}
}

// writeTestCert writes a self-signed certificate for 127.0.0.1 and its
// key as PEM files.
func writeTestCert(t *testing.T) (certFile, keyFile string) {
	return testcert.New(t, "emsdp test").Files(t)
}

// A port in use (or needing privileges) is one clear line, exit 1.
func TestServeListenErrors(t *testing.T) {
	serveNoLeaks(t)
	udp, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer udp.Close()
	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tcp.Close()
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"emsd port taken", []string{"--listen", udp.LocalAddr().String(), "--smtp", "off", "--admin", "off"},
			"emsd listen udp " + udp.LocalAddr().String() + ": bind: address already in use (another program uses"},
		{"smtp port taken", []string{"--listen", "127.0.0.1:0", "--smtp", tcp.Addr().String(), "--admin", "off"},
			"smtp listen tcp " + tcp.Addr().String() + ": bind: address already in use (another program uses"},
		{"admin port taken", []string{"--listen", "127.0.0.1:0", "--smtp", "off", "--admin", tcp.Addr().String()},
			"admin listen tcp"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, errs := runCmd(t, "", append([]string{"serve", "--data", t.TempDir()}, tc.args...)...)
			if code != exitFailed || !strings.Contains(errs, tc.want) || strings.Contains(errs, "goroutine") {
				t.Errorf("exit %d, stderr %q", code, errs)
			}
			if n := strings.Count(strings.TrimSpace(lastLines(errs)), "\n"); n != 0 {
				t.Errorf("more than one line of error: %q", errs)
			}
		})
	}
	if os.Geteuid() != 0 {
		code, _, errs := runCmd(t, "", "serve", "--data", t.TempDir(), "--listen", "127.0.0.1:641", "--smtp", "off", "--admin", "off")
		if code != exitFailed || !strings.Contains(errs, "need root or CAP_NET_BIND_SERVICE") {
			t.Errorf("privileged port: exit %d, %q", code, errs)
		}
	}
}

// lastLines drops the server's log lines, keeping the final error.
func lastLines(s string) string {
	var keep []string
	for _, l := range strings.Split(strings.TrimSpace(s), "\n") {
		if strings.HasPrefix(l, "emsdp:") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

// Two servers never share a data directory.
func TestServeDataDirLocked(t *testing.T) {
	serveNoLeaks(t)
	data := t.TempDir()
	startServe(t, "--config", serveConfig(t, ""), "--listen", "127.0.0.1:0", "--smtp", "off", "--admin", "off", "--data", data)
	code, _, errs := runCmd(t, "", "serve", "--listen", "127.0.0.1:0", "--smtp", "off", "--admin", "off", "--data", data)
	if code != exitFailed || !strings.Contains(errs, "in use by another emsdp serve") {
		t.Errorf("second server: exit %d, %q", code, errs)
	}
}

// With --log-format json every log line of the server is one JSON object
// (the "listening" line for people aside).
func TestServeJSONLog(t *testing.T) {
	_, errb := startServe(t, "--config", serveConfig(t, ""), "--listen", "127.0.0.1:0", "--smtp", "127.0.0.1:0",
		"--admin", "off", "--data", filepath.Join(t.TempDir(), "data"), "--log-format", "json")
	var records int
	for _, line := range strings.Split(strings.TrimSpace(errb.String()), "\n") {
		if strings.HasPrefix(line, "emsdp serve: ") {
			continue
		}
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("log line is not JSON: %q: %v", line, err)
		}
		if rec["msg"] == "serving" && rec["level"] == "INFO" {
			records++
		}
	}
	if records != 1 {
		t.Errorf("%d JSON \"serving\" records in:\n%s", records, errb.String())
	}
}
