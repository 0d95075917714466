package esro

import (
	"context"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// Every test, synctest bubbles aside, must leave no goroutine behind.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// Real UDP on loopback: both handshakes, both roles on each endpoint.
func TestUDPLoopback(t *testing.T) {
	a, err := Listen("udp", "127.0.0.1:0", &Config{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	b, err := Listen("udp", "127.0.0.1:0", &Config{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	defer b.Close()
	for _, ep := range []*Endpoint{a, b} {
		ep.Handle(3, ThreeWay, &echo{})
		ep.Handle(7, TwoWay, &echo{})
	}
	for _, dir := range [][2]*Endpoint{{a, b}, {b, a}} {
		to := netip.MustParseAddrPort(dir[1].LocalAddr().String())
		for _, sap := range []uint8{3, 7} {
			hs := ThreeWay
			if sap == 7 {
				hs = TwoWay
			}
			r, err := dir[0].Invoke(context.Background(), &Request{To: to, SAP: sap, Handshake: hs, Operation: 35, Data: []byte("payload")})
			if err != nil || string(r.Data) != "payload" {
				t.Fatalf("sap %d: %v %v", sap, r, err)
			}
		}
	}
	if s := a.Stats(); s.InvokesSent != 2 || s.InvokesReceived != 2 || s.ResultsReceived != 2 {
		t.Fatalf("stats %+v", s)
	}
}

// A one-shot invoker closes its endpoint as soon as Invoke returns; the ACK
// queued in the same step as the RESULT indication must still go out (see
// docs/protocol.md ESRO §5.2), or the performer ends in a transmission failure although
// the operation succeeded. Found by interop runs against the C reference.
func TestCloseAfterInvokeStillAcks(t *testing.T) {
	cfg := &Config{Timers: Timers{Acknowledgement: time.Millisecond, Roundtrip: 20 * time.Millisecond,
		Retransmit: 30 * time.Millisecond, NSDULifetime: 5 * time.Millisecond, RetransmitCount: 3}, Logger: quiet}
	perf, err := Listen("udp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer perf.Close()
	var confirmed, failed atomic.Int64
	perf.HandleFunc(13, ThreeWay, func(ctx context.Context, w ResponseWriter, inv *Invocation) {
		w.Result(0, inv.Data)
		if err := w.Confirmed(ctx); err != nil {
			failed.Add(1)
		} else {
			confirmed.Add(1)
		}
	})
	to := netip.MustParseAddrPort(perf.LocalAddr().String())
	const n = 200
	for i := range n {
		inv, err := Listen("udp", "127.0.0.1:0", cfg)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := inv.Invoke(context.Background(), &Request{To: to, SAP: 13, Handshake: ThreeWay, Data: []byte{byte(i)}}); err != nil {
			t.Fatal(err)
		}
		inv.Close()
	}
	deadline := time.Now().Add(5 * time.Second)
	for confirmed.Load()+failed.Load() < n && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if failed.Load() != 0 || confirmed.Load() != n {
		t.Fatalf("%d of %d answers confirmed, %d failed: ACKs lost at Close", confirmed.Load(), n, failed.Load())
	}
}
