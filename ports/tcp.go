package ports

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unicode"
)

const maxBanner = 4096

func (p *prober) tcp(ctx context.Context, port int) PortResult {
	res := PortResult{Port: port, Proto: "tcp"}
	raddr := netip.AddrPortFrom(p.addr, uint16(port)).String()

	st := addStep(&res, "tcp-connect")
	c, err := p.dial(ctx, raddr)
	if err != nil {
		var ne net.Error
		switch {
		case isRefused(err):
			res.State, st.Outcome = StateClosed, "refused (RST)"
		case ctx.Err() == nil && errors.As(err, &ne) && ne.Timeout():
			res.State, st.Outcome = StateFiltered, "no answer to SYN within "+p.o.Timeout.String()
		default:
			res.State, st.Outcome = StateError, err.Error()
		}
		return res
	}
	res.State, st.Outcome = StateOpen, "connected"

	st = addStep(&res, "tcp-banner")
	banner, closed, err := readPassive(ctx, c, p.o.Timeout)
	c.Close()
	if err != nil {
		st.Outcome = err.Error()
		res.Notes = append(res.Notes, "banner read failed: "+err.Error())
		return res
	}
	switch {
	case len(banner) > 0:
		st.Received = append(st.Received, Packet{Data: banner, Decoded: printable(banner), Matched: true})
		res.Service, res.Identification = classifyBanner(banner)
		res.Evidence = "it spoke first: " + printable(firstLine(banner))
		st.Outcome = "nothing sent; banner received"
	case closed:
		res.Service, res.Identification = ServiceWrapped, "accepts connections, then closes them without a word"
		st.Outcome = "nothing sent; peer closed the connection"
		res.Evidence = "connection closed by the peer before anything was sent"
	default:
		st.Outcome = "nothing sent; silent for " + p.o.Timeout.String()
		res.Identification = "unknown: silent until the client speaks"
		res.Evidence = "accepts connections and sends nothing on its own"
	}
	if !p.o.Aggressive {
		if len(banner) == 0 {
			res.Notes = append(res.Notes, "silent TCP service: --aggressive may send an ONC-RPC NULL call and an HTTP HEAD, where no printer can be behind the port")
		}
		return res
	}
	if res.Service != "" && res.Service != ServiceUnknown && res.Service != ServiceWrapped {
		res.Notes = append(res.Notes, "active payloads not sent: the banner already identifies the service")
		return res
	}
	if why := p.activeBlocked(ctx, port, res.Service); why != "" {
		res.Notes = append(res.Notes, "active payloads not sent: "+why)
		return res
	}
	p.tcpRPC(ctx, raddr, &res)
	if res.Service != ServiceONCRPC {
		p.tcpHTTP(ctx, raddr, &res)
	}
	return res
}

func addStep(res *PortResult, name string) *Step {
	res.Steps = append(res.Steps, Step{Name: name})
	return &res.Steps[len(res.Steps)-1]
}

func (p *prober) dial(ctx context.Context, addr string) (net.Conn, error) {
	d := net.Dialer{Timeout: p.o.Timeout}
	return d.DialContext(ctx, "tcp", addr)
}

// readPassive reads what the peer sends on its own within wait, sending
// nothing. After the first octets it waits only briefly for the rest.
func readPassive(ctx context.Context, c net.Conn, wait time.Duration) (data []byte, closed bool, err error) {
	stop := deadlineOnCancel(ctx, c)
	defer stop()
	buf := make([]byte, maxBanner)
	n := 0
	deadline := time.Now().Add(wait)
	for n < len(buf) {
		if err := c.SetReadDeadline(deadline); err != nil {
			return nil, false, fmt.Errorf("ports: %w", err)
		}
		if err := ctx.Err(); err != nil {
			return nil, false, fmt.Errorf("ports: %w", err)
		}
		m, err := c.Read(buf[n:])
		n += m
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			if ctx.Err() != nil {
				return nil, false, fmt.Errorf("ports: %w", ctx.Err())
			}
			return buf[:n], false, nil
		case errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || isReset(err):
			return buf[:n], true, nil
		case err != nil:
			return nil, false, fmt.Errorf("ports: reading banner: %w", err)
		}
		if m > 0 {
			deadline = time.Now().Add(min(wait, 300*time.Millisecond))
		}
	}
	return buf[:n], false, nil
}

