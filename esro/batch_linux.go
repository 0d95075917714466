//go:build linux

package esro

import (
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// batchSlots is how many datagrams one recvmmsg or sendmmsg moves at most.
const batchSlots = 8

// busyReads is how many reads in a row must find a datagram already
// waiting before the read side grows from one buffer to batchSlots.
const busyReads = 16

// batchConn moves datagrams of a *net.UDPConn with recvmmsg and sendmmsg:
// one system call and one pass through the endpoint's lock for every
// datagram that queued up while the previous ones were processed, and one
// system call for the replies they caused.
//
// Reads start with one 64 KiB buffer, like the generic path, and grow to
// batchSlots buffers of that size once the socket proves busy: every slot
// must take the largest datagram (docs/protocol.md ESRO §6: accept up to 65507
// octets), and a device's endpoint should not carry half a megabyte of
// buffers it never fills.
type batchConn struct {
	rc    syscall.RawConn
	inet6 bool // the socket is AF_INET6: IPv4 peers are v4-mapped
	r     *mmsgs
	bufs  [][]byte
	busy  int // consecutive reads that found a datagram waiting
	// writes holds *mmsgs for flushes, which run concurrently.
	writes sync.Pool
	st     *counters // for the kernel drop count

	// ICMP errors read from the socket's error queue (icmp_linux.go).
	icmpMu   sync.Mutex
	icmp     []icmpReport
	icmpSeen atomic.Bool
}

// mmsgs are the kernel's argument arrays for one batch, and the state of
// the system call on them. recv and send are method values made once: a
// closure made per call would escape into syscall.RawConn and cost
// allocations on every datagram.
type mmsgs struct {
	b     *batchConn
	hdrs  []unix.Mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet6 // room for either family
	oob   []byte                  // reads: one SO_RXQ_OVFL message per slot
	retry bool                    // sends: the current slot was retried after an ICMP error

	k, done int // slots to move, slots moved
	calls   int // system calls made
	errno   syscall.Errno
	recv    func(fd uintptr) bool
	send    func(fd uintptr) bool
}

func newMmsgs(b *batchConn, n int) *mmsgs {
	m := &mmsgs{b: b, hdrs: make([]unix.Mmsghdr, n), iovs: make([]unix.Iovec, n), names: make([]unix.RawSockaddrInet6, n)}
	for i := range m.hdrs {
		m.hdrs[i].Hdr.Name = (*byte)(unsafe.Pointer(&m.names[i]))
		m.hdrs[i].Hdr.Iov = &m.iovs[i]
		m.hdrs[i].Hdr.SetIovlen(1)
	}
	m.recv, m.send = m.doRecv, m.doSend
	return m
}

// doRecv is one attempt of recvmmsg on slots 0..k-1 (false: nothing there
// yet, wait until readable).
//
// Slot 0 alone is read with recvfrom: the kernel serves it without
// copying in a message header and its vector of buffers, and a quiet
// socket makes two reads per datagram (the second finds nothing).
// Measured on one core with 256 client endpoints, it made a whole 2-way
// exchange some 8% cheaper than recvmmsg of one slot. No control message
// comes with it: the drop count is read when Stats asks (refreshDrops).
func (m *mmsgs) doRecv(fd uintptr) bool {
	for {
		m.calls++
		var r uintptr
		var e syscall.Errno
		if m.k == 1 {
			l := uint32(unix.SizeofSockaddrInet6)
			r, _, e = unix.Syscall6(unix.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(m.iovs[0].Base)), uintptr(m.iovs[0].Len), 0,
				uintptr(unsafe.Pointer(&m.names[0])), uintptr(unsafe.Pointer(&l)))
			if e == 0 {
				m.hdrs[0].Len = uint32(r)
				m.hdrs[0].Hdr.SetControllen(0)
				r = 1
			}
		} else {
			r, _, e = unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&m.hdrs[0])), uintptr(m.k), 0, 0, 0)
		}
		switch {
		case e == unix.EINTR:
			continue
		case e == unix.EAGAIN:
			return false
		case icmpErrno(e):
			// A pending ICMP error, not a datagram: read the reports,
			// return none.
			m.b.drainErrQueue(fd)
			m.done = 0
			return true
		}
		m.done, m.errno = int(r), e
		return true
	}
}

