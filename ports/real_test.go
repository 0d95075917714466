package ports_test

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/ports"
	"github.com/esro-emsdp/emsdp/ports/portstest"
	"github.com/esro-emsdp/emsdp/server"
	"github.com/esro-emsdp/emsdp/ua"
)

// The probe ladder against the real thing: `emsdp serve` (package server,
// with its SQLite store) is identified as an EMSD server, and the device
// client (package ua) as an EMSD device.
func TestProbeRealServerAndDevice(t *testing.T) {
	srv, ep := startServerAndDevice(t)

	for _, tc := range []struct {
		name    string
		port    int
		service string
		steps   string
	}{
		{"emsdp serve", int(srv.Addrs().EMSD.Port()), ports.ServiceEMSDServer, "esro-unbound-sap,emsd-mts-getconf"},
		{"ua device", portstest.EndpointPort(ep), ports.ServiceEMSDDevice, "esro-unbound-sap,emsd-mts-getconf,emsd-ua-subctl"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := probeOne(t, tc.port, ports.ProbeOptions{UDP: true})
			if r.State != ports.StateOpen || r.Service != tc.service || stepNames(r) != tc.steps {
				t.Fatalf("result = %+v", r)
			}
		})
	}
}

// startServerAndDevice starts an EMSD server (EMSD only, on loopback) and
// a device client of it, both closed at cleanup.
func startServerAndDevice(t *testing.T) (*server.Server, *esro.Endpoint) {
	t.Helper()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	cfg := server.DefaultConfig()
	cfg.Data = t.TempDir()
	cfg.EMSD.Listen, cfg.SMTP.Listen, cfg.Admin.Listen = "127.0.0.1:0", "", ""
	srv, err := server.Start(t.Context(), cfg, server.Options{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	})
	ep, err := esro.Listen("udp", "127.0.0.1:0", &esro.Config{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ep.Close() })
	dev, err := ua.New(ep, ua.Config{Server: srv.Addrs().EMSD, Address: emsd.Address(198036), Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dev.Close() })
	return srv, ep
}
