package emsd

import (
	"bytes"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

// fuzzSeeds returns every EMSD argument, result and contents found in the
// captures and spec vectors.
func fuzzSeeds(tb testing.TB) [][]byte {
	seeds := [][]byte{tv1[4:], tv3[4:], tv4[4:], fullIPMRaw, hx("30 00"), hx("02 01 04"),
		hx("30 0b 25 09 02 04 32 5d 82 21 02 01 01"), hx("30 05 30 03 0a 01 20"),
		hx("30 20 45 08 3c 6f 72 69 67 40 78 3e 30 0f 30 0d 40 03 61 40 62 a1 06 02 01 01 80 01 0b a0 03 02 01 20"),
		hx("30 0f 40 00 30 05 30 03 04 01 00 02 01 20 80 01 64")}
	for _, ds := range captures(tb) {
		for _, d := range ds {
			if len(d.data) < 3 {
				continue
			}
			switch d.data[0] & 7 {
			case 0:
				op := Operation(d.data[2] & 0x3f)
				_, arg, err := StripInstanceID(op, d.data[3:])
				if err != nil || len(arg) == 0 || arg[0] != 0x30 {
					continue
				}
				seeds = append(seeds, arg)
				var s SubmitArgument
				var a DeliverArgument
				if s.Unmarshal(arg, v11) == nil && len(s.Contents) > 0 {
					seeds = append(seeds, s.Contents)
				} else if a.Unmarshal(arg, v11) == nil && len(a.Contents) > 0 {
					seeds = append(seeds, a.Contents)
				}
			case 1:
				seeds = append(seeds, d.data[2:])
			case 2:
				seeds = append(seeds, d.data[3:])
			}
		}
	}
	return seeds
}

// fuzzDecoder checks that decoding never panics, fails only with
// *DecodeError, and that decoded values re-encode to an equivalent,
// stable encoding.
func fuzzDecoder(f *testing.F, like pdu) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s, false)
	}
	f.Add([]byte{}, true)
	f.Fuzz(func(t *testing.T, b []byte, v10 bool) {
		o := Options{}
		if v10 {
			o.Version = V1_0
		}
		v := newLike(like)
		if err := v.Unmarshal(b, o); err != nil {
			var de *DecodeError
			if !errors.As(err, &de) || de.Code != CodeProtocolViolation || de.Err == nil {
				t.Fatalf("error %T %v", err, err)
			}
			return
		}
		enc, err := v.Marshal(o)
		if err != nil {
			// Only a report entry that lost its report choice (§2.7) cannot be sent.
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("decoded value does not encode: %v\n%s", err, dump(v))
			}
			return
		}
		w := newLike(like)
		if err := w.Unmarshal(enc, o); err != nil {
			t.Fatalf("re-encoding does not decode: %v\n% x", err, enc)
		}
		if !reflect.DeepEqual(v, w) {
			t.Fatalf("value changed:\n %s\n %s", dump(v), dump(w))
		}
		enc2, err := w.Marshal(o)
		if err != nil || !bytes.Equal(enc, enc2) {
			t.Fatalf("encoding not stable: %v", err)
		}
	})
}

func FuzzSubmitArgument(f *testing.F)           { fuzzDecoder(f, &SubmitArgument{}) }
func FuzzSubmitResult(f *testing.F)             { fuzzDecoder(f, &SubmitResult{}) }
func FuzzDeliverArgument(f *testing.F)          { fuzzDecoder(f, &DeliverArgument{}) }
func FuzzDeliveryControlArgument(f *testing.F)  { fuzzDecoder(f, &DeliveryControlArgument{}) }
func FuzzDeliveryControlResult(f *testing.F)    { fuzzDecoder(f, &DeliveryControlResult{}) }
func FuzzDeliveryVerifyArgument(f *testing.F)   { fuzzDecoder(f, &DeliveryVerifyArgument{}) }
func FuzzDeliveryVerifyResult(f *testing.F)     { fuzzDecoder(f, &DeliveryVerifyResult{}) }
func FuzzSubmissionVerifyArgument(f *testing.F) { fuzzDecoder(f, &SubmissionVerifyArgument{}) }
func FuzzSubmissionVerifyResult(f *testing.F)   { fuzzDecoder(f, &SubmissionVerifyResult{}) }
func FuzzErrorParameter(f *testing.F)           { fuzzDecoder(f, new(ErrorParameter)) }
func FuzzIPM(f *testing.F)                      { fuzzDecoder(f, &IPM{}) }
func FuzzReportDelivery(f *testing.F)           { fuzzDecoder(f, &ReportDelivery{}) }
func FuzzProbeSubmission(f *testing.F)          { fuzzDecoder(f, &ProbeSubmission{}) }

// FuzzDecodeContents drives the content dispatch with any content type.
func FuzzDecodeContents(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(uint32(ContentIPM), s)
		f.Add(uint32(ContentDeliveryReport), s)
	}
	f.Fuzz(func(t *testing.T, ct uint32, b []byte) {
		c, err := DecodeContents(ContentType(ct), b, v11)
		if err != nil {
			if CodeOf(err) != CodeProtocolViolation {
				t.Fatal(err)
			}
			return
		}
		if c.ContentType() != ContentType(ct) {
			t.Fatalf("content type %d for %d", c.ContentType(), ct)
		}
	})
}

