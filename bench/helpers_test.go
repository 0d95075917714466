package main

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
	"time"
)

func TestUDPWire(t *testing.T) {
	for _, tc := range []struct {
		sizes           []int
		packets, octets int
		desc            string
	}{
		{nil, 0, 0, "nothing"},
		{[]int{2}, 1, 30, "an ACK"},
		{[]int{1472}, 1, 1500, "largest unfragmented payload"},
		{[]int{1473}, 2, 1521, "one octet more: two fragments"},
		{[]int{1503}, 2, 1551, "a full ESRO PDU of 1500 user octets"},
		{[]int{2952}, 2, 3000, "two full fragments"},
		{[]int{2953}, 3, 3021, "three fragments"},
		{[]int{300, 2, 1503}, 4, 300 + 28 + 2 + 28 + 1551, "several datagrams"},
	} {
		p, o := udpWire(tc.sizes)
		if p != tc.packets || o != tc.octets {
			t.Errorf("%s: udpWire(%v) = %d packets %d octets, want %d %d", tc.desc, tc.sizes, p, o, tc.packets, tc.octets)
		}
	}
}

func TestParseSNMP(t *testing.T) {
	const snmp = "Ip: Forwarding DefaultTTL\nIp: 2 64\n" +
		"Tcp: RtoAlgorithm RtoMin OutSegs RetransSegs\nTcp: 1 200 104693 20\n" +
		"Udp: InDatagrams OutSegs\nUdp: 5 7\n"
	for _, tc := range []struct {
		in, proto, name string
		want            uint64
		ok              bool
	}{
		{snmp, "Tcp", "OutSegs", 104693, true},
		{snmp, "Tcp", "RetransSegs", 20, true},
		{snmp, "Udp", "OutSegs", 7, true},
		{snmp, "Tcp", "InSegs", 0, false},
		{snmp, "Icmp", "OutMsgs", 0, false},
		{"Tcp: OutSegs\nTcp: x\n", "Tcp", "OutSegs", 0, false},
		{"Tcp: OutSegs\n", "Tcp", "OutSegs", 0, false},
		{"", "Tcp", "OutSegs", 0, false},
	} {
		got, err := parseSNMP([]byte(tc.in), tc.proto, tc.name)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("parseSNMP(%s %s) = %d, %v; want %d (ok %v)", tc.proto, tc.name, got, err, tc.want, tc.ok)
		}
	}
}

func TestTextBody(t *testing.T) {
	for _, n := range []int{1, 2, 69, 70, 71, 200, 5000} {
		b := textBody(n)
		if len(b) != n {
			t.Fatalf("textBody(%d): %d octets", n, len(b))
		}
		if b[n-1] != '\n' {
			t.Errorf("textBody(%d) does not end in a line end", n)
		}
		for i, line := range bytes.Split(b[:n-1], []byte("\n")) {
			if len(line) > 69 {
				t.Errorf("textBody(%d) line %d: %d characters", n, i, len(line))
			}
		}
	}
}

func TestFormatMetric(t *testing.T) {
	for _, tc := range []struct {
		v    float64
		want string
	}{
		{0, "0"}, {3, "3"}, {30, "30"}, {12345, "12345"}, {-2, "-2"},
		{0.1234, "0.123"}, {2.5, "2.5"}, {12.34, "12.3"}, {123.4, "123"},
	} {
		if got := formatMetric(tc.v); got != tc.want {
			t.Errorf("formatMetric(%v) = %q, want %q", tc.v, got, tc.want)
		}
	}
}

func TestPrintTable(t *testing.T) {
	a := newResult("s", "first", "size", "64 B")
	a.set("ops/s", 1000, "1/s")
	a.set("p50", 0.25, "ms")
	b := newResult("s", "second", "size", "64 B", "mode", "x")
	b.set("ops/s", 500, "1/s")
	b.set("extra", 7, "")
	var w strings.Builder
	printTable(&w, []Result{a, b})
	want := "| run | size | mode | ops/s (1/s) | p50 (ms) | extra |\n" +
		"| --- | --- | --- | --- | --- | --- |\n" +
		"| first | 64 B |  | 1000 | 0.25 |  |\n" +
		"| second | 64 B | x | 500 |  | 7 |\n"
	if w.String() != want {
		t.Errorf("got\n%s\nwant\n%s", w.String(), want)
	}
}

func TestRunUsage(t *testing.T) {
	for _, args := range [][]string{{"-sections", "nosuch"}, {"extra"}, {"-duration", "x"}} {
		var out, errb strings.Builder
		if code := run(t.Context(), args, &out, &errb); code != 2 {
			t.Errorf("run(%q) = %d, want 2 (stderr %q)", args, code, errb.String())
		}
	}
}

