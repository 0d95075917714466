package main

import (
	"context"
	"encoding/hex"
	"regexp"
	"strings"
	"testing"

	"github.com/esro-emsdp/emsdp/server"
)

// The DTLS key commands: a generated key is printed once, never shown
// again, stored, and rotated by "device psk".
func TestDevicePSKCommands(t *testing.T) {
	data := t.TempDir()
	d := func(args ...string) []string { return append(args, "--data", data) }
	keyRE := regexp.MustCompile(`(?m)^psk: ([0-9a-f]{32})$`)

	code, out, errs := runCmd(t, "", d("device", "add", "--address", "5.1", "--ip", "127.0.0.1", "--psk", "generate")...)
	m := keyRE.FindStringSubmatch(out)
	if code != exitOK || m == nil || !strings.Contains(out, "psk-identity: 005.001") || !strings.Contains(out, "dtls=yes") ||
		!strings.Contains(errs, "shown once") {
		t.Fatalf("add --psk generate: exit %d\n%s\n%s", code, out, errs)
	}
	first := m[1]
	if _, out, _ := runCmd(t, "", d("device", "show", "5.1")...); strings.Contains(out, first) || !strings.Contains(out, "dtls:      yes") {
		t.Fatalf("show reveals the key or misses it:\n%s", out)
	}
	if got := storedPSK(t, data, 5001); got != first {
		t.Fatalf("stored key %s, printed %s", got, first)
	}

	hexKey := "00112233445566778899aabbccddeeff00"
	for _, tc := range []struct {
		name   string
		args   []string
		code   int
		stdout string
		stderr string
	}{
		{"add with key", d("device", "add", "--address", "5.2", "--ip", "127.0.0.1", "--psk", hexKey, "--require-dtls"), exitOK, `dtls=required\n$`, ""},
		// Behind a NAT: no address, the key alone; it cannot then lose it.
		{"add without address", d("device", "add", "--address", "5.4", "--psk", hexKey, "--require-dtls"), exitOK, `ip=- port=- .* password=no .*dtls=required\n$`, ""},
		{"show without address", d("device", "show", "5.4"), exitOK, `heard: +never \(no operation with its password yet\); deliveries go over DTLS \(on a server with dtls\.listen\): through the session the device has open with it, else they wait until it opens one\n`, ""},
		{"show with address", d("device", "show", "5.2"), exitOK, `heard: +never .*; deliveries go over DTLS .*else through one the server opens to the registered address\n`, ""},
		{"no address, key removed", d("device", "psk", "5.4", "--psk", "none", "--require-dtls", "no"), exitUsage, `^$`, "needs a password or a DTLS key"},
		{"short key", d("device", "add", "--address", "5.3", "--ip", "127.0.0.1", "--psk", "0011"), exitUsage, `^$`, "2 bytes"},
		{"not hex", d("device", "add", "--address", "5.3", "--ip", "127.0.0.1", "--psk", "zz"), exitUsage, `^$`, "not hex"},
		{"require without key", d("device", "add", "--address", "5.3", "--ip", "127.0.0.1", "--password", "", "--require-dtls"), exitUsage, `^$`, "needs --psk"},
		{"rotate", d("device", "psk", "5.1"), exitOK, `(?s)^DTLS key changed for device 005\.001 \(dtls=yes\)\npsk-identity: 005\.001\npsk: [0-9a-f]{32}\n$`, "shown once"},
		{"set hex", d("device", "psk", "5.1", "--psk", hexKey, "--require-dtls", "yes"), exitOK, `^DTLS key changed for device 005\.001 \(dtls=required\)\n$`, ""},
		{"remove while required", d("device", "psk", "5.1", "--psk", "none"), exitUsage, `^$`, "--require-dtls no"},
		{"remove", d("device", "psk", "5.1", "--psk", "none", "--require-dtls", "no"), exitOK, `^DTLS key removed for device 005\.001\n$`, ""},
		{"unknown device", d("device", "psk", "9.9"), exitFailed, `^$`, "no device 009.009"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errs := runCmd(t, "", tc.args...)
			if code != tc.code || !regexp.MustCompile(tc.stdout).MatchString(out) || !strings.Contains(errs, tc.stderr) {
				t.Errorf("%v: exit %d (want %d)\nstdout %q\nstderr %q", tc.args, code, tc.code, out, errs)
			}
		})
	}
	if got := storedPSK(t, data, 5002); got != hexKey {
		t.Fatalf("stored key %s, want %s", got, hexKey)
	}
	if got := storedPSK(t, data, 5001); got != "" {
		t.Fatalf("removed key still stored: %s", got)
	}
}

func storedPSK(t *testing.T, data string, addr uint32) string {
	t.Helper()
	cfg, err := server.LoadConfig("")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Data = data
	db, err := cfg.OpenStore(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	dev, err := db.Device(context.Background(), addr)
	if err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(dev.PSK)
}
