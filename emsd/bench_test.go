package emsd

import (
	"testing"
	"time"
)

// typicalSubmission is the TV13-like IPM of a device submission.
func typicalSubmission() *IPM {
	return &IPM{Heading: Heading{
		Originator: LocalOR(198036, ""),
		Recipients: []RecipientData{
			{Recipient: LocalOR(198037, ""), Flags: RcptNonDeliveryReport},
			{Recipient: RFC822OR("someone@example.com"), Flags: RcptNonDeliveryReport},
			{Recipient: RFC822OR("other@example.org"), Flags: RcptCopy | RcptNonDeliveryReport},
		},
		RepliedTo: ptr(RFC822ID("<prev@example.com>")),
		Subject:   "Lunch tomorrow?",
	}, Body: &Body{Text: []byte("Shall we meet at noon at the usual place? Reply before 10.\n")}}
}

func BenchmarkSubmitEncode(b *testing.B) {
	m := typicalSubmission()
	buf := make([]byte, 0, 512)
	arg := &SubmitArgument{ContentType: ContentIPM}
	b.ReportAllocs()
	for b.Loop() {
		c, err := m.AppendMarshal(buf[:0], v11)
		if err != nil {
			b.Fatal(err)
		}
		arg.Contents = c
		if _, err := arg.AppendMarshal(make([]byte, 0, 512), v11); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkSubmitDecode(b *testing.B) {
	m := typicalSubmission()
	c, _ := m.Marshal(v11)
	raw, _ := (&SubmitArgument{ContentType: ContentIPM, Contents: c}).Marshal(v11)
	b.SetBytes(int64(len(raw)))
	b.ReportAllocs()
	for b.Loop() {
		var a SubmitArgument
		if err := a.Unmarshal(raw, v11); err != nil {
			b.Fatal(err)
		}
		if _, err := a.Content(v11); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkSplitReassemble40K(b *testing.B) {
	_, content := bigIPM(b, 40*1024)
	sp := Splitter{}
	b.SetBytes(int64(len(content)))
	b.ReportAllocs()
	for b.Loop() {
		segs, err := sp.SplitSubmit(&SubmitArgument{ContentType: ContentIPM}, content, 1)
		if err != nil {
			b.Fatal(err)
		}
		r := NewReassembler[int](ReassemblerConfig{})
		for _, s := range segs {
			var a SubmitArgument
			if err := a.Unmarshal(s, v11); err != nil {
				b.Fatal(err)
			}
			if _, err := r.AddSubmit(time.Time{}, 1, &a); err != nil {
				b.Fatal(err)
			}
		}
	}
}
