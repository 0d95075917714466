//go:build darwin || freebsd || windows

package ports

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"

	"github.com/shirou/gopsutil/v4/process"
)

// withProcesses completes sockets with their process: name, executable,
// command line and, where the socket table had none, the user, read
// natively through gopsutil (libproc and sysctl on macOS, sysctl
// kern.proc on FreeBSD, the process's PEB on Windows).
func withProcesses(ctx context.Context, ns []nativeSocket) ([]Socket, []string) {
	cache := map[int]Process{}
	var socks []Socket
	denied := 0
	for _, n := range ns {
		s := n.Socket
		if n.pid > 0 {
			p, ok := cache[n.pid]
			if !ok {
				p = nativeProcess(ctx, n.pid)
				cache[n.pid] = p
				if strings.Contains(p.Err, "permission denied") || strings.Contains(p.Err, "Access is denied") {
					denied++
				}
			}
			s.Processes = []Process{p}
			if s.User == "" {
				if pr, err := process.NewProcessWithContext(ctx, int32(n.pid)); err == nil {
					s.User, _ = pr.UsernameWithContext(ctx)
				}
			}
		} else {
			s.Owner = "no process found for it (a kernel socket, or not visible to this user)"
		}
		socks = append(socks, s)
	}
	var limits []string
	if denied > 0 {
		limits = append(limits, fmt.Sprintf("%d processes could not be inspected fully (permission denied); run as administrator to see every owner", denied))
	}
	return socks, limits
}

func nativeProcess(ctx context.Context, pid int) Process {
	p := Process{PID: pid}
	pr, err := process.NewProcessWithContext(ctx, int32(pid))
	if err != nil {
		p.Err = err.Error()
		return p
	}
	var errs []string
	if p.Name, err = pr.NameWithContext(ctx); err != nil {
		errs = append(errs, "name: "+err.Error())
	}
	if p.Exe, err = pr.ExeWithContext(ctx); err != nil {
		errs = append(errs, "exe: "+err.Error())
	}
	if p.Cmdline, err = pr.CmdlineSliceWithContext(ctx); err != nil {
		errs = append(errs, "cmdline: "+err.Error())
	}
	p.Err = strings.Join(errs, "; ")
	return p
}

func portList(ports []int) string {
	s := make([]string, len(ports))
	for i, p := range ports {
		s[i] = strconv.Itoa(p)
	}
	return strings.Join(s, ",")
}

func wantPorts(ports []int) map[int]bool {
	m := make(map[int]bool, len(ports))
	for _, p := range ports {
		m[p] = true
	}
	return m
}

// runTool runs a system tool; exit status 1 with no output is "nothing
// found" for lsof.
func runTool(ctx context.Context, name string, args ...string) ([]byte, error) {
	path, err := exec.LookPath(name)
	if err != nil {
		return nil, err
	}
	out, err := exec.CommandContext(ctx, path, args...).Output()
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ExitCode() == 1 && len(out) == 0 {
		return nil, nil
	}
	return out, err
}
