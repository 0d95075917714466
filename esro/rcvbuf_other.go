//go:build !linux

package esro

import "net"

// SetReceiveBuffer sizes conn's kernel receive buffer to n octets and
// returns n: this system does not say what it granted.
func SetReceiveBuffer(conn *net.UDPConn, n int) (int, error) {
	if err := conn.SetReadBuffer(n); err != nil {
		return 0, err
	}
	return n, nil
}
