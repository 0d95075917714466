package ports

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
)

// Inspector looks at the local machine. The zero value reads the real /proc
// and /etc/services.
type Inspector struct {
	// ProcRoot is the procfs mount; "" means /proc on Linux. Elsewhere, ""
	// selects the system's own socket table: lsof on macOS, sockstat on
	// FreeBSD, GetExtendedTcpTable/UdpTable on Windows, and a bind test
	// (which can only say whether a port is taken) on other systems.
	ProcRoot string
	// ServicesFile is the services(5) database; "" means /etc/services and
	// "-" means none.
	ServicesFile string

	procFS fs.FS // tests: a fake procfs
}

// LocalReport is what Local found.
type LocalReport struct {
	OS    string      `json:"os"`
	Ports []LocalPort `json:"ports"`
	// Limitations says what could not be known (permissions, platform,
	// namespaces), so that "nothing listening" is never overstated.
	Limitations []string `json:"limitations,omitempty"`
}

// LocalPort is one port and protocol.
type LocalPort struct {
	Port       int            `json:"port"`
	Proto      string         `json:"proto"` // "tcp" or "udp"
	Registered []Registration `json:"registered,omitempty"`
	Sockets    []Socket       `json:"sockets,omitempty"`
	Verdict    string         `json:"verdict"`
}

// Socket is one kernel socket whose local port is the port looked at.
type Socket struct {
	Family    string    `json:"family"` // "tcp", "tcp6", "udp", "udp6"
	Local     string    `json:"local"`
	Remote    string    `json:"remote,omitempty"`
	State     string    `json:"state"`
	UID       int       `json:"uid"`
	User      string    `json:"user,omitempty"`
	Inode     uint64    `json:"inode,omitempty"`
	Processes []Process `json:"processes,omitempty"`
	// Owner explains an empty Processes (permission, namespace, kernel).
	Owner string `json:"owner,omitempty"`
	// Listening is true for a TCP socket in LISTEN and for every UDP
	// socket: what serves the port, as opposed to a connection using it.
	Listening bool `json:"listening"`
}

// Process is a process holding a socket. Fields it was not allowed to read
// are empty and Err says why.
type Process struct {
	PID     int      `json:"pid"`
	Name    string   `json:"name"` // /proc/PID/comm
	Exe     string   `json:"exe,omitempty"`
	Cmdline []string `json:"cmdline,omitempty"`
	Err     string   `json:"error,omitempty"`
}

// Local reports every TCP and UDP socket bound to the given ports on this
// machine with the processes that hold them.
func Local(ctx context.Context, ports []int) (*LocalReport, error) {
	return (&Inspector{}).Local(ctx, ports)
}

// Local is the package-level Local with this Inspector's settings.
func (in *Inspector) Local(ctx context.Context, ports []int) (*LocalReport, error) {
	if err := checkPorts(ports); err != nil {
		return nil, err
	}
	svcPath := in.ServicesFile
	switch svcPath {
	case "":
		svcPath = "/etc/services"
	case "-":
		svcPath = ""
	}
	services, err := readServices(svcPath)
	if err != nil {
		return nil, err
	}
	rep := &LocalReport{OS: runtime.GOOS}
	var socks []Socket
	switch {
	case in.procFS != nil:
		socks, rep.Limitations, err = procSockets(ctx, in.procFS, ports)
	case in.ProcRoot != "":
		socks, rep.Limitations, err = procSockets(ctx, os.DirFS(in.ProcRoot), ports)
	case runtime.GOOS == "linux":
		socks, rep.Limitations, err = procSockets(ctx, os.DirFS("/proc"), ports)
	default:
		socks, rep.Limitations, err = nativeSockets(ctx, ports)
	}
	if err != nil {
		return nil, err
	}
	for _, port := range ports {
		for _, proto := range []string{"tcp", "udp"} {
			lp := LocalPort{Port: port, Proto: proto, Registered: lookupRegistrations(port, proto, services)}
			for _, s := range socks {
				if strings.HasPrefix(s.Family, proto) && portOf(s.Local) == port {
					lp.Sockets = append(lp.Sockets, s)
				}
			}
			lp.Verdict = localVerdict(lp)
			rep.Ports = append(rep.Ports, lp)
		}
	}
	return rep, nil
}

func checkPorts(ports []int) error {
	if len(ports) == 0 {
		return errors.New("ports: no port given")
	}
	for _, p := range ports {
		if p <= 0 || p > 65535 {
			return fmt.Errorf("ports: port %d out of range 1..65535", p)
		}
	}
	return nil
}

func portOf(addr string) int {
	i := strings.LastIndexByte(addr, ':')
	p, _ := strconv.Atoi(addr[i+1:])
	return p
}

