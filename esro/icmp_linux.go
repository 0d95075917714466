package esro

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// setSocketOptions asks the kernel to report ICMP errors of an
// unconnected socket (IP_RECVERR; without it Linux drops them) and the
// count of datagrams it dropped for want of buffer (SO_RXQ_OVFL). A
// kernel that refuses either only loses that report.
func setSocketOptions(fd int, inet6 bool) {
	unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_RECVERR, 1)
	if inet6 {
		unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_RECVERR, 1)
	}
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RXQ_OVFL, 1)
}

// oobSlot is the control buffer of one received datagram: room for the
// SO_RXQ_OVFL message (a uint32).
var oobSlot = unix.CmsgSpace(4)

// icmpErrno reports whether e is what the kernel turns an ICMP error
// into.
func icmpErrno(e syscall.Errno) bool {
	switch e {
	case unix.ECONNREFUSED, unix.EHOSTUNREACH, unix.ENETUNREACH, unix.EHOSTDOWN, unix.ENETDOWN, unix.EPROTO:
		return true
	}
	return false
}

func (b *batchConn) setCounters(st *counters) { b.st = st }

// noteDrops reads the SO_RXQ_OVFL count from one datagram's control
// messages.
func (b *batchConn) noteDrops(oob []byte) {
	if b.st == nil {
		return
	}
	for len(oob) >= unix.SizeofCmsghdr {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		n := int(h.Len)
		if n < unix.SizeofCmsghdr || n > len(oob) {
			return
		}
		if h.Level == unix.SOL_SOCKET && h.Type == unix.SO_RXQ_OVFL && n >= unix.CmsgLen(4) {
			d := uint64(binary.NativeEndian.Uint32(oob[unix.CmsgLen(0):]))
			for {
				cur := b.st.kernelDrops.Load()
				if d <= cur || b.st.kernelDrops.CompareAndSwap(cur, d) {
					break
				}
			}
		}
		oob = oob[min(unix.CmsgSpace(n-unix.CmsgLen(0)), len(oob)):]
	}
}

// refreshDrops reads the socket's drop count (SO_MEMINFO), which reads of
// one datagram (recvfrom, doRecv) do not bring in a control message.
func (b *batchConn) refreshDrops() {
	if b.st == nil {
		return
	}
	var info [unix.SK_MEMINFO_VARS]uint32
	var e syscall.Errno
	if err := b.rc.Control(func(fd uintptr) {
		l := uint32(unsafe.Sizeof(info))
		_, _, e = unix.Syscall6(unix.SYS_GETSOCKOPT, fd, unix.SOL_SOCKET, unix.SO_MEMINFO,
			uintptr(unsafe.Pointer(&info[0])), uintptr(unsafe.Pointer(&l)), 0)
	}); err != nil || e != 0 {
		return
	}
	d := uint64(info[unix.SK_MEMINFO_DROPS])
	for {
		cur := b.st.kernelDrops.Load()
		if d <= cur || b.st.kernelDrops.CompareAndSwap(cur, d) {
			return
		}
	}
}

// maxErrQueue bounds the reports read at once.
const maxErrQueue = 64

// drainErrQueue reads the socket's error queue (MSG_ERRQUEUE): each entry
// names the destination of a datagram an ICMP error came back for and
// quotes the datagram. Reports for datagrams too large (EMSGSIZE, path
// MTU) are not about reachability and are left out.
func (b *batchConn) drainErrQueue(fd uintptr) {
	var buf [64]byte
	var oob [256]byte
	for range maxErrQueue {
		n, oobn, _, from, err := unix.Recvmsg(int(fd), buf[:], oob[:], unix.MSG_ERRQUEUE|unix.MSG_DONTWAIT)
		if err != nil {
			return
		}
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			continue
		}
		for _, c := range msgs {
			if !((c.Header.Level == unix.SOL_IP && c.Header.Type == unix.IP_RECVERR) ||
				(c.Header.Level == unix.SOL_IPV6 && c.Header.Type == unix.IPV6_RECVERR)) ||
				len(c.Data) < int(unsafe.Sizeof(unix.SockExtendedErr{})) {
				continue
			}
			ee := (*unix.SockExtendedErr)(unsafe.Pointer(&c.Data[0]))
			errno := syscall.Errno(ee.Errno)
			if errno == unix.EMSGSIZE || (ee.Origin != unix.SO_EE_ORIGIN_ICMP && ee.Origin != unix.SO_EE_ORIGIN_ICMP6) {
				continue
			}
			to := sockaddrAddrPort(from)
			if !to.IsValid() {
				continue
			}
			b.icmpMu.Lock()
			if len(b.icmp) < maxErrQueue {
				b.icmp = append(b.icmp, icmpReport{to: to, payload: append([]byte(nil), buf[:min(n, len(buf))]...), err: errno})
			}
			b.icmpMu.Unlock()
			b.icmpSeen.Store(true)
		}
	}
}

func sockaddrAddrPort(sa unix.Sockaddr) netip.AddrPort {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr).Unmap(), uint16(a.Port))
	}
	return netip.AddrPort{}
}

func (b *batchConn) takeICMP() []icmpReport {
	if !b.icmpSeen.Load() {
		return nil
	}
	b.icmpMu.Lock()
	defer b.icmpMu.Unlock()
	r := b.icmp
	b.icmp = nil
	b.icmpSeen.Store(false)
	return r
}

// afterSendError reads the error queue when a single send failed with an
// ICMP error meant for an earlier datagram, and reports whether to send
// again (once).
func (b *batchConn) afterSendError(err error) bool {
	var e syscall.Errno
	if !errors.As(err, &e) || !icmpErrno(e) {
		return false
	}
	b.rc.Control(func(fd uintptr) { b.drainErrQueue(fd) })
	return true
}
