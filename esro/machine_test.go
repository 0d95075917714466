package esro

import (
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"
)

// harness drives a machine with explicit time: the fake clock of the §5
// transition tests. Timers are the shipped ini's, fixed: T_retx 3 s,
// T_last 4.2 s, T_ref 22 s, T_inact 4 s, T_noresp 33 s.
type harness struct {
	t       *testing.T
	m       *machine
	st      counters
	started []*invocation
	t0, now time.Time
	peer    netip.AddrPort
}

func (h *harness) indicate(inv *invocation, _ Handler) { h.started = append(h.started, inv) }

func newHarness(t *testing.T, mod func(*Config)) *harness {
	t.Helper()
	cfg := Config{FixedTimers: true, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	if mod != nil {
		mod(&cfg)
	}
	rc, err := cfg.resolved()
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{t: t, t0: time.Unix(1_800_000_000, 0), peer: netip.MustParseAddrPort("192.0.2.7:2003")}
	h.now = h.t0
	h.m = newMachine(rc, &h.st, h)
	h.m.nextRef = 0x5d // first invocation gets 0x5e, as in the captures
	// The peer is proven, as a device its application authenticated: the
	// §5 transitions are the reference's. hostile_test.go covers the
	// limits on unproven sources.
	h.m.prove(h.now, h.peer)
	return h
}

// at moves the clock to t0+d and fires what is due.
func (h *harness) at(d time.Duration) {
	h.t.Helper()
	if n := h.t0.Add(d); n.Before(h.now) {
		h.t.Fatalf("clock moving back to %v", d)
	} else {
		h.now = n
	}
	h.m.advance(h.now)
}

// run steps the clock through every deadline up to t0+d, as a perfect
// clock would fire them.
func (h *harness) run(d time.Duration) {
	h.t.Helper()
	end := h.t0.Add(d)
	for {
		at, ok := h.m.nextDeadline()
		if !ok || at.After(end) {
			break
		}
		h.at(at.Sub(h.t0))
	}
	h.at(d)
}

func (h *harness) recv(hexs string) { h.recvFrom(h.peer, hexs) }

func (h *harness) recvFrom(from netip.AddrPort, hexs string) {
	h.t.Helper()
	h.m.receive(h.now, unhex(h.t, hexs), from)
}

// sent returns the datagrams queued since the last call, as hex.
func (h *harness) sent() []string {
	var s []string
	for _, o := range h.m.takeOut() {
		s = append(s, hex.EncodeToString(o.payload()))
	}
	return s
}

func (h *harness) expect(want ...string) {
	h.t.Helper()
	got := h.sent()
	for i := range want {
		want[i] = strings.ReplaceAll(want[i], " ", "")
	}
	if !slices.Equal(got, want) {
		h.t.Fatalf("at +%v sent %q, want %q", h.now.Sub(h.t0), got, want)
	}
}

func (h *harness) invoke(hs Handshake, data string) *invocation {
	h.t.Helper()
	inv, wait, err := h.m.invoke(h.now, &Request{To: h.peer, SAP: 13, Operation: 2, Encoding: 2, Handshake: hs, Data: []byte(data)}, h.peer)
	if err != nil || wait != nil {
		h.t.Fatalf("invoke: %v %v", err, wait)
	}
	return inv
}

func (h *harness) state(inv *invocation, want state) {
	h.t.Helper()
	if inv.st != want {
		h.t.Fatalf("at +%v state %v, want %v", h.now.Sub(h.t0), inv.st, want)
	}
}

// takeOut hands the queued datagrams to the test (the Endpoint recycles
// them instead).
func (m *machine) takeOut() []outgoing {
	o := m.out
	m.out = nil
	return o
}

func isDone(inv *invocation) bool { return inv.finished }

func (h *harness) bind(sap uint8, hs Handshake) {
	h.t.Helper()
	if err := h.m.bind(sap, hs, HandlerFunc(nil)); err != nil {
		h.t.Fatal(err)
	}
}

const (
	invokeDate = "d0 5e 82 64 61 74 65" // INVOKE SAP 13, ref 0x5e, op 2, enc 2, "date"
	resultText = "81 5e 6f 6b"          // RESULT ref 0x5e, enc 2, "ok"
	errorText  = "82 5e 02 6e 6f"       // ERROR ref 0x5e, enc 2, value 2, "no"
	ack5e      = "03 5e"
)

func TestTimerFormulas(t *testing.T) {
	for _, tt := range []struct {
		tm                             Timers
		retx, last, ref, inact, noresp int // ms
	}{
		{ShippedTimers(), 3000, 4200, 22000, 4000, 33000},
		{CompiledTimers(), 15000, 22000, 70000, 20000, 105000},
	} {
		ms := func(d time.Duration) int { return int(d / time.Millisecond) }
		got := []int{ms(tt.tm.RetransmitInterval()), ms(tt.tm.LastWait()), ms(tt.tm.ReferenceHold()), ms(tt.tm.Inactivity()), ms(tt.tm.NoResponse())}
		if want := []int{tt.retx, tt.last, tt.ref, tt.inact, tt.noresp}; !slices.Equal(got, want) {
			t.Errorf("%+v: got %v want %v", tt.tm, got, want)
		}
	}
}

// §5.2: 3-way invoker, every transition.
func TestInvoker3Way(t *testing.T) {
	t.Run("result, ACK, inactivity, hold, release", func(t *testing.T) {
		h := newHarness(t, nil)
		inv := h.invoke(ThreeWay, "date")
		h.expect(invokeDate)
		h.state(inv, stInvokeSent)
		h.at(time.Second)
		h.recv(resultText)
		h.expect(ack5e)
		h.state(inv, stAckSent)
		if !isDone(inv) || inv.err != nil || string(inv.res.Data) != "ok" || inv.res.Encoding != 2 {
			t.Fatalf("outcome %+v %v", inv.res, inv.err)
		}
		h.at(3 * time.Second) // duplicate RESULT: re-ACK, restart T_inact
		h.recv(resultText)
		h.expect(ack5e)
		h.at(6999 * time.Millisecond)
		h.state(inv, stAckSent)
		h.at(7 * time.Second) // T_inact from the duplicate
		h.state(inv, stInvokerRefWait)
		h.expect()
		h.at(10 * time.Second) // duplicate in InvokerRefWait: re-ACK (Open Point 10), restart T_ref
		h.recv(resultText)
		h.expect(ack5e)
		// hold = T_ref + max(T_last, T_inact) + L = 29.2 s, see machine
		h.at(39199 * time.Millisecond)
		h.state(inv, stInvokerRefWait)
		h.at(39200 * time.Millisecond)
		h.state(inv, stReleased)
		h.recv(resultText) // late reply after release: FAILURE(ref, 1)
		h.expect("04 5e 01")
		if len(h.m.invokerMap()) != 0 || h.m.peers[h.peer].nheld != 0 {
			t.Fatal("reference not released")
		}
	})
	t.Run("error", func(t *testing.T) {
		h := newHarness(t, nil)
		inv := h.invoke(ThreeWay, "date")
		h.sent()
		h.recv(errorText)
		h.expect(ack5e)
		var er *ErrorReply
		if !errors.As(inv.err, &er) || er.Value != 2 || string(er.Data) != "no" || er.Encoding != 2 {
			t.Fatalf("got %v", inv.err)
		}
	})
	t.Run("retransmissions, T_last, failure 2", func(t *testing.T) {
		h := newHarness(t, nil)
		inv := h.invoke(ThreeWay, "date")
		h.expect(invokeDate)
		for k := 1; k <= 8; k++ {
			h.at(time.Duration(3*k)*time.Second - time.Millisecond)
			h.expect()
			h.at(time.Duration(3*k) * time.Second)
			h.expect(invokeDate) // byte-identical resend
		}
		h.at(27 * time.Second) // RETX with k = N: start T_last, send nothing
		h.expect()
		h.at(31199 * time.Millisecond)
		if isDone(inv) {
			t.Fatal("failed before T_last")
		}
		h.at(31200 * time.Millisecond) // (N+1)·T_retx + T_last
		var f *Failure
		if !errors.As(inv.err, &f) || f.Reason != UserNotResponding || f.Remote {
			t.Fatalf("got %v", inv.err)
		}
		h.state(inv, stInvokerRefWait)
		h.recv(resultText) // late RESULT: discarded, no ACK (no reply was delivered)
		h.expect()
		h.at(60399 * time.Millisecond)
		h.state(inv, stInvokerRefWait)
		h.at(60400 * time.Millisecond)
		h.state(inv, stReleased)
		if got := h.st.retransmissions.Load(); got != 8 {
			t.Fatalf("%d retransmissions", got)
		}
	})
	t.Run("result while T_last runs", func(t *testing.T) {
		h := newHarness(t, nil)
		inv := h.invoke(ThreeWay, "date")
		h.at(27 * time.Second)
		h.at(28 * time.Second)
		h.sent()
		h.recv(resultText)
		h.expect(ack5e)
		if inv.err != nil || inv.res == nil {
			t.Fatalf("got %v", inv.err)
		}
	})
	t.Run("FAILURE PDU", func(t *testing.T) {
		h := newHarness(t, nil)
		inv := h.invoke(ThreeWay, "date")
		h.sent()
		h.recv("04 5e 07") // values beyond 3 pass through
		var f *Failure
		if !errors.As(inv.err, &f) || f.Reason != 7 || !f.Remote {
			t.Fatalf("got %v", inv.err)
		}
		h.state(inv, stInvokerRefWait)
		h.recv("04 5e 02") // ignored outside InvokePduSent
		h.expect()
		if h.st.drops[DropUnmatchedFailure].Load() != 1 {
			t.Fatal("second FAILURE not counted as a drop")
		}
		h.at(3 * time.Second) // no retransmission after the failure
		h.expect()
	})
	t.Run("FAILURE in AckPduSent ignored", func(t *testing.T) {
		h := newHarness(t, nil)
		inv := h.invoke(ThreeWay, "date")
		h.recv(resultText)
		h.sent()
		h.recv("04 5e 01")
		h.state(inv, stAckSent)
		if inv.err != nil {
			t.Fatal(inv.err)
		}
	})
	t.Run("abandoned by the caller", func(t *testing.T) {
		h := newHarness(t, nil)
		inv := h.invoke(ThreeWay, "date")
		h.sent()
		h.m.abandon(h.now, inv, errors.New("gave up"))
		h.state(inv, stInvokerRefWait)
		h.at(3 * time.Second)
		h.expect() // no retransmission
		h.recv(resultText)
		h.expect() // no ACK for a reply nobody received
		h.at(32199 * time.Millisecond)
		h.state(inv, stInvokerRefWait) // the late RESULT at +3 s restarted the hold
		h.at(32200 * time.Millisecond)
		h.state(inv, stReleased)
	})
}

// §5.4: 2-way invoker.
func TestInvoker2Way(t *testing.T) {
	h := newHarness(t, nil)
	inv := h.invoke(TwoWay, "date")
	h.expect(invokeDate)
	h.at(3 * time.Second)
	h.expect(invokeDate)
	h.recv(resultText)
	h.expect() // no ACK in 2-way
	h.state(inv, stInvokerRefWait)
	if inv.res == nil {
		t.Fatal("no result")
	}
	h.at(10 * time.Second) // duplicate: silent, restarts the hold
	h.recv(resultText)
	h.expect()
	h.at(39199 * time.Millisecond)
	h.state(inv, stInvokerRefWait)
	h.at(39200 * time.Millisecond)
	h.state(inv, stReleased)
	h.recv(resultText)
	h.expect("04 5e 01")

	h2 := newHarness(t, nil)
	inv = h2.invoke(TwoWay, "date")
	h2.run(31199 * time.Millisecond)
	if isDone(inv) {
		t.Fatal("failed early")
	}
	h2.run(31200 * time.Millisecond)
	var f *Failure
	if !errors.As(inv.err, &f) || f.Reason != UserNotResponding {
		t.Fatalf("got %v", inv.err)
	}
}

// §5.3: 3-way performer, every transition.
func TestPerformer3Way(t *testing.T) {
	t.Run("answer, ACK, hold, release", func(t *testing.T) {
		h := newHarness(t, nil)
		h.bind(13, ThreeWay)
		h.recv(invokeDate)
		if len(h.started) != 1 {
			t.Fatal("no INVOKE.indication")
		}
		inv := h.started[0]
		if c := inv.call; c.SAP != 13 || c.RemoteSAP != 12 || c.Ref != 0x5e || c.Operation != 2 || c.Encoding != 2 || string(c.Data) != "date" || c.Peer != h.peer || c.Handshake != ThreeWay {
			t.Fatalf("indication %+v", c)
		}
		h.state(inv, stInvokeReceived)
		h.at(time.Second)
		h.recv(invokeDate) // duplicate while the user works: silence
		h.expect()
		if len(h.started) != 1 {
			t.Fatal("duplicate INVOKE indicated")
		}
		if err := h.m.answer(h.now, inv, false, 2, 0, []byte("ok")); err != nil {
			t.Fatal(err)
		}
		h.expect(resultText)
		h.state(inv, stAckWait)
		if err := h.m.answer(h.now, inv, false, 2, 0, []byte("again")); !errors.Is(err, ErrAnswered) {
			t.Fatalf("second answer: %v", err) // scenario 5001
		}
		h.expect()
		h.at(2 * time.Second)
		h.recv(ack5e)
		h.state(inv, stPerformerRefWait)
		if !isDone(inv) || inv.err != nil {
			t.Fatalf("confirm %v", inv.err)
		}
		h.at(10 * time.Second) // duplicate INVOKE and ACK: silent, restart T_ref
		h.recv(invokeDate)
		h.recv(ack5e)
		h.expect()
		h.at(31999 * time.Millisecond)
		h.state(inv, stPerformerRefWait)
		h.at(32 * time.Second)
		h.state(inv, stReleased)
		h.recv(invokeDate) // after release: a new invocation
		if len(h.started) != 2 {
			t.Fatal("INVOKE after release not indicated")
		}
	})
	t.Run("retransmit reply, T_last, failure 0", func(t *testing.T) {
		h := newHarness(t, nil)
		h.bind(13, ThreeWay)
		h.recv(invokeDate)
		inv := h.started[0]
		h.m.answer(h.now, inv, true, 2, 2, []byte("no"))
		h.expect(errorText)
		for k := 1; k <= 8; k++ {
			h.at(time.Duration(3*k) * time.Second)
			h.expect(errorText)
		}
		h.at(27 * time.Second)
		h.expect()
		h.at(31200 * time.Millisecond)
		var f *Failure
		if !errors.As(inv.err, &f) || f.Reason != Transmission {
			t.Fatalf("got %v", inv.err)
		}
		h.state(inv, stPerformerRefWait)
		h.recv(invokeDate) // absorbed within T_ref after the failure
		h.expect()
		if len(h.started) != 1 {
			t.Fatal("re-indicated")
		}
	})
	t.Run("duplicate INVOKE in AckPduWait", func(t *testing.T) {
		h := newHarness(t, nil)
		h.bind(13, ThreeWay)
		h.recv(invokeDate)
		inv := h.started[0]
		h.m.answer(h.now, inv, false, 2, 0, []byte("ok"))
		h.sent()
		h.at(3 * time.Second)
		h.expect(resultText) // k = 1
		h.at(4 * time.Second)
		h.recv(invokeDate)
		h.expect(resultText) // immediate resend from the kept copy
		h.at(6999 * time.Millisecond)
		h.expect() // RETX restarted from the duplicate ...
		h.at(7 * time.Second)
		h.expect(resultText)
		if inv.k != 2 {
			t.Fatalf("k = %d: the duplicate reset the count (Open Point 11)", inv.k)
		}
	})
	t.Run("user never answers", func(t *testing.T) {
		h := newHarness(t, nil)
		h.bind(13, ThreeWay)
		h.recv(invokeDate)
		inv := h.started[0]
		h.at(32999 * time.Millisecond)
		h.expect()
		h.at(33 * time.Second) // T_noresp
		h.expect("04 5e 02")
		var f *Failure
		if !errors.As(inv.err, &f) || f.Reason != LocalResource || !errors.Is(inv.err, ErrNoResponse) {
			t.Fatalf("got %v", inv.err)
		}
		h.state(inv, stFailedRefWait)
		if err := h.m.answer(h.now, inv, false, 0, 0, nil); !errors.Is(err, ErrInvocationEnded) {
			t.Fatalf("late answer: %v", err)
		}
		h.at(40 * time.Second)
		h.recv(invokeDate) // duplicate: the same FAILURE again (Open Point 8)
		h.expect("04 5e 02")
		h.at(62 * time.Second)
		h.state(inv, stReleased)
	})
	t.Run("performer timeout off", func(t *testing.T) {
		h := newHarness(t, func(c *Config) { c.PerformerTimeout = -1 })
		h.bind(13, ThreeWay)
		h.recv(invokeDate)
		h.at(time.Hour)
		h.expect()
		h.state(h.started[0], stInvokeReceived)
	})
}

// §5.5: 2-way performer.
func TestPerformer2Way(t *testing.T) {
	h := newHarness(t, nil)
	h.bind(13, TwoWay)
	h.recv(invokeDate)
	inv := h.started[0]
	h.m.answer(h.now, inv, false, 2, 0, []byte("ok"))
	h.expect(resultText)
	h.state(inv, stResultSent)
	h.at(3 * time.Second) // never retransmitted
	h.expect()
	h.recv(invokeDate) // duplicate within T_inact: re-answer, restart T_inact (Open Point 9)
	h.expect(resultText)
	h.recv(ack5e) // ACK to a 2-way performer: ignored
	h.expect()
	if h.st.drops[DropUnexpected].Load() != 1 {
		t.Fatal("ACK not counted")
	}
	h.at(6999 * time.Millisecond)
	h.state(inv, stResultSent)
	h.at(7 * time.Second) // T_inact: local confirm
	h.state(inv, stPerformerRefWait)
	if !isDone(inv) || inv.err != nil {
		t.Fatal("no confirm")
	}
	h.at(10 * time.Second)
	h.recv(invokeDate) // still re-answered from the kept reply, see machine
	h.expect(resultText)
	h.at(31999 * time.Millisecond)
	h.state(inv, stPerformerRefWait)
	h.at(32 * time.Second)
	h.state(inv, stReleased)

	// user never answers: FAILURE(2) to the invoker, failure 1 locally
	h2 := newHarness(t, nil)
	h2.bind(13, TwoWay)
	h2.recv(invokeDate)
	h2.run(33 * time.Second)
	h2.expect("04 5e 02")
}

// §2.7 demultiplexing and §6 limits.
func TestReceiveDemux(t *testing.T) {
	t.Run("unbound SAP", func(t *testing.T) {
		h := newHarness(t, nil)
		h.recv("e0 cc 82 64 61 74 65")
		h.expect("04 cc 02") // capture esro-invoke-unbound-sap
		h.recv("e0 cc 82 64 61 74 65")
		h.expect("04 cc 02") // again for each retransmission, no state kept
		h.recv("00 01 00")   // SAP 0 can never be bound
		h.expect("04 01 02")
		if h.m.total() != 0 {
			t.Fatal("state kept")
		}
	})
	t.Run("unknown replies", func(t *testing.T) {
		h := newHarness(t, nil)
		h.recv("01 09 41")
		h.recv("02 0a 01")
		h.expect("04 09 01", "04 0a 01")
		h.recv("03 0b")
		h.recv("04 0c 01")
		h.expect()
		if h.st.drops[DropUnmatchedAck].Load() != 1 || h.st.drops[DropUnmatchedFailure].Load() != 1 {
			t.Fatal("drops not counted")
		}
	})
	t.Run("malformed datagrams get no reply", func(t *testing.T) {
		h := newHarness(t, nil)
		h.bind(13, ThreeWay)
		for _, s := range []string{"", "05", "07 01 02", "d0 01", "00", "01", "02 01", "03", "04 01"} {
			h.recv(s)
		}
		h.expect()
		if len(h.started) != 0 {
			t.Fatal("truncated INVOKE indicated")
		}
		if h.st.drops[DropEmpty].Load() != 1 || h.st.drops[DropBadType].Load() != 2 || h.st.drops[DropShort].Load() != 6 {
			t.Fatalf("drops %v", h.st.snapshot().Drops)
		}
	})
	t.Run("ACK before the answer", func(t *testing.T) {
		h := newHarness(t, nil)
		h.bind(13, ThreeWay)
		h.recv(invokeDate)
		h.recv(ack5e)
		h.state(h.started[0], stInvokeReceived)
		if h.st.drops[DropUnmatchedAck].Load() != 1 {
			t.Fatal("not counted")
		}
	})
	t.Run("same number on another SAP", func(t *testing.T) {
		h := newHarness(t, nil)
		h.bind(13, ThreeWay)
		h.bind(11, ThreeWay)
		h.recv(invokeDate)
		h.recv("b0 5e 82 64 61 74 65")
		h.expect()
		if len(h.started) != 1 || h.st.drops[DropSAPMismatch].Load() != 1 {
			t.Fatal("second SAP not rejected")
		}
	})
	t.Run("peers by IP and port", func(t *testing.T) {
		h := newHarness(t, nil)
		h.bind(13, ThreeWay)
		h.recv(invokeDate)
		h.recvFrom(netip.MustParseAddrPort("192.0.2.7:4000"), invokeDate)
		if len(h.started) != 2 {
			t.Fatal("same number from another port not a new invocation")
		}
		h.m.answer(h.now, h.started[1], false, 0, 0, nil)
		if o := h.m.takeOut(); len(o) != 1 || o[0].to.Port() != 4000 {
			t.Fatalf("reply to %v", o)
		}
	})
	t.Run("peers by IP only", func(t *testing.T) {
		h := newHarness(t, func(c *Config) { c.IPOnlyPeers = true })
		h.bind(13, ThreeWay)
		h.recv(invokeDate)
		h.recvFrom(netip.MustParseAddrPort("192.0.2.7:4000"), invokeDate)
		if len(h.started) != 1 {
			t.Fatal("IP-only mode took a duplicate for a new invocation")
		}
		h.m.answer(h.now, h.started[0], false, 2, 0, []byte("ok"))
		h.sent()
		h.recvFrom(netip.MustParseAddrPort("192.0.2.7:4000"), ack5e)
		h.state(h.started[0], stPerformerRefWait) // ACK from another port accepted
	})
	t.Run("FAILURE for a performer awaiting its ACK", func(t *testing.T) {
		h := newHarness(t, nil)
		h.bind(13, ThreeWay)
		h.recv(invokeDate)
		inv := h.started[0]
		h.m.answer(h.now, inv, false, 2, 0, []byte("ok"))
		h.sent()
		h.recv("04 5e 01")
		var f *Failure
		if !errors.As(inv.err, &f) || f.Reason != LocalResource || !f.Remote {
			t.Fatalf("got %v", inv.err)
		}
		h.state(inv, stPerformerRefWait)
		h.at(3 * time.Second)
		h.expect() // retransmission stopped
	})
	t.Run("invocation limits", func(t *testing.T) {
		h := newHarness(t, func(c *Config) {
			c.MaxInvocations, c.MaxPeerInvocations = 3, 2
			c.MaxUnprovenPerPrefix, c.MaxUnprovenPerAddr = 3, 3
		})
		h.bind(13, ThreeWay)
		h.recv("d0 01 02")
		h.recvFrom(netip.MustParseAddrPort("192.0.2.7:4000"), "d0 02 02") // same IP, another port
		h.recv("d0 03 02")
		h.expect("04 03 01") // per-address cap, all ports together
		h.recvFrom(netip.MustParseAddrPort("198.51.100.1:9"), "d0 04 02")
		h.recvFrom(netip.MustParseAddrPort("198.51.100.2:9"), "d0 05 02")
		h.expect("04 05 01") // total cap
		if len(h.started) != 3 {
			t.Fatalf("%d started", len(h.started))
		}
		_, _, err := h.m.invoke(h.now, &Request{To: h.peer, SAP: 1, Handshake: TwoWay}, h.peer)
		var f *Failure
		if !errors.As(err, &f) || f.Reason != LocalResource || !errors.Is(err, ErrTooManyInvokes) {
			t.Fatalf("invoke at the cap: %v", err)
		}
	})
}

// The per-address count of performer invocations lives in an entry that
// every peer of the address points to: it must stay right while peers of
// the address come and go, and go with the last of them (many source
// ports of one address, more than maxIdlePeers, so idle peers are
// forgotten along the way).
func TestPerAddressCountAcrossPeers(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.MaxPeerInvocations = 2 })
	h.bind(13, TwoWay)
	addr := netip.MustParseAddr("192.0.2.7")
	// One long-lived invocation from port 1 keeps its peer busy.
	h.recvFrom(netip.AddrPortFrom(addr, 1), "d0 01 02")
	if len(h.started) != 1 {
		t.Fatal("not started")
	}
	for i := range maxIdlePeers + 200 {
		from := netip.AddrPortFrom(addr, uint16(100+i))
		h.m.prove(h.now, from)
		h.m.receive(h.now, []byte{0xd0, byte(i), 0x02}, from)
		inv := h.started[len(h.started)-1]
		if inv.addr != from {
			t.Fatalf("invocation %d not started (%v)", i, inv.addr)
		}
		if err := h.m.answer(h.now, inv, false, 0, 0, nil); err != nil {
			t.Fatal(err)
		}
		h.m.takeOut()
		// Past T_inact and the reference hold: released, its peer idle.
		h.now = h.now.Add(time.Minute)
		h.m.advance(h.now)
		checkInvariants(t, h.m)
	}
	if l := h.m.perfPerIP[addr]; l == nil || l.n != 1 {
		t.Fatalf("count %+v, want 1 invocation", l)
	}
	// The cap still counts every port of the address together.
	h.recvFrom(netip.AddrPortFrom(addr, 2), "d0 02 02")
	h.recvFrom(netip.AddrPortFrom(addr, 3), "d0 03 02")
	h.expect("04 03 01")
	checkInvariants(t, h.m)
}

