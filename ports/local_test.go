package ports

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/esro-emsdp/emsdp/internal/testport"
)

// procAddr formats an address the way this machine's kernel would.
func procAddr(ap netip.AddrPort) string {
	raw := ap.Addr().AsSlice()
	out := make([]byte, len(raw))
	for i := 0; i < len(raw); i += 4 {
		binary.BigEndian.PutUint32(out[i:], binary.NativeEndian.Uint32(raw[i:]))
	}
	return fmt.Sprintf("%s:%04X", strings.ToUpper(hex.EncodeToString(out)), ap.Port())
}

func procRow(local, remote string, state uint8, uid int, inode uint64) string {
	return fmt.Sprintf("   0: %s %s %02X 00000000:00000000 00:00000000 00000000 %5d        0 %d 1 0000000000000000\n",
		procAddr(netip.MustParseAddrPort(local)), procAddr(netip.MustParseAddrPort(remote)), state, uid, inode)
}

const procHeader = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"

func link(target string) *fstest.MapFile {
	return &fstest.MapFile{Data: []byte(target), Mode: fs.ModeSymlink}
}

// fakeProc: emsdp serve on 641/udp, cupsd listening on 641/tcp with one
// connection, a 642/udp socket of an invisible process and a TIME-WAIT.
func fakeProc() fstest.MapFS {
	return fstest.MapFS{
		"net/tcp": {Data: []byte(procHeader +
			procRow("0.0.0.0:641", "0.0.0.0:0", tcpListen, 0, 7001) +
			procRow("10.0.0.1:641", "10.0.0.9:40000", 1, 0, 7002) +
			procRow("10.0.0.1:641", "10.0.0.9:40001", 6, 0, 0) +
			procRow("127.0.0.1:22", "0.0.0.0:0", tcpListen, 0, 7003))},
		"net/udp": {Data: []byte(procHeader +
			procRow("127.0.0.1:641", "0.0.0.0:0", udpUnconn, 0, 5001) +
			procRow("0.0.0.0:642", "0.0.0.0:0", udpUnconn, 4242, 5002))},
		"100/comm":    {Data: []byte("emsdp\n")},
		"100/exe":     link("/usr/local/bin/emsdp"),
		"100/cmdline": {Data: []byte("emsdp\x00serve\x00--listen\x00127.0.0.1:641\x00")},
		"100/fd/0":    link("/dev/null"),
		"100/fd/3":    link("socket:[5001]"),
		"200/comm":    {Data: []byte("cupsd\n")},
		"200/exe":     link("/usr/sbin/cupsd"),
		"200/cmdline": {Data: []byte("/usr/sbin/cupsd\x00-l\x00")},
		"200/fd/4":    link("socket:[7001]"),
		"200/fd/5":    link("socket:[7002]"),
		"201/comm":    {Data: []byte("cupsd\n")},
		"201/cmdline": {Data: []byte("/usr/sbin/cupsd\x00-l\x00")},
		"201/fd/4":    link("socket:[7001]"), // a forked child sharing the socket; exe unreadable
		"self":        link("100"),
	}
}

// denyFS refuses every path under one of its prefixes, as procfs does for
// other users' processes.
type denyFS struct {
	fs.FS
	deny []string
}

func (d denyFS) check(name string) error {
	for _, p := range d.deny {
		if strings.HasPrefix(name, p) {
			return &fs.PathError{Op: "open", Path: name, Err: fs.ErrPermission}
		}
	}
	return nil
}

func (d denyFS) Open(name string) (fs.File, error) {
	if err := d.check(name); err != nil {
		return nil, err
	}
	return d.FS.Open(name)
}

func (d denyFS) ReadLink(name string) (string, error) {
	if err := d.check(name); err != nil {
		return "", err
	}
	return fs.ReadLink(d.FS, name)
}

func (d denyFS) Lstat(name string) (fs.FileInfo, error) { return fs.Lstat(d.FS, name) }

func verdicts(r *LocalReport) map[string]string {
	m := map[string]string{}
	for _, p := range r.Ports {
		m[fmt.Sprintf("%d/%s", p.Port, p.Proto)] = p.Verdict
	}
	return m
}

