package main

import (
	"context"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/internal/pgtest"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/open"
)

// The device commands, in order, on one store: outputs and exit codes.
func TestDeviceCommands(t *testing.T) {
	data := t.TempDir()
	d := func(args ...string) []string { return append(args, "--data", data) }
	for _, tc := range []struct {
		name   string
		args   []string
		code   int
		stdout string // regexp
		stderr string // substring
	}{
		{"add", d("device", "add", "--address", "198.036", "--password", "secret", "--ip", "192.0.2.7",
			"--alias", "Alice@Example.net", "--alias", "a2@example.net,a3@example.net"), exitOK,
			`^added device 198\.036 ip=192\.0\.2\.7 port=641 version=1\.1 mode=complete password=yes aliases=alice@example\.net,a2@example\.net,a3@example\.net\n$`, ""},
		{"add 1.0 efficient", d("device", "add", "--address", "198037", "--password", "", "--ip", "192.0.2.8",
			"--port", "2002", "--version", "1.0", "--mode", "efficient"), exitOK,
			`^added device 198\.037 ip=192\.0\.2\.8 port=2002 version=1\.0 mode=efficient password=no aliases=-\n$`, ""},
		{"add existing", d("device", "add", "--address", "198.036", "--password", "x", "--ip", "192.0.2.9"), exitFailed, `^$`, "already exists"},
		{"alias taken", d("device", "add", "--address", "198.038", "--password", "x", "--ip", "192.0.2.9", "--alias", "alice@example.net"),
			exitFailed, `^$`, "already exists"},
		{"no password flag", d("device", "add", "--address", "198.039", "--ip", "192.0.2.9"), exitUsage, `^$`, "--password is required"},
		{"password too long", d("device", "add", "--address", "198.039", "--ip", "192.0.2.9", "--password", "12345678901234567"), exitUsage, `^$`, "at most 16"},
		{"bad address", d("device", "add", "--address", "1.2.3.4", "--password", "", "--ip", "192.0.2.9"), exitUsage, `^$`, "--address"},
		{"address 0", d("device", "add", "--address", "0", "--password", "", "--ip", "192.0.2.9"), exitUsage, `^$`, "other than 0"},
		{"no address", d("device", "add", "--password", "", "--ip", "192.0.2.9"), exitUsage, `^$`, "--address NNN.NNN is required"},
		{"bad ip", d("device", "add", "--address", "1.2", "--password", "", "--ip", "host"), exitUsage, `^$`, "--ip"},
		{"no ip, no password", d("device", "add", "--address", "1.2", "--password", ""), exitUsage, `^$`, "--ip is required for a device without password"},
		{"port without ip", d("device", "add", "--address", "1.2", "--password", "x", "--port", "27102"), exitUsage, `^$`, "--port needs --ip"},
		{"bad port", d("device", "add", "--address", "1.2", "--password", "", "--ip", "::1", "--port", "70000"), exitUsage, `^$`, "--port"},
		{"bad version", d("device", "add", "--address", "1.2", "--password", "", "--ip", "::1", "--version", "2.0"), exitUsage, `^$`, "--version"},
		{"bad mode", d("device", "add", "--address", "1.2", "--password", "", "--ip", "::1", "--mode", "fast"), exitUsage, `^$`, "--mode"},
		{"bad alias", d("device", "add", "--address", "1.2", "--password", "", "--ip", "::1", "--alias", "Bob <b@x>"), exitUsage, `^$`, "--alias"},
		{"list", d("device", "list"), exitOK,
			`^ADDRESS +IP +PORT +VERSION +MODE +PASSWORD +ALIASES +HEARD-FROM +HEARD-AGO\n198\.036 +192\.0\.2\.7 +641 +1\.1 +complete +yes +a2@example\.net,a3@example\.net,alice@example\.net +- +-\n198\.037 +192\.0\.2\.8 +2002 +1\.0 +efficient +no +- +- +-\n$`, ""},
		{"show", d("device", "show", "198.037"), exitOK,
			`(?s)^address: +198\.037\nip: +192\.0\.2\.8\nport: +2002\nversion: +1\.0\nmode: +efficient\npassword: +no\naliases: +-\ncontrol: +none\nheard: +never \(no operation with its password yet\); deliveries go to the registered address\ncreated: .*\nupdated: .*\n$`, ""},
		{"show by flag", d("device", "show", "--address", "198.036"), exitOK, `password: +yes`, ""},
		{"show unknown", d("device", "show", "1.1"), exitFailed, `^$`, "no device 001.001"},
		{"passwd", d("device", "passwd", "--address", "198.037", "--password", "new"), exitOK, `^password changed for device 198\.037\n$`, ""},
		{"passwd shows", d("device", "show", "198.037"), exitOK, `password: +yes`, ""},
		{"passwd removes", d("device", "passwd", "198.036", "--password", ""), exitOK, `^password removed for device 198\.036\n$`, ""},
		{"passwd missing", d("device", "passwd", "198.036"), exitUsage, `^$`, "--password is required"},
		{"passwd unknown", d("device", "passwd", "1.1", "--password", "x"), exitFailed, `^$`, "no device 001.001"},
		{"remove", d("device", "remove", "198.036"), exitOK, `^removed device 198\.036\n$`, ""},
		{"remove again", d("device", "remove", "--address", "198.036"), exitFailed, `^$`, "no device 198.036"},
		{"add without ip", d("device", "add", "--address", "198.040", "--password", "pw"), exitOK,
			`^added device 198\.040 ip=- port=- version=1\.1 mode=complete password=yes aliases=-\n$`, ""},
		{"show without ip", d("device", "show", "198.040"), exitOK,
			`(?s)ip: +-\nport: +-\n.*heard: +never \(no operation with its password yet\); offline: deliveries wait until it is heard again\n`, ""},
		{"passwd cannot remove the only way in", d("device", "passwd", "198.040", "--password", ""), exitUsage, `^$`, "without IP address needs a password"},
		{"alias free again", d("device", "add", "--address", "198.038", "--password", "", "--ip", "::1", "--alias", "alice@example.net"),
			exitOK, `^added device 198\.038 ip=::1`, ""},
		{"two addresses", d("device", "show", "1.1", "1.2"), exitUsage, `^$`, "unexpected argument"},
		{"no subcommand", []string{"device"}, exitUsage, `^$`, "usage: emsdp device add|list|show|remove|passwd"},
		{"unknown subcommand", []string{"device", "rename"}, exitUsage, `^$`, "usage:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errs := runCmd(t, "", tc.args...)
			if code != tc.code || !regexp.MustCompile(tc.stdout).MatchString(out) || !strings.Contains(errs, tc.stderr) {
				t.Errorf("%v: exit %d (want %d)\nstdout %q\nstderr %q", tc.args, code, tc.code, out, errs)
			}
		})
	}
}

