package ports_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/ports"
	"github.com/esro-emsdp/emsdp/ports/portstest"
)

const loopback = "127.0.0.1"

func probeOne(t *testing.T, port int, opts ports.ProbeOptions) ports.PortResult {
	t.Helper()
	opts.Ports = []int{port}
	if opts.Timeout == 0 {
		opts.Timeout = 300 * time.Millisecond
	}
	rep, err := ports.Probe(context.Background(), loopback, &opts)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Results) != 1 {
		t.Fatalf("results = %+v", rep.Results)
	}
	return rep.Results[0]
}

func stepNames(r ports.PortResult) string {
	var n []string
	for _, s := range r.Steps {
		n = append(n, s.Name)
	}
	return strings.Join(n, ",")
}

// Every UDP datagram the prober sent, as the server saw it.
func sentESRO(t *testing.T, s *portstest.UDPServer) []esro.PDU {
	t.Helper()
	var out []esro.PDU
	for _, b := range s.Received() {
		p, err := esro.ParsePDU(b)
		if err != nil {
			t.Fatalf("prober sent a non-ESRO datagram % x to an ESRO port: %v", b, err)
		}
		out = append(out, p)
	}
	return out
}

func TestProbeUDP(t *testing.T) {
	tests := []struct {
		name      string
		server    func(t *testing.T) int
		state     string
		service   string
		ident     string // substring
		steps     string
		evidence  string // substring
		checkSent func(t *testing.T)
	}{
		{
			name: "bare ESRO engine",
			server: func(t *testing.T) int {
				return portstest.NewESRO(t, map[uint8]portstest.Handler{13: func(inv esro.PDU) *esro.PDU {
					return &esro.PDU{Type: esro.TypeResult, Ref: inv.Ref, Data: []byte("date")}
				}}).Port()
			},
			state: ports.StateOpen, service: ports.ServiceESRO,
			ident: "ESRO engine without EMSD", steps: "esro-unbound-sap,emsd-mts-getconf,emsd-ua-subctl",
			evidence: "FAILURE echoing our random reference number",
		},
		{
			name:   "EMSD server",
			server: func(t *testing.T) int { return portstest.NewEMSDServer(t).Port() },
			state:  ports.StateOpen, service: ports.ServiceEMSDServer,
			ident: "EMSD server", steps: "esro-unbound-sap,emsd-mts-getconf",
			evidence: "ERROR 7",
		},
		{
			name:   "EMSD device",
			server: func(t *testing.T) int { return portstest.NewEMSDDevice(t).Port() },
			state:  ports.StateOpen, service: ports.ServiceEMSDDevice,
			ident: "EMSD device", steps: "esro-unbound-sap,emsd-mts-getconf,emsd-ua-subctl",
			evidence: "parameter 02 01 07",
		},
		{
			name: "ESRO with a RESULT at SAP 9",
			server: func(t *testing.T) int {
				return portstest.NewESRO(t, map[uint8]portstest.Handler{9: func(inv esro.PDU) *esro.PDU {
					return &esro.PDU{Type: esro.TypeResult, Ref: inv.Ref}
				}}).Port()
			},
			state: ports.StateOpen, service: ports.ServiceESRO,
			ident: "not a recognisable EMSD server", steps: "esro-unbound-sap,emsd-mts-getconf",
		},
		{
			name: "wrong reference number is no evidence",
			server: func(t *testing.T) int {
				return portstest.NewUDP(t, func(b []byte) [][]byte {
					if len(b) < 3 {
						return nil
					}
					return [][]byte{{0x04, b[1] + 1, 0x02}}
				}).Port()
			},
			state: ports.StateOpen, service: ports.ServiceUnknown,
			ident: "not as ESRO or ONC-RPC",
			steps: "esro-unbound-sap,oncrpc-null-200100000", // no RPC reply: the other programs are skipped
		},
		{
			name:   "echo is not ESRO",
			server: func(t *testing.T) int { return portstest.NewEchoUDP(t).Port() },
			state:  ports.StateOpen, service: ports.ServiceEcho, ident: "echo service",
		},
		{
			name: "NetInfo",
			server: func(t *testing.T) int {
				return portstest.NewRPC(t, portstest.RPCProgram{Prog: 200100000, Low: 2, High: 2}).Port()
			},
			state: ports.StateOpen, service: ports.ServiceONCRPC,
			ident: "NetInfo (netinfod) (program 200100000)", steps: "esro-unbound-sap,oncrpc-null-200100000",
			evidence: "MSG_ACCEPTED SUCCESS",
		},
		{
			name: "NetInfo binder, other version",
			server: func(t *testing.T) int {
				return portstest.NewRPC(t, portstest.RPCProgram{Prog: 200100001, Low: 3, High: 4}).Port()
			},
			state: ports.StateOpen, service: ports.ServiceONCRPC,
			ident: "NetInfo binder (nibindd)", steps: "esro-unbound-sap,oncrpc-null-200100000,oncrpc-null-200100001",
			evidence: "PROG_MISMATCH (versions 3..4)",
		},
		{
			name: "RPC server offering none of ours",
			server: func(t *testing.T) int {
				return portstest.NewRPC(t, portstest.RPCProgram{Prog: 100003, Low: 3, High: 3}).Port()
			},
			state: ports.StateOpen, service: ports.ServiceONCRPC,
			ident: "ONC-RPC service", steps: "esro-unbound-sap,oncrpc-null-200100000,oncrpc-null-200100001,oncrpc-null-100000",
			evidence: "PROG_UNAVAIL",
		},
		{
			name:   "closed",
			server: func(t *testing.T) int { return portstest.ClosedUDPPort(t) },
			state:  ports.StateClosed, steps: "esro-unbound-sap", evidence: "ICMP port unreachable",
		},
		{
			name:   "silent",
			server: func(t *testing.T) int { return portstest.NewSilentUDP(t).Port() },
			state:  ports.StateOpenFiltered, steps: "esro-unbound-sap,oncrpc-null-200100000",
			evidence: "no reply",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			port := tt.server(t)
			r := probeOne(t, port, ports.ProbeOptions{UDP: true})
			if r.Proto != "udp" || r.Port != port || r.State != tt.state || r.Service != tt.service ||
				!strings.Contains(r.Identification, tt.ident) || !strings.Contains(r.Evidence, tt.evidence) {
				t.Errorf("result = %+v", r)
			}
			if tt.steps != "" && stepNames(r) != tt.steps {
				t.Errorf("steps = %s, want %s", stepNames(r), tt.steps)
			}
		})
	}
}

