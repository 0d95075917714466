package ports

import (
	"bytes"
	"context"
	"fmt"
)

// nativeSockets lists the sockets on ports with lsof, which macOS ships in
// /usr/sbin, in its machine-readable -F form; processes are read natively.
func nativeSockets(ctx context.Context, ports []int) ([]Socket, []string, error) {
	list := portList(ports)
	out, err := runTool(ctx, "lsof", "-nP", "-w", "-F", "pcuLftPnT", "-iTCP:"+list, "-iUDP:"+list)
	if err != nil {
		socks, limits, berr := bindTest(ctx, ports)
		return socks, append(limits, fmt.Sprintf("lsof failed (%v): fell back to the bind test", err)), berr
	}
	ns, err := parseLsof(bytes.NewReader(out), wantPorts(ports))
	if err != nil {
		return nil, nil, fmt.Errorf("ports: %w", err)
	}
	socks, limits := withProcesses(ctx, ns)
	limits = append(limits, "the socket table comes from lsof: without sudo it lists only your own processes' sockets")
	return socks, limits, nil
}
