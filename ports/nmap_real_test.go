package ports_test

import (
	"context"
	"encoding/xml"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/ports"
	"github.com/esro-emsdp/emsdp/ports/portstest"
)

type nmapRun struct {
	Hosts []struct {
		Ports []struct {
			Port  int `xml:"portid,attr"`
			State struct {
				State string `xml:"state,attr"`
			} `xml:"state"`
			Service struct {
				Name    string `xml:"name,attr"`
				Product string `xml:"product,attr"`
				Info    string `xml:"extrainfo,attr"`
			} `xml:"service"`
		} `xml:"ports>port"`
	} `xml:"host"`
}

// The real nmap, with our probes appended to its own, at its default
// version intensity, names the real server, the real device client and a
// bare ESRO engine on ports none of which is a listed one.
func TestNmapReal(t *testing.T) {
	nmap, err := exec.LookPath("nmap")
	if err != nil {
		t.Fatal("nmap is not installed: install the Debian package nmap (./test.sh does); without it the nmap probes are not tested")
	}
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED LOUDLY: nmap -sU needs root (raw sockets); the nmap probes are NOT tested against the real nmap")
	}
	own, err := os.ReadFile("/usr/share/nmap/nmap-service-probes")
	if err != nil {
		t.Fatalf("nmap's probe file: %v", err)
	}
	probes := filepath.Join(t.TempDir(), "my.probes")
	if err := os.WriteFile(probes, ports.MergeNmapProbes(own), 0o644); err != nil {
		t.Fatal(err)
	}

	srv, devEP := startServerAndDevice(t)
	engine := portstest.NewEndpoint(t, map[uint8]esro.Handshake{13: esro.ThreeWay},
		func(_ context.Context, w esro.ResponseWriter, inv *esro.Invocation) { w.Result(inv.Encoding, inv.Data) })

	want := map[int][2]string{
		int(srv.Addrs().EMSD.Port()):   {"esro-emsdp", "EMSD server (message transfer system)"},
		portstest.EndpointPort(devEP):  {"esro-emsdp", "EMSD device (user agent)"},
		portstest.EndpointPort(engine): {"esro-gen", "ESRO engine"},
	}
	var list []string
	for p := range want {
		list = append(list, fmt.Sprint(p))
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	start := time.Now()
	cmd := exec.CommandContext(ctx, nmap, "-n", "-Pn", "-sU", "-sV", "--versiondb", probes,
		"-p", "U:"+strings.Join(list, ","), "-oX", "-", "127.0.0.1")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("nmap: %v\n%s", err, out)
	}
	t.Logf("nmap -sU -sV on %d ports took %v", len(want), time.Since(start).Round(time.Millisecond))
	var run nmapRun
	if err := xml.Unmarshal(out, &run); err != nil || len(run.Hosts) != 1 {
		t.Fatalf("nmap XML: %v\n%s", err, out)
	}
	for _, p := range run.Hosts[0].Ports {
		w, ok := want[p.Port]
		if !ok {
			continue
		}
		delete(want, p.Port)
		if p.State.State != "open" || p.Service.Name != w[0] || p.Service.Product != w[1] {
			t.Errorf("port %d: nmap says %s %s %q (%s), want open %s %q", p.Port, p.State.State, p.Service.Name,
				p.Service.Product, p.Service.Info, w[0], w[1])
		}
	}
	if len(want) > 0 {
		t.Errorf("nmap did not report %v:\n%s", want, out)
	}
}
