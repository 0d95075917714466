package ua

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
	"testing/synctest"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/internal/lossynet"
)

func TestSubmit(t *testing.T) {
	m, d := udpPair(t, Config{Password: "s3cret"})
	msg := &Message{
		To:             []string{"198.037", "bob@example.com"},
		Cc:             []string{"Carol Ünicode <carol@example.org>"},
		Bcc:            []string{"EMSD=198.036"},
		ReplyTo:        []string{"EMSD198.037"},
		InReplyTo:      "<prev@example.com>",
		Subject:        "Grüße from the device",
		Body:           []byte("Hällo\n"),
		Priority:       PriorityUrgent,
		Importance:     ImportanceHigh,
		DeliveryReport: true,
	}
	id, err := d.Submit(t.Context(), msg)
	if err != nil {
		t.Fatal(err)
	}
	subs := m.Submissions()
	if len(subs) != 1 || subs[0].ID != id {
		t.Fatalf("MTS has %+v, client got %v", subs, id)
	}
	s := subs[0]
	if sec := s.Arg.Security; sec == nil || sec.Address == nil || sec.Address.Address != 198036 || sec.Password != "s3cret" {
		t.Fatalf("credentials %+v", sec)
	}
	h := s.IPM.Heading
	nd := emsd.RcptNonDeliveryReport | emsd.RcptDeliveryReport
	want := []emsd.RecipientData{
		{Recipient: emsd.LocalOR(198037, ""), Flags: nd},
		{Recipient: emsd.RFC822OR("bob@example.com"), Flags: nd},
		{Recipient: emsd.RFC822OR("Carol Ünicode <carol@example.org>"), Flags: nd | emsd.RcptCopy},
		{Recipient: emsd.LocalOR(198036, ""), Flags: nd | emsd.RcptBlindCopy},
	}
	if fmt.Sprint(h.Recipients) != fmt.Sprint(want) {
		t.Fatalf("recipients %v, want %v", h.Recipients, want)
	}
	if h.Originator != emsd.LocalOR(198036, "") || h.Sender != nil {
		t.Fatalf("originator %v sender %v", h.Originator, h.Sender)
	}
	if len(h.ReplyTo) != 1 || h.ReplyTo[0] != emsd.LocalOR(198037, "") {
		t.Fatalf("reply-to %v", h.ReplyTo)
	}
	if h.RepliedTo == nil || *h.RepliedTo != emsd.RFC822ID("<prev@example.com>") {
		t.Fatalf("replied-to %v", h.RepliedTo)
	}
	if h.Subject != msg.Subject || string(s.IPM.Body.Text) != "Hällo\n" {
		t.Fatalf("subject %q body %q", h.Subject, s.IPM.Body.Text)
	}
	if h.Flags != emsd.MsgPriorityUrgent|emsd.MsgImportanceHigh {
		t.Fatalf("flags %v", h.Flags)
	}
	if h.MIMEContentType != "text/plain; charset=utf-8" || h.MIMEContentTransferEncoding != "8bit" {
		t.Fatalf("MIME %q %q", h.MIMEContentType, h.MIMEContentTransferEncoding)
	}
	// The id is in the verify list.
	if ok, _ := d.verify.Contains(emsd.MessageID{IsLocal: true, Local: id}); !ok {
		t.Fatal("submitted id not in the verify list")
	}
}

