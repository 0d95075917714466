package esro

import (
	"bytes"
	"testing"
	"time"
)

// TestReplyData: an invoker's reply data goes into the INVOKE's buffer
// only when nothing can still be reading that buffer.
func TestReplyData(t *testing.T) {
	for _, tc := range []struct {
		name      string
		sent      bool // Invoke's first send completed
		retx      bool // the INVOKE was retransmitted
		reply     string
		wantSame  bool
		wantReply string
	}{
		{name: "sent once", sent: true, reply: resultText, wantSame: true, wantReply: "ok"},
		{name: "first send not complete", reply: resultText, wantReply: "ok"},
		{name: "retransmitted", sent: true, retx: true, reply: resultText, wantReply: "ok"},
		{name: "reply larger than the INVOKE", sent: true, reply: "81 5e 6f 6b 6f 6b 6f 6b 6f 6b", wantReply: "okokokok"},
		{name: "error reply", sent: true, reply: errorText, wantSame: true, wantReply: "no"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, nil)
			inv := h.invoke(TwoWay, "date")
			kept := inv.kept
			h.expect(invokeDate)
			if tc.retx {
				h.run(3 * time.Second)
				h.expect(invokeDate)
			}
			inv.sent.Store(tc.sent)
			h.recv(tc.reply)
			if !isDone(inv) {
				t.Fatal("no outcome")
			}
			var data []byte
			if inv.res != nil {
				data = inv.res.Data
			} else if er, ok := inv.err.(*ErrorReply); ok {
				data = er.Data
			} else {
				t.Fatalf("outcome %v", inv.err)
			}
			if string(data) != tc.wantReply {
				t.Fatalf("reply data %q, want %q", data, tc.wantReply)
			}
			if same := &data[0] == &kept[0]; same != tc.wantSame {
				t.Errorf("reply in the INVOKE's buffer: %v, want %v", same, tc.wantSame)
			}
			if want := unhex(t, invokeDate); !tc.wantSame && string(kept) != string(want) {
				t.Errorf("INVOKE buffer overwritten: %x, want %x", kept, want)
			}
		})
	}
}

// An INVOKE up to roomPDU octets lives in its invocation's own
// allocation, as a small one does: starting an invocation costs the same
// number of allocations for 1400 octets as for 10, and the reply data
// take the INVOKE's buffer.
func TestInvokerRoom(t *testing.T) {
	h := newHarness(t, nil)
	allocs := func(n int) float64 {
		req := &Request{To: h.peer, SAP: 13, Handshake: TwoWay, Data: make([]byte, n)}
		return testing.AllocsPerRun(50, func() {
			inv, _, err := h.m.invoke(h.now, req, h.peer)
			if err != nil || inv == nil {
				t.Fatalf("invoke: %v", err)
			}
			h.m.out = h.m.out[:0]
		})
	}
	small, large := allocs(10), allocs(1400)
	if large > small {
		t.Errorf("a 1400-octet INVOKE costs %.2f allocations, a 10-octet one %.2f", large, small)
	}
	if huge := allocs(roomPDU); huge <= small {
		t.Errorf("an INVOKE over roomPDU: %.2f allocations, want more than %.2f", huge, small)
	}

	h = newHarness(t, nil)
	inv, _, err := h.m.invoke(h.now, &Request{To: h.peer, SAP: 13, Handshake: TwoWay, Data: make([]byte, 1400)}, h.peer)
	if err != nil {
		t.Fatal(err)
	}
	if &inv.kept[0] != &inv.room[0] {
		t.Fatal("INVOKE not in the invocation's room")
	}
	inv.sent.Store(true)
	reply := append([]byte{byte(TypeResult), inv.key.ref}, make([]byte, 1400)...)
	reply[2] = 'r'
	h.m.receive(h.now, reply, h.peer)
	if inv.res == nil || len(inv.res.Data) != 1400 || inv.res.Data[0] != 'r' || &inv.res.Data[0] != &inv.room[0] {
		t.Fatalf("reply data not in the room (outcome %v)", inv.err)
	}
}

// A performer invocation whose INVOKE does not fit its small buffer is
// allocated with room: an inline handler's reply goes there, a worker's
// copy of the argument does (and the reply, which the handler makes
// while it may still read its argument, then gets a buffer of its own).
// A 1400-octet echo then costs the performer no more allocations than a
// 10-octet one.
func TestPerformerRoom(t *testing.T) {
	invoke := func(ref uint8, n int) []byte {
		b, err := AppendPDU(make([]byte, 0, 3+n), &PDU{Type: TypeInvoke, SAP: 13, Ref: ref, Operation: 2, Encoding: 2, Data: make([]byte, n)})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for _, inline := range []bool{true, false} {
		newH := func() *harness {
			h := newHarness(t, nil)
			var hd Handler = HandlerFunc(nil)
			if inline {
				hd = inlineHandler{hd}
			}
			if err := h.m.bind(13, TwoWay, hd); err != nil {
				t.Fatal(err)
			}
			return h
		}
		t.Run(map[bool]string{true: "inline", false: "worker"}[inline], func(t *testing.T) {
			h := newH()
			h.m.receive(h.now, invoke(1, 1400), h.peer)
			if len(h.started) != 1 {
				t.Fatal("no indication")
			}
			inv := h.started[0]
			arg := inv.call.Data
			if err := h.m.answer(h.now, inv, false, 2, 0, bytes.Repeat([]byte{'r'}, 1400)); err != nil {
				t.Fatal(err)
			}
			inRoom := inv.room != nil && &inv.kept[0] == &inv.room[0]
			if inRoom != inline {
				t.Errorf("reply in the invocation's room: %v, want %v", inRoom, inline)
			}
			if !inline {
				if len(arg) != 1400 || cap(arg) != roomPDU || bytes.ContainsRune(arg, 'r') {
					t.Errorf("worker's argument: %d octets, capacity %d (want %d), overwritten: %v",
						len(arg), cap(arg), roomPDU, bytes.ContainsRune(arg, 'r'))
				}
			}
			if len(inv.kept) != 1402 || inv.kept[2] != 'r' {
				t.Errorf("reply PDU %d octets", len(inv.kept))
			}

			allocs := func(n int) float64 {
				h := newH()
				var dgs [][]byte
				for ref := range 60 {
					dgs = append(dgs, invoke(uint8(ref), n))
				}
				return testing.AllocsPerRun(50, func() {
					h.m.receive(h.now, dgs[0], h.peer)
					dgs = dgs[1:]
					inv := h.started[len(h.started)-1]
					h.m.answer(h.now, inv, false, 2, 0, inv.call.Data)
					h.m.out = h.m.out[:0]
				})
			}
			if small, large := allocs(10), allocs(1400); large > small {
				t.Errorf("a 1400-octet INVOKE and reply cost %.2f allocations, 10-octet ones %.2f", large, small)
			}
		})
	}
}