func isReset(err error) bool { return errors.Is(err, syscall.ECONNRESET) }

// printerWords are what print services put in banners and status lines.
// Whole words only: "helpdesk" is no LPD.
var printerWords = regexp.MustCompile(`(?i)(@PJL|\b(jetdirect|printer|lpd|cups|ipp)\b)`)

// classifyBanner names a service from what it says first.
func classifyBanner(b []byte) (service, ident string) {
	line := strings.TrimSpace(printable(firstLine(b)))
	low := strings.ToLower(string(b))
	if printerWords.MatchString(string(b)) {
		return ServicePrinter, "print service (" + line + ")"
	}
	switch {
	case bytes.HasPrefix(b, []byte("SSH-")):
		return ServiceBanner, "SSH server (" + line + ")"
	case bytes.HasPrefix(b, []byte("220")) && strings.Contains(low, "smtp"):
		return ServiceBanner, "SMTP server (" + line + ")"
	case bytes.HasPrefix(b, []byte("220")) && strings.Contains(low, "ftp"):
		return ServiceBanner, "FTP server (" + line + ")"
	case bytes.HasPrefix(b, []byte("220")):
		return ServiceBanner, "SMTP or FTP server (" + line + ")"
	case bytes.HasPrefix(b, []byte("+OK")):
		return ServiceBanner, "POP3 server (" + line + ")"
	case bytes.HasPrefix(b, []byte("* OK")):
		return ServiceBanner, "IMAP server (" + line + ")"
	case bytes.HasPrefix(b, []byte("RFB ")):
		return ServiceBanner, "VNC server (" + line + ")"
	}
	if isText(b) {
		return ServiceUnknown, "unrecognised text banner (" + line + ")"
	}
	return ServiceUnknown, "unrecognised binary banner"
}

func firstLine(b []byte) []byte {
	if i := bytes.IndexAny(b, "\r\n"); i >= 0 {
		return b[:i]
	}
	return b
}

func isText(b []byte) bool {
	for _, r := range string(b) {
		if r == unicode.ReplacementChar || (r < 0x20 && r != '\r' && r != '\n' && r != '\t') {
			return false
		}
	}
	return true
}

// printable renders octets for a terminal: text as quoted text, control
// characters escaped, never raw.
func printable(b []byte) string {
	if len(b) > 200 {
		b = b[:200]
	}
	return strconv.QuoteToASCII(string(b))
}

// printPort reports the TCP ports where a printer takes any octets as a job:
// raw printing 9100-9107 (nmap's own exclusion list), LPD, IPP, and the
// old private-printer, NPP and print-srv ports.
func printPort(port int) bool {
	return (port >= 9100 && port <= 9107) || slices.Contains([]int{35, 92, 170, 515, 631}, port)
}

// activeBlocked applies the rule of ProbeOptions.Aggressive and returns why
// nothing may be sent, or "".
func (p *prober) activeBlocked(ctx context.Context, port int, service string) string {
	if printPort(port) {
		return fmt.Sprintf("TCP %d is a print port", port)
	}
	if service == ServicePrinter {
		return "the banner looks like a print service"
	}
	if seen := p.printService(ctx); len(seen) > 0 {
		return fmt.Sprintf("the host accepts connections on print port(s) %v (checked by connecting only), so a silent port may be a raw print service", seen)
	}
	return ""
}

// printService connects to each PrintPorts port once per probe, sends
// nothing and closes, and returns those that accepted.
func (p *prober) printService(ctx context.Context) []int {
	p.printOnce.Do(func() {
		for _, port := range p.o.PrintPorts {
			c, err := p.dial(ctx, netip.AddrPortFrom(p.addr, uint16(port)).String())
			if err == nil {
				c.Close()
				p.printSeen = append(p.printSeen, port)
			}
		}
	})
	return p.printSeen
}