// Segmented submissions (§8): every segment fits the PDU size, gets a new
// instance id, and the MTS reassembles the exact IPM.
func TestSubmitSegmented(t *testing.T) {
	m, d := udpPair(t, Config{Password: "pw"})
	var ids []emsd.LocalMessageID
	for i, size := range []int{10 << 10, 40 << 10, 100} {
		body := bytes.Repeat([]byte(fmt.Sprintf("line %d of a big body\n", i)), size/10+1)[:size]
		id, err := d.Submit(t.Context(), &Message{To: []string{"198.037"}, Subject: fmt.Sprint("big ", i), Body: body})
		if err != nil {
			t.Fatalf("%d octets: %v", size, err)
		}
		ids = append(ids, id)
		got := m.Submissions()[i]
		if got.ID != id || !bytes.Equal(got.IPM.Body.Text, body) {
			t.Fatalf("%d octets: reassembled body differs", size)
		}
	}
	inv := m.Invocations()
	var seqs []uint32
	var counts []int // segments per message
	for i, v := range inv {
		if v.Instance != uint8(i) {
			t.Fatalf("invoke %d has instance id %d", i, v.Instance)
		}
		if len(v.Arg)+1 > emsd.DefaultMaxUserData {
			t.Fatalf("invoke %d: %d octets of user data", i, len(v.Arg)+1)
		}
		var a emsd.SubmitArgument
		must(t, a.Unmarshal(v.Arg, emsd.Options{}))
		switch {
		case a.Segment == nil:
			counts = append(counts, 1)
		case a.Segment.First:
			seqs = append(seqs, a.Segment.SequenceID)
			counts = append(counts, int(a.Segment.Value))
		}
		// Chunks are as large as the PDU allows (§8 Recommend: exact
		// sizing): every segment but the last fills it.
		n := counts[len(counts)-1]
		k := 0
		if a.Segment != nil && !a.Segment.First {
			k = int(a.Segment.Value)
		}
		if k < n-1 && len(v.Arg)+1 < emsd.DefaultMaxUserData-2 {
			t.Fatalf("invoke %d: segment %d of %d has only %d octets", i, k, n, len(v.Arg)+1)
		}
	}
	// 10 KB: 8 segments, 40 KB: 28, the small one unsegmented.
	if fmt.Sprint(counts) != "[8 28 1]" || len(inv) != 8+28+1 || fmt.Sprint(seqs) != "[1 2]" {
		t.Fatalf("%d invokes, segments %v, sequence ids %v", len(inv), counts, seqs)
	}
	// The verify list keeps the latest.
	if ok, _ := d.verify.Contains(emsd.MessageID{IsLocal: true, Local: ids[2]}); !ok {
		t.Fatal("last id not in the verify list")
	}
}

func TestSubmitInvalid(t *testing.T) {
	m, d := udpPair(t, Config{})
	for _, tc := range []struct {
		name string
		msg  Message
		want string
	}{
		{"no recipients", Message{Subject: "x"}, "no recipients"},
		{"bad local address", Message{To: []string{"1.2.3.4"}}, "bad EMSD address"},
		{"too big for 32 bits", Message{To: []string{"99999999999"}}, "bad EMSD address"},
		{"not an address", Message{To: []string{"bob at example"}}, "bad address"},
		{"control character", Message{To: []string{"bob@exa\x01mple.com"}}, "invalid characters"},
		{"invalid UTF-8", Message{To: []string{"b\xffb@example.com"}}, "invalid characters"},
		{"long address", Message{To: []string{strings.Repeat("a", 120) + "@example.com"}}, "at most 127"},
		{"subject too long", Message{To: []string{"198.037"}, Subject: strings.Repeat("ü", 64)}, "subject is 128 octets"},
		{"subject with newline", Message{To: []string{"198.037"}, Subject: "a\r\nBcc: x@y"}, "control characters"},
		{"bad reply-to", Message{To: []string{"198.037"}, ReplyTo: []string{""}}, "empty address"},
		{"bad in-reply-to", Message{To: []string{"198.037"}, InReplyTo: strings.Repeat("x", 128)}, "message id is 128"},
		{"bad extension", Message{To: []string{"198.037"}, Extensions: []emsd.Extension{{Label: "X A", Value: "1"}}}, "header field name"},
		{"beyond 32 segments", Message{To: []string{"198.037"}, Body: make([]byte, 50<<10)}, "segments"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := d.Submit(t.Context(), &tc.msg)
			if !errors.Is(err, ErrInvalidMessage) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want ErrInvalidMessage with %q", err, tc.want)
			}
		})
	}
	if n := len(m.Invocations()); n != 0 {
		t.Fatalf("%d INVOKEs sent for invalid messages", n)
	}
}