// §4: reference numbers.
func TestReferenceNumbers(t *testing.T) {
	h := newHarness(t, nil)
	h.m.nextRef = 254
	a := h.invoke(TwoWay, "")
	b := h.invoke(TwoWay, "")
	if a.key.ref != 255 || b.key.ref != 0 {
		t.Fatalf("refs %d %d: counter does not wrap", a.key.ref, b.key.ref)
	}
	other := netip.MustParseAddrPort("198.51.100.1:2002")
	c, _, _ := h.m.invoke(h.now, &Request{To: other, SAP: 1, Handshake: TwoWay}, other)
	if c.key.ref != 1 {
		t.Fatalf("ref %d: one engine-wide counter expected", c.key.ref)
	}
	// Fill the peer's 256 numbers; the next request must wait, and a
	// release must wake it.
	for range 254 {
		h.invoke(TwoWay, "")
	}
	_, wait, err := h.m.invoke(h.now, &Request{To: h.peer, SAP: 1, Handshake: TwoWay}, h.peer)
	if err != nil || wait == nil {
		t.Fatalf("257th invoke: %v %v", err, wait)
	}
	h.recv("01 ff") // RESULT for ref 255; the 2-way hold then releases it
	h.run(29200 * time.Millisecond)
	select {
	case <-wait:
	default:
		t.Fatal("waiter not woken by the release")
	}
	inv, w2, err := h.m.invoke(h.now, &Request{To: h.peer, SAP: 1, Handshake: TwoWay}, h.peer)
	if err != nil || w2 != nil || inv.key.ref != 255 {
		t.Fatalf("after release: %v %v %v", inv, w2, err)
	}
}

