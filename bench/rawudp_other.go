//go:build !linux

package main

import (
	"net"
	"net/netip"
	"sync/atomic"
)

// rawSock is the raw-UDP baseline's socket: net.UDPConn's own methods,
// counted as one system call each (the reads that find nothing waiting
// are not seen here).
type rawSock struct {
	conn  *net.UDPConn
	calls *atomic.Uint64
}

func newRawSock(conn *net.UDPConn, calls *atomic.Uint64) (*rawSock, error) {
	return &rawSock{conn: conn, calls: calls}, nil
}

func (s *rawSock) read(buf []byte) (int, netip.AddrPort, error) {
	s.calls.Add(1)
	return s.conn.ReadFromUDPAddrPort(buf)
}

func (s *rawSock) write(b []byte, to netip.AddrPort) error {
	s.calls.Add(1)
	_, err := s.conn.WriteToUDPAddrPort(b, to)
	return err
}
