package main

import (
	"fmt"
	"syscall"
)

// clampMSS sets the socket's TCP MSS to what an Ethernet link announces,
// so that segments over loopback (MTU 64 KiB) are cut as they would be on
// a 1500-octet link. Set before connect or listen, it is also the MSS
// announced in the SYN; accepted sockets inherit it.
func clampMSS(_, _ string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, tcpMSS)
	}); err != nil {
		return fmt.Errorf("clamp MSS: %w", err)
	}
	if serr != nil {
		return fmt.Errorf("clamp MSS: %w", serr)
	}
	return nil
}