func FuzzParseAddress(f *testing.F) {
	for _, s := range []string{"166.058", "1234", "1.2.3", "EMSD=198.036", `"EMSD198.036": `, "4294967.295", "emsd1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if a, err := ParseAddress(s); err == nil {
			if b, err := ParseAddress(a.String()); err != nil || b != a {
				t.Fatalf("%q -> %d -> %q -> %d %v", s, a, a.String(), b, err)
			}
		}
		if a, err := ParseDeviceAddress(s); err == nil {
			if b, err := ParseDeviceAddress("EMSD=" + a.String()); err != nil || b != a {
				t.Fatalf("%q -> %d", s, a)
			}
		}
		if id, err := ParseLocalMessageID(s); err == nil {
			if back, err := ParseLocalMessageID(id.String()); err != nil || back != id {
				t.Fatalf("%q -> %v", s, id)
			}
		}
	})
}

// FuzzSplit checks that every segment fits and that reassembly restores
// the content, for any content size, PDU size and message-id length.
func FuzzSplit(f *testing.F) {
	f.Add(uint16(4074), uint16(1500), uint8(27), false, false)
	f.Add(uint16(60000), uint16(1500), uint8(127), true, false)
	f.Add(uint16(1492), uint16(1500), uint8(0), false, true)
	f.Fuzz(func(t *testing.T, n, maxUD uint16, idLen uint8, deliver, v10 bool) {
		o := Options{}
		if v10 {
			o.Version = V1_0
		}
		content := make([]byte, n)
		for i := range content {
			content[i] = byte(i * 7)
		}
		sp := Splitter{Options: o, MaxUserData: int(maxUD)}
		budget := int(maxUD)
		if budget == 0 {
			budget = DefaultMaxUserData
		}
		if !v10 {
			budget--
		}
		var segs [][]byte
		var err error
		if deliver {
			env := deliverEnv()
			env.MessageID = RFC822ID(strings.Repeat("i", int(idLen)%128))
			segs, err = sp.SplitDeliver(env, content, 77)
		} else {
			segs, err = sp.SplitSubmit(&SubmitArgument{ContentType: ContentIPM}, content, 77)
		}
		if err != nil {
			if !errors.Is(err, ErrContentTooLong) && !errors.Is(err, ErrEnvelopeTooLarge) {
				t.Fatal(err)
			}
			return
		}
		r := NewReassembler[int](ReassemblerConfig{})
		var got []byte
		for k, s := range segs {
			if len(s) > budget {
				t.Fatalf("segment %d: %d > %d", k, len(s), budget)
			}
			var a SubmitArgument
			var d DeliverArgument
			if deliver {
				if err := d.Unmarshal(s, o); err != nil {
					t.Fatal(err)
				}
				done, err := r.AddDeliver(time.Time{}, 0, &d)
				if err != nil {
					t.Fatal(err)
				}
				if done != nil {
					got = done.Contents
				}
			} else {
				if err := a.Unmarshal(s, o); err != nil {
					t.Fatal(err)
				}
				done, err := r.AddSubmit(time.Time{}, 0, &a)
				if err != nil {
					t.Fatal(err)
				}
				if done != nil {
					got = done.Contents
				}
			}
		}
		if !bytes.Equal(got, content) && !(len(got) == 0 && len(content) == 0) {
			t.Fatalf("content changed: %d -> %d octets", len(content), len(got))
		}
	})
}

// FuzzReassembler feeds arbitrary segment sequences and checks the bounds.
func FuzzReassembler(f *testing.F) {
	f.Add([]byte{0, 1, 1, 3, 5, 0, 0, 0, 1, 1, 4, 0, 0, 0, 1, 2, 4, 0})
	f.Fuzz(func(t *testing.T, ops []byte) {
		cfg := ReassemblerConfig{Timeout: 10 * time.Second, MaxPartial: 3, MaxOctets: 64}
		r := NewReassembler[byte](cfg)
		now := time.Unix(0, 0)
		for len(ops) >= 6 {
			op := ops[:6]
			ops = ops[6:]
			now = now.Add(time.Duration(op[5]%16) * time.Second)
			a := &SubmitArgument{Segment: &SegmentInfo{First: op[1]&1 == 0, SequenceID: uint32(op[2] % 4),
				Value: uint32(op[3] % 40)}, Contents: bytes.Repeat([]byte{op[0]}, int(op[4]%24))}
			done, err := r.AddSubmit(now, op[0]%3, a)
			if err != nil {
				var re *ReassemblyError
				if !errors.As(err, &re) || (re.Code != CodeProtocolViolation && re.Code != CodeResource) {
					t.Fatal(err)
				}
			}
			if done != nil && done.Segment != nil {
				t.Fatal("partial message returned")
			}
			if b := r.Buffered(); b < 0 || b > cfg.MaxOctets || r.Len() > cfg.MaxPartial {
				t.Fatalf("bounds: %d octets, %d partial", b, r.Len())
			}
		}
		r.Expire(now.Add(cfg.Timeout))
		if r.Len() != 0 || r.Buffered() != 0 {
			t.Fatal("not empty after expiry")
		}
	})
}
