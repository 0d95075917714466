package emsd

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
	"time"
)

// bigIPM returns an encoded IPM of roughly size octets.
func bigIPM(t testing.TB, size int) (*IPM, []byte) {
	t.Helper()
	body := []byte(strings.Repeat("0123456789abcdef ", size/17+1)[:size])
	m := &IPM{Heading: Heading{Originator: LocalOR(198036, ""),
		Recipients: []RecipientData{{Recipient: RFC822OR("someone@example.com"), Flags: RcptNonDeliveryReport}},
		Subject:    "big"}, Body: &Body{Text: body}}
	b, err := m.Marshal(v11)
	if err != nil {
		t.Fatal(err)
	}
	return m, b
}

// longID is a 127-octet rfc822 message id, the longest allowed.
var longID = RFC822ID("<" + strings.Repeat("m", 113) + "@example.com>")

func deliverEnv() *DeliverArgument {
	return &DeliverArgument{MessageID: longID, DeliveryTime: 0xffffffff, SubmissionTime: ptr(Time(0xfffffffe)),
		Security: &SecurityElement{Password: strings.Repeat("p", MaxPassword)}, ContentType: ContentIPM}
}

func TestSplitReassemble(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, size := range []int{10 * 1024, 40 * 1024} {
		for _, deliver := range []bool{false, true} {
			for _, v := range []Version{V1_1, V1_0} {
				o := Options{Version: v}
				m, content := bigIPM(t, size)
				sp := Splitter{Options: o}
				var segs [][]byte
				var err error
				if deliver {
					segs, err = sp.SplitDeliver(deliverEnv(), content, 0x12345678)
				} else {
					segs, err = sp.SplitSubmit(&SubmitArgument{Security: &SecurityElement{Password: "pw"},
						ContentType: ContentIPM}, content, 9)
				}
				if err != nil {
					t.Fatal(err)
				}
				overhead := 0
				if v == V1_1 {
					overhead = 1 // instance id
				}
				total := 0
				for k, s := range segs {
					if len(s)+overhead > DefaultMaxUserData {
						t.Fatalf("segment %d: %d octets of user data", k, len(s)+overhead)
					}
					total += len(s)
				}
				// Chunks are as large as possible: all but the last segment
				// fill the user data exactly, so the count is minimal.
				for k, s := range segs[:len(segs)-1] {
					if len(s)+overhead != DefaultMaxUserData {
						t.Fatalf("segment %d not full: %d", k, len(s)+overhead)
					}
				}
				// Deliver in random order after the first segment.
				order := rng.Perm(len(segs) - 1)
				r := NewReassembler[string](ReassemblerConfig{})
				now := time.Unix(1000, 0)
				var got []byte
				for i, k := range append([]int{-1}, order...) {
					k++
					var c []byte
					if deliver {
						var a DeliverArgument
						if err := a.Unmarshal(segs[k], o); err != nil {
							t.Fatal(err)
						}
						want := deliverEnv()
						if a.MessageID != want.MessageID || *a.SubmissionTime != *want.SubmissionTime ||
							a.Security.Password != want.Security.Password || a.Segment.SequenceID != 0x12345678 {
							t.Fatalf("segment %d envelope %+v", k, a)
						}
						done, err := r.AddDeliver(now, "mts", &a)
						if err != nil {
							t.Fatal(err)
						}
						if done != nil {
							want.Contents = done.Contents
							if !reflect.DeepEqual(done, want) {
								t.Fatalf("reassembled envelope %s", dump(done))
							}
							c = done.Contents
						}
					} else {
						var a SubmitArgument
						if err := a.Unmarshal(segs[k], o); err != nil {
							t.Fatal(err)
						}
						done, err := r.AddSubmit(now, "dev", &a)
						if err != nil {
							t.Fatal(err)
						}
						if done != nil {
							c = done.Contents
						}
					}
					if (c != nil) != (i == len(segs)-1) {
						t.Fatalf("complete after %d of %d segments", i+1, len(segs))
					}
					got = c
				}
				mustEqualBytes(t, "reassembled", got, content)
				var back IPM
				if err := back.Unmarshal(got, v11); err != nil || !reflect.DeepEqual(&back, m) {
					t.Fatalf("IPM after reassembly: %v", err)
				}
				t.Logf("%d KB deliver=%v %v: %d segments, %d octets", size/1024, deliver, v, len(segs), total)
			}
		}
	}
}

