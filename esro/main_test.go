package esro

import (
	"context"
	"net/netip"
	"testing"

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
