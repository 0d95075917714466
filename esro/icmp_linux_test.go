//go:build linux

package esro

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"
)

// An INVOKE to a closed port ends with an Unreachable failure as soon as
// the kernel reports the ICMP port unreachable, not after every
// retransmission; the socket goes on working for other peers.
func TestUnreachable(t *testing.T) {
	for _, tc := range []struct{ name, network, local, addr string }{
		{"ipv4", "udp4", "127.0.0.1:0", "127.0.0.1:0"},
		{"ipv6", "udp6", "[::1]:0", "[::1]:0"},
		{"dual stack to ipv4", "udp", ":0", "127.0.0.1:0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := listenUDP(t, tc.network, tc.local)
			ep, err := NewEndpoint(c, &Config{Logger: slog.New(slog.DiscardHandler)})
			if err != nil {
				t.Fatal(err)
			}
			defer ep.Close()
			// A port that was just open is closed now.
			closed := listenUDP(t, tc.network, tc.addr)
			to := closed.LocalAddr().(*net.UDPAddr).AddrPort()
			closed.Close()
			peer, err := Listen(tc.network, tc.addr, &Config{Logger: slog.New(slog.DiscardHandler)})
			if err != nil {
				t.Fatal(err)
			}
			defer peer.Close()
			peer.HandleFunc(13, TwoWay, func(_ context.Context, w ResponseWriter, _ *Invocation) { w.Result(0, []byte("ok")) })

			// Well within the first retransmission (3 s): only the ICMP
			// report can end it in time.
			ctx, cancel := context.WithTimeout(context.Background(), 2500*time.Millisecond)
			defer cancel()
			for i := range 3 {
				_, err = ep.Invoke(ctx, &Request{To: to, SAP: 13, Handshake: ThreeWay, Data: []byte("x")})
				var f *Failure
				var ue *UnreachableError
				if !errors.As(err, &f) || f.Reason != Unreachable || f.Remote || !errors.As(err, &ue) ||
					ue.Addr != unmapped(to) || !errors.Is(err, syscall.ECONNREFUSED) {
					t.Fatalf("invocation %d: %v", i, err)
				}
				// The socket still serves a live peer at once.
				// (An argument as long as the answer: ep is not proven to
				// the peer.)
				res, err := ep.Invoke(ctx, &Request{To: peer.LocalAddr().(*net.UDPAddr).AddrPort(), SAP: 13, Handshake: TwoWay, Data: []byte("hi")})
				if err != nil || string(res.Data) != "ok" {
					t.Fatalf("live peer after it: %v %v", res, err)
				}
			}
			if s := ep.Stats(); s.Unreachable != 3 || s.LocalFailures[reasonIndex(Unreachable)] != 3 {
				t.Fatalf("stats: %d unreachable", s.Unreachable)
			}
		})
	}
}

func unmapped(a netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(a.Addr().Unmap(), a.Port()) }

// A report that does not quote an INVOKE as it was sent ends nothing.
func TestUnreachableMustQuote(t *testing.T) {
	h := newHarness(t, nil)
	inv := h.invoke(TwoWay, "abc")
	h.sent()
	for _, p := range [][]byte{nil, {0xd0, inv.key.ref}, {0xd0, inv.key.ref + 1, 0x82}, append([]byte{0xd0, inv.key.ref, 0x82}, "abX"...)} {
		h.m.unreachable(h.now, icmpReport{to: h.peer, payload: p, err: syscall.ECONNREFUSED})
		h.state(inv, stInvokeSent)
	}
	h.m.unreachable(h.now, icmpReport{to: h.peer, payload: inv.kept[:3], err: syscall.ECONNREFUSED})
	h.state(inv, stInvokerRefWait)
}

// Datagrams the kernel drops for want of receive buffer are counted:
// from SO_MEMINFO when the socket is quiet (its reads bring no control
// messages), from SO_RXQ_OVFL once it is busy.
func TestKernelDrops(t *testing.T) {
	for _, busy := range []bool{false, true} {
		t.Run(map[bool]string{false: "quiet", true: "busy"}[busy], func(t *testing.T) {
			c := listenUDP(t, "udp4", "127.0.0.1:0")
			c.SetReadBuffer(4096) // the kernel's minimum: a few datagrams
			b := newBatchConn(c).(*batchConn)
			if busy { // as after busyReads reads that found a datagram waiting
				for len(b.bufs) < batchSlots {
					b.bufs = append(b.bufs, make([]byte, maxDatagram+1))
				}
			}
			var st counters
			b.setCounters(&st)
			tx := listenUDP(t, "udp4", "127.0.0.1:0")
			const sent = 200
			to := c.LocalAddr().(*net.UDPAddr).AddrPort()
			for range sent {
				tx.WriteToUDPAddrPort(make([]byte, 100), to)
			}
			// A datagram carries the count as it was when it was
			// queued: read what queued before the drops, then one sent
			// after them.
			c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
			for {
				if _, err := b.read(); err != nil {
					break
				}
			}
			c.SetReadDeadline(time.Time{})
			tx.WriteToUDPAddrPort(make([]byte, 100), to)
			if _, err := b.read(); err != nil {
				t.Fatal(err)
			}
			if !busy {
				if len(b.bufs) != 1 {
					t.Fatalf("%d read buffers: the quiet path was not tested", len(b.bufs))
				}
				b.refreshDrops()
			}
			t.Logf("%d dropped", st.kernelDrops.Load())
			if d := st.kernelDrops.Load(); d == 0 || d >= sent {
				t.Fatalf("%d drops of %d", d, sent)
			}
		})
	}
}
