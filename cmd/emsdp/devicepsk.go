package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"strings"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/store"
)

// pskFlag parses --psk: "" none, "generate" a fresh random key of 128 bits
// (RFC 7925's minimum, and a 32-digit string a person can still type into
// a device), or the key in hex.
func pskFlag(s string) (key []byte, generated bool, err error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "":
		return nil, false, nil
	case "generate":
		key = make([]byte, 16)
		rand.Read(key) // never fails (crypto/rand)
		return key, true, nil
	}
	key, err = hex.DecodeString(strings.TrimSpace(s))
	if err != nil {
		return nil, false, usagef("--psk: not hex digits (or \"generate\")")
	}
	if len(key) < store.MinPSKLen || len(key) > store.MaxPSKLen {
		return nil, false, usagef("--psk: %d bytes; a key has %d..%d bytes (%d..%d hex digits)", len(key),
			store.MinPSKLen, store.MaxPSKLen, 2*store.MinPSKLen, 2*store.MaxPSKLen)
	}
	return key, false, nil
}

// printPSK shows a generated key, the only time it is shown.
func printPSK(env *cmdEnv, d *store.Device) {
	fmt.Fprintf(env.stdout, "psk-identity: %s\npsk: %s\n", emsd.Address(d.Address), hex.EncodeToString(d.PSK))
	fmt.Fprintln(env.stderr, "emsdp: this key is shown once; give it to the device (emsdp ua ... --dtls --psk KEY)")
}

func dtlsText(d *store.Device) string {
	switch {
	case d.RequireDTLS:
		return "required"
	case d.PSK != nil:
		return "yes"
	}
	return "no"
}

// devicePSK sets, rotates or removes a device's DTLS key. The server ends
// the sessions made with the old key when it sees the change.
func devicePSK(ctx context.Context, env *cmdEnv, args []string) int {
	var psk *string
	var require *string
	fs := flag.NewFlagSet("emsdp device psk", flag.ContinueOnError)
	st, a, done, code := addressOnly(fs, env, args, func(fs *flag.FlagSet) {
		psk = fs.String("psk", "generate", `new key: "generate" (printed once), hex digits, or "none" to remove it`)
		require = fs.String("require-dtls", "", `"yes" refuses the device's plain-UDP operations, "no" allows them (default: unchanged)`)
	})
	if done {
		return code
	}
	var key []byte
	var generated bool
	var err error
	if !strings.EqualFold(*psk, "none") {
		if key, generated, err = pskFlag(*psk); err != nil {
			return fail(env, err)
		}
	}
	d, code := st.editDevice(ctx, env, a, func(d *store.Device) error {
		d.PSK = key
		switch strings.ToLower(*require) {
		case "":
		case "yes", "true":
			d.RequireDTLS = true
		case "no", "false":
			d.RequireDTLS = false
		default:
			return usagef("--require-dtls %q: want yes or no", *require)
		}
		if key == nil && d.RequireDTLS {
			return usagef("device %s requires DTLS: removing its key needs --require-dtls no", a)
		}
		return nil
	})
	if code != exitOK {
		return code
	}
	switch {
	case key == nil:
		fmt.Fprintf(env.stdout, "DTLS key removed for device %s\n", a)
	case generated:
		fmt.Fprintf(env.stdout, "DTLS key changed for device %s (dtls=%s)\n", a, dtlsText(d))
		printPSK(env, d)
	default:
		fmt.Fprintf(env.stdout, "DTLS key changed for device %s (dtls=%s)\n", a, dtlsText(d))
	}
	return exitOK
}
