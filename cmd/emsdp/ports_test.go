package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/esro-emsdp/emsdp/ports"
	"github.com/esro-emsdp/emsdp/ports/portstest"
)

func runPorts(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	env := &cmdEnv{stdin: strings.NewReader(""), stdout: &out, stderr: &errb, getenv: func(string) string { return "" }}
	code = run(context.Background(), env, append([]string{"ports"}, args...))
	return code, out.String(), errb.String()
}

// noLeaks checks, after every other cleanup of t, that t left no goroutine
// behind. The package has no TestMain of its own for goleak.
func noLeaks(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, ignore) })
}

func TestPortsLocal(t *testing.T) {
	noLeaks(t)
	if runtime.GOOS != "linux" {
		t.Skip("process details need procfs")
	}
	u, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	port := u.LocalAddr().(*net.UDPAddr).Port

	code, out, errs := runPorts(t, "--port", fmt.Sprint(port))
	want := fmt.Sprintf("%d/udp: emsdp.test (pid %d)", port, os.Getpid())
	if code != exitOK || !strings.Contains(out, want) || !strings.Contains(out, fmt.Sprintf("%d/tcp: nothing listening", port)) {
		t.Fatalf("exit %d, stdout:\n%s\nstderr:\n%s\nwant %q", code, out, errs, want)
	}

	code, out, _ = runPorts(t, "--json", "--port", fmt.Sprint(port))
	var rep ports.LocalReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil || code != exitOK {
		t.Fatalf("exit %d, JSON %v:\n%s", code, err, out)
	}
	if len(rep.Ports) != 2 || rep.Ports[1].Proto != "udp" || len(rep.Ports[1].Sockets) != 1 || rep.Ports[1].Sockets[0].Processes[0].PID != os.Getpid() {
		t.Fatalf("report = %+v", rep)
	}
}

func TestPortsProbe(t *testing.T) {
	noLeaks(t)
	ep := portstest.NewEMSDServerEndpoint(t)
	port := fmt.Sprint(portstest.EndpointPort(ep))
	// Flags before and after HOST.
	for _, args := range [][]string{
		{"probe", "127.0.0.1", "--port", port, "--udp", "--timeout", "300ms", "--json"},
		{"probe", "--json", "--udp", "--port", port, "127.0.0.1", "--timeout=300ms"},
	} {
		code, out, errs := runPorts(t, args...)
		var rep ports.ProbeReport
		if err := json.Unmarshal([]byte(out), &rep); err != nil || code != exitOK {
			t.Fatalf("%q: exit %d, %v\n%s\n%s", args, code, err, out, errs)
		}
		if len(rep.Results) != 1 || rep.Results[0].Service != ports.ServiceEMSDServer {
			t.Fatalf("%q: results = %+v", args, rep.Results)
		}
	}
	code, out, _ := runPorts(t, "probe", "127.0.0.1", "--port", port, "--udp", "--timeout", "300ms")
	if code != exitOK || !strings.Contains(out, port+"/udp  open  EMSD server (message transfer system)") || !strings.Contains(out, "sent          90 ") {
		t.Fatalf("exit %d:\n%s", code, out)
	}
}

func TestPortsNmapProbe(t *testing.T) {
	code, out, _ := runPorts(t, "nmap-probe")
	if code != exitOK || out != ports.NmapProbe() || !strings.Contains(out, "Probe UDP ESRO-SAP0 q|\\x00\\x4e\\x3f|") {
		t.Fatalf("exit %d:\n%s", code, out)
	}
	own := filepath.Join(t.TempDir(), "nmap-service-probes")
	if err := os.WriteFile(own, []byte("Exclude T:9100-9107\nProbe TCP NULL q||\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	code, out, _ = runPorts(t, "nmap-probe", "--merge", own)
	if code != exitOK || !strings.HasPrefix(out, "Exclude T:9100-9107\n") || !strings.HasSuffix(out, "Probe TCP NULL q||\n") ||
		!strings.Contains(out, "Probe UDP EMSD-device") {
		t.Errorf("--merge: exit %d\n%s", code, out)
	}
	if code, _, _ := runPorts(t, "nmap-probe", "--merge", own+".missing"); code != exitFailed {
		t.Errorf("--merge of a missing file: exit %d", code)
	}
}

func TestPortsExitCodes(t *testing.T) {
	tests := []struct {
		args []string
		code int
		err  string // substring of stderr
	}{
		{[]string{"probe"}, exitUsage, "want 1 argument"},
		{[]string{"probe", "a", "b"}, exitUsage, "want 1 argument"},
		{[]string{"probe", "127.0.0.1", "--timeout", "0s"}, exitUsage, "must be positive"},
		{[]string{"probe", "127.0.0.1", "--attempts", "0"}, exitUsage, "must be positive"},
		{[]string{"probe", "127.0.0.1", "--port", "70000"}, exitUsage, "bad port"},
		{[]string{"--port", "0"}, exitUsage, "bad port"},
		{[]string{"--port", "x"}, exitUsage, "bad port"},
		{[]string{"--bogus"}, exitUsage, "flag provided but not defined"},
		{[]string{"extra"}, exitUsage, "want 0 argument"},
		{[]string{"nmap-probe", "extra"}, exitUsage, "want 0 argument"},
		{[]string{"-h"}, exitOK, "usage: emsdp ports"},
		{[]string{"probe", "-h"}, exitOK, "usage: emsdp ports probe"},
		{[]string{"probe", "bad..host", "--port", "1", "--udp"}, exitFailed, "resolving bad..host"},
	}
	for _, tt := range tests {
		code, _, errs := runPorts(t, tt.args...)
		if code != tt.code || !strings.Contains(errs, tt.err) {
			t.Errorf("ports %q: exit %d, stderr %q; want exit %d and %q", tt.args, code, errs, tt.code, tt.err)
		}
	}
}

func TestPortList(t *testing.T) {
	var l portList
	for _, v := range []string{"641", "642, 259", "2002"} {
		if err := l.Set(v); err != nil {
			t.Fatal(err)
		}
	}
	if l.String() != "641,642,259,2002" {
		t.Fatalf("portList = %s", l.String())
	}
	if got := portList(nil).or([]int{1}); len(got) != 1 {
		t.Fatalf("or = %v", got)
	}
}
