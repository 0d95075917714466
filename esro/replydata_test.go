package esro

import (
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
