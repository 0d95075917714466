// Package portstest provides loopback servers for testing the port checker:
// a minimal ESRO engine (with EMSD server and device emulations), an
// ONC-RPC responder, TCP banner and silent servers, a silent UDP port and
// closed ports. Everything binds 127.0.0.1 on an ephemeral port and is torn
// down by t.Cleanup.
package portstest

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"testing"

	"github.com/esro-emsdp/emsdp/esro"
)

// UDPServer answers datagrams on a loopback port with a function.
type UDPServer struct {
	Addr netip.AddrPort
	conn *net.UDPConn
	done chan struct{}

	mu       sync.Mutex
	received [][]byte
}

// NewUDP starts a server that answers each datagram with answer(datagram);
// a nil answer sends nothing. Several answers are sent in order.
func NewUDP(t testing.TB, answer func([]byte) [][]byte) *UDPServer {
	t.Helper()
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:0")))
	if err != nil {
		t.Fatal(err)
	}
	s := &UDPServer{Addr: c.LocalAddr().(*net.UDPAddr).AddrPort(), conn: c, done: make(chan struct{})}
	go s.serve(answer)
	t.Cleanup(func() {
		c.Close()
		<-s.done
	})
	return s
}

func (s *UDPServer) serve(answer func([]byte) [][]byte) {
	defer close(s.done)
	buf := make([]byte, 65535)
	for {
		n, from, err := s.conn.ReadFromUDPAddrPort(buf)
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			continue
		}
		b := bytes.Clone(buf[:n])
		s.mu.Lock()
		s.received = append(s.received, b)
		s.mu.Unlock()
		if answer == nil {
			continue
		}
		for _, r := range answer(b) {
			s.conn.WriteToUDPAddrPort(r, from)
		}
	}
}

// Port is the server's port.
func (s *UDPServer) Port() int { return int(s.Addr.Port()) }

// Received returns every datagram received so far.
func (s *UDPServer) Received() [][]byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([][]byte(nil), s.received...)
}

// NewSilentUDP is a bound UDP port that never answers.
func NewSilentUDP(t testing.TB) *UDPServer { return NewUDP(t, nil) }

// NewEchoUDP sends every datagram back.
func NewEchoUDP(t testing.TB) *UDPServer {
	return NewUDP(t, func(b []byte) [][]byte { return [][]byte{b} })
}

// Handler is what a bound SAP answers to an INVOKE; nil means no answer.
type Handler func(inv esro.PDU) *esro.PDU

// NewESRO starts a minimal ESRO engine with the given SAPs bound. It does
// the receive processing of docs/protocol.md ESRO §2.7 that a probe can see: short,
// empty and type 5–7 datagrams are dropped; an INVOKE to an unbound SAP gets
// FAILURE(ref, 2); a RESULT or ERROR matching nothing gets FAILURE(ref, 1);
// ACK and FAILURE are absorbed. It keeps no invocation state (no
// retransmission, no duplicate detection), which probes never need.
func NewESRO(t testing.TB, saps map[uint8]Handler) *UDPServer {
	return NewUDP(t, func(b []byte) [][]byte {
		p, err := esro.ParsePDU(b)
		if err != nil {
			return nil
		}
		var out *esro.PDU
		switch p.Type {
		case esro.TypeInvoke:
			h, ok := saps[p.SAP]
			if !ok {
				out = &esro.PDU{Type: esro.TypeFailure, Ref: p.Ref, Value: 2}
			} else {
				out = h(p)
			}
		case esro.TypeResult, esro.TypeError:
			out = &esro.PDU{Type: esro.TypeFailure, Ref: p.Ref, Value: 1}
		}
		if out == nil {
			return nil
		}
		r, err := esro.AppendPDU(nil, out)
		if err != nil {
			panic(err)
		}
		return [][]byte{r}
	})
}

// errorReply answers ERROR(value) with param as error parameter.
func errorReply(value uint8, param []byte) Handler {
	return func(inv esro.PDU) *esro.PDU {
		return &esro.PDU{Type: esro.TypeError, Ref: inv.Ref, Value: value, Data: param}
	}
}

// NewEMSDServer emulates an EMSD server (MTS) as the reference answers a
// device it does not know: SAPs 2, 5, 6 and 9 bound, every INVOKE refused
// with ERROR 7 and no parameter (docs/protocol.md EMSD §1.4, §1.6, TV16). Replace with
// the real `emsdp serve` once it exists.
func NewEMSDServer(t testing.TB) *UDPServer {
	h := errorReply(7, nil)
	return NewESRO(t, map[uint8]Handler{2: h, 5: h, 6: h, 9: h})
}

