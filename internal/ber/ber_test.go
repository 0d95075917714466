package ber

import (
	"bytes"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
)

func hx(s string) []byte {
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		panic(err)
	}
	return b
}

func TestLength(t *testing.T) {
	for n, want := range map[int]string{0: "00", 127: "7f", 128: "81 80", 255: "81 ff", 256: "82 01 00",
		65535: "82 ff ff", 65536: "83 01 00 00", 1 << 24: "84 01 00 00 00"} {
		got := AppendLength(nil, n)
		if !bytes.Equal(got, hx(want)) || LengthSize(n) != len(got) {
			t.Errorf("%d: % x (size %d)", n, got, LengthSize(n))
		}
	}
}

func TestUint(t *testing.T) {
	for v, want := range map[uint32]string{0: "02 01 00", 32: "02 01 20", 128: "02 01 80", 200: "02 01 c8",
		0x1234: "02 02 12 34", 0xFFFFFFFF: "02 04 ff ff ff ff"} {
		got := AppendUint(nil, 0x02, v)
		if !bytes.Equal(got, hx(want)) || UintSize(v) != len(got) {
			t.Errorf("%d: % x", v, got)
		}
		back, err := Uint(got[2:])
		if err != nil || back != v {
			t.Errorf("Uint(% x) = %d %v", got[2:], back, err)
		}
	}
	if v, err := Uint(nil); err != nil || v != 0 {
		t.Fatal("zero octets")
	}
	if v, err := Uint(hx("00 00 00 80")); err != nil || v != 128 {
		t.Fatal("padding")
	}
	if _, err := Uint(hx("00 ff ff ff ff")); !errors.Is(err, ErrIntegerTooLong) {
		t.Fatal("5 octets")
	}
}

func TestEncoderBackpatch(t *testing.T) {
	for _, n := range []int{0, 1, 127, 128, 255, 256, 70000} {
		var e Encoder
		e.Buf = []byte{0xee}
		s := e.Begin(0x30)
		inner := e.Begin(0x04)
		e.Raw(bytes.Repeat([]byte{0xab}, n))
		e.End(inner)
		e.End(s)
		want := append([]byte{0xee, 0x30}, AppendLength(nil, n+1+LengthSize(n))...)
		want = append(append(want, 0x04), AppendLength(nil, n)...)
		want = append(want, bytes.Repeat([]byte{0xab}, n)...)
		if !bytes.Equal(e.Buf, want) {
			t.Fatalf("%d: mismatch", n)
		}
		r := NewReader(e.Buf[1:])
		tl, err := r.Next()
		if err != nil || tl.Tag != 0x30 || !r.Empty() || tl.Offset != 0 {
			t.Fatal(err)
		}
		ir := tl.Reader()
		it, err := ir.Next()
		if err != nil || len(it.Content) != n || it.Offset != 1+LengthSize(n+1+LengthSize(n)) {
			t.Fatalf("%d: %v %d", n, err, it.Offset)
		}
	}
	var e Encoder
	e.String(0x80, "ab")
	e.Bytes(0x04, []byte{1})
	e.BitString(0x03, []byte{0x84})
	e.Uint(0x0a, 1)
	if !bytes.Equal(e.Buf, hx("80 02 61 62 04 01 01 03 02 00 84 0a 01 01")) {
		t.Fatalf("% x", e.Buf)
	}
}

func TestReader(t *testing.T) {
	bad := map[string]error{
		"":                        ErrTruncated,
		"30":                      ErrTruncated,
		"30 01":                   ErrTruncated,
		"30 81":                   ErrTruncated,
		"30 82 00":                ErrTruncated,
		"30 80 00 00":             ErrIndefiniteLength,
		"1f 01 00":                ErrLongTag,
		"3f 81 01 00 00":          ErrLongTag,
		"30 84 ff ff ff ff 00":    ErrTruncated,
		"30 8f ff ff ff ff ff ff": ErrTruncated,
	}
	for in, want := range bad {
		r := NewReader(hx(in))
		if _, err := r.Next(); !errors.Is(err, want) {
			t.Errorf("%q: %v, want %v", in, err, want)
		}
	}
	r := NewReader(hx("04 84 00 00 00 01 aa 05 00"))
	tl, err := r.Next()
	if err != nil || !bytes.Equal(tl.Content, hx("aa")) || tl.ContentOff != 6 {
		t.Fatal(err, tl)
	}
	if r.Offset() != 7 || r.PeekTag() != 0x05 {
		t.Fatal(r.Offset())
	}
	if rest := r.Rest(); !bytes.Equal(rest, hx("05 00")) || !r.Empty() || r.Offset() != 9 {
		t.Fatal(rest)
	}
	if !Match(0x30, 0x10) || !Match(0x24, 0x04) || Match(0x80, 0x40) || Match(0x02, 0x0a) {
		t.Fatal("Match")
	}
}

func TestBitString(t *testing.T) {
	for in, want := range map[string]uint64{
		"00": 0, "00 80": 1, "00 84": 1 | 1<<5, "00 01": 1 << 7, "07 81": 1, "00 00 80": 1 << 8,
		"00 00 00 00 00 10": 1 << 35, "00 00 00 00 00 00 00 00 01 ff": 1 << 63,
	} {
		got, err := BitString(hx(in))
		if err != nil || got != want {
			t.Errorf("%s: %#x %v", in, got, err)
		}
	}
	for _, in := range []string{"", "08", "ff 00"} {
		if _, err := BitString(hx(in)); !errors.Is(err, ErrBitString) {
			t.Errorf("%q accepted", in)
		}
	}
	for m, want := range map[uint64]string{0: "00", 1: "80", 1 << 35: "00 00 00 00 10", 1<<63 | 1: "80 00 00 00 00 00 00 01"} {
		if got := BitStringOctets(m, 1); !bytes.Equal(got, hx(want)) {
			t.Errorf("%#x: % x", m, got)
		}
		back, _ := BitString(append([]byte{0}, hx(want)...))
		if back != m {
			t.Errorf("%#x round trip: %#x", m, back)
		}
	}
}

func FuzzReader(f *testing.F) {
	f.Add(hx("30 03 02 01 20"))
	f.Add(hx("30 82 00 03 02 01 20"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r := NewReader(b)
		for !r.Empty() {
			off := r.Offset()
			tl, err := r.Next()
			if err != nil {
				return
			}
			if tl.Offset != off || tl.ContentOff+len(tl.Content) != r.Offset() || r.Offset() > len(b) {
				t.Fatalf("offsets %d %d %d", off, tl.ContentOff, r.Offset())
			}
			if !bytes.Equal(b[tl.ContentOff:tl.ContentOff+len(tl.Content)], tl.Content) {
				t.Fatal("content")
			}
			BitString(tl.Content)
			Uint(tl.Content)
		}
	})
}