func TestUnbindWithLiveInvocations(t *testing.T) {
	h := newHarness(t, nil)
	h.bind(13, ThreeWay)
	h.recv(invokeDate)
	inv := h.started[0]
	if err := h.m.unbind(h.now, 13); err != nil {
		t.Fatal(err)
	}
	if !errors.Is(inv.err, ErrSAPNotBound) {
		t.Fatalf("got %v", inv.err)
	}
	h.recv(invokeDate) // held number: absorbed
	h.expect()
	h.recv("d0 5f 82") // new number: unbound SAP
	h.expect("04 5f 02")
	h.at(22 * time.Second)
	h.state(inv, stReleased)
	if err := h.m.unbind(h.now, 13); !errors.Is(err, ErrSAPNotBound) {
		t.Fatalf("second unbind: %v", err)
	}
}

func TestBindValidation(t *testing.T) {
	h := newHarness(t, nil)
	f := HandlerFunc(nil)
	for _, tt := range []struct {
		sap uint8
		hs  Handshake
	}{{0, ThreeWay}, {16, ThreeWay}, {5, 1}, {5, 4}} {
		if err := h.m.bind(tt.sap, tt.hs, f); err == nil {
			t.Errorf("bind(%d, %d) succeeded", tt.sap, tt.hs)
		}
	}
	if err := h.m.bind(5, TwoWay, nil); err == nil {
		t.Error("nil handler accepted")
	}
	h.bind(5, TwoWay)
	if err := h.m.bind(5, ThreeWay, f); !errors.Is(err, ErrSAPBound) {
		t.Errorf("rebind: %v", err)
	}
}

