package esro

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"
)

var stranger = netip.MustParseAddrPort("203.0.113.9:2003")

// Toward an unproven source a performer's reply waits until the source
// has sent as many octets and datagrams; the INVOKE's retransmission
// earns it.
func TestAmplificationLimit(t *testing.T) {
	h := newHarness(t, nil)
	h.bind(13, ThreeWay)
	h.recvFrom(stranger, "d0 01 02") // 3 octets
	inv := h.started[0]
	h.m.answer(h.now, inv, false, 1, 0, []byte("okay")) // 6 octets
	h.expect()
	if s := h.st.snapshot(); s.Withheld != 1 || s.WithheldBytes != 6 {
		t.Fatalf("withheld %d/%d", s.Withheld, s.WithheldBytes)
	}
	h.at(3 * time.Second)
	h.expect() // the retransmission has no budget either
	h.recvFrom(stranger, "d0 01 02")
	h.expect("41 01 6f 6b 61 79") // 6 octets in, 6 out
	h.recvFrom(stranger, "03 01")
	h.state(inv, stPerformerRefWait)

	// A proven source gets the reference's behaviour.
	h.recv("d0 02 02")
	h.m.answer(h.now, h.started[1], false, 1, 0, []byte("okay"))
	h.expect("41 02 6f 6b 61 79")
}

// FAILUREs sent without state are limited by the datagram that caused
// them: a 2-octet RESULT for no invocation gets nothing, a 3-octet one
// its FAILURE.
func TestAmplificationStatelessFailure(t *testing.T) {
	h := newHarness(t, nil)
	h.recvFrom(stranger, "01 07")
	h.expect()
	h.recvFrom(stranger, "01 07 00")
	h.expect("04 07 01")
	h.recvFrom(stranger, "d0 08 02") // no SAP bound
	h.expect("04 08 02")
}

// However unsolicited datagrams arrive and handlers answer, no unproven
// source gets more octets or datagrams than it sent.
func TestReflectionBound(t *testing.T) {
	for seed := range uint64(20) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 1))
			h := newHarness(t, func(c *Config) { c.FixedTimers = seed%2 == 0 })
			h.bind(5, ThreeWay)
			h.bind(9, TwoWay)
			srcs := []netip.AddrPort{stranger, netip.MustParseAddrPort("203.0.113.10:9"), netip.MustParseAddrPort("[2001:db8::1]:7")}
			in := map[netip.AddrPort][2]int{}
			out := map[netip.AddrPort][2]int{}
			collect := func() {
				for _, o := range h.m.takeOut() {
					c := out[o.to]
					c[0]++
					c[1] += len(o.payload())
					out[o.to] = c
				}
			}
			for range 400 {
				from := srcs[rng.IntN(len(srcs))]
				var b []byte
				switch rng.IntN(6) {
				case 0, 1: // INVOKE to a bound SAP, maybe a duplicate
					sap := []byte{5, 9}[rng.IntN(2)]
					b = []byte{sap<<4 | byte(TypeInvoke), byte(rng.IntN(8)), 2}
				case 2:
					b = []byte{byte(rng.IntN(16))<<4 | byte(TypeInvoke), byte(rng.IntN(8)), 2}
				case 3:
					b = []byte{byte(TypeResult), byte(rng.IntN(8)), 0}[:2+rng.IntN(2)]
				case 4:
					b = []byte{byte(TypeAck), byte(rng.IntN(8))}
				case 5:
					b = []byte{byte(TypeError), byte(rng.IntN(8)), 1}
				}
				c := in[from]
				c[0]++
				c[1] += len(b)
				in[from] = c
				h.m.receive(h.now, b, from)
				for _, inv := range h.started {
					if inv.st == stInvokeReceived && rng.IntN(2) == 0 {
						data := make([]byte, rng.IntN(20))
						if rng.IntN(2) == 0 {
							h.m.refuse(h.now, inv, 1, 4, data)
						} else {
							h.m.answer(h.now, inv, rng.IntN(2) == 0, 1, 4, data)
						}
					}
				}
				collect()
				h.at(h.now.Sub(h.t0) + time.Duration(rng.IntN(3000))*time.Millisecond)
				collect()
			}
			h.run(h.now.Sub(h.t0) + 10*time.Minute)
			collect()
			for _, s := range srcs {
				if out[s][0] > in[s][0] || out[s][1] > in[s][1] {
					t.Errorf("%v: %d datagrams, %d octets out for %d, %d in", s, out[s][0], out[s][1], in[s][0], in[s][1])
				}
			}
		})
	}
}