func TestSplitBoundaries(t *testing.T) {
	sp := Splitter{}
	env := &SubmitArgument{ContentType: ContentIPM}
	// Unsegmented while the whole argument fits: 1499 octets of argument
	// = 30 82 05 d8 02 01 20 + 1492 content octets.
	segs, err := sp.SplitSubmit(env, make([]byte, 1492), 1)
	if err != nil || len(segs) != 1 || len(segs[0]) != 1499 {
		t.Fatalf("%v %d", err, len(segs))
	}
	var a SubmitArgument
	if err := a.Unmarshal(segs[0], v11); err != nil || a.Segment != nil {
		t.Fatal(err, a.Segment)
	}
	segs, err = sp.SplitSubmit(env, make([]byte, 1493), 1)
	if err != nil || len(segs) != 2 {
		t.Fatalf("%v %d", err, len(segs))
	}
	// Empty content.
	segs, err = sp.SplitSubmit(env, nil, 1)
	if err != nil || len(segs) != 1 {
		t.Fatal(err)
	}
	mustEqualBytes(t, "empty", segs[0], hx("30 03 02 01 20"))
	// MaxUserData includes the instance-id octet in 1.1 only.
	sp10 := Splitter{Options: v10, MaxUserData: 100}
	segs, err = sp10.SplitSubmit(env, make([]byte, 95), 1)
	if err != nil || len(segs) != 1 || len(segs[0]) != 100 {
		t.Fatalf("1.0: %v %d", err, len(segs[0]))
	}
	sp11 := Splitter{MaxUserData: 100}
	segs, err = sp11.SplitSubmit(env, make([]byte, 95), 1)
	if err != nil || len(segs) != 2 || len(segs[0]) > 99 {
		t.Fatalf("1.1: %v %d", err, len(segs))
	}
}

func TestSplitLimits(t *testing.T) {
	_, content := bigIPM(t, 50*1024)
	sp := Splitter{}
	_, err := sp.SplitDeliver(deliverEnv(), content, 1)
	var sl *SegmentLimitError
	if !errors.As(err, &sl) || !errors.Is(err, ErrContentTooLong) || sl.Diagnostic() != DiagContentTooLong ||
		sl.Max != 32 || sl.Needed <= 32 {
		t.Fatalf("too long: %v", err)
	}
	// A DOS-style UA limit of 16 segments (§8).
	_, content = bigIPM(t, 30*1024)
	if _, err := (&Splitter{MaxSegments: 16}).SplitSubmit(&SubmitArgument{}, content, 1); !errors.As(err, &sl) || sl.Max != 16 {
		t.Fatalf("16: %v", err)
	}
	// Exactly 32 full segments still work.
	sp = Splitter{}
	env := &SubmitArgument{ContentType: ContentIPM}
	one, _ := sp.SplitSubmit(env, make([]byte, 3000), 1)
	var a SubmitArgument
	if err := a.Unmarshal(one[0], v11); err != nil {
		t.Fatal(err)
	}
	chunk := len(a.Contents)
	segs, err := sp.SplitSubmit(env, make([]byte, 32*chunk), 1)
	if err != nil || len(segs) != 32 {
		t.Fatalf("32 segments: %v %d", err, len(segs))
	}
	if _, err := sp.SplitSubmit(env, make([]byte, 32*chunk+1), 1); !errors.Is(err, ErrContentTooLong) {
		t.Fatalf("33 segments: %v", err)
	}
	// The reference's 1400-octet chunks do not fit with a long message id
	// (Open Point 7); exact sizing does.
	_, content = bigIPM(t, 4000)
	if _, err := (&Splitter{ChunkSize: 1400}).SplitDeliver(deliverEnv(), content, 1); !errors.Is(err, ErrEnvelopeTooLarge) {
		t.Fatalf("1400 with long id: %v", err)
	}
	if _, err := (&Splitter{MaxUserData: 150}).SplitDeliver(deliverEnv(), content, 1); !errors.Is(err, ErrEnvelopeTooLarge) {
		t.Fatalf("tiny PDU: %v", err)
	}
	// Encode errors of the envelope are passed on.
	env2 := deliverEnv()
	env2.MessageID = RFC822ID(strings.Repeat("x", 128))
	if _, err := sp.SplitDeliver(env2, content, 1); !errors.Is(err, ErrTooLong) {
		t.Fatalf("bad envelope: %v", err)
	}
}