func TestRequestValidation(t *testing.T) {
	to := netip.MustParseAddrPort("127.0.0.1:2002")
	for _, r := range []Request{
		{SAP: 13, Handshake: ThreeWay},         // no address
		{To: to, SAP: 16, Handshake: ThreeWay}, // scenario 2002
		{To: to, SAP: 13, Operation: 64, Handshake: ThreeWay},
		{To: to, SAP: 13, Encoding: 4, Handshake: ThreeWay},
		{To: to, SAP: 13, Handshake: 1},
		{To: to, SAP: 13, Handshake: ThreeWay, Data: make([]byte, 1501)}, // scenario 4xxx
	} {
		if err := r.validate(1500); err == nil {
			t.Errorf("%+v accepted", r)
		}
	}
	ok := Request{To: to, SAP: 13, Handshake: ThreeWay, Data: make([]byte, 1500)}
	if err := ok.validate(1500); err != nil {
		t.Errorf("exactly PDUSize refused: %v", err)
	}
	h := newHarness(t, nil)
	h.bind(13, TwoWay)
	h.recv(invokeDate)
	if err := h.m.answer(h.now, h.started[0], false, 0, 0, make([]byte, 1501)); !errors.Is(err, ErrTooLarge) {
		t.Errorf("oversize answer: %v", err)
	}
	if err := h.m.answer(h.now, h.started[0], false, 4, 0, nil); err == nil {
		t.Error("encoding 4 accepted")
	}
}