// The operator's commands in a directory without a store (or with a
// mistyped --data) create nothing and say where they looked; device add
// creates a store and says so; listings open it read-only; errors name it.
func TestAdminCommandsWithoutStore(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	def := filepath.Join(dir, "emsdp-data", "emsdp.db")
	typo := filepath.Join(dir, "emsdp-dta")
	for _, args := range [][]string{
		{"device", "list"}, {"device", "show", "1.1"}, {"device", "remove", "1.1"},
		{"device", "passwd", "1.1", "--password", "x"}, {"queue", "list"}, {"queue", "show", "D1"},
		{"queue", "retry", "--all"}, {"queue", "remove", "D1"},
	} {
		code, out, errs := runCmd(t, "", args...)
		if code != exitFailed || out != "" || !strings.Contains(errs, "no store at "+def) {
			t.Errorf("%v: exit %d, stdout %q, stderr %q", args, code, out, errs)
		}
		code, _, errs = runCmd(t, "", append(args, "--data", typo)...)
		if code != exitFailed || !strings.Contains(errs, "no store at "+filepath.Join(typo, "emsdp.db")+" (from --data") {
			t.Errorf("%v --data typo: exit %d, stderr %q", args, code, errs)
		}
	}
	for _, p := range []string{filepath.Dir(def), typo} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Fatalf("%s was created (%v)", p, err)
		}
	}
	code, out, errs := runCmd(t, "", "device", "add", "--address", "1.1", "--password", "", "--ip", "::1")
	if code != exitOK || !strings.HasPrefix(out, "added device 001.001") || !strings.Contains(errs, "note: created a new, empty store at "+def) {
		t.Fatalf("add: exit %d, stdout %q, stderr %q", code, out, errs)
	}
	code, _, errs = runCmd(t, "", "device", "add", "--address", "1.2", "--password", "", "--ip", "::1")
	if code != exitOK || errs != "" {
		t.Errorf("second add: exit %d, stderr %q", code, errs)
	}
	if code, out, _ := runCmd(t, "", "device", "list"); code != exitOK || !strings.Contains(out, "001.002") {
		t.Errorf("list: exit %d %q", code, out)
	}
	if code, _, errs := runCmd(t, "", "device", "show", "9.9"); code != exitFailed || !strings.Contains(errs, "no device 009.009 (store "+def+")") {
		t.Errorf("show unknown: exit %d, stderr %q", code, errs)
	}
}