func TestLocalFakeProc(t *testing.T) {
	tests := []struct {
		name string
		fsys fs.FS
		want map[string]string
		// wantLimit is a substring one of the limitations must contain.
		wantLimit string
	}{
		{"all visible", fakeProc(), map[string]string{
			"641/udp":  "641/udp: emsdp serve (pid 100) — EMSD server (ESRO-EMSDP)",
			"641/tcp":  "641/tcp: cupsd (pid 200) — CUPS print service, cupsd (pid 201) — CUPS print service; registered to repcmd (IANA)",
			"642/udp":  "642/udp: socket of uid 4242, owner no visible process holds it (another PID namespace, or a kernel socket); registered to esro-emsdp (IANA)",
			"642/tcp":  "642/tcp: nothing listening",
			"2002/udp": "2002/udp: nothing bound",
		}, "network namespace"},
		{"other users hidden", denyFS{fakeProc(), []string{"100/fd", "200/fd", "201/fd"}}, map[string]string{
			"641/udp": "641/udp: socket of uid 0, owner not visible: 3 processes could not be inspected (permission denied; run as root); registered to repcmd (IANA)",
			"641/tcp": "641/tcp: socket of uid 0, owner not visible: 3 processes could not be inspected (permission denied; run as root); registered to repcmd (IANA)",
		}, "3 processes could not be inspected"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := &Inspector{ServicesFile: "-", procFS: tt.fsys}
			rep, err := in.Local(context.Background(), []int{641, 642, 2002})
			if err != nil {
				t.Fatal(err)
			}
			got := verdicts(rep)
			for k, want := range tt.want {
				// uid 0 may have a name on this machine; compare without it.
				g := strings.ReplaceAll(got[k], "socket of root (uid 0)", "socket of uid 0")
				if g != want {
					t.Errorf("%s verdict\n got %q\nwant %q", k, g, want)
				}
			}
			if !strings.Contains(strings.Join(rep.Limitations, "\n"), tt.wantLimit) {
				t.Errorf("limitations %q lack %q", rep.Limitations, tt.wantLimit)
			}
		})
	}
}

// A table read while it changes (a busy host opening and closing
// sockets) can list a socket twice: one socket it is, not two.
func TestLocalSocketListedTwice(t *testing.T) {
	f := fakeProc()
	f["net/udp"] = &fstest.MapFile{Data: []byte(procHeader +
		procRow("127.0.0.1:641", "0.0.0.0:0", udpUnconn, 0, 5001) +
		procRow("0.0.0.0:642", "0.0.0.0:0", udpUnconn, 4242, 5002) +
		procRow("127.0.0.1:641", "0.0.0.0:0", udpUnconn, 0, 5001))}
	rep, err := (&Inspector{ServicesFile: "-", procFS: f}).Local(context.Background(), []int{641})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range rep.Ports {
		if p.Proto == "udp" && (len(p.Sockets) != 1 || len(p.Sockets[0].Processes) != 1) {
			t.Errorf("641/udp sockets = %+v, want the one socket of pid 100", p.Sockets)
		}
	}
}

func TestLocalFakeProcDetails(t *testing.T) {
	rep, err := (&Inspector{ServicesFile: "-", procFS: fakeProc()}).Local(context.Background(), []int{641})
	if err != nil {
		t.Fatal(err)
	}
	var tcp LocalPort
	for _, p := range rep.Ports {
		if p.Proto == "tcp" {
			tcp = p
		}
	}
	if len(tcp.Sockets) != 3 {
		t.Fatalf("641/tcp sockets = %+v, want listen, established and time-wait", tcp.Sockets)
	}
	states := []string{tcp.Sockets[0].State, tcp.Sockets[1].State, tcp.Sockets[2].State}
	if strings.Join(states, ",") != "LISTEN,ESTAB,TIME-WAIT" {
		t.Errorf("states = %v", states)
	}
	if tcp.Sockets[1].Remote != "10.0.0.9:40000" || tcp.Sockets[2].Owner != "no owner (closing connection)" {
		t.Errorf("sockets = %+v", tcp.Sockets)
	}
	p := tcp.Sockets[0].Processes
	if len(p) != 2 || p[0].Exe != "/usr/sbin/cupsd" || strings.Join(p[0].Cmdline, " ") != "/usr/sbin/cupsd -l" || p[1].Exe != "" || !strings.Contains(p[1].Err, "exe") {
		t.Errorf("processes = %+v", p)
	}
	var buf strings.Builder
	if err := rep.WriteText(&buf); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"registered  repcmd", "pid 200  /usr/sbin/cupsd  /usr/sbin/cupsd -l", "verdicts:\n  641/tcp: cupsd"} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("text output lacks %q:\n%s", want, buf.String())
		}
	}
}

