package main

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/internal/captures"
	"github.com/esro-emsdp/emsdp/internal/pcaprec"
)

// writePcap records a reference capture section as a pcap, with the
// performer's port replaced by port.
func writePcap(t *testing.T, section string, port uint16) (string, []byte) {
	t.Helper()
	var buf bytes.Buffer
	rec, err := pcaprec.New(&buf)
	if err != nil {
		t.Fatal(err)
	}
	addr := func(s string) netip.AddrPort {
		ap, err := netip.ParseAddrPort(s)
		if err != nil {
			ap = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), 2003)
			if s == "2002" {
				ap = netip.AddrPortFrom(ap.Addr(), 2002)
			}
		}
		if ap.Port() == 2002 && strings.HasSuffix(ap.Addr().String(), ".10") || s == "2002" {
			ap = netip.AddrPortFrom(ap.Addr(), port)
		}
		return ap
	}
	t0 := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
	for _, dg := range captures.Get(section).Datagrams {
		if err := rec.Write(t0.Add(time.Duration(dg.Offset*float64(time.Second))), addr(dg.From), addr(dg.To), dg.Payload); err != nil {
			t.Fatal(err)
		}
	}
	path := filepath.Join(t.TempDir(), section+".pcap")
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return path, buf.Bytes()
}

func TestDecodeCommand(t *testing.T) {
	seg, segBytes := writePcap(t, "emsd-submit-segmented", 2002)
	code, out, errOut := runCmd(t, "", "decode", seg)
	if code != exitOK || errOut != "" {
		t.Fatalf("decode: exit %d, stderr %q", code, errOut)
	}
	for _, want := range []string{
		"#1 2026-12-07T10:00:00.000000Z 127.0.0.11:2002 → 127.0.0.10:2002 INVOKE sap=5 ref=192 op=33 enc=BER",
		"EMSD submission SubmitArgument (1.1) instance=0",
		"segment: first of 3, sequence 1",
		"reassembled: 3 segments",
		`originator: "198.036"`,
		"RESULT ref=194 enc=BER len=2+",
		"ACK ref=194 len=2+0 invoke=#7",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("decode output lacks %q:\n%s", want, out)
		}
	}

	// The same from standard input, as JSON: one object per datagram.
	code, js, _ := runCmd(t, string(segBytes), "decode", "--json", "-")
	lines := strings.Split(strings.TrimSpace(js), "\n")
	if code != exitOK || len(lines) != 9 {
		t.Fatalf("decode --json -: exit %d, %d lines", code, len(lines))
	}
	var rec struct {
		Frame int
		Src   string
		ESRO  struct{ Type string }
		EMSD  struct {
			Operation  string
			Reassembly struct{ Complete bool }
		}
	}
	if err := json.Unmarshal([]byte(lines[6]), &rec); err != nil {
		t.Fatal(err)
	}
	if rec.Frame != 7 || rec.ESRO.Type != "INVOKE" || rec.EMSD.Operation != "submission" || !rec.EMSD.Reassembly.Complete {
		t.Errorf("JSON record 7: %s", lines[6])
	}

	// Another port: found by the heuristic, or by --port; not with
	// --no-heuristic.
	odd, _ := writePcap(t, "emsd-submit-1", 7641)
	if _, out, _ := runCmd(t, "", "decode", odd); !strings.Contains(out, `subject: "Hello over EMSD"`) || !strings.Contains(out, "RESULT") {
		t.Errorf("heuristic on port 7641:\n%s", out)
	}
	if code, out, errOut := runCmd(t, "", "decode", odd, "--no-heuristic"); code != exitOK || out != "" || !strings.Contains(errOut, "try --port") {
		t.Errorf("--no-heuristic: exit %d, out %q, err %q", code, out, errOut)
	}
	if _, out, _ := runCmd(t, "", "decode", "--no-heuristic", "--port", "7641", odd); strings.Count("\n"+out, "\n#") != 3 {
		t.Errorf("--port 7641:\n%s", out)
	}

	// One datagram in hex; the password is masked.
	_, out, _ = runCmd(t, "", "decode", "--hex", "50:07:21:00:30:16:a0:11:a0:0f:30:05:04:03:19:80:36:80:06:73:65:63:72:65:74:02:01:20")
	if !strings.Contains(out, "credentials: device 198.036, password ********") || strings.Contains(out, "secret") {
		t.Errorf("--hex with a password:\n%s", out)
	}

	for _, c := range []struct {
		args []string
		code int
		err  string
	}{
		{[]string{"decode"}, exitUsage, "usage"},
		{[]string{"decode", "--hex", "zz"}, exitUsage, "--hex"},
		{[]string{"decode", "--hex", "00", seg}, exitUsage, "exclusive"},
		{[]string{"decode", "--port", "0", seg}, exitUsage, "bad port"},
		{[]string{"decode", filepath.Join(t.TempDir(), "none.pcap")}, exitFailed, "no such file"},
		{[]string{"decode", "decode_test.go"}, exitFailed, "not a pcap"},
	} {
		code, _, errOut := runCmd(t, "", c.args...)
		if code != c.code || !strings.Contains(errOut, c.err) {
			t.Errorf("%v: exit %d, stderr %q; want %d and %q", c.args, code, errOut, c.code, c.err)
		}
	}
}