// The datagrams, as the EMSD server emulation received them: the SAP 0
// probe, the SAP 9 get-configuration, and the ACK of its ERROR.
func TestProbeEMSDServerWire(t *testing.T) {
	srv := portstest.NewEMSDServer(t)
	r := probeOne(t, srv.Port(), ports.ProbeOptions{UDP: true})
	if r.Service != ports.ServiceEMSDServer {
		t.Fatalf("result = %+v", r)
	}
	waitReceived(t, srv, 3)
	got := sentESRO(t, srv)
	if len(got) != 3 {
		t.Fatalf("server received %v", got)
	}
	inv0, inv9, ack := got[0], got[1], got[2]
	if inv0.Type != esro.TypeInvoke || inv0.SAP != 0 || inv0.Operation != 63 || len(inv0.Data) != 0 {
		t.Errorf("first probe = %v", inv0)
	}
	if inv9.Type != esro.TypeInvoke || inv9.SAP != 9 || inv9.Operation != 7 || !bytes.Equal(inv9.Data, []byte{0x30, 0}) || inv9.Ref == inv0.Ref {
		t.Errorf("EMSD probe = %v % x", inv9, inv9.Data)
	}
	if ack.Type != esro.TypeAck || ack.Ref != inv9.Ref {
		t.Errorf("third datagram = %v, want ACK of ref %d", ack, inv9.Ref)
	}
	// The report shows what was sent and received in hex.
	st := r.Steps[1]
	if len(st.Sent) != 2 || len(st.Received) != 1 || st.Received[0].Data.String() != fmt.Sprintf("02 %02x 07", inv9.Ref) {
		t.Errorf("step = %+v", st)
	}
}

