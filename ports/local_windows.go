package ports

import (
	"context"
	"fmt"
	"net/netip"

	gnet "github.com/shirou/gopsutil/v4/net"
)

// nativeSockets reads the system's TCP and UDP tables with their owning
// process ids (GetExtendedTcpTable and GetExtendedUdpTable, through
// gopsutil); processes are read natively.
func nativeSockets(ctx context.Context, ports []int) ([]Socket, []string, error) {
	conns, err := gnet.ConnectionsWithContext(ctx, "inet")
	if err != nil {
		return nil, nil, fmt.Errorf("ports: socket tables: %w", err)
	}
	rows := make([]winConn, 0, len(conns))
	for _, c := range conns {
		rows = append(rows, winConnOf(c))
	}
	socks, limits := withProcesses(ctx, windowsSockets(rows, wantPorts(ports)))
	return socks, limits, nil
}

const (
	afInet6   = 23 // AF_INET6 on Windows
	sockDgram = 2
)

func winConnOf(c gnet.ConnectionStat) winConn {
	addr := func(a gnet.Addr) netip.AddrPort {
		ip, _ := netip.ParseAddr(a.IP)
		return netip.AddrPortFrom(ip, uint16(a.Port))
	}
	return winConn{IPv6: c.Family == afInet6, UDP: c.Type == sockDgram, Local: addr(c.Laddr), Remote: addr(c.Raddr),
		Status: c.Status, PID: int(c.Pid)}
}