func TestAdaptiveRTO(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.FixedTimers = false; c.Jitter = -1 })
	p := h.m.peerFor(h.peer)
	if got := h.m.rto(p, 0); got != 3*time.Second {
		t.Fatalf("initial RTO %v, want T_retx", got)
	}
	inv := h.invoke(ThreeWay, "date")
	h.at(40 * time.Millisecond)
	h.recv(resultText)
	if !p.hasRTT || p.srtt != 40*time.Millisecond || p.rttvar != 20*time.Millisecond {
		t.Fatalf("srtt %v rttvar %v", p.srtt, p.rttvar)
	}
	_ = inv
	if got := h.m.rto(p, 0); got != 200*time.Millisecond { // 40 + 4·20 = 120, clamped to MinRTO
		t.Fatalf("RTO %v", got)
	}
	if got := h.m.rto(p, 2); got != 480*time.Millisecond { // 120·4
		t.Fatalf("backoff RTO %v", got)
	}
	if got := h.m.rto(p, 10); got != 3*time.Second {
		t.Fatalf("RTO %v not capped at MaxRTO", got)
	}
	// A retransmitted invocation gives no sample (Karn).
	inv2, _, _ := h.m.invoke(h.now, &Request{To: h.peer, SAP: 13, Handshake: ThreeWay}, h.peer)
	h.at(h.now.Sub(h.t0) + 200*time.Millisecond)
	h.at(h.now.Sub(h.t0) + 5*time.Second)
	h.recv("01 " + hex.EncodeToString([]byte{inv2.key.ref}))
	if p.srtt != 40*time.Millisecond {
		t.Fatalf("sample taken from a retransmitted invocation: srtt %v", p.srtt)
	}
	// With jitter, every value stays inside the bounds.
	hj := newHarness(t, func(c *Config) { c.FixedTimers = false; c.Jitter = 0.5 })
	pj := hj.m.peerFor(hj.peer)
	for k := range 20 {
		if d := hj.m.rto(pj, k%6); d < hj.m.cfg.MinRTO || d > hj.m.cfg.MaxRTO {
			t.Fatalf("jittered RTO %v outside bounds", d)
		}
	}
}

