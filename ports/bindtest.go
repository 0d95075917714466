package ports

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime"
	"strconv"
	"syscall"
)

// bindTest is the fallback where neither procfs nor a native socket table
// is known (systems other than Linux, macOS, FreeBSD and Windows, or when
// their tool failed): it tries to bind each port on the wildcard address
// and releases it at once. It can tell "free" from "taken" but never who
// holds a port.
func bindTest(ctx context.Context, ports []int) ([]Socket, []string, error) {
	limits := []string{
		fmt.Sprintf("no socket table is known on %s: process id, executable and command line cannot be known here; try `lsof -nP -i :PORT` or `netstat`", runtime.GOOS),
		"taken ports were found by a bind test (bind, then release at once); it cannot see sockets bound with address-reuse options or to one specific address",
	}
	var lc net.ListenConfig
	var socks []Socket
	for _, port := range ports {
		addr := net.JoinHostPort("", strconv.Itoa(port))
		for _, proto := range []string{"tcp", "udp"} {
			var err error
			if proto == "tcp" {
				var l net.Listener
				if l, err = lc.Listen(ctx, "tcp", addr); err == nil {
					l.Close()
				}
			} else {
				var c net.PacketConn
				if c, err = lc.ListenPacket(ctx, "udp", addr); err == nil {
					c.Close()
				}
			}
			switch {
			case err == nil:
			case errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM):
				limits = append(limits, fmt.Sprintf("%d/%s: not allowed to bind, so the bind test cannot tell (run as administrator)", port, proto))
			default:
				socks = append(socks, Socket{Family: proto, Local: addr, State: "in use", UID: -1, Owner: "unknown (bind test: " + err.Error() + ")", Listening: true})
			}
		}
	}
	return socks, limits, nil
}