func TestLocalErrors(t *testing.T) {
	ctx := context.Background()
	in := &Inspector{ServicesFile: "-", procFS: fstest.MapFS{}}
	for _, ports := range [][]int{nil, {0}, {65536}} {
		if _, err := in.Local(ctx, ports); err == nil {
			t.Errorf("Local(%v) succeeded", ports)
		}
	}
	if _, err := in.Local(ctx, []int{641}); err == nil {
		t.Error("Local on a procfs without socket tables succeeded")
	}
	bad := fstest.MapFS{"net/udp": {Data: []byte(procHeader + "   0: garbage\n")}}
	if _, err := (&Inspector{ServicesFile: "-", procFS: bad}).Local(ctx, []int{641}); err == nil {
		t.Error("Local on a malformed table succeeded")
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := (&Inspector{ServicesFile: "-", procFS: fakeProc()}).Local(cancelled, []int{641}); err == nil {
		t.Error("Local with a cancelled context succeeded")
	}
}

// The real thing: sockets this test binds must show up with this process.
func TestLocalReal(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("procfs only on Linux")
	}
	// One port on both protocols: a UDP port of the kernel's choosing,
	// and another one if its TCP twin is taken.
	var port int
	for try := 0; port == 0; try++ {
		u, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer u.Close()
		p := u.LocalAddr().(*net.UDPAddr).Port
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			if try == 20 {
				t.Fatalf("no UDP port of 20 had its TCP twin free: %v", err)
			}
			continue
		}
		defer l.Close()
		port = p
	}
	free := testport.Quiet(t, "tcp", "udp") // nothing bound to it, on either protocol

	rep, err := Local(context.Background(), []int{port, free})
	if err != nil {
		t.Fatal(err)
	}
	exe, _ := os.Executable()
	for _, lp := range rep.Ports {
		if lp.Port == free {
			if len(lp.Sockets) != 0 || !strings.Contains(lp.Verdict, "nothing") {
				t.Errorf("free port %d/%s: %+v", free, lp.Proto, lp)
			}
			continue
		}
		if len(lp.Sockets) != 1 {
			t.Fatalf("%d/%s sockets = %+v", port, lp.Proto, lp.Sockets)
		}
		s := lp.Sockets[0]
		if s.Local != fmt.Sprintf("127.0.0.1:%d", port) || len(s.Processes) != 1 || s.Processes[0].PID != os.Getpid() || s.Processes[0].Exe != exe {
			t.Errorf("%d/%s socket = %+v, want this process %d %s", port, lp.Proto, s, os.Getpid(), exe)
		}
		want := fmt.Sprintf("%d/%s: ports.test (pid %d)", port, lp.Proto, os.Getpid())
		if lp.Verdict != want {
			t.Errorf("verdict %q, want %q", lp.Verdict, want)
		}
	}
}

func TestBindTest(t *testing.T) {
	u, err := net.ListenPacket("udp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	port := u.LocalAddr().(*net.UDPAddr).Port
	socks, limits, err := bindTest(context.Background(), []int{port})
	if err != nil {
		t.Fatal(err)
	}
	if len(limits) < 2 {
		t.Errorf("limitations = %q", limits)
	}
	found := false
	for _, s := range socks {
		if s.Family == "udp" && portOf(s.Local) == port {
			found = true
		}
	}
	if !found {
		t.Errorf("bind test missed the bound UDP port %d: %+v", port, socks)
	}
	v := localVerdict(LocalPort{Port: port, Proto: "udp", Sockets: socks[:1]})
	if !strings.Contains(v, "in use, owner unknown (bind test") {
		t.Errorf("verdict %q", v)
	}
}

func TestClassifyProcess(t *testing.T) {
	tests := []struct {
		p    Process
		want string
	}{
		{Process{Exe: "/usr/bin/emsdp", Cmdline: []string{"emsdp", "serve"}}, "EMSD server (ESRO-EMSDP)"},
		{Process{Exe: "/usr/bin/emsdp (deleted)", Cmdline: []string{"emsdp", "device"}}, "EMSD device (ESRO-EMSDP user agent)"},
		{Process{Name: "emsdp", Cmdline: []string{"emsdp", "esro", "perform"}}, "ESRO engine (emsdp esro)"},
		{Process{Exe: "/opt/neda/bin/emsd-mts"}, "EMSD software (C reference or other)"},
		{Process{Exe: "/opt/neda/bin/erop_sh"}, "ESRO engine (C reference)"},
		{Process{Name: "netinfod"}, "Mac OS X NetInfo (ONC-RPC)"},
		{Process{Exe: "/usr/sbin/rpcbind"}, "ONC-RPC portmapper"},
		{Process{Exe: "/usr/sbin/rpc.statd"}, "ONC-RPC service"},
		{Process{Exe: "/usr/bin/sshd"}, ""},
	}
	for _, tt := range tests {
		if got := classifyProcess(tt.p); got != tt.want {
			t.Errorf("classifyProcess(%+v) = %q, want %q", tt.p, got, tt.want)
		}
	}
	if got := processLabel(Process{PID: 7, Exe: "/usr/bin/emsdp", Cmdline: []string{"emsdp", "serve", "-c", "x"}}); got != "emsdp serve (pid 7)" {
		t.Errorf("processLabel = %q", got)
	}
}
