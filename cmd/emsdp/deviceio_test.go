package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"golang.org/x/crypto/bcrypt"
)

// device import: good rows are written, each bad one is refused with its
// line and why, and nothing of it is written; export gives back what was
// imported (hashes, not passwords), and imports into another store.
func TestDeviceImportExport(t *testing.T) {
	data := t.TempDir()
	hash, err := bcrypt.GenerateFromPassword([]byte("hashed"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	must := func(code int, out, errs string, want int) {
		t.Helper()
		if code != want {
			t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", code, want, out, errs)
		}
	}
	code, _, errs := runCmd(t, "", "device", "add", "--data", data, "--address", "198.050", "--password", "",
		"--ip", "192.0.2.50", "--alias", "taken@example.net")
	must(code, "", errs, exitOK)

	csvIn := strings.Join([]string{
		"address,ip,port,mode,version,password,password_hash,aliases",
		"198.001,192.0.2.1,641,complete,1.1,secret,,a1@example.net b1@example.net",
		"198.002,192.0.2.2,2002,efficient,1.0,,," + string(hash) + ",", // one field too many
		"198.003,192.0.2.3,,,,,," + string(hash),                       // hash in the aliases column
		"198.004,192.0.2.4,,,,,,",
		"198.004,192.0.2.44,,,,,,",                  // repeats line 5
		"198.x,192.0.2.5,,,,,,",                     // bad address
		"198.006,not-an-ip,,,,,,",                   // bad ip
		"198.007,192.0.2.7,70000,,,,,",              // bad port
		"198.008,192.0.2.8,,fast,,,,",               // bad mode
		"198.009,192.0.2.9,,,,,nohash,",             // not a bcrypt hash
		"198.010,192.0.2.10,,,,pw,pwhash,",          // both
		"198.011,192.0.2.11,,,,,,taken@example.net", // alias of 198.050
		"198.050,192.0.2.60,,,,,,",                  // exists
		"198.012,192.0.2.12,,,,12345678901234567,,",
		"198.013,192.0.2.13,,efficient,1.0,,,a1@example.net", // alias repeats line 2
		"198.014,192.0.2.14,,,,,,",
	}, "\n") + "\n"
	code, out, errs := runCmd(t, csvIn, "device", "import", "--data", data)
	must(code, out, errs, exitFailed)
	for _, want := range []string{
		`refused line 3: 9 fields, the header names 8`,
		`refused line 4: alias "\$2a\$04\$`,
		`refused line 6: device 198\.004 repeats line 5`,
		`refused line 7: address "198\.x"`,
		`refused line 8: ip "not-an-ip"`,
		`refused line 9: port 70000 out of range`,
		`refused line 10: mode "fast"`,
		`refused line 11: password_hash is not a bcrypt hash`,
		`refused line 12: both password and password_hash`,
		`refused line 13: device 198\.011: alias taken@example\.net belongs to another device`,
		`refused line 14: device 198\.050 exists \(--update replaces it\)`,
		`refused line 15: password is 17 octets, at most 16`,
		`refused line 16: alias a1@example\.net repeats line 2`,
		`imported 16 rows in \S+: 3 added, 0 updated, 13 refused\n$`,
	} {
		if !regexp.MustCompile(want).MatchString(out) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	code, out, errs = runCmd(t, "", "device", "list", "--data", data)
	must(code, out, errs, exitOK)
	for _, a := range []string{"198.001", "198.004", "198.014", "198.050"} {
		if !strings.Contains(out, a) {
			t.Errorf("device %s missing:\n%s", a, out)
		}
	}
	if n := strings.Count(out, "\n"); n != 5 {
		t.Errorf("%d lines listed, want a header and 4 devices:\n%s", n, out)
	}

	// JSON lines, with --update: 198.004 changes, 198.020 is new.
	jsonIn := `{"address":"198.004","ip":"192.0.2.40","mode":"efficient","aliases":["d4@example.net"]}
{"address":"198.020","ip":"192.0.2.20","password_hash":"` + string(hash) + `"}
{"address":"198.021","ip":"192.0.2.21","colour":"blue"}
not json
{"address":"198.022","ip":"192.0.2.22","psk":"00112233445566778899aabbccddeeff","require_dtls":true}
{"address":"198.023","ip":"192.0.2.23","require_dtls":true}
`
	f := filepath.Join(t.TempDir(), "devs.jsonl")
	if err := os.WriteFile(f, []byte(jsonIn), 0o600); err != nil {
		t.Fatal(err)
	}
	code, out, errs = runCmd(t, "", "device", "import", "--data", data, "--update", f)
	must(code, out, errs, exitFailed)
	for _, want := range []string{`refused line 3: not a device record: json: unknown field "colour"`,
		`refused line 4: not a device record`, `refused line 6: require_dtls needs a psk`,
		`imported 6 rows in \S+: 2 added, 1 updated, 3 refused\n$`} {
		if !regexp.MustCompile(want).MatchString(out) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	code, out, errs = runCmd(t, "", "device", "show", "--data", data, "198.004")
	must(code, out, errs, exitOK)
	if !strings.Contains(out, "192.0.2.40") || !strings.Contains(out, "efficient") || !strings.Contains(out, "d4@example.net") {
		t.Errorf("198.004 not updated:\n%s", out)
	}

	// Export, import into a new store, export again: the same registry.
	for _, format := range []string{"csv", "jsonl"} {
		code, exported, errs := runCmd(t, "", "device", "export", "--data", data, "--format", format)
		must(code, exported, errs, exitOK)
		if strings.Contains(exported, "secret") || !strings.Contains(exported, "$2a$") ||
			!strings.Contains(exported, "00112233445566778899aabbccddeeff") {
			t.Errorf("%s export shows a password or no hash:\n%s", format, exported)
		}
		other := t.TempDir()
		code, out, errs = runCmd(t, exported, "device", "import", "--data", other, "--format", format)
		must(code, out, errs, exitOK)
		if !strings.Contains(out, "6 added, 0 updated, 0 refused") {
			t.Errorf("%s re-import: %s", format, out)
		}
		code, again, errs := runCmd(t, "", "device", "export", "--data", other, "--format", format)
		must(code, again, errs, exitOK)
		if again != exported {
			t.Errorf("%s export after the move differs:\n%s\nwant\n%s", format, again, exported)
		}
	}
	// The imported password works as "device add" would have made it.
	code, out, _ = runCmd(t, "", "device", "export", "--data", data, "--format", "jsonl")
	line := regexp.MustCompile(`\{"address":"198\.001","password_hash":"([^"]+)"`).FindStringSubmatch(out)
	if line == nil || bcrypt.CompareHashAndPassword([]byte(line[1]), []byte("secret")) != nil {
		t.Errorf("198.001's password does not check: %s", out)
	}
}

// A 100,000-line import (password hashes given, as an export writes them)
// writes every device.
func TestDeviceImportLarge(t *testing.T) {
	if testing.Short() {
		t.Skip("100,000 devices")
	}
	data := t.TempDir()
	hash, err := bcrypt.GenerateFromPassword([]byte("pw"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	b.WriteString("address,ip,port,password_hash\n")
	const n = 100000
	for i := range n {
		fmt.Fprintf(&b, "%d,10.%d.%d.%d,641,%s\n", 1000000+i, i>>16&255, i>>8&255, i&255, hash)
	}
	code, out, errs := runCmd(t, b.String(), "device", "import", "--data", data)
	if code != exitOK || !strings.Contains(out, fmt.Sprintf("imported %d rows in ", n)) ||
		!strings.Contains(out, fmt.Sprintf(": %d added, 0 updated, 0 refused", n)) {
		t.Fatalf("exit %d: %s %s", code, out, errs)
	}
	code, out, errs = runCmd(t, "", "device", "export", "--data", data)
	if code != exitOK || strings.Count(out, "\n") != n+1 {
		t.Fatalf("export: exit %d, %d lines: %s", code, strings.Count(out, "\n"), errs)
	}
}
