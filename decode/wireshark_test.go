package decode_test

import (
	"bytes"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/decode"
	"github.com/esro-emsdp/emsdp/internal/captures"
	"github.com/esro-emsdp/emsdp/internal/pcaprec"
)

// tsharkFields are the dissector's fields the test reads, in order.
var tsharkFields = []string{"frame.number", "esro.type", "esro.sap", "esro.ref", "esro.op", "esro.encoding",
	"esro.error", "esro.invoke_frame", "emsd.op", "emsd.pdu", "emsd.instance", "emsd.device", "emsd.password",
	"emsd.segment.sequence", "emsd.segment.total", "emsd.segment.number", "emsd.content_type", "emsd.message_id",
	"emsd.originator", "emsd.recipient", "emsd.subject", "emsd.body_length", "emsd.reassembled_length",
	"emsd.error", "emsd.status", "emsd.report.recipient", "emsd.report.outcome", "_ws.expert.message"}

// runTshark runs the real tshark with the dissector on a capture and
// returns one map of field values per frame.
func runTshark(t *testing.T, pcap string, extra ...string) []map[string]string {
	t.Helper()
	tshark, err := exec.LookPath("tshark")
	if err != nil {
		t.Fatal("tshark is not installed: install the Debian package tshark (./test.sh does); " +
			"without it the Wireshark dissector is not tested")
	}
	script, err := filepath.Abs("../contrib/wireshark/esro-emsd.lua")
	if err != nil {
		t.Fatal(err)
	}
	// Read it here so that go test's cache knows the result depends on it.
	if _, err := os.ReadFile(script); err != nil {
		t.Fatal(err)
	}
	args := []string{"-n", "-r", pcap, "-X", "lua_script:" + script, "-T", "fields", "-E", "separator=\t", "-E", "occurrence=a", "-E", "aggregator=,"}
	for _, f := range tsharkFields {
		args = append(args, "-e", f)
	}
	args = append(args, extra...)
	cmd := exec.Command(tshark, args...)
	// A private configuration directory: no user's preferences apply.
	cmd.Env = append(os.Environ(), "HOME="+t.TempDir(), "XDG_CONFIG_HOME="+t.TempDir())
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("tshark: %v\n%s", err, errb.String())
	}
	if s := errb.String(); strings.Contains(s, "Lua") || strings.Contains(s, "lua") {
		t.Fatalf("tshark reported a Lua problem:\n%s", s)
	}
	var rows []map[string]string
	for _, line := range strings.Split(strings.TrimRight(out.String(), "\n"), "\n") {
		if line == "" {
			continue
		}
		vals := strings.Split(line, "\t")
		row := make(map[string]string)
		for i, f := range tsharkFields {
			if i < len(vals) {
				row[f] = vals[i]
			}
		}
		rows = append(rows, row)
	}
	return rows
}

