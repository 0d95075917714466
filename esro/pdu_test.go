package esro

import (
	"bytes"
	"encoding/hex"
	"errors"
	"strings"
	"testing"

	"github.com/esro-emsdp/emsdp/internal/captures"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Spec docs/protocol.md ESRO §2.8 test vectors.
func TestPDUVectors(t *testing.T) {
	tests := []struct {
		name string
		hex  string
		want PDU
	}{
		{"invoke ber", "d0 05 02 64 61 74 65", PDU{Type: TypeInvoke, SAP: 13, Ref: 5, Operation: 2, Encoding: EncodingBER, Data: []byte("date")}},
		{"invoke per", "d0 05 42 64 61 74 65", PDU{Type: TypeInvoke, SAP: 13, Ref: 5, Operation: 2, Encoding: EncodingPER, Data: []byte("date")}},
		{"invoke enc2", "d0 01 82 64 61 74 65", PDU{Type: TypeInvoke, SAP: 13, Ref: 1, Operation: 2, Encoding: EncodingReserved1, Data: []byte("date")}},
		{"invoke max", "f0 ff ff", PDU{Type: TypeInvoke, SAP: 15, Ref: 255, Operation: 63, Encoding: EncodingReserved2, Data: []byte{}}},
		{"result", "01 05 4a 75 6e 65 20 32 39 2c 20 31 39 39 36", PDU{Type: TypeResult, Ref: 5, Data: []byte("June 29, 1996")}},
		{"result enc2", "81 01 41 75 67 20 31 30 2c 20 31 39 39 35 0a", PDU{Type: TypeResult, Ref: 1, Encoding: 2, Data: []byte("Aug 10, 1995\n")}},
		{"result empty", "01 06", PDU{Type: TypeResult, Ref: 6, Data: []byte{}}},
		{"error", "02 05 02 45 72 72 6f 72 20 72 65 73 70 6f 6e 73 65", PDU{Type: TypeError, Ref: 5, Value: 2, Data: []byte("Error response")}},
		{"error enc2", "82 05 00 57 68 61 74 3f", PDU{Type: TypeError, Ref: 5, Encoding: 2, Value: 0, Data: []byte("What?")}},
		{"ack", "03 05", PDU{Type: TypeAck, Ref: 5}},
		{"failure 2", "04 05 02", PDU{Type: TypeFailure, Ref: 5, Value: 2}},
		{"failure 1", "04 00 01", PDU{Type: TypeFailure, Ref: 0, Value: 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := unhex(t, tt.hex)
			got, err := ParsePDU(in)
			if err != nil {
				t.Fatal(err)
			}
			if got.Type != tt.want.Type || got.SAP != tt.want.SAP || got.Ref != tt.want.Ref ||
				got.Operation != tt.want.Operation || got.Encoding != tt.want.Encoding ||
				got.Value != tt.want.Value || !bytes.Equal(got.Data, tt.want.Data) {
				t.Fatalf("ParsePDU = %+v, want %+v", got, tt.want)
			}
			out, err := AppendPDU(nil, &tt.want)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(out, in) {
				t.Fatalf("AppendPDU = % x, want % x", out, in)
			}
		})
	}
}

// Every datagram the C reference exchanged decodes and re-encodes byte for byte.
func TestPDUCapturesRoundTrip(t *testing.T) {
	n := 0
	for _, s := range captures.All() {
		for i, d := range s.Datagrams {
			p, err := ParsePDU(d.Payload)
			if err != nil {
				t.Errorf("%s #%d: %v", s.Name, i, err)
				continue
			}
			out, err := AppendPDU(nil, &p)
			if err != nil {
				t.Errorf("%s #%d: %v", s.Name, i, err)
				continue
			}
			if !bytes.Equal(out, d.Payload) {
				t.Errorf("%s #%d: re-encoded % x, captured % x", s.Name, i, out, d.Payload)
			}
			n++
		}
	}
	if n < 100 {
		t.Fatalf("only %d datagrams checked", n)
	}
}

// Spec docs/protocol.md ESRO §2.7 recommendation: short, empty and type 5–7 datagrams are errors.
func TestParsePDURejects(t *testing.T) {
	tests := []struct {
		hex  string
		want error
	}{
		{"", ErrEmptyPDU},
		{"05 01 02", ErrBadPDUType},
		{"06", ErrBadPDUType},
		{"ff ff ff ff", ErrBadPDUType},
		{"d0 01", ErrShortPDU},
		{"00", ErrShortPDU},
		{"01", ErrShortPDU},
		{"02 01", ErrShortPDU},
		{"03", ErrShortPDU},
		{"04 01", ErrShortPDU},
	}
	for _, tt := range tests {
		_, err := ParsePDU(unhex(t, tt.hex))
		if !errors.Is(err, tt.want) {
			t.Errorf("ParsePDU(%s) = %v, want %v", tt.hex, err, tt.want)
		}
	}
}

func TestParsePDUIgnoresReservedAndTrailing(t *testing.T) {
	p, err := ParsePDU(unhex(t, "0b 07 ee ee")) // ACK with reserved bit 3 set and trailing octets
	if err != nil || p.Type != TypeAck || p.Ref != 7 {
		t.Fatalf("got %+v, %v", p, err)
	}
	p, err = ParsePDU(unhex(t, "3c 07 03 99")) // FAILURE with reserved bits and a trailing octet
	if err != nil || p.Type != TypeFailure || p.Ref != 7 || p.Value != 3 || len(p.Data) != 0 {
		t.Fatalf("got %+v, %v", p, err)
	}
	p, err = ParsePDU(unhex(t, "d8 07 02")) // INVOKE with reserved bit 3 set
	if err != nil || p.SAP != 13 {
		t.Fatalf("got %+v, %v", p, err)
	}
}

func TestAppendPDURejectsOutOfRange(t *testing.T) {
	for _, p := range []PDU{
		{Type: TypeInvoke, SAP: 16},
		{Type: TypeInvoke, Operation: 64},
		{Type: TypeResult, Encoding: 4},
		{Type: 5},
	} {
		if _, err := AppendPDU(nil, &p); err == nil {
			t.Errorf("AppendPDU(%+v) succeeded", p)
		}
	}
}

func FuzzParsePDU(f *testing.F) {
	for _, s := range captures.All() {
		for _, d := range s.Datagrams {
			f.Add(d.Payload)
		}
	}
	f.Add([]byte{})
	f.Add([]byte{0xd0})
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := ParsePDU(b)
		if err != nil {
			return
		}
		if len(b) < p.Type.HeaderLen() {
			t.Fatalf("accepted %d octets for %s", len(b), p.Type)
		}
		out, err := AppendPDU(nil, &p)
		if err != nil {
			t.Fatalf("decoded PDU does not re-encode: %v", err)
		}
		again, err := ParsePDU(out)
		if err != nil || again.Type != p.Type || again.Ref != p.Ref || !bytes.Equal(again.Data, p.Data) {
			t.Fatalf("round trip changed %+v into %+v (%v)", p, again, err)
		}
	})
}
