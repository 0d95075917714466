package server

import (
	"context"
	"net/netip"
	"sync"
	"testing"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/internal/captures"
	"github.com/esro-emsdp/emsdp/store/storedid"
)

// recorder is a ResponseWriter that records the answers of one
// invocation.
type recorder struct {
	mu      sync.Mutex
	answers int
	isErr   bool
	value   uint8
	data    []byte
}

func (r *recorder) Result(_ esro.Encoding, data []byte) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.answers++
	r.data = append([]byte(nil), data...)
	return nil
}

func (r *recorder) Error(_ esro.Encoding, value uint8, data []byte) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.answers++
	r.isErr, r.value, r.data = true, value, append([]byte(nil), data...)
	return nil
}

// Confirmed reports the answer acknowledged.
func (r *recorder) Confirmed(context.Context) error { return nil }

// FuzzServeESRO feeds arbitrary INVOKEs to the server's handlers: every
// one gets exactly one answer (a RESULT, or an ERROR with an EMSD code),
// and nothing panics or hangs.
func FuzzServeESRO(f *testing.F) {
	for _, name := range []string{"emsd-submit-1", "emsd-submit-2", "emsd-submit-multi-recipient-local",
		"emsd-submit-segmented", "emsd-delivery-control", "probe-mts-submit-small-segments",
		"probe-mts-delivery-verify-local-sap9", "probe-mts-delivery-verify-rfc822-sap9", "probe-mts-submit-bad-ber",
		"probe-mts-delivery-control-with-args", "probe-mts-submit-content-type-2", "probe-mts-submit-v10-op1"} {
		for _, d := range captures.Get(name).Datagrams {
			if p, err := esro.ParsePDU(d.Payload); err == nil && p.Type == esro.TypeInvoke {
				f.Add(p.SAP, p.Operation, uint8(p.Encoding), true, false, p.Data)
			}
		}
	}
	f.Add(uint8(5), uint8(0), uint8(0), true, true, []byte{0x30, 0x00})
	c := testConfig(f)
	c.SMTP.Listen, c.Admin.Listen = "", ""
	s := startServer(f, c)
	known := netip.MustParseAddrPort("127.0.0.11:2002")
	old := netip.MustParseAddrPort("127.0.0.12:2002")
	addDevice(f, s, 198036, known, deviceOpts{})
	addDevice(f, s, 198037, old, deviceOpts{version: emsd.V1_0})
	f.Fuzz(func(t *testing.T, sap, op, enc uint8, registered, v10 bool, data []byte) {
		peer := netip.MustParseAddrPort("127.0.0.13:2002")
		switch {
		case registered && v10:
			peer = old
		case registered:
			peer = known
		}
		w := &recorder{}
		s.perf.serve(context.Background(), w, &esro.Invocation{Peer: peer, SAP: sap % 16, Operation: op % 64,
			Encoding: esro.Encoding(enc % 4), Handshake: esro.ThreeWay, Data: data})
		if w.answers != 1 {
			t.Fatalf("%d answers", w.answers)
		}
		if w.isErr && (w.value < 1 || w.value > 7) {
			t.Fatalf("ERROR value %d", w.value)
		}
	})
}

// FuzzStoredIDs: stored message ids and addresses decode without panics,
// and what encodes decodes back.
func FuzzStoredIDs(f *testing.F) {
	for _, s := range []string{"L:325d8221.00000001", "R:<a@b>", "L:198036", "R:bob@example.com", "X", "L:zz"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if m, err := storedid.ParseMessageID(s); err == nil {
			if back, err := storedid.ParseMessageID(storedid.MessageID(m).String()); err != nil || back != m {
				t.Fatalf("%q: %v then %v (%v)", s, m, back, err)
			}
		}
		a := storedid.ParseAddress(s)
		if back := storedid.ParseAddress(storedid.Address(a).String()); back != a {
			t.Fatalf("%q: %v then %v", s, a, back)
		}
	})
}