// A refused invocation from an unproven source leaves a tombstone: no
// in-flight slot, duplicates re-answered, a different INVOKE on the
// number performed anew, gone after T_ref.
func TestTombstone(t *testing.T) {
	h := newHarness(t, nil)
	h.bind(13, ThreeWay)
	h.recvFrom(stranger, "d0 01 02 41 42 43") // 6 octets
	inv := h.started[0]
	if err := h.m.refuse(h.now, inv, 1, 4, []byte{1}); err != nil {
		t.Fatal(err)
	}
	h.expect("42 01 04 01")
	if inv.st != stReleased || h.m.total() != 0 || len(h.m.hostile.tombs) != 1 || h.m.hostile.unproven != 0 {
		t.Fatalf("state %v, %d held, %d tombstones, %d unproven", inv.st, h.m.total(), len(h.m.hostile.tombs), h.m.hostile.unproven)
	}
	if !inv.finished || inv.err != nil {
		t.Fatalf("not confirmed: %v", inv.err)
	}
	h.at(time.Second)
	h.recvFrom(stranger, "d0 01 02 41 42 43")
	h.expect("42 01 04 01") // duplicate: the same ERROR
	if len(h.started) != 1 {
		t.Fatal("duplicate performed again")
	}
	h.recvFrom(stranger, "03 01")
	h.recvFrom(stranger, "d0 01 02 41 42 43")
	h.expect() // acknowledged: absorbed
	h.recvFrom(stranger, "d0 01 02 58")
	if len(h.started) != 2 {
		t.Fatal("new INVOKE on the number not performed")
	}
	h.m.refuse(h.now, h.started[1], 1, 4, nil)
	h.run(h.now.Sub(h.t0) + h.m.td.ref + time.Second)
	if n := len(h.m.hostile.tombs); n != 0 {
		t.Fatalf("%d tombstones after T_ref", n)
	}

	// A proven source's refusal is an ordinary ERROR.
	h.recv("d0 02 02")
	h.m.refuse(h.now, h.started[2], 1, 4, nil)
	h.state(h.started[2], stAckWait)
}

// A handler that never answers an unproven source leaves a tombstone that
// repeats the FAILURE.
func TestTombstoneNoResponse(t *testing.T) {
	h := newHarness(t, nil)
	h.bind(9, TwoWay)
	h.recvFrom(stranger, "90 01 02")
	h.run(h.m.td.noresp)
	h.expect("04 01 02")
	if h.m.total() != 0 || len(h.m.hostile.tombs) != 1 {
		t.Fatalf("%d held, %d tombstones", h.m.total(), len(h.m.hostile.tombs))
	}
	h.recvFrom(stranger, "90 01 02")
	h.expect("04 01 02")
}

func TestTombstoneCap(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.MaxTombstones = 10 })
	h.bind(13, TwoWay)
	for i := range 100 {
		h.recvFrom(netip.AddrPortFrom(stranger.Addr(), uint16(1000+i)), "d0 01 02")
		h.m.refuse(h.now, h.started[i], 1, 4, nil)
	}
	if n := len(h.m.hostile.tombs); n != 10 {
		t.Fatalf("%d tombstones", n)
	}
	if s := h.st.snapshot(); s.Tombstones != 10 || s.InFlightPerformer != 0 {
		t.Fatalf("stats %+v", s)
	}
}

// Unproven sources have caps of their own, per address, per /24 or /48
// and in total; beyond them INVOKEs are dropped unanswered, and proven
// peers still get in.
func TestUnprovenCaps(t *testing.T) {
	h := newHarness(t, func(c *Config) {
		c.MaxInvocations, c.MaxUnproven, c.MaxUnprovenPerPrefix, c.MaxUnprovenPerAddr = 100, 20, 8, 4
	})
	h.bind(13, TwoWay)
	invoke := func(from string, ref byte) {
		h.m.receive(h.now, []byte{0xd0, ref, 2}, netip.MustParseAddrPort(from))
	}
	for i := range 10 {
		invoke("198.51.100.1:7", byte(i))
	}
	if len(h.started) != 4 {
		t.Fatalf("per address: %d started", len(h.started))
	}
	for i := range 10 {
		invoke(fmt.Sprintf("198.51.100.%d:7", 10+i), 1)
	}
	if len(h.started) != 8 {
		t.Fatalf("per /24: %d started", len(h.started))
	}
	for i := range 40 {
		invoke(fmt.Sprintf("[2001:db8:%x::1]:7", i), 1)
	}
	if len(h.started) != 20 {
		t.Fatalf("in total: %d started", len(h.started))
	}
	h.expect() // no answers to what was dropped
	if s := h.st.snapshot(); s.Drops[DropUnprovenLimit] != 40 || s.InFlightUnproven != 20 {
		t.Fatalf("drops %d, unproven %d", s.Drops[DropUnprovenLimit], s.InFlightUnproven)
	}
	h.recv("d0 01 02") // proven
	if len(h.started) != 21 {
		t.Fatal("proven peer refused")
	}
	// Prove frees the unproven slot at once; a release the same.
	h.m.proveInvocation(h.now, h.started[0])
	h.m.answer(h.now, h.started[4], false, 0, 0, nil)
	h.at(h.m.td.inact + h.m.td.ref + time.Second)
	invoke("198.51.100.1:7", 200)
	invoke("198.51.100.99:7", 1)
	if len(h.started) != 23 {
		t.Fatalf("slots not freed: %d started", len(h.started))
	}
}