// waitReceived waits until srv has n datagrams: the last ones (an ACK) may
// still be in flight when Probe returns.
func waitReceived(t *testing.T, srv *portstest.UDPServer, n int) {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Second); len(srv.Received()) < n && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
}

// Reference numbers must be random per probe, or an old reply could be
// taken for a new one.
func TestProbeRandomReference(t *testing.T) {
	srv := portstest.NewESRO(t, nil)
	refs := map[uint8]bool{}
	for range 8 {
		probeOne(t, srv.Port(), ports.ProbeOptions{UDP: true})
	}
	for _, p := range sentESRO(t, srv) {
		if p.Type == esro.TypeInvoke && p.SAP == 0 {
			refs[p.Ref] = true
		}
	}
	if len(refs) < 4 {
		t.Fatalf("8 probes used only %d reference numbers", len(refs))
	}
}

// A lost reply is retried; a silent port gets Attempts sends per step.
func TestProbeAttempts(t *testing.T) {
	n := 0
	srv := portstest.NewUDP(t, func(b []byte) [][]byte {
		n++
		if n == 1 {
			return nil // "lost"
		}
		return [][]byte{{0x04, b[1], 0x02}}
	})
	r := probeOne(t, srv.Port(), ports.ProbeOptions{UDP: true, Attempts: 2})
	if r.Service != ports.ServiceESRO || len(r.Steps[0].Sent) != 2 {
		t.Fatalf("result = %+v", r)
	}
	silent := portstest.NewSilentUDP(t)
	probeOne(t, silent.Port(), ports.ProbeOptions{UDP: true, Attempts: 3, Timeout: 50 * time.Millisecond})
	if got := len(silent.Received()); got != 6 {
		t.Fatalf("silent port received %d datagrams, want 3 ESRO + 3 RPC", got)
	}
	// RPC probes must be ignored by ESRO engines: their first octet is type 7.
	for _, b := range silent.Received()[3:] {
		if b[0]&7 != 7 {
			t.Errorf("RPC probe % x would read as ESRO type %d", b, b[0]&7)
		}
	}
}

// No UDP probe is printable text.
func TestProbeDatagramsAreBinary(t *testing.T) {
	silent := portstest.NewSilentUDP(t)
	probeOne(t, silent.Port(), ports.ProbeOptions{UDP: true, Attempts: 1, Timeout: 50 * time.Millisecond})
	srv := portstest.NewEMSDDevice(t)
	probeOne(t, srv.Port(), ports.ProbeOptions{UDP: true})
	all := append(silent.Received(), srv.Received()...)
	if len(all) < 5 {
		t.Fatalf("only %d datagrams", len(all))
	}
	for _, b := range all {
		if !bytes.ContainsFunc(b, func(r rune) bool { return r < 0x20 && r != '\n' && r != '\r' && r != '\t' }) ||
			bytes.ContainsAny(b, "\r\n") {
			t.Errorf("datagram % x could read as text", b)
		}
	}
}

