package emsd

import (
	"bytes"
	"errors"
	"testing"
)

func TestInstanceID(t *testing.T) {
	for op, want := range map[Operation]bool{0: false, 2: false, 6: false, 31: false, 32: true, 33: true,
		35: true, 63: true, 127: true, 128: false} {
		if CarriesInstanceID(op) != want {
			t.Errorf("CarriesInstanceID(%d)", op)
		}
	}
	id, arg, err := StripInstanceID(OpSubmission, hx("07 30 00"))
	if err != nil || id != 7 || !bytes.Equal(arg, hx("30 00")) {
		t.Fatal(id, arg, err)
	}
	id, arg, err = StripInstanceID(OpDeliveryControl, hx("30 00"))
	if err != nil || id != 0 || !bytes.Equal(arg, hx("30 00")) {
		t.Fatal(id, arg, err)
	}
	if _, _, err := StripInstanceID(OpDelivery, nil); !errors.Is(err, ErrTruncated) || CodeOf(err) != CodeProtocolViolation {
		t.Fatal(err)
	}
	mustEqualBytes(t, "prepend", PrependInstanceID(0xfe, hx("30 00")), hx("fe 30 00"))
}

func TestInstanceCounter(t *testing.T) {
	var c InstanceCounter
	for i := range 600 {
		if got := c.Next(); got != uint8(i) {
			t.Fatalf("#%d: %d", i, got)
		}
	}
	var s SequenceCounter
	if s.Next() != 1 || s.Next() != 2 {
		t.Fatal("sequence ids start at 1")
	}
	s.n.Store(0xfffffffe)
	if s.Next() != 0xffffffff || s.Next() != 1 {
		t.Fatal("sequence id 0 skipped on wrap")
	}
}

func TestDuplicateWindow(t *testing.T) {
	arg := []byte("segment")
	var w DuplicateWindow
	if w.Observe(5, arg) || !w.Observe(5, arg) || !w.Observe(5, arg) {
		t.Fatal("5 then duplicate")
	}
	// Receiving 133 = 5+128 clears 5: the window is half the id space.
	if w.Observe(133, arg) || w.Observe(5, arg) || !w.Observe(5, arg) {
		t.Fatal("bit (id+128)%256 not cleared")
	}
	if w.Observe(133, arg) {
		t.Fatal("133 was cleared by 5")
	}
	// Wrap-around: 200 clears 72.
	if w.Observe(72, arg) || w.Observe(200, arg) || w.Observe(72, arg) {
		t.Fatal("wrap")
	}
	// A sender counting 0..255 repeatedly is never taken for a duplicate.
	var seq DuplicateWindow
	for i := range 1000 {
		if seq.Observe(uint8(i), arg) {
			t.Fatalf("sequential id %d reported duplicate", i)
		}
	}
	// A set id with another argument is a new operation (a sender reusing
	// ids, as the reference MTS does), which then replaces the first.
	if w.Observe(72, []byte("other")) || !w.Observe(72, []byte("other")) || w.Observe(72, arg) {
		t.Fatal("same id, other argument")
	}
	// Duplicate only asks; Record after performing.
	var r DuplicateWindow
	if r.Duplicate(9, arg) || r.Duplicate(9, arg) {
		t.Fatal("Duplicate recorded")
	}
	r.Record(9, arg)
	if !r.Duplicate(9, arg) || r.Duplicate(9, nil) {
		t.Fatal("Record")
	}
	off := DuplicateWindow{Disabled: true}
	for range 3 {
		if off.Observe(0, arg) {
			t.Fatal("disabled window")
		}
	}
	off.Record(1, arg)
	if off.seen != ([256]*[32]byte{}) {
		t.Fatal("disabled window changed state")
	}
}
