package main

import (
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// rawSock is the raw-UDP baseline's socket: one recvfrom or sendto per
// datagram through Go's poller, exactly what net.UDPConn does, but
// counting every system call (including reads that find nothing and park),
// so that the baseline's syscalls/op compare with ESRO's. IPv4 only.
type rawSock struct {
	conn  *net.UDPConn
	rc    syscall.RawConn
	calls *atomic.Uint64

	// read side: one reader goroutine per socket
	rbuf  []byte
	rn    int
	rname unix.RawSockaddrInet4
	rerr  syscall.Errno
	rfn   func(fd uintptr) bool

	writers sync.Pool // of *rawWrite
}

type rawWrite struct {
	s    *rawSock
	b    []byte
	name unix.RawSockaddrInet4
	err  syscall.Errno
	fn   func(fd uintptr) bool
}

func newRawSock(conn *net.UDPConn, calls *atomic.Uint64) (*rawSock, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return nil, err
	}
	s := &rawSock{conn: conn, rc: rc, calls: calls}
	s.rfn = s.doRead
	s.writers.New = func() any { w := &rawWrite{s: s}; w.fn = w.do; return w }
	return s, nil
}

func (s *rawSock) doRead(fd uintptr) bool {
	for {
		s.calls.Add(1)
		l := uint32(unix.SizeofSockaddrInet4)
		r, _, e := unix.Syscall6(unix.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&s.rbuf[0])), uintptr(len(s.rbuf)), 0,
			uintptr(unsafe.Pointer(&s.rname)), uintptr(unsafe.Pointer(&l)))
		switch e {
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		}
		s.rn, s.rerr = int(r), e
		return true
	}
}

func (s *rawSock) read(buf []byte) (int, netip.AddrPort, error) {
	s.rbuf = buf
	if err := s.rc.Read(s.rfn); err != nil {
		return 0, netip.AddrPort{}, err
	}
	if s.rerr != 0 {
		return 0, netip.AddrPort{}, s.rerr
	}
	p := (*[2]byte)(unsafe.Pointer(&s.rname.Port))
	return s.rn, netip.AddrPortFrom(netip.AddrFrom4(s.rname.Addr), uint16(p[0])<<8|uint16(p[1])), nil
}

func (w *rawWrite) do(fd uintptr) bool {
	for {
		w.s.calls.Add(1)
		_, _, e := unix.Syscall6(unix.SYS_SENDTO, fd, uintptr(unsafe.Pointer(&w.b[0])), uintptr(len(w.b)), 0,
			uintptr(unsafe.Pointer(&w.name)), unix.SizeofSockaddrInet4)
		switch e {
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		}
		w.err = e
		return true
	}
}

func (s *rawSock) write(b []byte, to netip.AddrPort) error {
	w := s.writers.Get().(*rawWrite)
	defer s.writers.Put(w)
	w.b, w.err = b, 0
	w.name = unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: to.Addr().As4()}
	p := (*[2]byte)(unsafe.Pointer(&w.name.Port))
	p[0], p[1] = byte(to.Port()>>8), byte(to.Port())
	err := s.rc.Write(w.fn)
	w.b = nil
	if err != nil {
		return err
	}
	if w.err != 0 {
		return w.err
	}
	return nil
}
