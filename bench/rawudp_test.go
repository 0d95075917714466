package main

import (
	"context"
	"io"
	"log/slog"
	"runtime"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/esro"
)

// The raw-UDP baseline and the ESRO load it is compared with both
// complete exchanges and count their system calls: for raw UDP at least
// one read and one write per datagram of the exchange (more for reads that
// found nothing waiting); ESRO moves several datagrams per call when they
// queue up, so only that it counts.
func TestRawUDPBaseline(t *testing.T) {
	o := &benchOptions{duration: 200 * time.Millisecond, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	for _, hs := range []esro.Handshake{esro.TwoWay, esro.ThreeWay} {
		for _, load := range []struct {
			name string
			run  func(context.Context, *benchOptions, esro.Handshake, int, int) (loadStats, error)
		}{{"raw", rawLoad}, {"esro", esroLoad}} {
			st, err := load.run(context.Background(), o, hs, 64, 4)
			if err != nil {
				t.Fatalf("%s %v: %v", load.name, hs, err)
			}
			if st.completed == 0 || st.failed != 0 {
				t.Fatalf("%s %v: %d completed, %d failed", load.name, hs, st.completed, st.failed)
			}
			if st.mallocs == 0 && load.name == "esro" {
				t.Errorf("%s %v: no allocations counted", load.name, hs)
			}
			if runtime.GOOS != "linux" {
				continue
			}
			min := 2 * float64(hs)
			if load.name == "esro" {
				min = 1
			}
			if st.perOp(st.calls) < min {
				t.Errorf("%s %v: %.2f system calls per exchange, want at least %v", load.name, hs, st.perOp(st.calls), min)
			}
		}
	}
}