// procSockets reads procfs. Only the caller's network namespace is visible:
// sockets of containers with their own namespace are not listed.
func procSockets(ctx context.Context, fsys fs.FS, ports []int) ([]Socket, []string, error) {
	limits := []string{"only this network namespace is visible: sockets inside containers with their own network namespace are not listed"}
	want := map[int]bool{}
	for _, p := range ports {
		want[p] = true
	}
	var socks []Socket
	read := 0
	for _, fam := range []string{"tcp", "tcp6", "udp", "udp6"} {
		f, err := fsys.Open("net/" + fam)
		if errors.Is(err, fs.ErrNotExist) {
			continue // no IPv6 in this kernel
		}
		if err != nil {
			return nil, nil, fmt.Errorf("ports: %w", err)
		}
		entries, err := parseProcNet(f, binary.NativeEndian)
		f.Close()
		if err != nil {
			return nil, nil, fmt.Errorf("ports: %s: %w", fam, err)
		}
		read++
		// One socket is one inode. The kernel walks its table afresh on
		// every read of the file, so a table that changes between two
		// reads (a busy host opening and closing sockets) can list a
		// socket twice.
		seen := map[uint64]bool{}
		for _, e := range entries {
			if !want[int(e.Local.Port())] {
				continue
			}
			if e.Inode != 0 {
				if seen[e.Inode] {
					continue
				}
				seen[e.Inode] = true
			}
			s := Socket{Family: fam, Local: e.Local.String(), State: stateName(fam, e.State), UID: e.UID, Inode: e.Inode}
			if e.Remote.Port() != 0 {
				s.Remote = e.Remote.String()
			}
			s.Listening = e.State == tcpListen || strings.HasPrefix(fam, "udp")
			if u, err := user.LookupId(strconv.Itoa(e.UID)); err == nil {
				s.User = u.Username
			}
			socks = append(socks, s)
		}
	}
	if read == 0 {
		return nil, nil, errors.New("ports: no socket tables in procfs (net/tcp, net/udp)")
	}
	if len(socks) == 0 {
		return nil, limits, nil
	}
	owners, denied, err := socketOwners(ctx, fsys)
	if err != nil {
		return nil, nil, err
	}
	cache := map[int]Process{}
	for i := range socks {
		s := &socks[i]
		for _, pid := range owners[s.Inode] {
			p, ok := cache[pid]
			if !ok {
				p = readProcess(fsys, pid)
				cache[pid] = p
			}
			s.Processes = append(s.Processes, p)
		}
		switch {
		case len(s.Processes) > 0:
		case s.Inode == 0:
			s.Owner = "no owner (closing connection)"
		case denied > 0:
			s.Owner = fmt.Sprintf("not visible: %d processes could not be inspected (permission denied; run as root)", denied)
		default:
			s.Owner = "no visible process holds it (another PID namespace, or a kernel socket)"
		}
	}
	if denied > 0 {
		limits = append(limits, fmt.Sprintf("%d processes could not be inspected (permission denied); run as root to see every owner", denied))
	}
	return socks, limits, nil
}

// socketOwners maps socket inodes to the pids whose descriptors point at them
// ("socket:[INODE]" links under /proc/PID/fd). denied counts processes whose
// descriptors we may not read.
func socketOwners(ctx context.Context, fsys fs.FS) (map[uint64][]int, int, error) {
	dirs, err := fs.ReadDir(fsys, ".")
	if err != nil {
		return nil, 0, fmt.Errorf("ports: %w", err)
	}
	owners := map[uint64][]int{}
	denied := 0
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil || pid <= 0 {
			continue
		}
		if err := ctx.Err(); err != nil {
			return nil, 0, fmt.Errorf("ports: scanning processes: %w", err)
		}
		fdDir := d.Name() + "/fd"
		fds, err := fs.ReadDir(fsys, fdDir)
		if errors.Is(err, fs.ErrPermission) {
			denied++
			continue
		}
		if err != nil {
			continue // the process exited meanwhile
		}
		for _, fd := range fds {
			link, err := fs.ReadLink(fsys, fdDir+"/"+fd.Name())
			if err != nil {
				continue
			}
			ino, ok := strings.CutPrefix(link, "socket:[")
			if !ok {
				continue
			}
			n, err := strconv.ParseUint(strings.TrimSuffix(ino, "]"), 10, 64)
			if err == nil && !slices.Contains(owners[n], pid) {
				owners[n] = append(owners[n], pid)
			}
		}
	}
	for _, pids := range owners {
		slices.Sort(pids)
	}
	return owners, denied, nil
}