func TestVersionCommand(t *testing.T) {
	code, out, _ := runCmd(t, "", "--version")
	if code != exitOK || !strings.HasPrefix(out, "emsdp ") || !strings.Contains(out, "go1.") {
		t.Errorf("--version: exit %d, %q", code, out)
	}
	code, out, _ = runCmd(t, "", "version")
	for _, want := range []string{"module:   github.com/esro-emsdp/emsdp\n", "revision: ", "date:     ", "go:       go1.", "platform: "} {
		if code != exitOK || !strings.Contains(out, want) {
			t.Errorf("version: exit %d, lacks %q:\n%s", code, want, out)
		}
	}
	code, out, _ = runCmd(t, "", "version", "--json")
	var v struct{ Module, Version, Revision, Go string }
	if err := json.Unmarshal([]byte(out), &v); code != exitOK || err != nil || v.Module != "github.com/esro-emsdp/emsdp" || v.Version == "" || v.Go == "" {
		t.Errorf("version --json: exit %d, %q (%v)", code, out, err)
	}
	if code, _, _ := runCmd(t, "", "version", "extra"); code != exitUsage {
		t.Errorf("version extra: exit %d", code)
	}
}

// --trace logs every PDU, decoded, passwords masked: esro invoke and ua send.
func TestTraceFlag(t *testing.T) {
	timers := strings.Fields(fast)
	a3, _ := startPerformer(t, append([]string{"--sap", "13", "--reply", "echo"}, timers...)...)
	env, out, errb := testEnv()
	code := run(t.Context(), env, append([]string{"esro", "invoke", "--to", a3, "--sap", "13", "--op", "2", "--enc", "2", "--data", "date", "--trace"}, timers...))
	if code != exitOK || !strings.Contains(out.String(), "result") {
		t.Fatalf("esro invoke --trace: exit %d, %q", code, errb.String())
	}
	for _, want := range []string{
		"level=TRACE msg=pdu dir=out peer=" + a3 + ` pdu="INVOKE sap=13 ref=`,
		"level=TRACE msg=pdu dir=in peer=" + a3 + ` pdu="RESULT ref=`,
		"level=TRACE msg=pdu dir=out peer=" + a3 + ` pdu="ACK ref=`,
	} {
		if !strings.Contains(errb.String(), want) {
			t.Errorf("esro invoke --trace stderr lacks %q:\n%s", want, errb.String())
		}
	}

	uaNoLeaks(t)
	m := uaMTS(t)
	code, _, errs := uaRun(t, "", "send", "--server", m.Addr().String(), "--address", "198.036", "--password", "pw",
		"--to", "bob@example.com", "--subject", "Traced", "--trace")
	if code != exitOK {
		t.Fatalf("ua send --trace: exit %d, %s", code, errs)
	}
	for _, want := range []string{"dir=out", "EMSD submission SubmitArgument (1.1)", "password ********", `subject: \"Traced\"`, "dir=in", "SubmitResult"} {
		if !strings.Contains(errs, want) {
			t.Errorf("ua send --trace stderr lacks %q:\n%s", want, errs)
		}
	}
	if strings.Contains(errs, "password pw") || strings.Contains(errs, `"pw"`) {
		t.Error("the password is in the trace")
	}
}
