//go:build !linux

package esro

import "net"

// newBatchConn: batched datagram I/O is implemented for Linux only
// (recvmmsg, sendmmsg); elsewhere every endpoint reads and writes one
// datagram per system call.
func newBatchConn(net.PacketConn) batchIO { return nil }