func TestConfigValidation(t *testing.T) {
	for _, c := range []Config{
		{Timers: Timers{Roundtrip: -1, Retransmit: 1}},
		{Timers: Timers{Roundtrip: 1, Retransmit: 0}},
		{Timers: Timers{Roundtrip: 1, Retransmit: 1, RetransmitCount: 256}},
		{MinRTO: time.Second, MaxRTO: time.Millisecond},
		{Jitter: 0.9},
		{PDUSize: 70000},
		{MaxInvocations: -1},
	} {
		if _, err := c.resolved(); err == nil {
			t.Errorf("%+v accepted", c)
		}
	}
	r, err := (*Config)(nil).resolved()
	if err != nil || r.Timers != ShippedTimers() || r.PDUSize != 1500 || r.MaxRTO != 3*time.Second {
		t.Fatalf("defaults %+v %v", r, err)
	}
}

func TestSupersededInvocation(t *testing.T) {
	h := newHarness(t, nil)
	h.bind(13, ThreeWay)
	h.recv(invokeDate)
	old := h.started[0]
	h.m.answer(h.now, old, false, 2, 0, []byte("ok"))
	h.sent()
	h.recv("d0 5e 82 77 65 65 6b 64 61 79") // same number, other argument: a new invocation
	if len(h.started) != 2 || string(h.started[1].call.Data) != "weekday" {
		t.Fatal("new INVOKE on a held number not performed")
	}
	if !errors.Is(old.err, ErrSuperseded) {
		t.Fatalf("old invocation ended by %v", old.err)
	}
	h.state(old, stReleased)
	h.at(3 * time.Second)
	h.expect() // the old reply is no longer retransmitted
	if h.st.superseded.Load() != 1 || h.m.total() != 1 {
		t.Fatal("supersede not accounted")
	}
}