// doSend hands slots done..k-1 to sendmmsg until all are sent or one
// fails (false: the socket buffer is full, wait until writable). Slot 0
// alone goes with sendto, which the kernel serves without copying in a
// message header.
func (m *mmsgs) doSend(fd uintptr) bool {
	for m.done < m.k {
		m.calls++
		var r uintptr
		var e syscall.Errno
		if m.k == 1 {
			h := &m.hdrs[0].Hdr
			_, _, e = unix.Syscall6(unix.SYS_SENDTO, fd, uintptr(unsafe.Pointer(m.iovs[0].Base)), uintptr(m.iovs[0].Len), 0,
				uintptr(unsafe.Pointer(h.Name)), uintptr(h.Namelen))
			r = 1
		} else {
			r, _, e = unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&m.hdrs[m.done])), uintptr(m.k-m.done), 0, 0, 0)
		}
		switch {
		case e == 0:
			m.done += int(r)
			m.retry = false
		case e == unix.EINTR:
		case e == unix.EAGAIN:
			return false
		case icmpErrno(e) && !m.retry:
			// With IP_RECVERR the kernel fails the next send on the
			// socket with an ICMP error that came for any earlier
			// datagram; this one was not sent. Read the report and try
			// it again, once.
			m.b.drainErrQueue(fd)
			m.retry = true
		default:
			m.errno = e
			m.retry = false
			return true
		}
	}
	return true
}

// newBatchConn returns a batchConn for conn, or nil when conn is not a
// plain UDP socket (the generic net.PacketConn path is used then).
func newBatchConn(conn net.PacketConn) batchIO {
	uc, ok := conn.(*net.UDPConn)
	if !ok {
		return nil
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return nil
	}
	b := &batchConn{rc: rc}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		var sa unix.Sockaddr
		if sa, serr = unix.Getsockname(int(fd)); serr == nil {
			_, b.inet6 = sa.(*unix.SockaddrInet6)
		}
		setSocketOptions(int(fd), b.inet6)
	}); err != nil || serr != nil {
		return nil
	}
	b.r = newMmsgs(b, batchSlots)
	b.r.oob = make([]byte, batchSlots*oobSlot)
	b.bufs = [][]byte{make([]byte, maxDatagram+1)}
	b.writes.New = func() any { return newMmsgs(b, batchSlots) }
	return b
}

// read waits for at least one datagram and returns how many it got; read
// loop only. Datagram i is datagram(i) until the next read.
func (b *batchConn) read() (int, error) {
	m := b.r
	m.k, m.done, m.calls, m.errno = len(b.bufs), 0, 0, 0
	for i := range m.k {
		h := &m.hdrs[i]
		h.Hdr.Namelen = unix.SizeofSockaddrInet6
		h.Hdr.Flags = 0
		h.Len = 0
		h.Hdr.Control = &m.oob[i*oobSlot]
		h.Hdr.SetControllen(oobSlot)
		m.iovs[i].Base = &b.bufs[i][0]
		m.iovs[i].SetLen(len(b.bufs[i]))
	}
	err := b.rc.Read(m.recv)
	if b.st != nil {
		b.st.socketCalls.Add(uint64(m.calls))
	}
	if err != nil {
		return 0, err
	}
	if m.errno != 0 {
		return 0, &net.OpError{Op: "read", Net: "udp", Err: m.errno}
	}
	if m.done > 0 {
		// The drop count is cumulative: the last datagram's is enough.
		i := m.done - 1
		b.noteDrops(m.oob[i*oobSlot : i*oobSlot+int(m.hdrs[i].Hdr.Controllen)])
	}
	if m.calls == 1 { // a datagram was waiting: the socket is busy
		b.busy++
		if b.busy == busyReads && len(b.bufs) < batchSlots {
			for range batchSlots - len(b.bufs) {
				b.bufs = append(b.bufs, make([]byte, maxDatagram+1))
			}
		}
	} else {
		b.busy = 0
	}
	return m.done, nil
}

// datagram returns the payload and source of datagram i of the last read.
func (b *batchConn) datagram(i int) ([]byte, netip.AddrPort) {
	return b.bufs[i][:b.r.hdrs[i].Len], sockaddrToAddrPort(&b.r.names[i])
}