// A relative data directory in a configuration file is relative to the
// file, so serve and the operator's commands find the same store from
// anywhere.
func TestConfigRelativeData(t *testing.T) {
	etc := t.TempDir()
	cfg := filepath.Join(etc, "emsdp.toml")
	if err := os.WriteFile(cfg, []byte(`data = "store"`+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Chdir(t.TempDir())
	if code, _, errs := runCmd(t, "", "device", "add", "--config", cfg, "--address", "1.1", "--password", "", "--ip", "::1"); code != exitOK ||
		!strings.Contains(errs, filepath.Join(etc, "store", "emsdp.db")) {
		t.Fatalf("add: %d %s", code, errs)
	}
	t.Chdir(t.TempDir())
	if code, out, errs := runCmd(t, "", "device", "list", "--config", cfg); code != exitOK || !strings.Contains(out, "001.001") {
		t.Errorf("list from elsewhere: %d %q %s", code, out, errs)
	}
}

// --config locates the data directory of the server.
func TestDeviceConfigData(t *testing.T) {
	data := t.TempDir()
	cfg := serveConfig(t, `data = "`+data+`"`)
	if code, _, errs := runCmd(t, "", "device", "add", "--config", cfg, "--address", "1.1", "--password", "", "--ip", "::1"); code != exitOK {
		t.Fatalf("add: %d %s", code, errs)
	}
	if code, out, _ := runCmd(t, "", "device", "list", "--data", data); code != exitOK || !strings.Contains(out, "001.001") {
		t.Errorf("list: %d %q", code, out)
	}
}

// With a PostgreSQL store, two 'emsdp serve' share it (no data-directory
// lock), 'emsdp device' given the same --config edits the registry both
// serve, and --dsn names the store directly.
func TestDevicePostgres(t *testing.T) {
	serveNoLeaks(t)
	pg, err := pgtest.Start(context.Background(), pgtest.Options{NoFsync: true})
	if err != nil {
		t.Fatalf("PostgreSQL server for the test: %v", err) // CI installs it: fail, do not skip
	}
	t.Cleanup(func() {
		if err := pg.Stop(); err != nil {
			t.Error(err)
		}
	})
	dsn := pg.NewDatabase(t)
	data := filepath.Join(t.TempDir(), "data")
	cfg := serveConfig(t, `data = "`+data+`"`)
	text, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	text = []byte(strings.Replace(string(text), "[store]\n", "[store]\ndriver = \"postgres\"\ndsn = \""+dsn+"\"\n", 1))
	if err := os.WriteFile(cfg, text, 0o600); err != nil {
		t.Fatal(err)
	}
	a1, _ := startServe(t, "--config", cfg, "--listen", "127.0.0.1:0", "--smtp", "off", "--admin", "off")
	a2, errb := startServe(t, "--config", cfg, "--listen", "127.0.0.1:0", "--smtp", "off", "--admin", "off")
	if !strings.Contains(errb.String(), " store=postgres\n") {
		t.Errorf("listening line: %q", errb.String())
	}

	if code, out, errs := runCmd(t, "", "device", "add", "--config", cfg, "--address", "198.036", "--password", "pw",
		"--ip", "127.0.0.1"); code != exitOK || !strings.HasPrefix(out, "added device 198.036") {
		t.Fatalf("device add: exit %d %q %s", code, out, errs)
	}
	send := func(mts string) int {
		code, _, _ := runCmd(t, "x\n", append([]string{"ua", "send", "--server", mts, "--address", "198.036",
			"--password", "pw", "--to", "bob@example.com"}, strings.Fields(fast)...)...)
		return code
	}
	for _, mts := range []string{a1.emsd, a2.emsd} {
		waitFor(t, "the device known to the server at "+mts, func() bool { return send(mts) == exitOK })
	}
	// A database without a store is not made one by a listing.
	if code, _, errs := runCmd(t, "", "device", "list", "--dsn", pg.NewDatabase(t)); code != exitFailed ||
		!strings.Contains(errs, "no store at") {
		t.Errorf("device list on an empty database: exit %d %s", code, errs)
	}
	if code, out, errs := runCmd(t, "", "device", "list", "--dsn", dsn); code != exitOK ||
		!regexp.MustCompile(`\n198\.036 +127\.0\.0\.1 +641 `).MatchString(out) {
		t.Errorf("device list --dsn: exit %d %q %s", code, out, errs)
	}
	if code, _, errs := runCmd(t, "", "device", "remove", "--config", cfg, "198.036"); code != exitOK {
		t.Fatalf("device remove: exit %d %s", code, errs)
	}
	for _, mts := range []string{a1.emsd, a2.emsd} {
		waitFor(t, "the device forgotten by the server at "+mts, func() bool { return send(mts) == exitError })
	}
	if _, err := os.Stat(data); !os.IsNotExist(err) {
		t.Errorf("data directory created with the PostgreSQL store: %v", err)
	}

	for _, tc := range []struct {
		name   string
		args   []string
		stderr string
	}{
		{"data and dsn", []string{"device", "list", "--data", data, "--dsn", dsn}, "give one"},
		{"data with a postgres config", []string{"device", "list", "--config", cfg, "--data", data}, "the store of " + cfg + " is postgres"},
		{"serve data with a postgres config", []string{"serve", "--config", cfg, "--data", data, "--check-config"}, "--data is for the SQLite store"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if code, _, errs := runCmd(t, "", tc.args...); code != exitUsage || !strings.Contains(errs, tc.stderr) {
				t.Errorf("%v: exit %d, stderr %q", tc.args, code, errs)
			}
		})
	}
}

// show and list say where a device was last heard from, how long ago and
// by which server, and where its deliveries go therefore.
func TestDeviceHeard(t *testing.T) {
	data := t.TempDir()
	if code, _, errs := runCmd(t, "", "device", "add", "--data", data, "--address", "198.002", "--password", "pw",
		"--ip", "127.0.0.2", "--port", "27102"); code != exitOK {
		t.Fatalf("add: %d %s", code, errs)
	}
	ds := &deviceStore{data: data}
	db, err := ds.open(context.Background(), &cmdEnv{stderr: io.Discard}, open.Existing)
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = db.SetContact(context.Background(), 198002, store.Contact{Addr: netip.MustParseAddrPort("127.0.0.3:27999"),
		Via: "mts1 127.0.0.1:641", At: time.Now().Add(-5 * time.Second)})
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	code, out, _ := runCmd(t, "", "device", "show", "198.002", "--data", data)
	if want := regexp.MustCompile(`\nheard: +127\.0\.0\.3:27999, [56]s ago \(\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ\), by mts1 127\.0\.0\.1:641 in a submission; deliveries go there\n`); code != exitOK || !want.MatchString(out) {
		t.Errorf("show: %d %q", code, out)
	}
	code, out, _ = runCmd(t, "", "device", "list", "--data", data)
	if want := regexp.MustCompile(`\n198\.002 +127\.0\.0\.2 +27102 +1\.1 +complete +yes +- +127\.0\.0\.3:27999 +[56]s\n$`); code != exitOK || !want.MatchString(out) {
		t.Errorf("list: %d %q", code, out)
	}
}