func TestProbeTCP(t *testing.T) {
	tests := []struct {
		name    string
		server  func(t *testing.T) int
		opts    ports.ProbeOptions
		state   string
		service string
		ident   string
		steps   string
		notes   string // substring of the joined notes
	}{
		{
			name:   "SSH banner",
			server: func(t *testing.T) int { return portstest.NewBannerTCP(t, "SSH-2.0-OpenSSH_9.6\r\n").Port() },
			state:  ports.StateOpen, service: ports.ServiceBanner, ident: `SSH server ("SSH-2.0-OpenSSH_9.6")`,
			steps: "tcp-connect,tcp-banner",
		},
		{
			name:   "printer banner",
			server: func(t *testing.T) int { return portstest.NewBannerTCP(t, "@PJL INFO STATUS\r\n").Port() },
			opts:   ports.ProbeOptions{Aggressive: true},
			state:  ports.StateOpen, service: ports.ServicePrinter, ident: "print service",
			steps: "tcp-connect,tcp-banner", notes: "active payloads not sent: the banner already identifies",
		},
		{
			name:   "unknown binary banner",
			server: func(t *testing.T) int { return portstest.NewBannerTCP(t, "\x00\x01\x02").Port() },
			state:  ports.StateOpen, service: ports.ServiceUnknown, ident: "unrecognised binary banner",
			steps: "tcp-connect,tcp-banner",
		},
		{
			name:   "closed",
			server: func(t *testing.T) int { return portstest.ClosedTCPPort(t) },
			state:  ports.StateClosed, steps: "tcp-connect",
		},
		{
			name:   "silent, passive",
			server: func(t *testing.T) int { return portstest.NewSilentTCP(t).Port() },
			state:  ports.StateOpen, steps: "tcp-connect,tcp-banner", notes: "--aggressive may send",
		},
		{
			name: "wrapped",
			server: func(t *testing.T) int {
				return portstest.NewTCP(t, func(c net.Conn, _ io.Reader) {}).Port()
			},
			state: ports.StateOpen, service: ports.ServiceWrapped, steps: "tcp-connect,tcp-banner",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			port := tt.server(t)
			r := probeOne(t, port, withTCP(tt.opts))
			if r.Proto != "tcp" || r.State != tt.state || r.Service != tt.service || !strings.Contains(r.Identification, tt.ident) ||
				stepNames(r) != tt.steps || !strings.Contains(strings.Join(r.Notes, "\n"), tt.notes) {
				t.Errorf("result = %+v", r)
			}
		})
	}
}

func withTCP(o ports.ProbeOptions) ports.ProbeOptions {
	o.TCP = true
	return o
}

// The --aggressive rule: nothing is ever sent to a silent port while the
// host has a print service, and a silent port with no printer around gets
// the RPC NULL call and HTTP HEAD.
func TestProbeTCPAggressive(t *testing.T) {
	printer := portstest.NewSilentTCP(t) // a raw print service: silent, prints anything
	noPrinter := portstest.ClosedTCPPort(t)

	t.Run("silent port, host has a print service", func(t *testing.T) {
		srv := portstest.NewSilentTCP(t)
		r := probeOne(t, srv.Port(), ports.ProbeOptions{TCP: true, Aggressive: true, PrintPorts: []int{noPrinter, printer.Port()}})
		if stepNames(r) != "tcp-connect,tcp-banner" || !strings.Contains(strings.Join(r.Notes, " "), fmt.Sprintf("print port(s) [%d]", printer.Port())) {
			t.Errorf("result = %+v", r)
		}
		time.Sleep(50 * time.Millisecond) // let the server record anything that was sent
		if got := srv.Received(); len(got) != 0 {
			t.Errorf("silent port received % x", got)
		}
		if got := printer.Received(); len(got) != 0 || printer.Conns() == 0 {
			t.Errorf("print port: %d connections, received % x; want a connect-only check", printer.Conns(), got)
		}
	})
	t.Run("silent port, no printer", func(t *testing.T) {
		srv := portstest.NewSilentTCP(t)
		r := probeOne(t, srv.Port(), ports.ProbeOptions{TCP: true, Aggressive: true, PrintPorts: []int{noPrinter}})
		if stepNames(r) != "tcp-connect,tcp-banner,tcp-oncrpc-null,tcp-http-head" || r.Service != "" {
			t.Errorf("result = %+v", r)
		}
		if got := string(srv.Received()); !strings.Contains(got, "HEAD / HTTP/1.0") || got[0] != 0x80 {
			t.Errorf("server received %q", got)
		}
	})
	t.Run("RPC over TCP", func(t *testing.T) {
		srv := portstest.NewRPCTCP(t, portstest.RPCProgram{Prog: 200100000, Low: 2, High: 2})
		r := probeOne(t, srv.Port(), ports.ProbeOptions{TCP: true, Aggressive: true, PrintPorts: []int{noPrinter}})
		if r.Service != ports.ServiceONCRPC || !strings.Contains(r.Identification, "NetInfo") || stepNames(r) != "tcp-connect,tcp-banner,tcp-oncrpc-null" {
			t.Errorf("result = %+v", r)
		}
	})
	t.Run("HTTP", func(t *testing.T) {
		srv := portstest.NewTCP(t, func(c net.Conn, r io.Reader) {
			buf := make([]byte, 512)
			n, _ := r.Read(buf)
			if strings.HasPrefix(string(buf[:n]), "HEAD") {
				io.WriteString(c, "HTTP/1.0 200 OK\r\nServer: test\r\n\r\n")
			}
		})
		r := probeOne(t, srv.Port(), ports.ProbeOptions{TCP: true, Aggressive: true, PrintPorts: []int{noPrinter}})
		if r.Service != ports.ServiceHTTP || r.Identification != "HTTP server (HTTP/1.0 200 OK)" {
			t.Errorf("result = %+v", r)
		}
	})
}