// The linger deadline (linger.go) that each ACK sets, on the shipped timers:
// T_retx 3 s, N 8, RT 1 s.
func TestLingerDeadline(t *testing.T) {
	ms := func(n int) time.Duration { return time.Duration(n) * time.Millisecond }
	until := func(h *harness, want time.Duration) {
		t.Helper()
		if got := h.m.lingerUntil.Sub(h.t0); got != want {
			t.Fatalf("at +%v lingering until +%v, want +%v", h.now.Sub(h.t0), got, want)
		}
	}
	t.Run("clean link: one quiet interval", func(t *testing.T) {
		h := newHarness(t, nil)
		h.invoke(ThreeWay, "date")
		h.sent()
		h.at(ms(100))
		h.recv(resultText)
		h.expect(ack5e)
		// grace = max(2·RT = 2 s, srtt + 4·rttvar = 100 + 4·50 ms)
		until(h, ms(100+3000+2000))
	})
	t.Run("lost ACK on a fresh link: the performer's whole budget", func(t *testing.T) {
		h := newHarness(t, nil)
		h.invoke(ThreeWay, "date")
		h.sent()
		h.at(ms(100))
		h.recv(resultText)
		h.at(ms(3100))
		h.recv(resultText) // 1 loss in 3 datagrams: q^(k+1) ≤ 1e-4 needs k ≥ 8 = N
		h.expect(ack5e, ack5e)
		until(h, ms(100+8*3000+2000)) // bounded by N·T_retx + grace after the first reply
		h.at(ms(6100))
		h.recv(resultText)
		h.expect(ack5e)
		until(h, ms(100+8*3000+2000))
	})
	t.Run("clean history: each duplicate re-arms one interval", func(t *testing.T) {
		h := newHarness(t, nil)
		h.m.peerFor(h.peer).loss = lossEstimate{trials: 1000}
		h.invoke(ThreeWay, "date")
		h.sent()
		h.at(ms(100))
		h.recv(resultText)
		until(h, ms(5100))
		h.at(ms(3100))
		h.recv(resultText)
		until(h, ms(8100))
		h.at(ms(8000)) // T_inact over: InvokerRefWait re-ACKs and lingers too
		h.recv(resultText)
		h.expect(ack5e, ack5e, ack5e)
		until(h, ms(13000))
	})
	t.Run("INVOKE retransmitted: a lossy link", func(t *testing.T) {
		h := newHarness(t, nil)
		h.invoke(ThreeWay, "date")
		h.at(3 * time.Second)
		h.at(ms(3100))
		h.recv(resultText)
		h.expect(invokeDate, invokeDate, ack5e)
		// No RTT sample from a retransmitted INVOKE (Karn): grace = 2·RT.
		until(h, ms(3100+8*3000+2000))
	})
	t.Run("2-way: nothing to linger for", func(t *testing.T) {
		h := newHarness(t, nil)
		h.invoke(TwoWay, "date")
		h.recv(resultText)
		h.recv(resultText)
		if !h.m.lingerUntil.IsZero() {
			t.Fatalf("lingering until %v", h.m.lingerUntil)
		}
	})
	t.Run("no retransmissions configured: only the grace", func(t *testing.T) {
		h := newHarness(t, func(c *Config) { c.Timers = ShippedTimers(); c.Timers.RetransmitCount = 0 })
		h.invoke(ThreeWay, "date")
		h.recv(resultText)
		until(h, ms(2000))
	})
}

