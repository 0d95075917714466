package ports

import (
	"encoding/json"
	"net/netip"
	"os"
	"strings"
	"testing"
)

func openSample(t *testing.T, name string) *os.File {
	t.Helper()
	f, err := os.Open("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// sample is what the tests expect of one parsed socket.
type sample struct {
	fam, local, remote, state, user string
	listening                       bool
	pid                             int
}

func checkSockets(t *testing.T, got []nativeSocket, want []sample) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%d sockets, want %d: %+v", len(got), len(want), got)
	}
	for i, w := range want {
		g := got[i]
		if g.Family != w.fam || g.Local != w.local || g.Remote != w.remote || g.State != w.state || g.User != w.user ||
			g.Listening != w.listening || g.pid != w.pid {
			t.Errorf("socket %d = %+v (pid %d), want %+v", i, g.Socket, g.pid, w)
		}
	}
}

// macOS: a recorded `lsof -nP -w -F pcuLftPnT -iTCP:641 -iUDP:641`.
func TestParseLsof(t *testing.T) {
	got, err := parseLsof(openSample(t, "lsof-macos.txt"), map[int]bool{641: true})
	if err != nil {
		t.Fatal(err)
	}
	checkSockets(t, got, []sample{
		{"udp", "0.0.0.0:641", "", "UNCONN", "alice", true, 4242},
		{"udp6", "[::]:641", "", "UNCONN", "alice", true, 4242},
		{"tcp6", "[::1]:641", "", "LISTEN", "root", true, 812},
		{"tcp", "127.0.0.1:641", "127.0.0.1:60123", "ESTAB", "root", false, 812},
	})
	if got[0].UID != 501 || got[2].UID != 0 {
		t.Errorf("uids %d, %d", got[0].UID, got[2].UID)
	}
	for in, want := range map[string]string{"ESTABLISHED": "ESTAB", "SYN_SENT": "SYN-SENT", "TIME_WAIT": "TIME-WAIT", "CLOSED": "CLOSE", "LISTEN": "LISTEN"} {
		if got := ssState(in); got != want {
			t.Errorf("ssState(%q) = %q, want %q", in, got, want)
		}
	}
	if _, err := parseLsof(strings.NewReader("pxyz\n"), map[int]bool{641: true}); err == nil {
		t.Error("a bad pid line was accepted")
	}
}

// FreeBSD: a recorded `sockstat -46 -P tcp,udp -p 641,642`.
func TestParseSockstat(t *testing.T) {
	got, err := parseSockstat(openSample(t, "sockstat-freebsd.txt"), map[int]bool{641: true, 642: true})
	if err != nil {
		t.Fatal(err)
	}
	checkSockets(t, got, []sample{
		{"udp", "0.0.0.0:641", "", "UNCONN", "emsd", true, 1234},
		{"udp6", "[::]:641", "", "UNCONN", "emsd", true, 1234},
		{"tcp", "0.0.0.0:641", "", "LISTEN", "root", true, 901},
		{"udp", "0.0.0.0:642", "", "UNCONN", "", true, 0},
	})
	if _, err := parseSockstat(strings.NewReader("root emsdp 1\n"), map[int]bool{641: true}); err == nil {
		t.Error("a short line was accepted")
	}
}

// Windows: socket-table rows as GetExtendedTcpTable/UdpTable give them.
func TestWindowsSockets(t *testing.T) {
	ap := netip.MustParseAddrPort
	got := windowsSockets([]winConn{
		{UDP: true, Local: ap("0.0.0.0:641"), Status: "NONE", PID: 3120},
		{IPv6: true, UDP: true, Local: ap("[::]:641"), Status: "NONE", PID: 3120},
		{Local: ap("0.0.0.0:641"), Status: "LISTEN", PID: 4},
		{Local: ap("127.0.0.1:641"), Remote: ap("127.0.0.1:50123"), Status: "ESTABLISHED", PID: 4},
		{Local: ap("0.0.0.0:445"), Status: "LISTEN", PID: 4},
	}, map[int]bool{641: true})
	checkSockets(t, got, []sample{
		{"udp", "0.0.0.0:641", "", "UNCONN", "", true, 3120},
		{"udp6", "[::]:641", "", "UNCONN", "", true, 3120},
		{"tcp", "0.0.0.0:641", "", "LISTEN", "", true, 4},
		{"tcp", "127.0.0.1:641", "127.0.0.1:50123", "ESTAB", "", false, 4},
	})
}

// Whatever the system, the same sockets and processes give the same
// verdicts and the same JSON as the procfs view.
func TestNativeVerdicts(t *testing.T) {
	ns, err := parseSockstat(openSample(t, "sockstat-freebsd.txt"), map[int]bool{641: true})
	if err != nil {
		t.Fatal(err)
	}
	procs := map[int]Process{
		1234: {PID: 1234, Name: "emsdp", Exe: "/usr/local/bin/emsdp", Cmdline: []string{"/usr/local/bin/emsdp", "serve", "--config", "/usr/local/etc/emsdp.toml"}},
		901:  {PID: 901, Name: "lpd", Exe: "/usr/sbin/lpd", Cmdline: []string{"/usr/sbin/lpd"}},
	}
	lp := map[string]*LocalPort{"udp": {Port: 641, Proto: "udp"}, "tcp": {Port: 641, Proto: "tcp"}}
	for _, n := range ns {
		s := n.Socket
		s.Processes = []Process{procs[n.pid]}
		p := lp[s.Family[:3]]
		p.Sockets = append(p.Sockets, s)
	}
	for proto, want := range map[string]string{
		"udp": "641/udp: emsdp serve (pid 1234) — EMSD server (ESRO-EMSDP)",
		"tcp": "641/tcp: lpd (pid 901) — line printer spooler",
	} {
		if got := localVerdict(*lp[proto]); got != want {
			t.Errorf("%s verdict %q, want %q", proto, got, want)
		}
	}
	b, err := json.Marshal(lp["udp"].Sockets[0])
	if err != nil {
		t.Fatal(err)
	}
	want := `{"family":"udp","local":"0.0.0.0:641","state":"UNCONN","uid":-1,"user":"emsd","processes":[{"pid":1234,"name":"emsdp","exe":"/usr/local/bin/emsdp","cmdline":["/usr/local/bin/emsdp","serve","--config","/usr/local/etc/emsdp.toml"]}],"listening":true}`
	if string(b) != want {
		t.Errorf("JSON\n%s\nwant\n%s", b, want)
	}
}