// A reply to our own invocation proves its source.
func TestReplyProves(t *testing.T) {
	h := newHarness(t, nil)
	h.peer = stranger
	inv := h.invoke(TwoWay, "x")
	h.sent()
	if h.m.isProven(h.now, stranger) {
		t.Fatal("proven before any reply")
	}
	h.recvFrom(netip.MustParseAddrPort("203.0.113.9:2004"), fmt.Sprintf("01 %02x", inv.key.ref))
	if h.m.isProven(h.now, stranger) {
		t.Fatal("proven by a reply from another port")
	}
	h.recvFrom(stranger, fmt.Sprintf("01 %02x", inv.key.ref))
	if !h.m.isProven(h.now, stranger) {
		t.Fatal("not proven by the reply")
	}
	h.at(h.m.cfg.ProvenFor + time.Second)
	if h.m.isProven(h.now, stranger) {
		t.Fatal("still proven after ProvenFor")
	}
}

// On an AuthenticatedConn every source is proven: no unproven cap drops
// its INVOKEs, however many come from one address, and replies are not
// held to what it sent.
func TestAuthenticatedPeersProven(t *testing.T) {
	h := newHarness(t, func(c *Config) {
		c.MaxUnproven, c.MaxUnprovenPerPrefix, c.MaxUnprovenPerAddr = 1, 1, 1
		c.peersAuthenticated = true
	})
	h.bind(13, ThreeWay)
	for i := range 10 {
		h.m.receive(h.now, []byte{0xd0, byte(i), 2}, netip.AddrPortFrom(stranger.Addr(), uint16(2000+i)))
	}
	if len(h.started) != 10 {
		t.Fatalf("%d of 10 INVOKEs started", len(h.started))
	}
	if s := h.st.snapshot(); s.Drops[DropUnprovenLimit] != 0 || s.InFlightUnproven != 0 {
		t.Fatalf("drops %d, unproven %d", s.Drops[DropUnprovenLimit], s.InFlightUnproven)
	}
	h.expect()
	h.m.answer(h.now, h.started[0], false, 1, 0, []byte("a reply longer than its INVOKE"))
	if len(h.sent()) != 1 {
		t.Fatal("reply withheld")
	}
	if s := h.st.snapshot(); s.Withheld != 0 {
		t.Fatalf("withheld %d", s.Withheld)
	}
	// Nor is a proof kept for any of them.
	h.m.prove(h.now, stranger)
	if n := len(h.m.hostile.proven); n != 0 {
		t.Fatalf("%d proofs kept", n)
	}
}

// A proof runs ProvenFor after the last reply that renewed it; a reply
// that comes while the proof still has all but 1/64 of that to run
// leaves it as it is.
func TestProofRenewal(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.ProvenFor = 64 * time.Second })
	a := netip.MustParseAddrPort("198.51.100.9:7")
	h.m.prove(h.now, a)
	h.m.prove(h.now.Add(500*time.Millisecond), a) // within 1/64 (1 s): kept
	if !h.m.isProven(h.t0.Add(64*time.Second-time.Nanosecond), a) || h.m.isProven(h.t0.Add(64*time.Second), a) {
		t.Fatal("proof not ending 64 s after the first reply")
	}
	h.m.prove(h.now.Add(32*time.Second), a) // renewed
	if !h.m.isProven(h.t0.Add(96*time.Second-time.Nanosecond), a) || h.m.isProven(h.t0.Add(96*time.Second), a) {
		t.Fatal("proof not renewed for 64 s")
	}
	h.m.hostile.proven[a] = maxClock // Endpoint.Trust
	h.m.prove(h.now.Add(40*time.Second), a)
	if !h.m.isProven(h.t0.Add(1000*time.Hour), a) {
		t.Fatal("a trusted source's proof ended")
	}
}