func TestProbeBothProtocolsAndJSON(t *testing.T) {
	srv := portstest.NewEMSDServer(t)
	opts := &ports.ProbeOptions{Ports: []int{srv.Port()}, Timeout: 300 * time.Millisecond, PrintPorts: []int{portstest.ClosedTCPPort(t)}}
	// An address literal: resolving a name could send a DNS query off the
	// machine.
	rep, err := ports.Probe(context.Background(), loopback, opts)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Host != loopback || rep.Addr != loopback {
		t.Errorf("host %s, addr %s", rep.Host, rep.Addr)
	}
	if len(rep.Results) != 2 || rep.Results[0].Proto != "udp" || rep.Results[1].Proto != "tcp" {
		t.Fatalf("results = %+v", rep.Results)
	}
	b, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	var back ports.ProbeReport
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back.Results[0].Service != ports.ServiceEMSDServer || !bytes.Equal(back.Results[0].Steps[0].Sent[0].Data, rep.Results[0].Steps[0].Sent[0].Data) {
		t.Errorf("JSON round trip lost data: %s", b)
	}
	if !regexp.MustCompile(`"hex":"00[0-9a-f]{2}3f"`).Match(b) {
		t.Errorf("JSON lacks the hex of the SAP 0 probe: %s", b)
	}
	var text strings.Builder
	if err := rep.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		fmt.Sprintf("%d/udp  open  EMSD server (message transfer system)", srv.Port()),
		"esro-unbound-sap: FAILURE with our reference number",
		"= INVOKE sap=0 ref=",
		"evidence: SAP 9 answered get-configuration",
	} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("text lacks %q:\n%s", want, text.String())
		}
	}
}

func TestProbeErrors(t *testing.T) {
	ctx := context.Background()
	if _, err := ports.Probe(ctx, loopback, &ports.ProbeOptions{Ports: []int{70000}}); err == nil {
		t.Error("port 70000 accepted")
	}
	if _, err := ports.Probe(ctx, "bad..host", nil); err == nil {
		t.Error("unresolvable host accepted")
	}
	// Cancelling stops a probe that would otherwise wait a minute.
	silent := portstest.NewSilentUDP(t)
	cctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	rep, err := ports.Probe(cctx, loopback, &ports.ProbeOptions{Ports: []int{silent.Port()}, UDP: true, Timeout: time.Minute})
	if err == nil || time.Since(start) > 5*time.Second {
		t.Fatalf("Probe = %v after %v", err, time.Since(start))
	}
	if rep == nil || len(rep.Results) != 1 {
		t.Fatalf("partial report = %+v", rep)
	}
}