// NewEMSDDevice emulates an EMSD user agent: SAPs 3, 4, 7 and 8 bound;
// delivery (35) and submission verify (6) accepted with an empty RESULT,
// everything else ERROR 7 with ErrorParameter 7 (02 01 07), docs/protocol.md EMSD
// §1.4.
func NewEMSDDevice(t testing.TB) *UDPServer {
	h := func(inv esro.PDU) *esro.PDU {
		if inv.Operation == 35 || inv.Operation == 6 {
			return &esro.PDU{Type: esro.TypeResult, Ref: inv.Ref}
		}
		return &esro.PDU{Type: esro.TypeError, Ref: inv.Ref, Value: 7, Data: []byte{0x02, 0x01, 0x07}}
	}
	return NewESRO(t, map[uint8]Handler{3: h, 4: h, 7: h, 8: h})
}

// RPCProgram is a program an RPC responder offers, with its version range.
type RPCProgram struct{ Prog, Low, High uint32 }

// rpcAnswer answers an RFC 5531 CALL as a server offering progs would:
// SUCCESS, PROG_MISMATCH or PROG_UNAVAIL; RPC_MISMATCH for RPC version ≠ 2.
// Anything that is not a CALL gets nothing. Encoded independently of the
// ports package so that its parser is tested against another encoder.
func rpcAnswer(b []byte, progs []RPCProgram) []byte {
	if len(b) < 24 {
		return nil
	}
	w := func(i int) uint32 { return binary.BigEndian.Uint32(b[4*i:]) }
	if w(1) != 0 {
		return nil
	}
	out := binary.BigEndian.AppendUint32(nil, w(0))
	out = binary.BigEndian.AppendUint32(out, 1) // REPLY
	if w(2) != 2 {
		out = binary.BigEndian.AppendUint32(out, 1) // MSG_DENIED
		out = binary.BigEndian.AppendUint32(out, 0) // RPC_MISMATCH
		out = binary.BigEndian.AppendUint32(out, 2)
		return binary.BigEndian.AppendUint32(out, 2)
	}
	out = binary.BigEndian.AppendUint32(out, 0) // MSG_ACCEPTED
	out = append(out, 0, 0, 0, 0, 0, 0, 0, 0)   // verifier AUTH_NONE, empty
	for _, p := range progs {
		if p.Prog != w(3) {
			continue
		}
		if w(4) < p.Low || w(4) > p.High {
			out = binary.BigEndian.AppendUint32(out, 2) // PROG_MISMATCH
			out = binary.BigEndian.AppendUint32(out, p.Low)
			return binary.BigEndian.AppendUint32(out, p.High)
		}
		return binary.BigEndian.AppendUint32(out, 0) // SUCCESS, NULL has no results
	}
	return binary.BigEndian.AppendUint32(out, 1) // PROG_UNAVAIL
}

// NewRPC is an ONC-RPC server over UDP offering progs.
func NewRPC(t testing.TB, progs ...RPCProgram) *UDPServer {
	return NewUDP(t, func(b []byte) [][]byte {
		if r := rpcAnswer(b, progs); r != nil {
			return [][]byte{r}
		}
		return nil
	})
}

// TCPServer accepts connections on a loopback port.
type TCPServer struct {
	Addr netip.AddrPort
	l    net.Listener
	wg   sync.WaitGroup

	mu       sync.Mutex
	conns    int
	received []byte
}

// NewTCP runs serve for every accepted connection; the server records what
// the client sent (through the io.Reader it passes to serve).
func NewTCP(t testing.TB, serve func(c net.Conn, r io.Reader)) *TCPServer {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &TCPServer{Addr: l.Addr().(*net.TCPAddr).AddrPort(), l: l}
	var mu sync.Mutex
	open := map[net.Conn]bool{}
	closed := false
	s.wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if closed {
				mu.Unlock()
				c.Close()
				return
			}
			open[c] = true
			mu.Unlock()
			s.mu.Lock()
			s.conns++
			s.mu.Unlock()
			s.wg.Go(func() {
				defer func() {
					c.Close()
					mu.Lock()
					delete(open, c)
					mu.Unlock()
				}()
				serve(c, &recorder{r: c, s: s})
			})
		}
	})
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		closed = true
		for c := range open {
			c.Close()
		}
		mu.Unlock()
		s.wg.Wait()
	})
	return s
}

type recorder struct {
	r io.Reader
	s *TCPServer
}

func (r *recorder) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	r.s.mu.Lock()
	r.s.received = append(r.s.received, p[:n]...)
	r.s.mu.Unlock()
	return n, err
}

