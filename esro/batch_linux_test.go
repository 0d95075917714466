//go:build linux

package esro

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"
)

// datagramsFor are payloads of the sizes the batch path must carry
// unchanged: the smallest PDUs, a full default PDU and, once, the largest
// UDP payload (docs/protocol.md ESRO §6: accept up to 65507 octets), placed where a
// grown reader takes it into a slot other than the first.
func datagramsFor(n int) [][]byte {
	sizes := []int{2, 3, 1503, 100, 7}
	var out [][]byte
	for i := range n {
		size := sizes[i%len(sizes)]
		if i == batchSlots+3 {
			size = maxDatagram
		}
		b := bytes.Repeat([]byte{byte(i)}, size)
		out = append(out, b)
	}
	return out
}

func listenUDP(t *testing.T, network, addr string) *net.UDPConn {
	t.Helper()
	c, err := net.ListenPacket(network, addr)
	if err != nil {
		t.Skipf("%s %s: %v", network, addr, err)
	}
	t.Cleanup(func() { c.Close() })
	// Room for a round of datagrams (the system may cap it lower).
	c.(*net.UDPConn).SetReadBuffer(1 << 20)
	return c.(*net.UDPConn)
}

// Datagrams written in batches arrive complete, in order, from the
// sender's address, and are read in batches once the reader is busy; for
// IPv4 sockets, IPv6 sockets and IPv4 peers of dual-stack sockets.
func TestBatchConnRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name          string
		network, a, b string
		to            func(b *net.UDPConn) netip.AddrPort
	}{
		{"ipv4", "udp4", "127.0.0.1:0", "127.0.0.1:0", nil},
		{"ipv6", "udp6", "[::1]:0", "[::1]:0", nil},
		{"dual stack to ipv4", "udp", ":0", "127.0.0.1:0", func(b *net.UDPConn) netip.AddrPort {
			return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), b.LocalAddr().(*net.UDPAddr).AddrPort().Port())
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := listenUDP(t, tc.network, tc.a)
			b := listenUDP(t, tc.network, tc.b)
			if tc.name == "dual stack to ipv4" {
				b = listenUDP(t, "udp4", tc.b)
			}
			ba, bb := newBatchConn(a), newBatchConn(b)
			if ba == nil || bb == nil {
				t.Fatal("no batch I/O on a UDP socket")
			}
			to := b.LocalAddr().(*net.UDPAddr).AddrPort()
			if tc.to != nil {
				to = tc.to(b)
			}
			want := datagramsFor(2 * batchSlots)
			out := make([]outgoing, len(want))
			for i, d := range want {
				out[i] = outgoing{to: to, b: d}
			}
			var st counters
			// Several rounds, so that the reader grows to full batches.
			for round := range busyReads + 2 {
				ba.write(out, &st, quiet)
				if got := st.datagramsOut.Load(); got != uint64((round+1)*len(want)) || st.sendErrors.Load() != 0 {
					t.Fatalf("round %d: %d sent, %d errors", round, got, st.sendErrors.Load())
				}
				for i := 0; i < len(want); {
					n, err := bb.read()
					if err != nil {
						t.Fatal(err)
					}
					for j := range n {
						p, from := bb.datagram(j)
						if !bytes.Equal(p, want[i]) {
							t.Fatalf("round %d datagram %d: %d octets starting %x, want %d", round, i, len(p), p[:min(len(p), 1)], len(want[i]))
						}
						if from.Addr().Unmap() != a.LocalAddr().(*net.UDPAddr).AddrPort().Addr().Unmap() && tc.to == nil {
							t.Fatalf("from %v, want %v", from, a.LocalAddr())
						}
						if from.Port() != a.LocalAddr().(*net.UDPAddr).AddrPort().Port() {
							t.Fatalf("from port %d, want %v", from.Port(), a.LocalAddr())
						}
						i++
					}
				}
			}
			if got := len(bb.(*batchConn).bufs); got != batchSlots {
				t.Errorf("reader has %d buffers after a busy phase, want %d", got, batchSlots)
			}
		})
	}
}