func seg(first bool, seq, v uint32, c string) *SubmitArgument {
	return &SubmitArgument{Segment: &SegmentInfo{First: first, SequenceID: seq, Value: v},
		ContentType: ContentIPM, Contents: []byte(c)}
}

func wantReasm(t *testing.T, err error, target error, code ErrorCode) {
	t.Helper()
	var re *ReassemblyError
	if !errors.Is(err, target) || !errors.As(err, &re) || re.Code != code || CodeOf(err) != code {
		t.Fatalf("got %v, want %v (code %d)", err, target, code)
	}
}

func TestReassemblerRules(t *testing.T) {
	now := time.Unix(5000, 0)
	r := NewReassembler[string](ReassemblerConfig{})
	add := func(from string, a *SubmitArgument) (*SubmitArgument, error) { return r.AddSubmit(now, from, a) }

	// Unsegmented arguments pass through.
	plain := &SubmitArgument{ContentType: ContentIPM, Contents: []byte("x")}
	if got, err := add("d", plain); err != nil || got != plain {
		t.Fatal(err)
	}
	// Bad segment counts.
	for _, n := range []uint32{0, 33, 1 << 31} {
		_, err := add("d", seg(true, 1, n, "a"))
		wantReasm(t, err, ErrSegmentCount, CodeProtocolViolation)
	}
	// Unknown sequence.
	_, err := add("d", seg(false, 9, 1, "a"))
	wantReasm(t, err, ErrUnknownSequence, CodeProtocolViolation)

	if got, err := add("d", seg(true, 1, 3, "A")); got != nil || err != nil {
		t.Fatal(got, err)
	}
	// Outside the mask, beyond 31, segment 0 again, duplicates.
	for _, k := range []uint32{3, 31, 32, 1000} {
		_, err := add("d", seg(false, 1, k, "x"))
		wantReasm(t, err, ErrSegmentNumber, CodeProtocolViolation)
	}
	_, err = add("d", seg(false, 1, 0, "x"))
	wantReasm(t, err, ErrDuplicateSegment, CodeProtocolViolation)
	if got, err := add("d", seg(false, 1, 2, "C")); got != nil || err != nil {
		t.Fatal(got, err)
	}
	_, err = add("d", seg(false, 1, 2, "C"))
	wantReasm(t, err, ErrDuplicateSegment, CodeProtocolViolation)
	// Same sequence id from another sender is a different message.
	_, err = add("other", seg(false, 1, 1, "B"))
	wantReasm(t, err, ErrUnknownSequence, CodeProtocolViolation)
	// A delivery segment does not complete a submission.
	_, err = r.AddDeliver(now, "d", &DeliverArgument{Segment: &SegmentInfo{SequenceID: 1, Value: 1}})
	wantReasm(t, err, ErrUnknownSequence, CodeProtocolViolation)
	if r.Len() != 1 || r.Buffered() != 2 {
		t.Fatalf("partial state %d %d", r.Len(), r.Buffered())
	}
	got, err := add("d", seg(false, 1, 1, "B"))
	if err != nil || got == nil || string(got.Contents) != "ABC" || got.Segment != nil {
		t.Fatalf("%v %+v", err, got)
	}
	if r.Len() != 0 || r.Buffered() != 0 {
		t.Fatal("state after completion")
	}
	// A new first segment restarts the sequence.
	add("d", seg(true, 2, 2, "old"))
	add("d", seg(true, 2, 2, "new"))
	got, err = add("d", seg(false, 2, 1, "!"))
	if err != nil || string(got.Contents) != "new!" || r.Buffered() != 0 {
		t.Fatalf("%v %+v", err, got)
	}
	// 32 segments use the whole mask.
	add("d", seg(true, 3, 32, "0"))
	for k := uint32(1); k < 31; k++ {
		if got, err := add("d", seg(false, 3, k, "-")); got != nil || err != nil {
			t.Fatal(k, got, err)
		}
	}
	if got, err := add("d", seg(false, 3, 31, "$")); err != nil || len(got.Contents) != 32 {
		t.Fatal(err)
	}
}

