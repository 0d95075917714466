package decode_test

import (
	"bytes"
	"encoding/json"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/esro-emsdp/emsdp/decode"
	"github.com/esro-emsdp/emsdp/internal/captures"
)

func TestTracer(t *testing.T) {
	var buf bytes.Buffer
	level := new(slog.LevelVar)
	log := slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: level, ReplaceAttr: decode.ReplaceLevel}))
	trace := decode.NewTracer(log)
	peer := netip.MustParseAddrPort("192.0.2.7:2002")
	// With password: 30 16 a0 11 a0 0f 30 05 04 03 19 80 36 80 06 "secret" 02 01 20
	invoke := mustHex(t, "50 07 21 00 30 16 a0 11 a0 0f 30 05 04 03 19 80 36 80 06 73 65 63 72 65 74 02 01 20")
	trace(false, peer, invoke)
	if buf.Len() != 0 {
		t.Fatalf("traced at level info: %s", buf.String())
	}
	level.Set(decode.LevelTrace)
	trace(false, peer, invoke)
	trace(true, peer, mustHex(t, "01 07 30 0b 30 09 02 04 6b 07 d4 14 02 01 01"))
	trace(false, peer, mustHex(t, "03 07"))
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 3 {
		t.Fatalf("%d lines:\n%s", len(lines), buf.String())
	}
	var rec []struct{ Level, Msg, Dir, Peer, PDU string }
	for _, l := range lines {
		var r struct{ Level, Msg, Dir, Peer, PDU string }
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatal(err)
		}
		rec = append(rec, r)
	}
	if r := rec[0]; r.Level != "TRACE" || r.Msg != "pdu" || r.Dir != "in" || r.Peer != "192.0.2.7:2002" ||
		!strings.HasPrefix(r.PDU, "INVOKE sap=5 ref=7 op=33 enc=BER len=3+25 | EMSD submission SubmitArgument (1.1) instance=0; credentials: device 198.036, password ********") {
		t.Errorf("INVOKE traced as %+v", r)
	}
	if r := rec[1]; r.Dir != "out" || !strings.Contains(r.PDU, "SubmitResult") || !strings.Contains(r.PDU, "message-id: 6b07d414.00000001") {
		t.Errorf("RESULT traced as %+v", r)
	}
	if r := rec[2]; r.PDU != "ACK ref=7 len=2+0" {
		t.Errorf("ACK traced as %+v", r)
	}
	if strings.Contains(buf.String(), "secret") {
		t.Error("the password is in the trace")
	}
}

// Tracing many conversations keeps its memory bounded and never panics.
func TestTracerManyPeers(t *testing.T) {
	log := slog.New(slog.NewTextHandler(&bytes.Buffer{}, &slog.HandlerOptions{Level: decode.LevelTrace}))
	trace := decode.NewTracer(log)
	dgs := captures.Get("emsd-submit-segmented").Datagrams
	for i := range 20000 {
		peer := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 2002)
		dg := dgs[i%len(dgs)]
		trace(i%2 == 0, peer, dg.Payload)
	}
}

func TestParseLevel(t *testing.T) {
	for s, want := range map[string]slog.Level{"trace": decode.LevelTrace, "debug": slog.LevelDebug, "info": slog.LevelInfo, "warn": slog.LevelWarn, "ERROR": slog.LevelError} {
		if got, err := decode.ParseLevel(s); err != nil || got != want {
			t.Errorf("%q: %v %v", s, got, err)
		}
	}
	if _, err := decode.ParseLevel("loud"); err == nil {
		t.Error("loud accepted")
	}
}

// The cost of tracing per datagram: off (the level check only) and on.
func BenchmarkTracer(b *testing.B) {
	sub := captures.Get("emsd-submit-1").Datagrams[0].Payload
	peer := netip.MustParseAddrPort("192.0.2.7:2002")
	for _, lv := range []slog.Level{slog.LevelInfo, decode.LevelTrace} {
		b.Run(lv.String(), func(b *testing.B) {
			trace := decode.NewTracer(slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: lv})))
			b.ReportAllocs()
			for b.Loop() {
				trace(false, peer, sub)
			}
		})
	}
}