// A destination the socket's family cannot reach fails alone: the
// datagrams around it go out.
func TestBatchConnBadDestination(t *testing.T) {
	a := listenUDP(t, "udp4", "127.0.0.1:0")
	b := listenUDP(t, "udp4", "127.0.0.1:0")
	ba, bb := newBatchConn(a), newBatchConn(b)
	to := b.LocalAddr().(*net.UDPAddr).AddrPort()
	out := []outgoing{
		{to: to, b: []byte{1, 1}},
		{to: netip.MustParseAddrPort("[2001:db8::1]:9"), b: []byte{2, 2}},
		{to: to, b: []byte{3, 3}},
	}
	var st counters
	ba.write(out, &st, quiet)
	if st.datagramsOut.Load() != 2 || st.sendErrors.Load() != 1 {
		t.Fatalf("%d sent, %d errors", st.datagramsOut.Load(), st.sendErrors.Load())
	}
	for _, want := range []byte{1, 3} {
		n, err := bb.read()
		if err != nil {
			t.Fatal(err)
		}
		if p, _ := bb.datagram(0); n < 1 || p[0] != want {
			t.Fatalf("got %x, want %d", p, want)
		}
		if n == 2 {
			if p, _ := bb.datagram(1); p[0] != 3 {
				t.Fatalf("second %x", p)
			}
			break
		}
	}
}

// Endpoints on batch I/O under a load that makes both ends read and
// write in batches: every invocation completes exactly once.
func TestBatchEndpointsUnderLoad(t *testing.T) {
	// Holds short enough that 256 reference numbers towards the one peer
	// do not make the invokers wait (docs/protocol.md ESRO §4).
	cfg := &Config{Timers: Timers{Acknowledgement: time.Millisecond, Roundtrip: 20 * time.Millisecond,
		Retransmit: 30 * time.Millisecond, NSDULifetime: 5 * time.Millisecond, RetransmitCount: 4},
		PerformerTimeout: 10 * time.Second, Logger: quiet}
	perf, err := Listen("udp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer perf.Close()
	if perf.batch == nil {
		t.Fatal("endpoint on a UDP socket without batch I/O")
	}
	var performed atomic.Int64
	perf.HandleFunc(3, ThreeWay, func(_ context.Context, w ResponseWriter, inv *Invocation) {
		performed.Add(1)
		w.Result(inv.Encoding, inv.Data)
	})
	inv, err := Listen("udp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer inv.Close()
	to := netip.MustParseAddrPort(perf.LocalAddr().String())
	const n, conc = 1000, 64
	work := make(chan int, n)
	for i := range n {
		work <- i
	}
	close(work)
	errs := make(chan error, conc)
	for range conc {
		go func() {
			for i := range work {
				data := []byte{byte(i), byte(i >> 8), 7}
				r, err := inv.Invoke(context.Background(), &Request{To: to, SAP: 3, Handshake: ThreeWay, Data: data})
				if err == nil && !bytes.Equal(r.Data, data) {
					err = &ErrorReply{Data: r.Data}
				}
				if err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for range conc {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if performed.Load() != n {
		t.Errorf("%d invocations performed, want %d", performed.Load(), n)
	}
	// Every RESULT is acknowledged; the last ACKs may still be on their way.
	deadline := time.Now().Add(5 * time.Second)
	for perf.Stats().Confirms < n && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if s := perf.Stats(); s.Confirms != n || s.Drops != ([numDropReasons]uint64{}) || s.SendErrors != 0 {
		t.Errorf("performer stats %+v", s)
	}
	if len(perf.batch.(*batchConn).bufs) != batchSlots {
		t.Log("performer never grew to full batches (a quiet machine)")
	}
}
