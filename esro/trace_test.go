package esro

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"testing/synctest"

	"github.com/esro-emsdp/emsdp/internal/lossynet"
)

type traced struct {
	out  bool
	peer netip.AddrPort
	pdu  []byte
}

type traceLog struct {
	mu sync.Mutex
	l  []traced
}

func (t *traceLog) trace(out bool, peer netip.AddrPort, pdu []byte) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.l = append(t.l, traced{out, peer, bytes.Clone(pdu)})
}

func (t *traceLog) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	var b bytes.Buffer
	for _, x := range t.l {
		dir := "in "
		if x.out {
			dir = "out"
		}
		fmt.Fprintf(&b, "%s %s % x\n", dir, x.peer, x.pdu)
	}
	return b.String()
}

// Config.Trace sees every datagram in and out, on both ends, with the
// peer's address, whether it arrives through the machine or not.
func TestTrace(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var it, pt traceLog
		n := lossynet.New(lossynet.Config{})
		ic, _ := n.Listen("127.0.0.1:2003")
		pc, _ := n.Listen("127.0.0.1:2002")
		ie, err := NewEndpoint(ic, &Config{Logger: quiet, Trace: it.trace})
		if err != nil {
			t.Fatal(err)
		}
		pe, err := NewEndpoint(pc, &Config{Logger: quiet, Trace: pt.trace})
		if err != nil {
			t.Fatal(err)
		}
		defer ie.Close()
		defer pe.Close()
		pe.Handle(13, ThreeWay, &echo{})
		r, err := ie.Invoke(t.Context(), &Request{To: pc.AddrPort(), SAP: 13, Operation: 2, Encoding: 2, Handshake: ThreeWay, Data: []byte("date")})
		if err != nil || string(r.Data) != "date" {
			t.Fatalf("invoke: %v %v", r, err)
		}
		// An INVOKE for an unbound SAP: answered FAILURE, traced both ways.
		_, err = ie.Invoke(t.Context(), &Request{To: pc.AddrPort(), SAP: 14, Operation: 2, Handshake: ThreeWay})
		if err == nil {
			t.Fatal("invoke to an unbound SAP succeeded")
		}
		synctest.Wait()
		inv, perf := ic.AddrPort(), pc.AddrPort()
		ref := it.l[0].pdu[1]
		want := fmt.Sprintf("out %s d0 %02x 82 64 61 74 65\nin  %s 81 %02x 64 61 74 65\nout %s 03 %02x\n", perf, ref, perf, ref, perf, ref)
		if got := it.String(); len(got) < len(want) || got[:len(want)] != want {
			t.Errorf("invoker trace:\n%s\nwant it to start with\n%s", got, want)
		}
		want = fmt.Sprintf("in  %s d0 %02x 82 64 61 74 65\nout %s 81 %02x 64 61 74 65\nin  %s 03 %02x\n", inv, ref, inv, ref, inv, ref)
		if got := pt.String(); len(got) < len(want) || got[:len(want)] != want {
			t.Errorf("performer trace:\n%s\nwant it to start with\n%s", got, want)
		}
		last := pt.l[len(pt.l)-1]
		if !last.out || last.pdu[0] != byte(TypeFailure) || last.pdu[2] != 2 {
			t.Errorf("performer's last traced datagram % x, want FAILURE(2)", last.pdu)
		}
	})
}

// The same on real UDP sockets, which Linux reads and writes in batches.
func TestTraceUDP(t *testing.T) {
	var it, pt traceLog
	pe, err := Listen("udp", "127.0.0.1:0", &Config{Logger: quiet, Trace: pt.trace})
	if err != nil {
		t.Fatal(err)
	}
	defer pe.Close()
	ie, err := Listen("udp", "127.0.0.1:0", &Config{Logger: quiet, Trace: it.trace})
	if err != nil {
		t.Fatal(err)
	}
	defer ie.Close()
	pe.Handle(13, TwoWay, &echo{})
	perf := pe.LocalAddr().(*net.UDPAddr).AddrPort()
	for i := range 3 {
		data := fmt.Sprintf("x%d", i)
		if r, err := ie.Invoke(t.Context(), &Request{To: perf, SAP: 13, Operation: 2, Handshake: TwoWay, Data: []byte(data)}); err != nil || string(r.Data) != data {
			t.Fatalf("invoke: %v %v", r, err)
		}
	}
	ie.Close()
	pe.Close()
	count := func(l *traceLog, out bool, typ PDUType) int {
		l.mu.Lock()
		defer l.mu.Unlock()
		n := 0
		for _, x := range l.l {
			if x.out == out && PDUType(x.pdu[0]&7) == typ {
				n++
			}
		}
		return n
	}
	if count(&it, true, TypeInvoke) != 3 || count(&it, false, TypeResult) != 3 ||
		count(&pt, false, TypeInvoke) != 3 || count(&pt, true, TypeResult) != 3 {
		t.Errorf("traces:\ninvoker\n%s\nperformer\n%s", it.String(), pt.String())
	}
}