func TestReassemblerTimeout(t *testing.T) {
	t0 := time.Unix(10000, 0)
	r := NewReassembler[int](ReassemblerConfig{Timeout: UAReassemblyTimeout})
	r.AddSubmit(t0, 1, seg(true, 1, 2, "a"))
	r.AddSubmit(t0.Add(30*time.Second), 1, seg(true, 2, 2, "b"))
	if n := r.Expire(t0.Add(59 * time.Second)); n != 0 || r.Len() != 2 {
		t.Fatal("expired early")
	}
	// Just before the deadline a segment is still accepted.
	if got, err := r.AddSubmit(t0.Add(59*time.Second), 1, seg(false, 2, 1, "c")); err != nil || string(got.Contents) != "bc" {
		t.Fatal(err)
	}
	_, err := r.AddSubmit(t0.Add(60*time.Second), 1, seg(false, 1, 1, "x"))
	wantReasm(t, err, ErrUnknownSequence, CodeProtocolViolation)
	if r.Len() != 0 || r.Buffered() != 0 {
		t.Fatal("not discarded")
	}
	r.AddSubmit(t0, 1, seg(true, 3, 2, "a"))
	r.AddSubmit(t0.Add(time.Second), 2, seg(true, 3, 2, "a"))
	if n := r.Expire(t0.Add(60 * time.Second)); n != 1 || r.Len() != 1 {
		t.Fatalf("Expire: %d", n)
	}
	if n := r.Expire(t0.Add(61 * time.Second)); n != 1 || r.Len() != 0 {
		t.Fatalf("Expire: %d", n)
	}
	// Default timeout is the MTS's 120 s.
	r2 := NewReassembler[int](ReassemblerConfig{})
	r2.AddSubmit(t0, 1, seg(true, 1, 2, "a"))
	if r2.Expire(t0.Add(119*time.Second)) != 0 || r2.Expire(t0.Add(120*time.Second)) != 1 {
		t.Fatal("default timeout")
	}
}