// The mail section against the real server, device client and go-smtp:
// the counts that follow from the protocols must come out.
func TestMailSection(t *testing.T) {
	o := &benchOptions{quick: true, log: slog.New(slog.DiscardHandler), srvLog: slog.New(slog.DiscardHandler)}
	rep, err := runMail(t.Context(), o)
	if err != nil {
		t.Fatal(err)
	}
	_, segErr := tcpOutSegs()
	rows := map[string]Result{}
	for _, r := range rep.results() {
		rows[r.Name+" "+r.Conditions["body"]] = r
	}
	for _, tc := range []struct {
		row       string
		datagrams float64
	}{
		// One segment each way and the ACK (docs/protocol.md EMSD §8, docs/protocol.md ESRO §5).
		{"EMSD submit (ESRO 3-way) 200 B", 3},
		{"EMSD deliver, complete (ESRO 3-way) 200 B", 3},
		{"EMSD deliver, efficient (ESRO 2-way) 200 B", 2},
		// 5000 octets of body: four segments of at most 1500 octets.
		{"EMSD submit (ESRO 3-way) 5000 B", 12},
		{"EMSD deliver, efficient (ESRO 2-way) 5000 B", 8},
	} {
		r, ok := rows[tc.row]
		if !ok {
			t.Fatalf("no row %q in %v", tc.row, rows)
		}
		if got := r.Metrics["datagrams/segments"]; got != tc.datagrams {
			t.Errorf("%s: %v datagrams, want %v", tc.row, got, tc.datagrams)
		}
		if segErr == nil && r.Metrics["wire vs SMTP"] >= 1 {
			t.Errorf("%s: %v of SMTP's octets", tc.row, r.Metrics["wire vs SMTP"])
		}
	}
	for _, row := range []string{"SMTP submission, AUTH PLAIN 200 B", "SMTP relay MTA to MTA, no AUTH 200 B"} {
		r := rows[row]
		if r.Metrics["payload"] < 300 {
			t.Errorf("%s: payload %v octets, less than the message", row, r.Metrics["payload"])
		}
		// Handshake, greeting, one segment per command and reply, teardown.
		if segErr == nil && r.Metrics["datagrams/segments"] < 15 {
			t.Errorf("%s: %v segments", row, r.Metrics["datagrams/segments"])
		}
	}
}

// The server section runs against the real server and leaves nothing
// behind (TestMain checks goroutines); its memory figures are plausible
// for what an invocation holds: more than its argument, less than a
// goroutine stack's worth of heap.
func TestServerSection(t *testing.T) {
	o := &benchOptions{quick: true, duration: 200 * time.Millisecond, log: slog.New(slog.DiscardHandler), srvLog: slog.New(slog.DiscardHandler)}
	rep, err := runServer(t.Context(), o)
	if err != nil {
		t.Fatal(err)
	}
	var thr, mem int
	for _, r := range rep.results() {
		if v, ok := r.Metrics["submissions/s"]; ok {
			thr++
			if v <= 0 {
				t.Errorf("%s %v: %v submissions/s", r.Name, r.Conditions, v)
			}
		}
		if v, ok := r.Metrics["heap per invocation"]; ok {
			mem++
			if v < 200 || v > 16<<10 {
				t.Errorf("%s: %v octets of heap per invocation", r.Name, v)
			}
		}
	}
	if thr != 3 || mem != 2 {
		t.Errorf("%d throughput rows, %d memory rows", thr, mem)
	}
}

// The linger section on a tenth of the shipped timers (T_retx 300 ms, RT
// 100 ms): on a clean link `ua send` stays one retransmission interval and
// the grace (2·RT), every submission is confirmed, and --no-linger leaves
// at once.
func TestLingerSection(t *testing.T) {
	o := &benchOptions{quick: true, log: slog.New(slog.DiscardHandler), srvLog: slog.New(slog.DiscardHandler)}
	for _, noLinger := range []bool{false, true} {
		r, err := lingerRun(t.Context(), o, lossTimers, 5, 0, noLinger)
		if err != nil {
			t.Fatal(err)
		}
		m := r.Metrics
		if m["submitted"] != 5 || m["unconfirmed"] != 0 {
			t.Errorf("%s: %v submitted, %v unconfirmed", r.Name, m["submitted"], m["unconfirmed"])
		}
		// 300 ms + 200 ms after the RESULT; generous for a loaded machine.
		if stay := m["p50"]; noLinger && stay >= 0.5 || !noLinger && (stay < 0.5 || stay > 3) {
			t.Errorf("%s: p50 %v s", r.Name, stay)
		}
	}
}
