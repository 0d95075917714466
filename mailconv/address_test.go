package mailconv

import (
	"testing"

	"github.com/esro-emsdp/emsdp/emsd"
)

// Mapping.Device finds the device behind every form a device address
// takes in a submitted IPM, among them the forms the reference UA sends
// (captures emsd-submit-1, emsd-submit-emsd-equals-not-local), and agrees
// with FormatIPM about which recipients are local.
func TestMappingDevice(t *testing.T) {
	m := Mapping{Domains: []string{"emsd.example.test"}, Resolve: func(spec string) (emsd.Address, bool) {
		switch spec {
		case "alice@example.net", "198.037@emsd.example.test":
			return map[string]emsd.Address{"alice@example.net": 198036, "198.037@emsd.example.test": 198037}[spec], true
		}
		return 0, false
	}}
	for _, tc := range []struct {
		a    emsd.ORAddress
		want emsd.Address // 0: not a device
	}{
		{emsd.LocalOR(198036, "Device One"), 198036},
		{emsd.RFC822OR(`"EMSD=198.037": `), 198037}, // reference UA, EMSD=<n> (captured)
		{emsd.RFC822OR(`"198.036": `), 198036},      // reference UA, host-less number (captured)
		{emsd.RFC822OR("EMSD198.037"), 198037},
		{emsd.RFC822OR("EMSD=1234"), 1234},
		{emsd.RFC822OR("198.037@EMSD.example.test"), 198037},
		{emsd.RFC822OR("Alice <alice@example.net>"), 198036},
		{emsd.RFC822OR("Doe, Jane <alice@example.net>"), 198036}, // unquoted special, salvaged
		{emsd.RFC822OR("198.099@emsd.example.test"), 0},          // no such subscriber
		{emsd.RFC822OR("bob@example.com"), 0},
		{emsd.RFC822OR("not an address"), 0},
		{emsd.RFC822OR(""), 0},
	} {
		got, ok := m.Device(tc.a)
		if ok != (tc.want != 0) || got != tc.want {
			t.Errorf("Device(%v) = %s, %v; want %s", tc.a, got, ok, tc.want)
		}
		if tc.a.IsLocal {
			continue
		}
		ipm := &emsd.IPM{Heading: emsd.Heading{Originator: emsd.LocalOR(198036, ""),
			Recipients: []emsd.RecipientData{{Recipient: tc.a}}}}
		out, err := FormatIPM(ipm, FormatOptions{Domain: "emsd.example.test", Mapping: m})
		if err != nil {
			t.Fatal(err)
		}
		r := out.Recipients[0]
		if r.Local != (tc.want != 0) || (r.Local && r.Device != tc.want) {
			t.Errorf("FormatIPM recipient %v: local=%v device=%s; Device says %s", tc.a, r.Local, r.Device, tc.want)
		}
	}
}

// Mapping.Device never panics, and FormatIPM agrees with it about every
// rfc822 text: local exactly when Device finds a device, the same one.
func FuzzMappingDevice(f *testing.F) {
	for _, s := range []string{`"EMSD=198.037": `, `"198.036": `, "EMSD198.037", "198.037@emsd.example.test",
		"Doe, Jane <x@y>", "a@b", "", `"`, "EMSD=", "1.2.3", "4294967296"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		a := emsd.RFC822OR(s)
		n, ok := testMapping.Device(a)
		ipm := &emsd.IPM{Heading: emsd.Heading{Originator: emsd.LocalOR(198036, ""),
			Recipients: []emsd.RecipientData{{Recipient: a}}}}
		out, err := FormatIPM(ipm, FormatOptions{Domain: testDomain, Mapping: testMapping})
		if err != nil {
			return
		}
		if r := out.Recipients[0]; r.Local != ok || (ok && r.Device != n) {
			t.Fatalf("%q: Device %s %v, FormatIPM local=%v device=%s", s, n, ok, r.Local, r.Device)
		}
	})
}