func TestReassemblerBounds(t *testing.T) {
	now := time.Unix(0, 0)
	r := NewReassembler[int](ReassemblerConfig{MaxPartial: 2, MaxOctets: 10})
	r.AddSubmit(now, 1, seg(true, 1, 2, "aaaa"))
	r.AddSubmit(now, 2, seg(true, 1, 2, "bbbb"))
	_, err := r.AddSubmit(now, 3, seg(true, 1, 2, "c"))
	wantReasm(t, err, ErrTooManyPartial, CodeResource)
	// A complete single-segment message needs no buffer.
	if got, err := r.AddSubmit(now, 3, seg(true, 1, 1, "c")); err != nil || string(got.Contents) != "c" {
		t.Fatal(err)
	}
	// 8 of 10 octets used: 3 more overflow, and the partial message is dropped.
	_, err = r.AddSubmit(now, 1, seg(false, 1, 1, "xyz"))
	wantReasm(t, err, ErrReassemblyMemory, CodeResource)
	if r.Len() != 1 || r.Buffered() != 4 {
		t.Fatalf("after overflow: %d %d", r.Len(), r.Buffered())
	}
	_, err = r.AddSubmit(now, 1, seg(true, 5, 2, "0123456789"))
	wantReasm(t, err, ErrReassemblyMemory, CodeResource)
	if got, err := r.AddSubmit(now, 2, seg(false, 1, 1, "bb")); err != nil || string(got.Contents) != "bbbbbb" {
		t.Fatal(err)
	}
	if r.Len() != 0 || r.Buffered() != 0 {
		t.Fatal("not empty")
	}
	// Expired partial messages make room for new ones.
	r.AddSubmit(now, 1, seg(true, 1, 2, "a"))
	r.AddSubmit(now, 2, seg(true, 1, 2, "a"))
	if _, err := r.AddSubmit(now.Add(MTSReassemblyTimeout), 3, seg(true, 1, 2, "a")); err != nil {
		t.Fatal(err)
	}
	// MaxSegments above 32 is clamped.
	r3 := NewReassembler[int](ReassemblerConfig{MaxSegments: 100})
	_, err = r3.AddSubmit(now, 1, seg(true, 1, 33, "a"))
	wantReasm(t, err, ErrSegmentCount, CodeProtocolViolation)
	// The returned contents do not alias the caller's buffers.
	r4 := NewReassembler[int](ReassemblerConfig{})
	a := seg(true, 1, 2, "ab")
	r4.AddSubmit(now, 1, a)
	a.Contents[0] = 'X'
	got, _ := r4.AddSubmit(now, 1, seg(false, 1, 1, "c"))
	if !bytes.Equal(got.Contents, []byte("abc")) {
		t.Fatalf("aliasing: %q", got.Contents)
	}
}

// A continuation segment joins a partial message only when its envelope
// names the same message: chunks of two deliveries that share a sequence
// id are never joined.
func TestReassemblerSameMessage(t *testing.T) {
	now := time.Unix(5000, 0)
	dseg := func(first bool, k uint32, id MessageID, dt Time, ct ContentType, chunk string) *DeliverArgument {
		return &DeliverArgument{MessageID: id, DeliveryTime: dt, ContentType: ct,
			Segment: &SegmentInfo{First: first, SequenceID: 1, Value: k}, Contents: []byte(chunk)}
	}
	a, b := LocalID(100, 1), LocalID(100, 2)
	tests := []struct {
		name string
		next *DeliverArgument
		ok   bool
	}{
		{"same message", dseg(false, 1, a, 7, ContentIPM, "2"), true},
		{"other message id", dseg(false, 1, b, 7, ContentIPM, "2"), false},
		{"rfc822 id of the same text", dseg(false, 1, RFC822ID(a.String()), 7, ContentIPM, "2"), false},
		{"other delivery attempt", dseg(false, 1, a, 8, ContentIPM, "2"), false},
		{"other content type", dseg(false, 1, a, 7, ContentDeliveryReport, "2"), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := NewReassembler[string](ReassemblerConfig{})
			if got, err := r.AddDeliver(now, "mts", dseg(true, 2, a, 7, ContentIPM, "1")); got != nil || err != nil {
				t.Fatal(got, err)
			}
			got, err := r.AddDeliver(now, "mts", tt.next)
			if !tt.ok {
				wantReasm(t, err, ErrUnknownSequence, CodeProtocolViolation)
				return
			}
			if err != nil || got == nil || string(got.Contents) != "12" {
				t.Fatalf("%v %+v", err, got)
			}
		})
	}
}