func sockaddrToAddrPort(sa *unix.RawSockaddrInet6) netip.AddrPort {
	switch sa.Family {
	case unix.AF_INET:
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		return netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), ntohs(sa4.Port))
	case unix.AF_INET6:
		a := netip.AddrFrom16(sa.Addr)
		if sa.Scope_id != 0 {
			// Only link-local peers have one; the name lookup the
			// standard library does would allocate on every datagram.
			a = a.WithZone(strconv.FormatUint(uint64(sa.Scope_id), 10))
		}
		return netip.AddrPortFrom(a, ntohs(sa.Port))
	}
	return netip.AddrPort{}
}

func ntohs(p uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(&p))
	return uint16(b[0])<<8 | uint16(b[1])
}

func htons(p uint16) uint16 { return ntohs(p) }

// errBatchAddr: a destination this socket's family cannot reach.
var errBatchAddr = errors.New("esro: address family does not match the socket")

// write sends out, batchSlots datagrams per system call, counting each
// datagram sent or failed in st.
func (b *batchConn) write(out []outgoing, st *counters, log *slog.Logger) {
	m := b.writes.Get().(*mmsgs)
	defer b.writes.Put(m)
	failed := func(o *outgoing, err error) {
		st.sendErrors.Add(1)
		log.Debug("esro: send", "to", o.to, "err", err)
	}
	for len(out) > 0 {
		k := 0
		for k < len(out) && k < batchSlots {
			if err := b.fill(m, k, out[k].to, out[k].payload()); err != nil {
				break
			}
			k++
		}
		if k == 0 {
			// The first datagram cannot be addressed: report it alone.
			failed(&out[0], errBatchAddr)
			out = out[1:]
			continue
		}
		sent, err := b.send(m, k)
		st.socketCalls.Add(uint64(m.calls))
		for i := range sent {
			st.datagramsOut.Add(1)
			st.bytesOut.Add(uint64(len(out[i].payload())))
		}
		if err != nil {
			// sendmmsg reports an error only for the first datagram it
			// could not send; the ones after it are tried again.
			failed(&out[sent], err)
			sent++
		}
		out = out[sent:]
		clear(m.iovs[:k]) // drop references to the payloads
	}
}

// fill prepares slot i to carry p to 'to'.
func (b *batchConn) fill(m *mmsgs, i int, to netip.AddrPort, p []byte) error {
	sa := &m.names[i]
	*sa = unix.RawSockaddrInet6{}
	a := to.Addr()
	switch {
	case !b.inet6:
		if !a.Unmap().Is4() {
			return errBatchAddr
		}
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		sa4.Family, sa4.Port, sa4.Addr = unix.AF_INET, htons(to.Port()), a.Unmap().As4()
		m.hdrs[i].Hdr.Namelen = unix.SizeofSockaddrInet4
	default:
		if z := a.Zone(); z != "" {
			id, err := zoneIndex(z)
			if err != nil {
				return err
			}
			sa.Scope_id = id
		}
		sa.Family, sa.Port, sa.Addr = unix.AF_INET6, htons(to.Port()), a.As16()
		m.hdrs[i].Hdr.Namelen = unix.SizeofSockaddrInet6
	}
	m.hdrs[i].Hdr.Flags = 0
	m.iovs[i].Base = &p[0] // payloads are never empty
	m.iovs[i].SetLen(len(p))
	return nil
}

func zoneIndex(z string) (uint32, error) {
	if n, err := strconv.ParseUint(z, 10, 32); err == nil {
		return uint32(n), nil
	}
	ifi, err := net.InterfaceByName(z)
	if err != nil {
		return 0, err
	}
	return uint32(ifi.Index), nil
}

// send hands slots 0..k-1 to sendmmsg until all are sent or one fails;
// it returns how many were sent and the error of the one that failed.
func (b *batchConn) send(m *mmsgs, k int) (int, error) {
	m.k, m.done, m.errno, m.calls = k, 0, 0, 0
	if err := b.rc.Write(m.send); err != nil {
		return m.done, err
	}
	if m.errno != 0 {
		return m.done, &net.OpError{Op: "write", Net: "udp", Err: m.errno}
	}
	return m.done, nil
}