func TestQuietIntervals(t *testing.T) {
	for _, tc := range []struct {
		trials, losses uint32
		n, want        int
	}{
		{0, 0, 8, 1},
		{2, 0, 8, 1},
		{1000, 1, 8, 1},   // q² = 1e-6
		{100, 2, 8, 2},    // q² = 4e-4, q³ = 8e-6
		{100, 5, 8, 3},    // 0.05^4 ≈ 6e-6
		{1000, 200, 8, 5}, // 0.2^6 ≈ 6e-5
		{1000, 200, 3, 3}, // capped at N
		{3, 1, 8, 8},
		{4, 4, 8, 8},
		{4, 4, 0, 1},
	} {
		l := lossEstimate{trials: tc.trials, losses: tc.losses}
		if got := l.quietIntervals(tc.n); got != tc.want {
			t.Errorf("%d losses in %d, N %d: %d intervals, want %d", tc.losses, tc.trials, tc.n, got, tc.want)
		}
	}
	var l lossEstimate
	for i := range 3 * lossWindow {
		if i%10 == 0 {
			l.lost()
		} else {
			l.sent()
		}
	}
	if q := float64(l.losses) / float64(l.trials); l.trials >= lossWindow || q < 0.08 || q > 0.12 {
		t.Fatalf("after decay %d losses in %d trials", l.losses, l.trials)
	}
}