// Port is the server's port.
func (s *TCPServer) Port() int { return int(s.Addr.Port()) }

// Received is every octet any client sent so far (as far as serve read it).
func (s *TCPServer) Received() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return bytes.Clone(s.received)
}

// Conns counts accepted connections.
func (s *TCPServer) Conns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conns
}

// drain reads (and so records) until the client closes.
func drain(r io.Reader) { io.Copy(io.Discard, r) }

// NewBannerTCP writes banner on every connection, then reads until the
// client closes.
func NewBannerTCP(t testing.TB, banner string) *TCPServer {
	return NewTCP(t, func(c net.Conn, r io.Reader) {
		io.WriteString(c, banner)
		drain(r)
	})
}

// NewSilentTCP accepts connections, never writes, and records what it gets:
// the shape of a raw print service.
func NewSilentTCP(t testing.TB) *TCPServer {
	return NewTCP(t, func(c net.Conn, r io.Reader) { drain(r) })
}

// NewRPCTCP is an ONC-RPC server over TCP (record marking) offering progs.
func NewRPCTCP(t testing.TB, progs ...RPCProgram) *TCPServer {
	return NewTCP(t, func(c net.Conn, r io.Reader) {
		var hdr [4]byte
		for {
			if _, err := io.ReadFull(r, hdr[:]); err != nil {
				return
			}
			n := binary.BigEndian.Uint32(hdr[:]) & 0x7fffffff
			if n > 1<<16 {
				return
			}
			msg := make([]byte, n)
			if _, err := io.ReadFull(r, msg); err != nil {
				return
			}
			if out := rpcAnswer(msg, progs); out != nil {
				c.Write(append(binary.BigEndian.AppendUint32(nil, 0x80000000|uint32(len(out))), out...))
			}
		}
	})
}

// ClosedUDPPort returns a loopback UDP port that was just bound and
// released, so that nothing listens there (ICMP port unreachable).
func ClosedUDPPort(t testing.TB) int {
	t.Helper()
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := c.LocalAddr().(*net.UDPAddr).Port
	c.Close()
	return port
}

// ClosedTCPPort is the TCP counterpart of ClosedUDPPort (RST on connect).
func ClosedTCPPort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	return port
}

// NewEndpoint starts the project's ESRO endpoint on loopback with handler h
// bound at each SAP of saps (SAP → handshake); it is closed by t.Cleanup.
func NewEndpoint(t testing.TB, saps map[uint8]esro.Handshake, h esro.HandlerFunc) *esro.Endpoint {
	t.Helper()
	ep, err := esro.Listen("udp", "127.0.0.1:0", &esro.Config{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ep.Close() })
	for sap, hs := range saps {
		if err := ep.HandleFunc(sap, hs, h); err != nil {
			t.Fatal(err)
		}
	}
	return ep
}

// EndpointPort is the UDP port of ep.
func EndpointPort(ep *esro.Endpoint) int { return ep.LocalAddr().(*net.UDPAddr).Port }

// NewEMSDServerEndpoint is NewEMSDServer built on the project's ESRO
// endpoint: the MTS SAPs (2 and 5 3-way, 6 and 9 2-way) bound, every
// operation refused with ERROR 7. It stands in for `emsdp serve` until the
// server exists; then start the real server here instead.
func NewEMSDServerEndpoint(t testing.TB) *esro.Endpoint {
	return NewEndpoint(t, map[uint8]esro.Handshake{2: esro.ThreeWay, 5: esro.ThreeWay, 6: esro.TwoWay, 9: esro.TwoWay},
		func(ctx context.Context, w esro.ResponseWriter, inv *esro.Invocation) {
			w.Error(esro.EncodingBER, 7, nil)
		})
}

// NewEMSDDeviceEndpoint is NewEMSDDevice on the project's ESRO endpoint (UA
// SAPs 3 and 4 3-way, 7 and 8 2-way).
func NewEMSDDeviceEndpoint(t testing.TB) *esro.Endpoint {
	return NewEndpoint(t, map[uint8]esro.Handshake{3: esro.ThreeWay, 4: esro.ThreeWay, 7: esro.TwoWay, 8: esro.TwoWay},
		func(ctx context.Context, w esro.ResponseWriter, inv *esro.Invocation) {
			if inv.Operation == 35 || inv.Operation == 6 {
				w.Result(esro.EncodingBER, nil)
				return
			}
			w.Error(esro.EncodingBER, 7, []byte{0x02, 0x01, 0x07})
		})
}
