package ports

import (
	"bufio"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"
)

// This file turns what the operating systems without /proc report about
// their sockets into Sockets. The parsers are plain functions of text or
// values so that every platform's are tested everywhere, with recorded
// samples; the files local_darwin.go, local_freebsd.go and
// local_windows.go only fetch the input.

// nativeSocket is one socket with the pid holding it (0: unknown).
type nativeSocket struct {
	Socket
	pid int
}

// parseLsof reads `lsof -nP -F pcuLftPnT` output (macOS): p, c, u and L
// start a process; f starts a file, whose t (IPv4/IPv6), P (TCP/UDP), n
// (local[->remote]) and T (TST=state) follow. Sockets whose local port is
// not in want are skipped.
func parseLsof(r io.Reader, want map[int]bool) ([]nativeSocket, error) {
	var out []nativeSocket
	var pid, uid int
	var user string
	var cur *nativeSocket
	var proto string // "tcp" or "udp" of the current file
	var v6 bool
	flush := func() {
		if cur != nil && proto != "" && cur.Local != "" && want[portOf(cur.Local)] {
			cur.Family = proto
			if v6 {
				cur.Family += "6"
				cur.Local = wildcard6(cur.Local)
			}
			cur.Listening = cur.State == "LISTEN" || proto == "udp"
			out = append(out, *cur)
		}
		cur, proto, v6 = nil, "", false
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			continue
		}
		v := line[1:]
		switch line[0] {
		case 'p':
			flush()
			n, err := strconv.Atoi(v)
			if err != nil {
				return nil, fmt.Errorf("lsof: bad pid line %q", line)
			}
			pid, uid, user = n, -1, ""
		case 'u':
			if n, err := strconv.Atoi(v); err == nil {
				uid = n
			}
		case 'L':
			user = v
		case 'f':
			flush()
			cur = &nativeSocket{Socket: Socket{UID: uid, User: user}, pid: pid}
		case 't':
			v6 = v == "IPv6"
		case 'P':
			if p := strings.ToLower(v); p == "tcp" || p == "udp" {
				proto = p
			}
		case 'n':
			if cur != nil {
				local, remote, _ := strings.Cut(v, "->")
				cur.Local = nativeAddr(local)
				if remote != "" {
					cur.Remote = nativeAddr(remote)
				}
			}
		case 'T':
			if st, ok := strings.CutPrefix(v, "ST="); ok && cur != nil {
				cur.State = ssState(st)
			}
		}
	}
	flush()
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("lsof: %w", err)
	}
	for i := range out {
		s := &out[i]
		if s.State == "" {
			s.State = "UNCONN"
			if s.Remote != "" {
				s.State = "ESTAB"
			}
		}
	}
	return out, nil
}

// nativeAddr turns the "*:641", "127.0.0.1:641" and "[::1]:641" of lsof
// and sockstat into the "ip:port" form of the procfs view
// ("0.0.0.0:641", "[::]:641").
func nativeAddr(s string) string {
	host, port, ok := cutHostPort(s)
	if !ok {
		return s
	}
	if host == "*" {
		host = "0.0.0.0"
	}
	return joinAddr(host, port)
}

// ssState names a TCP state as the procfs view does (ss(8)'s names):
// ESTABLISHED is ESTAB, SYN_SENT is SYN-SENT, CLOSED is CLOSE.
func ssState(s string) string {
	switch s = strings.ToUpper(strings.ReplaceAll(s, "_", "-")); s {
	case "ESTABLISHED":
		return "ESTAB"
	case "CLOSED":
		return "CLOSE"
	case "SYN-RECEIVED":
		return "SYN-RECV"
	}
	return s
}

// wildcard6 writes the wildcard address of an IPv6 socket as "[::]".
func wildcard6(addr string) string {
	if port, ok := strings.CutPrefix(addr, "0.0.0.0:"); ok {
		return "[::]:" + port
	}
	return addr
}

func cutHostPort(s string) (host, port string, ok bool) {
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return "", "", false
	}
	return strings.Trim(s[:i], "[]"), s[i+1:], true
}

func joinAddr(host, port string) string {
	if a, err := netip.ParseAddr(host); err == nil {
		p, _ := strconv.Atoi(port)
		return netip.AddrPortFrom(a, uint16(p)).String()
	}
	return host + ":" + port
}

// parseSockstat reads `sockstat -46 -P tcp,udp` output (FreeBSD): a header
// line, then USER COMMAND PID FD PROTO LOCAL FOREIGN per socket; unknown
// owners show "?". TCP sockets with a foreign "*:*" are listening.
func parseSockstat(r io.Reader, want map[int]bool) ([]nativeSocket, error) {
	var out []nativeSocket
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 || f[0] == "USER" {
			continue
		}
		if len(f) < 7 {
			return nil, fmt.Errorf("sockstat: short line %q", sc.Text())
		}
		proto := f[4] // tcp4, tcp6, udp4, udp6, tcp46, udp46
		if !strings.HasPrefix(proto, "tcp") && !strings.HasPrefix(proto, "udp") {
			continue
		}
		local, remote := nativeAddr(f[5]), nativeAddr(f[6])
		if !want[portOf(local)] {
			continue
		}
		fam := proto[:3]
		if strings.Contains(proto[3:], "6") {
			fam += "6"
		}
		if strings.HasSuffix(fam, "6") {
			local = wildcard6(local)
		}
		s := nativeSocket{Socket: Socket{Family: fam, Local: local, UID: -1}}
		if f[0] != "?" {
			s.User = f[0]
		}
		if pid, err := strconv.Atoi(f[2]); err == nil {
			s.pid = pid
		}
		switch {
		case fam[:3] == "udp":
			s.State, s.Listening = "UNCONN", true
			if f[6] != "*:*" {
				s.Remote, s.State = remote, "ESTAB"
			}
		case f[6] == "*:*":
			s.State, s.Listening = "LISTEN", true
		default:
			s.Remote, s.State = remote, "ESTAB"
		}
		if len(f) > 7 && fam[:3] == "tcp" {
			s.State = ssState(f[len(f)-1]) // with -s: the TCP state
			s.Listening = s.State == "LISTEN"
		}
		out = append(out, s)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("sockstat: %w", err)
	}
	return out, nil
}

// winConn is the part of a Windows socket-table row (GetExtendedTcpTable,
// GetExtendedUdpTable, as gopsutil returns it) that a Socket needs.
type winConn struct {
	IPv6, UDP     bool
	Local, Remote netip.AddrPort
	Status        string // "LISTEN", "ESTABLISHED", ..., "NONE" for UDP
	PID           int
}

// windowsSockets turns socket-table rows into Sockets.
func windowsSockets(rows []winConn, want map[int]bool) []nativeSocket {
	var out []nativeSocket
	for _, c := range rows {
		if !want[int(c.Local.Port())] {
			continue
		}
		fam := "tcp"
		if c.UDP {
			fam = "udp"
		}
		if c.IPv6 {
			fam += "6"
		}
		s := nativeSocket{Socket: Socket{Family: fam, Local: c.Local.String(), UID: -1, State: ssState(c.Status)}, pid: c.PID}
		if c.Remote.Port() != 0 {
			s.Remote = c.Remote.String()
		}
		if c.UDP {
			s.State, s.Listening = "UNCONN", true
		} else {
			s.Listening = c.Status == "LISTEN"
		}
		out = append(out, s)
	}
	return out
}