// The dissector, run by the real tshark on a capture of our own server and
// devices, shows what emsdp decode shows, frame by frame.
func TestWiresharkDissector(t *testing.T) {
	pcap := sessionCapture(t)
	rows := runTshark(t, pcap)
	recs := decodeFile(t, pcap)
	if len(rows) != len(recs) {
		t.Fatalf("tshark shows %d frames, decode %d", len(rows), len(recs))
	}
	types := map[string]string{"INVOKE": "0", "RESULT": "1", "ERROR": "2", "ACK": "3", "FAILURE": "4"}
	u := func(p *uint8) string {
		if p == nil {
			return ""
		}
		return strconv.Itoa(int(*p))
	}
	for i, r := range recs {
		row := rows[i]
		want := map[string]string{
			"frame.number": strconv.Itoa(r.Frame),
			"esro.type":    types[r.ESRO.Type],
			"esro.ref":     strconv.Itoa(int(r.ESRO.Ref)),
			"esro.sap":     u(r.ESRO.SAP),
			"esro.op":      u(r.ESRO.Operation),
			"esro.error":   u(r.ESRO.ErrorValue),
		}
		if r.ESRO.InvokeFrame > 0 {
			want["esro.invoke_frame"] = strconv.Itoa(r.ESRO.InvokeFrame)
		}
		if e := r.EMSD; e != nil {
			want["emsd.pdu"] = e.PDU
			want["emsd.instance"] = u(e.InstanceID)
			want["emsd.message_id"] = e.MessageID
			want["emsd.status"] = e.Status
			if e.Security != nil {
				want["emsd.device"], want["emsd.password"] = e.Security.Address, e.Security.Password
			}
			if s := e.Segment; s != nil {
				want["emsd.segment.sequence"] = strconv.Itoa(int(s.SequenceID))
				if s.First {
					want["emsd.segment.total"] = strconv.Itoa(int(s.Total))
				} else {
					want["emsd.segment.number"] = strconv.Itoa(int(s.Number))
				}
			}
			if e.Reassembly != nil && e.Reassembly.Complete {
				want["emsd.reassembled_length"] = strconv.Itoa(e.Reassembly.Length)
			}
			if b := e.Body; b != nil {
				want["emsd.originator"] = b.Originator
				var rcpts []string
				for _, x := range b.Recipients {
					rcpts = append(rcpts, strings.SplitN(x, " (", 2)[0])
				}
				want["emsd.recipient"] = strings.Join(rcpts, ",")
				if b.Subject != nil {
					want["emsd.subject"] = *b.Subject
				}
				if b.BodyLength != nil {
					want["emsd.body_length"] = strconv.Itoa(*b.BodyLength)
				}
			}
			if e.Error != nil {
				want["emsd.error"] = strconv.Itoa(int(e.Error.Code))
			}
		}
		for k, v := range want {
			if row[k] != v {
				t.Errorf("frame %d: tshark %s = %q, decode shows %q", r.Frame, k, row[k], v)
			}
		}
		retrans := strings.Contains(row["_ws.expert.message"], "Retransmission")
		if retrans != slices.Contains(r.Marks, "retransmission") {
			t.Errorf("frame %d: tshark expert %q, decode marks %v", r.Frame, row["_ws.expert.message"], r.Marks)
		}
	}
	// The display filters an operator would type, each showing the frames
	// decode's records say it should (how many retransmissions a run has
	// depends on the machine's load; the designed ones are at least 2).
	has := func(r *decode.Record, mark string) bool { return slices.Contains(r.Marks, mark) }
	count := func(match func(r *decode.Record) bool) int { return len(find(recs, match)) }
	subject := func(r *decode.Record, s string) bool {
		return r.EMSD != nil && r.EMSD.Body != nil && r.EMSD.Body.Subject != nil && *r.EMSD.Body.Subject == s
	}
	retransmitted := count(func(r *decode.Record) bool { return has(r, "retransmission") })
	if retransmitted < 2 {
		t.Errorf("%d retransmissions marked, want at least the 2 the session makes", retransmitted)
	}
	for filter, n := range map[string]int{
		"emsd.op == 33 && esro.type == 0 && !esro.invoke_frame": count(func(r *decode.Record) bool {
			return r.ESRO.Type == "INVOKE" && r.ESRO.Operation != nil && *r.ESRO.Operation == 33 && r.ESRO.InvokeFrame == 0
		}),
		"emsd.recipient == \"carol@example.com\"": count(func(r *decode.Record) bool {
			return r.EMSD != nil && r.EMSD.Body != nil && slices.ContainsFunc(r.EMSD.Body.Recipients,
				func(x string) bool { return strings.SplitN(x, " (", 2)[0] == "carol@example.com" })
		}),
		"emsd.subject == \"Short\"": count(func(r *decode.Record) bool { return subject(r, "Short") }),
		"emsd.error == 4":           1,
		"esro.retransmission":       retransmitted,
		"emsd.reassembled":          2,
	} {
		got := runTshark(t, pcap, "-Y", filter)
		if len(got) != n {
			t.Errorf("filter %q: %d frames, want %d", filter, len(got), n)
		}
	}
	// The ones without retransmissions, as designed: six first sends of
	// op 33 (short, four segments, refused) and one Short original.
	if n := count(func(r *decode.Record) bool {
		return r.ESRO.Type == "INVOKE" && r.ESRO.Operation != nil && *r.ESRO.Operation == 33 && r.ESRO.InvokeFrame == 0 && !has(r, "retransmission")
	}); n != 6 {
		t.Errorf("%d first op-33 INVOKEs, want 6", n)
	}
}

