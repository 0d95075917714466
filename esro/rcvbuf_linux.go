package esro

import (
	"fmt"
	"net"

	"golang.org/x/sys/unix"
)

// SetReceiveBuffer sizes conn's kernel receive buffer to n octets, so that
// a burst of datagrams waits there rather than being dropped, and returns
// the size the kernel granted. The usual way (SO_RCVBUF) is capped by
// net.core.rmem_max; with CAP_NET_ADMIN the cap is passed
// (SO_RCVBUFFORCE). A granted size below n is not an error: the caller
// reports it.
func SetReceiveBuffer(conn *net.UDPConn, n int) (int, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return 0, err
	}
	var got int
	var serr error
	cerr := rc.Control(func(fd uintptr) {
		unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, n)
		if got, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF); serr != nil {
			return
		}
		// The kernel doubles what it is given, for its bookkeeping.
		if got/2 < n {
			unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, n)
			got, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF)
		}
	})
	if cerr != nil {
		return 0, cerr
	}
	if serr != nil {
		return 0, fmt.Errorf("esro: receive buffer: %w", serr)
	}
	return got / 2, nil
}
