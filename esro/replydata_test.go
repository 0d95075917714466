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
