package decode_test

import (
	"bytes"
	"encoding/json"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/esro-emsdp/emsdp/decode"
)

// decodeFile decodes every datagram on port 641 of a capture.
func decodeFile(t *testing.T, path string) []*decode.Record {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	d := decode.New()
	var out []*decode.Record
	err = decode.ReadCapture(f, func(p *decode.Packet) error {
		if p.Src.Port() == 641 || p.Dst.Port() == 641 {
			out = append(out, d.Datagram(p.Time, p.Src, p.Dst, p.Payload))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// find returns the records for which match holds.
func find(recs []*decode.Record, match func(r *decode.Record) bool) []*decode.Record {
	var out []*decode.Record
	for _, r := range recs {
		if match(r) {
			out = append(out, r)
		}
	}
	return out
}

func TestSessionCapture(t *testing.T) {
	recs := decodeFile(t, sessionCapture(t))
	var text, js bytes.Buffer
	for _, r := range recs {
		r.Write(&text)
		b, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		js.Write(b)
	}
	if testing.Verbose() {
		t.Log("\n" + text.String())
	}
	for _, out := range []string{text.String(), js.String()} {
		if strings.Contains(out, devicePW) || strings.Contains(out, "wrong-password") {
			t.Errorf("a password appears in the output")
		}
	}
	for _, r := range recs {
		if r.ESRO == nil || r.Src == "" || r.Dst == "" || r.Time == nil {
			t.Errorf("#%d: incomplete record %+v", r.Frame, r)
		}
	}

	// The short submission: its INVOKE retransmitted once the first
	// RESULT was lost, the RESULT then sent again.
	short := find(recs, func(r *decode.Record) bool {
		return r.EMSD != nil && r.EMSD.Body != nil && r.EMSD.Body.Subject != nil && *r.EMSD.Body.Subject == "Short" &&
			r.EMSD.PDU == "SubmitArgument"
	})
	// (A loaded machine may retransmit more than the lost RESULT asks for.)
	marked := func(rs []*decode.Record) bool {
		return !slices.ContainsFunc(rs, func(r *decode.Record) bool { return !slices.Contains(r.Marks, "retransmission") })
	}
	if len(short) < 2 || len(short[0].Marks) != 0 || !marked(short[1:]) {
		t.Errorf("short submission: %d INVOKEs, want the original and marked retransmissions", len(short))
	}
	if len(short) > 0 {
		s := short[0]
		e := s.EMSD
		if s.ESRO.Type != "INVOKE" || *s.ESRO.SAP != 5 || *s.ESRO.Operation != 33 || s.ESRO.Encoding != "BER" ||
			s.ESRO.HeaderLength != 3 || s.ESRO.DataLength != s.Length-3 {
			t.Errorf("short submission ESRO header %+v", s.ESRO)
		}
		if e.Operation != "submission" || e.Version != "1.1" || e.InstanceID == nil || e.Security == nil ||
			e.Security.Address != "198.036" || e.Security.Password != decode.Mask || e.Content != "ipm95" {
			t.Errorf("short submission EMSD %+v", e)
		}
		if b := e.Body; b.Originator != "198.036" || len(b.Recipients) != 1 || !strings.HasPrefix(b.Recipients[0], "198.037") ||
			b.BodyLength == nil || *b.BodyLength != len("Hello.\n") {
			t.Errorf("short submission content %+v", b)
		}
		results := find(recs, func(r *decode.Record) bool {
			return r.ESRO.Type == "RESULT" && r.ESRO.InvokeFrame == s.Frame
		})
		if len(results) < 2 || !marked(results[1:]) || results[0].EMSD.MessageID == "" ||
			results[0].EMSD.PDU != "SubmitResult" {
			t.Errorf("short submission: results %v, want two or more, the later ones marked retransmission, with the message id", results)
		}
	}

	// The segmented submission and its delivery: every segment shown,
	// the message reassembled at the last one.
	for _, pdu := range []string{"SubmitArgument", "DeliverArgument"} {
		segs := find(recs, func(r *decode.Record) bool {
			return r.EMSD != nil && r.EMSD.PDU == pdu && r.EMSD.Segment != nil
		})
		if len(segs) < 3 {
			t.Errorf("%s: %d segments, want at least 3", pdu, len(segs))
			continue
		}
		first, last := segs[0].EMSD, segs[len(segs)-1].EMSD
		if !first.Segment.First || int(first.Segment.Total) != len(segs) || last.Segment.Number != uint32(len(segs)-1) {
			t.Errorf("%s: segment info first %+v last %+v for %d segments", pdu, first.Segment, last.Segment, len(segs))
		}
		if last.Reassembly == nil || !last.Reassembly.Complete || int(last.Reassembly.Segments) != len(segs) || last.Body == nil {
			t.Fatalf("%s: last segment not reassembled: %+v", pdu, last)
		}
		b := last.Body
		if *b.Subject != "Segmented" || b.Originator != "198.036" || len(b.Recipients) != 2 ||
			!strings.HasPrefix(b.Recipients[1], "carol@example.com") || *b.BodyLength != len(sessionBody()) {
			t.Errorf("%s: reassembled content %+v", pdu, b)
		}
		if pdu == "DeliverArgument" && (last.MessageID == "" || last.Delivered == "" || last.Submitted == "") {
			t.Errorf("delivery: message id or times missing: %+v", last)
		}
	}

	// Control, verify and the refused submission.
	for _, want := range []struct{ pdu, field string }{
		{"DeliveryControlArgument", "198.037"},
		{"DeliveryControlResult", ""},
		{"DeliveryVerifyArgument", "."},
		{"DeliveryVerifyResult", "no-report-sent"},
	} {
		// A loaded machine may retransmit; the repeats must be marked so.
		got := find(recs, func(r *decode.Record) bool { return r.EMSD != nil && r.EMSD.PDU == want.pdu })
		if len(got) < 1 || len(got[0].Marks) != 0 || !marked(got[1:]) || !strings.Contains(got[0].Line(), want.field) {
			t.Errorf("%s: %d records, want one showing %q and only marked retransmissions after it", want.pdu, len(got), want.field)
		}
	}
	errs := find(recs, func(r *decode.Record) bool { return r.ESRO.Type == "ERROR" })
	if len(errs) != 1 || errs[0].EMSD.Error.Name != "security-error" || errs[0].EMSD.Operation != "submission" {
		t.Errorf("refused submission: %d ERRORs, want one security-error", len(errs))
	}
	if acks := find(recs, func(r *decode.Record) bool { return r.ESRO.Type == "ACK" && r.ESRO.InvokeFrame > 0 }); len(acks) < 10 {
		t.Errorf("%d ACKs matched to their INVOKE", len(acks))
	}
}