func TestSubmitWrongPassword(t *testing.T) {
	m, d := udpPair(t, Config{Password: "right"})
	m.SetPassword(198036, "other")
	_, err := d.Submit(t.Context(), &Message{To: []string{"198.037"}, Body: []byte("x\n")})
	var e *Error
	if !errors.As(err, &e) || e.Code != emsd.CodeSecurity || e.Parameter == nil || *e.Parameter != emsd.CodeSecurity || e.Transient() {
		t.Fatalf("err %v", err)
	}
	if !errors.Is(err, emsd.CodeSecurity) {
		t.Fatal("errors.Is(err, emsd.CodeSecurity) is false")
	}
	if ok, _ := d.verify.Contains(emsd.MessageID{IsLocal: true}); ok {
		t.Fatal("failed submission in the verify list")
	}
}

// A segment that ends in an ESRO failure is invoked once more with the same
// instance id (§1.5); a second failure is reported as such.
func TestSubmitRetry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := lossynet.New(lossynet.Config{})
		n.Record()
		m, d := lossyPair(t, n, fastTimers, Config{})
		mconn := m.Conn().(*lossynet.Conn)
		// Lose the first INVOKE and its retransmissions: N+1 datagrams.
		mconn.DropNextReceived(fastTimers.RetransmitCount + 1)
		id, err := d.Submit(t.Context(), &Message{To: []string{"198.037"}, Body: []byte("hello\n")})
		if err != nil {
			t.Fatal(err)
		}
		if subs := m.Submissions(); len(subs) != 1 || subs[0].ID != id {
			t.Fatalf("submissions %+v", subs)
		}
		refs := map[uint8]uint8{} // invoke ref -> instance id
		for _, ev := range n.Trace() {
			if p, err := esro.ParsePDU(ev.Payload); err == nil && p.Type == esro.TypeInvoke && ev.To == m.Addr() {
				refs[p.Ref] = p.Data[0]
			}
		}
		if len(refs) != 2 {
			t.Fatalf("want 2 invocations, got %v", refs)
		}
		for _, inst := range refs {
			if inst != 0 {
				t.Fatalf("instance ids %v, want 0 on both", refs)
			}
		}

		// Now the MTS is gone for good: two invocations, then the failure.
		m.Close()
		_, err = d.Submit(t.Context(), &Message{To: []string{"198.037"}, Body: []byte("again\n")})
		var f *esro.Failure
		if !errors.As(err, &f) {
			t.Fatalf("err %v, want an ESRO failure", err)
		}
	})
}

// Submissions over a lossy network: each Submit either returns the id the
// MTS recorded for it or fails; the MTS never records a corrupt message.
func TestSubmitLossy(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := lossynet.New(lossynet.Config{Loss: 0.2, Duplicate: 0.1, Reorder: 0.1, Delay: 5e6, MaxDelay: 100e6, Seed: 7})
		timers := esro.ShippedTimers()
		timers.RetransmitCount = 12
		m, d := lossyPair(t, n, timers, Config{Password: "pw"})
		ok := 0
		for i := range 30 {
			body := bytes.Repeat([]byte(fmt.Sprintf("message %d\n", i)), 1+i*150)
			id, err := d.Submit(t.Context(), &Message{To: []string{"198.037"}, Subject: fmt.Sprint(i), Body: body})
			if err != nil {
				continue
			}
			ok++
			found := false
			for _, s := range m.Submissions() {
				if s.ID == id {
					found = true
					if s.IPM.Heading.Subject != fmt.Sprint(i) || !bytes.Equal(s.IPM.Body.Text, body) {
						t.Fatalf("message %d recorded wrongly", i)
					}
				}
			}
			if !found {
				t.Fatalf("message %d: id %v unknown to the MTS", i, id)
			}
		}
		if ok < 25 || n.Stats().Lost == 0 {
			t.Fatalf("%d of 30 submitted; network %+v", ok, n.Stats())
		}
	})
}
