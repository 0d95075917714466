package emsd

import (
	"bytes"
	"encoding/hex"
	"strings"
	"testing"

	"github.com/esro-emsdp/emsdp/esro"
	refcaptures "github.com/esro-emsdp/emsdp/internal/captures"
)

// hx parses space-separated hex octets.
func hx(s string) []byte {
	b, err := hex.DecodeString(strings.Join(strings.Fields(s), ""))
	if err != nil {
		panic(err)
	}
	return b
}

// cat concatenates hex strings and text parts: a part starting with '"'
// is text (without the quotes, Go escapes processed by the caller).
func cat(parts ...string) []byte {
	var out []byte
	for _, p := range parts {
		if strings.HasPrefix(p, `"`) {
			out = append(out, strings.TrimSuffix(strings.TrimPrefix(p, `"`), `"`)...)
		} else {
			out = append(out, hx(p)...)
		}
	}
	return out
}

// datagram is one captured UDP payload.
type datagram struct {
	from, to string
	data     []byte
}

// captures returns the reference's datagrams (package internal/captures,
// spec §7.3) by section name.
func captures(t testing.TB) map[string][]datagram {
	t.Helper()
	out := map[string][]datagram{}
	for _, s := range refcaptures.All() {
		for _, d := range s.Datagrams {
			out[s.Name] = append(out[s.Name], datagram{d.From, d.To, d.Payload})
		}
	}
	return out
}

// section returns the datagrams of one section.
func section(t testing.TB, name string) []datagram {
	t.Helper()
	d, ok := captures(t)[name]
	if !ok || len(d) == 0 {
		t.Fatalf("capture section %q missing", name)
	}
	return d
}

// esroPDU is a parsed ESRO PDU (docs/protocol.md ESRO §2): INVOKE header 3 octets,
// RESULT 2, ERROR 3, ACK 2, FAILURE 3.
type esroPDU struct {
	typ   int // 0 INVOKE, 1 RESULT, 2 ERROR, 3 ACK, 4 FAILURE
	sap   uint8
	ref   uint8
	enc   uint8
	op    Operation
	value uint8 // ERROR value
	data  []byte
}

func parseESRO(t testing.TB, b []byte) esroPDU {
	t.Helper()
	p, err := esro.ParsePDU(b)
	if err != nil {
		t.Fatalf("ESRO PDU % x: %v", b, err)
	}
	return esroPDU{typ: int(p.Type), sap: p.SAP, ref: p.Ref, enc: uint8(p.Encoding), op: Operation(p.Operation), value: p.Value, data: p.Data}
}

// invokeArg returns the EMSD argument of an INVOKE datagram, the
// instance-id octet stripped.
func invokeArg(t testing.TB, d datagram) (esroPDU, uint8, []byte) {
	t.Helper()
	p := parseESRO(t, d.data)
	if p.typ != 0 {
		t.Fatalf("not an INVOKE: % x", d.data[:min(8, len(d.data))])
	}
	id, arg, err := StripInstanceID(p.op, p.data)
	if err != nil {
		t.Fatal(err)
	}
	return p, id, arg
}

func mustEqualBytes(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if !bytes.Equal(got, want) {
		t.Fatalf("%s:\n got  % x\n want % x", what, got, want)
	}
}

func ptr[T any](v T) *T { return &v }

var (
	v11    = Options{}
	v11rev = Options{ReverseSequenceOf: true}
	v10    = Options{Version: V1_0}
)

// pdu is implemented by every PDU type (pointer receivers).
type pdu interface {
	AppendMarshal(b []byte, o Options) ([]byte, error)
	Marshal(o Options) ([]byte, error)
	Unmarshal(b []byte, o Options) error
}