// Every reference datagram and a few malformed ones go through the
// dissector without a Lua error; malformed ones get expert info, and a
// conversation on an unregistered port is found by the heuristic.
func TestWiresharkMalformed(t *testing.T) {
	var buf bytes.Buffer
	rec, err := pcaprec.New(&buf)
	if err != nil {
		t.Fatal(err)
	}
	ts := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	a, b := netip.MustParseAddrPort("127.0.0.1:2003"), netip.MustParseAddrPort("127.0.0.1:641")
	for _, s := range captures.All() {
		for _, dg := range s.Datagrams {
			rec.Write(ts, refAddr(dg.From), refAddr(dg.To), dg.Payload)
		}
	}
	// (tshark does not hand empty UDP payloads to dissectors.)
	bad := [][]byte{{0x05, 0x01}, {0xd0, 0x01}, {0x01}, {0x50, 0x01, 0x21}, {0x50, 0x02, 0x21, 0x00, 0x30, 0x84, 0xff},
		{0x50, 0x03, 0x21, 0x00, 0x30, 0x03, 0xa0, 0x05, 0x00}, {0x50, 0x04, 0x23, 0x00, 0x31, 0x00}}
	for _, p := range bad {
		rec.Write(ts, a, b, p)
	}
	odd := netip.MustParseAddrPort("127.0.0.1:7641")
	for _, dg := range captures.Get("emsd-submit-1").Datagrams {
		from, to := a, odd
		if dg.From == "2002" {
			from, to = odd, a
		}
		rec.Write(ts, from, to, dg.Payload)
	}
	path := filepath.Join(t.TempDir(), "malformed.pcap")
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	rows := runTshark(t, path)
	n := 0
	for _, s := range captures.All() {
		n += len(s.Datagrams)
	}
	if len(rows) != n+len(bad)+3 {
		t.Fatalf("%d frames, want %d", len(rows), n+len(bad)+3)
	}
	for i := range bad {
		row := rows[n+i]
		if !strings.Contains(row["_ws.expert.message"], "Malformed") && !strings.Contains(row["_ws.expert.message"], "shorter") &&
			!strings.Contains(row["_ws.expert.message"], "Invalid") && !strings.Contains(row["_ws.expert.message"], "Empty") &&
			!strings.Contains(row["_ws.expert.message"], "offset") && !strings.Contains(row["_ws.expert.message"], "missing") &&
			!strings.Contains(row["_ws.expert.message"], "SEQUENCE") {
			t.Errorf("malformed % x: expert %q", bad[i], row["_ws.expert.message"])
		}
	}
	// Reports: what the dissector says of each recipient is what decode says.
	var outcomes []string
	dd := decode.New()
	for _, sec := range captures.All() {
		for _, dg := range sec.Datagrams {
			r := dd.Datagram(ts, refAddr(dg.From), refAddr(dg.To), dg.Payload)
			if r.EMSD != nil && r.EMSD.Body != nil {
				for _, o := range r.EMSD.Body.Outcomes {
					w := "delivered " + o.Delivered
					if o.Delivered == "" {
						w = "not delivered: " + o.Reason
						if o.Diagnostic != "" {
							w += " (" + o.Diagnostic + ")"
						}
					}
					outcomes = append(outcomes, w)
				}
			}
		}
	}
	var shown []string
	for _, row := range rows {
		if row["emsd.report.outcome"] != "" {
			shown = append(shown, strings.Split(row["emsd.report.outcome"], ",")...)
		}
	}
	if len(outcomes) == 0 || len(shown) != len(outcomes) {
		t.Errorf("report outcomes: tshark %q, decode %q", shown, outcomes)
	}
	for i := range min(len(shown), len(outcomes)) {
		if !strings.HasPrefix(shown[i], outcomes[i]) {
			t.Errorf("report outcome %d: tshark %q, decode %q", i, shown[i], outcomes[i])
		}
	}
	tail := rows[len(rows)-3:]
	if tail[0]["emsd.subject"] != "Hello over EMSD" || tail[1]["emsd.pdu"] != "SubmitResult" || tail[2]["esro.type"] != "3" {
		t.Errorf("heuristic on port 7641: %v", tail)
	}
	// Whole-tree output: no Lua error anywhere.
	tshark, _ := exec.LookPath("tshark")
	script, _ := filepath.Abs("../contrib/wireshark/esro-emsd.lua")
	out, err := exec.Command(tshark, "-n", "-r", path, "-X", "lua_script:"+script, "-V").CombinedOutput()
	if err != nil {
		t.Fatalf("tshark -V: %v", err)
	}
	if strings.Contains(string(out), "Lua Error") {
		i := strings.Index(string(out), "Lua Error")
		t.Errorf("Lua error in the tree: %s", string(out)[max(0, i-500):min(len(out), i+200)])
	}
}
