package ports_test

import (
	"context"
	"testing"

	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/ports"
	"github.com/esro-emsdp/emsdp/ports/portstest"
)

// The same identifications against the project's own ESRO endpoint rather
// than the test responder.
func TestProbeESROEndpoint(t *testing.T) {
	tests := []struct {
		name    string
		start   func(t testing.TB) *esro.Endpoint
		service string
		ident   string
		steps   string
	}{
		{"bare endpoint", func(t testing.TB) *esro.Endpoint {
			return portstest.NewEndpoint(t, map[uint8]esro.Handshake{13: esro.ThreeWay, 15: esro.TwoWay},
				func(ctx context.Context, w esro.ResponseWriter, inv *esro.Invocation) { w.Result(2, []byte("date")) })
		}, ports.ServiceESRO, "ESRO engine without EMSD", "esro-unbound-sap,emsd-mts-getconf,emsd-ua-subctl"},
		{"EMSD server", portstest.NewEMSDServerEndpoint, ports.ServiceEMSDServer, "EMSD server", "esro-unbound-sap,emsd-mts-getconf"},
		{"EMSD device", portstest.NewEMSDDeviceEndpoint, ports.ServiceEMSDDevice, "EMSD device", "esro-unbound-sap,emsd-mts-getconf,emsd-ua-subctl"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ep := tt.start(t)
			r := probeOne(t, portstest.EndpointPort(ep), ports.ProbeOptions{UDP: true})
			if r.State != ports.StateOpen || r.Service != tt.service || stepNames(r) != tt.steps {
				t.Fatalf("result = %+v", r)
			}
			if r.Identification[:len(tt.ident)] != tt.ident {
				t.Errorf("identification %q, want prefix %q", r.Identification, tt.ident)
			}
		})
	}
}