// exchangeTCP opens a fresh connection, writes payload, and reads the answer
// until read returns true (complete), the peer closes, or Timeout passes.
func (p *prober) exchangeTCP(ctx context.Context, addr string, st *Step, payload []byte, decoded string, done func([]byte) bool) ([]byte, error) {
	c, err := p.dial(ctx, addr)
	if err != nil {
		return nil, fmt.Errorf("ports: %s: %w", st.Name, err)
	}
	defer c.Close()
	stop := deadlineOnCancel(ctx, c)
	defer stop()
	if err := c.SetDeadline(time.Now().Add(p.o.Timeout)); err != nil {
		return nil, fmt.Errorf("ports: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("ports: %s: %w", st.Name, err)
	}
	if _, err := c.Write(payload); err != nil {
		return nil, fmt.Errorf("ports: %s: %w", st.Name, err)
	}
	st.Sent = append(st.Sent, Packet{Data: payload, Decoded: decoded, Matched: true})
	var got []byte
	buf := make([]byte, maxBanner)
	for len(got) < maxBanner && !done(got) {
		n, err := c.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			break // timeout or close: judge what arrived
		}
	}
	return got, ctx.Err()
}

// tcpRPC sends one record-marked NULL call to the NetInfo program.
func (p *prober) tcpRPC(ctx context.Context, addr string, res *PortResult) {
	prog := rpcPrograms()[0]
	xid := rpcXID(rand.Uint32())
	st := addStep(res, "tcp-oncrpc-null")
	got, err := p.exchangeTCP(ctx, addr, st, recordMark(rpcNullCall(xid, prog.Prog, prog.Vers)),
		fmt.Sprintf("RPC CALL (record-marked) xid=%#08x prog=%d vers=%d proc=0 (NULL)", xid, prog.Prog, prog.Vers),
		func(b []byte) bool { return len(b) >= 4 && len(b) >= 4+int(binary.BigEndian.Uint32(b)&0x7fffffff) })
	if err != nil {
		st.Outcome = err.Error()
		return
	}
	if len(got) == 0 {
		st.Outcome = "no reply"
		return
	}
	pk := Packet{Data: got}
	st.Received = append(st.Received, pk)
	in := &st.Received[len(st.Received)-1]
	if len(got) < 4 {
		st.Outcome = "not an ONC-RPC reply"
		return
	}
	m, err := parseRPCReply(got[4:])
	if err != nil || m.XID != xid {
		st.Outcome = "not an ONC-RPC reply with our transaction id"
		return
	}
	in.Decoded, in.Matched = fmt.Sprintf("RPC REPLY xid=%#08x %s", m.XID, m), true
	st.Outcome = m.String()
	res.Service = ServiceONCRPC
	res.Identification = "ONC-RPC service"
	if m.Accepted && m.AcceptStat != acceptProgUnavail {
		res.Identification = fmt.Sprintf("ONC-RPC service: %s (program %d)", prog.Name, prog.Prog)
	}
	res.Evidence = fmt.Sprintf("a NULL call to program %d v%d over TCP got %s with our transaction id", prog.Prog, prog.Vers, m)
}

// tcpHTTP sends an HTTP HEAD, the most common thing on an unexpected port.
func (p *prober) tcpHTTP(ctx context.Context, addr string, res *PortResult) {
	const head = "HEAD / HTTP/1.0\r\n\r\n"
	st := addStep(res, "tcp-http-head")
	got, err := p.exchangeTCP(ctx, addr, st, []byte(head), printable([]byte(head)),
		func(b []byte) bool { return bytes.Contains(b, []byte("\r\n\r\n")) })
	if err != nil {
		st.Outcome = err.Error()
		return
	}
	if len(got) == 0 {
		st.Outcome = "no reply"
		return
	}
	ok := bytes.HasPrefix(got, []byte("HTTP/"))
	st.Received = append(st.Received, Packet{Data: got, Decoded: printable(got), Matched: ok})
	if !ok {
		st.Outcome = "not an HTTP response"
		return
	}
	st.Outcome = printable(firstLine(got))
	res.Service = ServiceHTTP
	res.Identification = "HTTP server (" + strings.Trim(printable(firstLine(got)), `"`) + ")"
	res.Evidence = "answered HEAD / with " + printable(firstLine(got))
}