func readProcess(fsys fs.FS, pid int) Process {
	dir := strconv.Itoa(pid) + "/"
	p := Process{PID: pid}
	if b, err := fs.ReadFile(fsys, dir+"comm"); err == nil {
		p.Name = strings.TrimSpace(string(b))
	}
	var errs []string
	if exe, err := fs.ReadLink(fsys, dir+"exe"); err == nil {
		p.Exe = exe
	} else {
		errs = append(errs, "exe: "+errText(err))
	}
	if b, err := fs.ReadFile(fsys, dir+"cmdline"); err == nil {
		for a := range strings.SplitSeq(strings.TrimRight(string(b), "\x00"), "\x00") {
			if a != "" || len(p.Cmdline) > 0 {
				p.Cmdline = append(p.Cmdline, a)
			}
		}
	} else {
		errs = append(errs, "cmdline: "+errText(err))
	}
	p.Err = strings.Join(errs, "; ")
	return p
}

func errText(err error) string {
	if errors.Is(err, fs.ErrPermission) {
		return "permission denied"
	}
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	return err.Error()
}

// processLabel is how a verdict names a process: "emsdp serve (pid 123)".
func processLabel(p Process) string {
	name := p.Name
	if p.Exe != "" {
		name = filepath.Base(strings.TrimSuffix(p.Exe, " (deleted)"))
	} else if len(p.Cmdline) > 0 {
		name = filepath.Base(p.Cmdline[0])
	}
	if name == "emsdp" && len(p.Cmdline) > 1 && !strings.HasPrefix(p.Cmdline[1], "-") {
		name += " " + p.Cmdline[1]
	}
	if name == "" {
		name = "?"
	}
	return fmt.Sprintf("%s (pid %d)", name, p.PID)
}

// classifyProcess names the service a known program provides; "" if unknown.
func classifyProcess(p Process) string {
	base := p.Name
	if p.Exe != "" {
		base = filepath.Base(strings.TrimSuffix(p.Exe, " (deleted)"))
	}
	sub := ""
	if len(p.Cmdline) > 1 {
		sub = p.Cmdline[1]
	}
	switch {
	case base == "emsdp" && sub == "serve":
		return "EMSD server (ESRO-EMSDP)"
	case base == "emsdp" && (sub == "device" || sub == "ua"):
		return "EMSD device (ESRO-EMSDP user agent)"
	case base == "emsdp" && sub == "esro":
		return "ESRO engine (emsdp esro)"
	case base == "emsdp":
		return "emsdp"
	case strings.Contains(base, "emsd"):
		return "EMSD software (C reference or other)"
	case strings.Contains(base, "esros") || strings.HasPrefix(base, "erop"):
		return "ESRO engine (C reference)"
	case base == "cupsd" || base == "cups-browsed":
		return "CUPS print service"
	case base == "lpd" || base == "lpsched":
		return "line printer spooler"
	case base == "netinfod" || base == "nibindd":
		return "Mac OS X NetInfo (ONC-RPC)"
	case base == "rpcbind" || base == "portmap":
		return "ONC-RPC portmapper"
	case strings.HasPrefix(base, "rpc."):
		return "ONC-RPC service"
	case strings.Contains(base, "roughtime") || strings.Contains(base, "roughenough"):
		return "Roughtime server"
	}
	return ""
}

// localVerdict is the one-line answer for a port and protocol.
func localVerdict(lp LocalPort) string {
	head := fmt.Sprintf("%d/%s: ", lp.Port, lp.Proto)
	var live, other []Socket
	for _, s := range lp.Sockets {
		if s.Listening {
			live = append(live, s)
		} else {
			other = append(other, s)
		}
	}
	if len(live) == 0 {
		what := "nothing listening"
		if lp.Proto == "udp" {
			what = "nothing bound"
		}
		if len(other) > 0 {
			what += fmt.Sprintf(" (%d connection(s) use the port)", len(other))
		}
		return head + what
	}
	var parts []string
	seen := map[string]bool{}
	for _, s := range live {
		var part string
		if len(s.Processes) == 0 {
			switch {
			case s.UID < 0:
				part = "in use"
			case s.User != "":
				part = fmt.Sprintf("socket of %s (uid %d)", s.User, s.UID)
			default:
				part = fmt.Sprintf("socket of uid %d", s.UID)
			}
			part += ", owner " + s.Owner
		}
		for i, p := range s.Processes {
			if i > 0 {
				part += ", "
			}
			part += processLabel(p)
			if c := classifyProcess(p); c != "" && c != "emsdp" {
				part += " — " + c
			}
		}
		if !seen[part] {
			seen[part] = true
			parts = append(parts, part)
		}
	}
	slices.SortStableFunc(parts, func(a, b string) int { return cmp.Compare(a, b) })
	v := head + strings.Join(parts, "; ")
	if iana := ianaName(lp.Registered); iana != "" && !strings.Contains(v, "ESRO") && !strings.Contains(v, "EMSD") {
		v += "; registered to " + iana + " (IANA)"
	}
	return v
}

func ianaName(regs []Registration) string {
	for _, r := range regs {
		if r.Source == SourceIANA {
			return r.Name
		}
	}
	return ""
}
