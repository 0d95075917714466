package ports

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"
)

// procNetEntry is one row of /proc/net/{tcp,tcp6,udp,udp6}.
type procNetEntry struct {
	Local, Remote netip.AddrPort
	State         uint8
	UID           int
	Inode         uint64
}

var errProcNetFormat = errors.New("ports: malformed /proc/net line")

// parseProcNet reads a /proc/net/{tcp,udp}[6] table. The kernel prints each
// 32-bit word of an address in host byte order, so order must be the byte
// order of the machine that wrote the file (binary.NativeEndian when read
// locally). The header line is skipped; any malformed row is an error because
// a half-read table would make "nothing listening" a lie.
func parseProcNet(r io.Reader, order binary.ByteOrder) ([]procNetEntry, error) {
	var out []procNetEntry
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 512), 64<<10)
	first := true
	for sc.Scan() {
		line := sc.Text()
		if first {
			first = false
			if strings.Contains(line, "local_address") {
				continue
			}
		}
		if strings.TrimSpace(line) == "" {
			continue
		}
		e, err := parseProcNetLine(line, order)
		if err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("ports: reading /proc/net table: %w", err)
	}
	return out, nil
}

// Fields: sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
func parseProcNetLine(line string, order binary.ByteOrder) (procNetEntry, error) {
	f := strings.Fields(line)
	if len(f) < 10 || !strings.HasSuffix(f[0], ":") {
		return procNetEntry{}, fmt.Errorf("%w: %q", errProcNetFormat, line)
	}
	var e procNetEntry
	var err error
	if e.Local, err = parseProcAddr(f[1], order); err != nil {
		return e, err
	}
	if e.Remote, err = parseProcAddr(f[2], order); err != nil {
		return e, err
	}
	st, err := strconv.ParseUint(f[3], 16, 8)
	if err != nil {
		return e, fmt.Errorf("%w: state %q", errProcNetFormat, f[3])
	}
	e.State = uint8(st)
	uid, err := strconv.ParseUint(f[7], 10, 32)
	if err != nil {
		return e, fmt.Errorf("%w: uid %q", errProcNetFormat, f[7])
	}
	e.UID = int(uid)
	if e.Inode, err = strconv.ParseUint(f[9], 10, 64); err != nil {
		return e, fmt.Errorf("%w: inode %q", errProcNetFormat, f[9])
	}
	return e, nil
}

// parseProcAddr decodes "0100007F:0277" (IPv4) or 32 hex digits:port (IPv6).
func parseProcAddr(s string, order binary.ByteOrder) (netip.AddrPort, error) {
	hs, ps, ok := strings.Cut(s, ":")
	if !ok || len(ps) != 4 {
		return netip.AddrPort{}, fmt.Errorf("%w: address %q", errProcNetFormat, s)
	}
	port, err := strconv.ParseUint(ps, 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%w: port %q", errProcNetFormat, ps)
	}
	raw, err := hex.DecodeString(hs)
	if err != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.AddrPort{}, fmt.Errorf("%w: address %q", errProcNetFormat, hs)
	}
	// hex.DecodeString gives the printed digits big-endian per word; put each
	// word back into the writer's byte order.
	var b [16]byte
	for i := 0; i < len(raw); i += 4 {
		order.PutUint32(b[i:], binary.BigEndian.Uint32(raw[i:]))
	}
	var a netip.Addr
	if len(raw) == 4 {
		a = netip.AddrFrom4([4]byte(b[:4]))
	} else {
		a = netip.AddrFrom16(b)
	}
	return netip.AddrPortFrom(a, uint16(port)), nil
}

const (
	tcpListen    = 0x0A
	udpUnconn    = 0x07 // an unconnected UDP socket shows TCP_CLOSE
	udpConnected = 0x01
)

// stateName names the kernel's socket states (include/net/tcp_states.h) as
// ss(8) prints them.
func stateName(proto string, st uint8) string {
	if strings.HasPrefix(proto, "udp") {
		switch st {
		case udpUnconn:
			return "UNCONN"
		case udpConnected:
			return "ESTAB"
		}
		return fmt.Sprintf("state-%02X", st)
	}
	switch st {
	case 0x01:
		return "ESTAB"
	case 0x02:
		return "SYN-SENT"
	case 0x03:
		return "SYN-RECV"
	case 0x04:
		return "FIN-WAIT-1"
	case 0x05:
		return "FIN-WAIT-2"
	case 0x06:
		return "TIME-WAIT"
	case 0x07:
		return "CLOSE"
	case 0x08:
		return "CLOSE-WAIT"
	case 0x09:
		return "LAST-ACK"
	case tcpListen:
		return "LISTEN"
	case 0x0B:
		return "CLOSING"
	case 0x0C:
		return "NEW-SYN-RECV"
	}
	return fmt.Sprintf("state-%02X", st)
}
