package ports

import (
	"bytes"
	"context"
	"fmt"
)

// nativeSockets lists the sockets on ports with sockstat(1) of the base
// system; processes are read natively (sysctl kern.proc).
func nativeSockets(ctx context.Context, ports []int) ([]Socket, []string, error) {
	out, err := runTool(ctx, "sockstat", "-46", "-P", "tcp,udp", "-p", portList(ports))
	if err != nil {
		socks, limits, berr := bindTest(ctx, ports)
		return socks, append(limits, fmt.Sprintf("sockstat failed (%v): fell back to the bind test", err)), berr
	}
	ns, err := parseSockstat(bytes.NewReader(out), wantPorts(ports))
	if err != nil {
		return nil, nil, fmt.Errorf("ports: %w", err)
	}
	socks, limits := withProcesses(ctx, ns)
	limits = append(limits, "sockets of jails and of other users' processes may be hidden unless run as root (security.bsd.see_other_uids)")
	return socks, limits, nil
}