// The nmap snippet's probes, sent to our emulations, must draw replies that
// its match lines recognise.
func TestNmapProbe(t *testing.T) {
	snippet := ports.NmapProbe()
	probes := regexp.MustCompile(`(?m)^Probe UDP (\S+) q\|([^|]*)\|$`).FindAllStringSubmatch(snippet, -1)
	if len(probes) != 3 {
		t.Fatalf("probes = %q in\n%s", probes, snippet)
	}
	type match struct{ service, re string }
	sections := strings.Split(snippet, "NEXT PROBE")[1:]
	for i, p := range probes {
		payload := unescape(t, p[2])
		var matches []match
		for _, m := range regexp.MustCompile(`(?m)^(?:soft)?match (\S+) m\|([^|]*)\|`).FindAllStringSubmatch(sections[i], -1) {
			matches = append(matches, match{m[1], m[2]})
		}
		for _, tc := range []struct {
			name string
			srv  *portstest.UDPServer
			want string
		}{
			{"engine", portstest.NewESRO(t, nil), "esro-gen"},
			{"server", portstest.NewEMSDServer(t), map[int]string{0: "esro-gen", 1: "esro-emsdp", 2: "esro-gen"}[i]},
			{"device", portstest.NewEMSDDevice(t), map[int]string{0: "esro-gen", 1: "esro-gen", 2: "esro-emsdp"}[i]},
		} {
			reply := exchange(t, tc.srv.Port(), payload)
			got := ""
			for _, m := range matches {
				// nmap matches octets; Go's regexp matches runes, so map each
				// octet to the rune of the same value.
				if regexp.MustCompile(m.re).MatchString(latin1(reply)) {
					got = m.service
					break
				}
			}
			if got != tc.want {
				t.Errorf("probe %s to %s: reply % x matched %q, want %q", p[1], tc.name, reply, got, tc.want)
			}
		}
	}
	for _, want := range []string{"rarity 7", "ports 259,641,642,2002", "p/ESRO engine/", "p/EMSD device (user agent)/", "softmatch esro-gen m|^\\x04\\x4e"} {
		if !strings.Contains(snippet, want) {
			t.Errorf("snippet lacks %q", want)
		}
	}
}

func unescape(t *testing.T, s string) []byte {
	t.Helper()
	var out []byte
	for len(s) > 0 {
		var b byte
		if _, err := fmt.Sscanf(s[:4], "\\x%02x", &b); err != nil {
			t.Fatalf("bad escape %q: %v", s, err)
		}
		out = append(out, b)
		s = s[4:]
	}
	return out
}

func latin1(b []byte) string {
	r := make([]rune, len(b))
	for i, c := range b {
		r[i] = rune(c)
	}
	return string(r)
}

func exchange(t *testing.T, port int, payload []byte) []byte {
	t.Helper()
	c, err := net.Dial("udp", net.JoinHostPort(loopback, fmt.Sprint(port)))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write(payload); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1500)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	return buf[:n]
}

func TestMergeNmapProbes(t *testing.T) {
	own := "# nmap's file\nExclude T:9100-9107\n\nProbe TCP NULL q||\nmatch x m|^x|\nProbe UDP DNS q|\\0|\n"
	got := string(ports.MergeNmapProbes([]byte(own)))
	ex, ours, null := strings.Index(got, "Exclude T:9100"), strings.Index(got, "Probe UDP ESRO-SAP0"), strings.Index(got, "Probe TCP NULL")
	if ex < 0 || ours < ex || null < ours || !strings.HasSuffix(got, "Probe UDP DNS q|\\0|\n") {
		t.Errorf("merged:\n%s", got)
	}
	if got := string(ports.MergeNmapProbes([]byte("Probe UDP X q||\n"))); !strings.HasPrefix(got, "\n# ESRO") {
		t.Errorf("without Exclude:\n%s", got)
	}
}
