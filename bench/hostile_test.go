package main

import (
	"context"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/esro"
)

// The hostile section's cheaper parts: reflection off an endpoint that
// answers more than it is sent stays at 1×, a closed port fails at once,
// refused invocations are tombstones.
func TestHostileParts(t *testing.T) {
	o := &benchOptions{quick: true, duration: 200 * time.Millisecond, log: slog.New(slog.DiscardHandler), srvLog: slog.New(slog.DiscardHandler)}
	ep, err := esro.Listen("udp", "127.0.0.1:0", &esro.Config{Timers: serverTimers, Logger: o.log})
	if err != nil {
		t.Fatal(err)
	}
	defer ep.Close()
	ep.HandleFunc(13, esro.ThreeWay, func(_ context.Context, w esro.ResponseWriter, _ *esro.Invocation) {
		w.Result(0, make([]byte, 50))
	})
	to := ep.LocalAddr().(*net.UDPAddr).AddrPort()
	for _, data := range [][]byte{nil, make([]byte, 60)} {
		fc, err := reflectOne(t.Context(), o, to, func(r uint8) []byte { return invokePDU(13, r, data) }, 3)
		if err != nil {
			t.Fatal(err)
		}
		if fc.outD > fc.inD || fc.outB > fc.inB || (len(data) > 50 && fc.outD == 0) {
			t.Errorf("argument %d octets: %+v", len(data), fc)
		}
	}
	ttf, err := timeToFailure(t.Context(), o)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range ttf {
		if r.Conditions["outcome"] != "unreachable" || r.Metrics["max"] > 1500 {
			t.Errorf("%s: %v after %v ms", r.Name, r.Conditions["outcome"], r.Metrics["max"])
		}
	}
	tomb, err := tombstoneMemory(t.Context(), o)
	if err != nil {
		t.Fatal(err)
	}
	if m := tomb[0].Metrics; m["in flight"] != 0 || m["tombstones"] == 0 || m["heap per tombstone"] > 4096 {
		t.Errorf("tombstones %v", m)
	}
}
