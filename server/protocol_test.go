package server

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/internal/captures"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/ua"
)

func testIPM(to ...string) *emsd.IPM {
	ipm := &emsd.IPM{Heading: emsd.Heading{Originator: emsd.LocalOR(198036, ""), Subject: "t"},
		Body: &emsd.Body{Text: []byte("body\n")}}
	for _, r := range to {
		or := emsd.RFC822OR(r)
		if a, err := emsd.ParseAddress(r); err == nil {
			or = emsd.LocalOR(a, "")
		}
		ipm.Heading.Recipients = append(ipm.Heading.Recipients, emsd.RecipientData{Recipient: or,
			Flags: emsd.RcptNonDeliveryReport})
	}
	return ipm
}

func submitArg(t testing.TB, sec *emsd.SecurityElement, ct emsd.ContentType, ipm *emsd.IPM, o emsd.Options) []byte {
	t.Helper()
	content, err := ipm.Marshal(o)
	must(t, err)
	b, err := (&emsd.SubmitArgument{Security: sec, ContentType: ct, Contents: content}).Marshal(o)
	must(t, err)
	return b
}

func unhex(s string) []byte {
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		panic(err)
	}
	return b
}

// answer is an ESRO outcome in a comparable form.
type answer struct {
	kind  string // result, error, failure
	value uint8
	data  string // hex
}

func outcomeOf(res *esro.Result, err error) answer {
	var er *esro.ErrorReply
	var f *esro.Failure
	switch {
	case err == nil:
		return answer{"result", 0, hex.EncodeToString(res.Data)}
	case errors.As(err, &er):
		return answer{"error", er.Value, hex.EncodeToString(er.Data)}
	case errors.As(err, &f):
		return answer{"failure", uint8(f.Reason), ""}
	}
	return answer{"other", 0, err.Error()}
}

// The server's answers to good and bad INVOKEs: ERROR 7 without parameter
// for protocol violations (as the captures show, docs/protocol.md EMSD §1.4, §7.3
// TV16), ERROR 4 with parameter 4 for unknown devices and wrong passwords
// (§9.3 Recommend), results for delivery control and verify.
func TestAnswers(t *testing.T) {
	s := startServer(t, testConfig(t))
	ep := listenESRO(t, "127.0.0.1")
	addDevice(t, s, 198036, epAddr(ep), deviceOpts{password: "pw"})
	stranger := listenESRO(t, "127.0.0.13")
	mts := s.Addrs().EMSD
	v11 := emsd.Options{}
	good := submitArg(t, &emsd.SecurityElement{Password: "pw"}, emsd.ContentIPM, testIPM("x@example.com"), v11)
	otherSeg, err := (&emsd.SubmitArgument{Security: &emsd.SecurityElement{Password: "pw"},
		Segment: &emsd.SegmentInfo{SequenceID: 0x77, Value: 1}, ContentType: emsd.ContentIPM, Contents: []byte{1, 2}}).Marshal(v11)
	must(t, err)
	errParam4 := "020104"
	for _, tc := range []struct {
		name string
		from *esro.Endpoint
		sap  uint8
		op   uint8
		enc  esro.Encoding
		data []byte
		want answer
	}{
		{"submission", ep, 5, 33, 0, emsd.PrependInstanceID(0, good), answer{kind: "result"}},
		{"no password", ep, 5, 33, 0, emsd.PrependInstanceID(1, submitArg(t, nil, 32, testIPM("x@y"), v11)), answer{"error", 4, errParam4}},
		{"wrong password", ep, 5, 33, 0, emsd.PrependInstanceID(2, submitArg(t, &emsd.SecurityElement{Password: "px"}, 32, testIPM("x@y"), v11)), answer{"error", 4, errParam4}},
		{"credentials of an unknown device", ep, 5, 33, 0, emsd.PrependInstanceID(3, submitArg(t,
			&emsd.SecurityElement{Address: &emsd.EMSDAddress{Address: 5}, Password: "pw"}, 32, testIPM("x@y"), v11)), answer{"error", 4, errParam4}},
		{"unknown device", stranger, 5, 33, 0, emsd.PrependInstanceID(0, good), answer{"error", 4, errParam4}},
		{"bad BER", ep, 5, 33, 0, emsd.PrependInstanceID(4, unhex("30 05 02 01")), answer{"error", 7, ""}},
		{"encoding type 2", ep, 5, 33, 2, emsd.PrependInstanceID(5, good), answer{"error", 7, ""}},
		{"no instance id", ep, 5, 33, 0, nil, answer{"error", 7, ""}},
		{"content type 2", ep, 5, 33, 0, emsd.PrependInstanceID(6, submitArg(t, &emsd.SecurityElement{Password: "pw"}, 2, testIPM("x@y"), v11)), answer{"error", 7, ""}},
		{"other segment of an unknown sequence", ep, 5, 33, 0, emsd.PrependInstanceID(7, otherSeg), answer{"error", 7, ""}},
		{"submission on SAP 9", ep, 9, 33, 0, emsd.PrependInstanceID(8, good), answer{"error", 7, ""}},
		{"1.0 submission from a 1.1 device", ep, 5, 0, 0, good, answer{"error", 7, ""}},
		{"op 1 with a 1.1 argument", ep, 5, 1, 0, good, answer{"error", 7, ""}},
		{"get configuration", ep, 5, 7, 0, unhex("3000"), answer{"error", 7, ""}},
		{"set configuration", ep, 9, 8, 0, unhex("3000"), answer{"error", 7, ""}},
		{"submission control", ep, 9, 4, 0, unhex("3000"), answer{"error", 7, ""}},
		{"delivery on the MTS (TV15)", ep, 5, 35, 0, unhex("00 30 0b 64 09 02 04 58 0a f4 30 02 01 00"), answer{"error", 7, ""}},
		{"delivery control", ep, 9, 2, 0, unhex("30 00"), answer{"error", 4, errParam4}},
		{"delivery control with password", ep, 9, 2, 0, unhex("30 08 a4 06 a0 04 80 02 70 77"), answer{"result", 0, "30023000"}},
		{"delivery control, bad BER", ep, 9, 2, 0, unhex("30 08 a4"), answer{"error", 7, ""}},
		{"delivery verify on SAP 9", ep, 9, 5, 0, unhex("30 0b 64 09 02 04 32 5d 82 21 02 01 01"), answer{"result", 0, "3003020101"}},
		{"delivery verify on SAP 5", ep, 5, 5, 0, unhex("30 07 45 05 3c 61 40 62 3e"), answer{"result", 0, "3003020101"}},
		{"delivery verify, unknown device", stranger, 9, 5, 0, unhex("30 07 45 05 3c 61 40 62 3e"), answer{"error", 4, errParam4}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hs := esro.ThreeWay
			if tc.sap == 9 {
				hs = esro.TwoWay
			}
			res, err := tc.from.Invoke(context.Background(), &esro.Request{To: mts, SAP: tc.sap, Operation: tc.op,
				Encoding: tc.enc, Handshake: hs, Data: tc.data})
			got := outcomeOf(res, err)
			if tc.want.kind == "result" && tc.want.data == "" {
				got.data = "" // checked elsewhere
			}
			if got != tc.want {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

// The reference's behaviour behind compat switches: IP-only
// identification (no password check, ERROR 7 for unknown devices) and
// ERROR 7 for delivery control (docs/protocol.md EMSD §9.3, §9.12, TV9, TV10).
func TestReferenceCompat(t *testing.T) {
	c := testConfig(t)
	c.Compat.IPOnlyIdentification = true
	c.Compat.DeliveryControlError = true
	s := startServer(t, c)
	ep := listenESRO(t, "127.0.0.11")
	addDevice(t, s, 198036, epAddr(ep), deviceOpts{password: "pw"})
	stranger := listenESRO(t, "127.0.0.13")
	mts := s.Addrs().EMSD
	arg := emsd.PrependInstanceID(0, submitArg(t, &emsd.SecurityElement{Password: "wrong"}, 32, testIPM("x@y"), emsd.Options{}))
	res, err := ep.Invoke(context.Background(), &esro.Request{To: mts, SAP: 5, Operation: 33, Handshake: esro.ThreeWay, Data: arg})
	if got := outcomeOf(res, err); got.kind != "result" {
		t.Errorf("submission with any password, ip-only: %+v", got)
	}
	res, err = stranger.Invoke(context.Background(), &esro.Request{To: mts, SAP: 5, Operation: 33, Handshake: esro.ThreeWay, Data: arg})
	if got := outcomeOf(res, err); got != (answer{"error", 7, ""}) {
		t.Errorf("unknown device, ip-only: %+v, want ERROR 7 without parameter (TV10)", got)
	}
	res, err = ep.Invoke(context.Background(), &esro.Request{To: mts, SAP: 9, Operation: 2, Handshake: esro.TwoWay, Data: unhex("3000")})
	if got := outcomeOf(res, err); got != (answer{"error", 7, ""}) {
		t.Errorf("delivery control: %+v, want ERROR 7 (TV9)", got)
	}
}

// captureInvokes returns the INVOKEs a capture section's device sent.
func captureInvokes(t *testing.T, name, from string) []esro.PDU {
	t.Helper()
	var out []esro.PDU
	for _, d := range captures.Get(name).Datagrams {
		if d.From != from {
			continue
		}
		p, err := esro.ParsePDU(d.Payload)
		must(t, err)
		if p.Type == esro.TypeInvoke {
			out = append(out, p)
		}
	}
	if len(out) == 0 {
		t.Fatalf("%s: no INVOKEs from %s", name, from)
	}
	return out
}

func captureAnswers(t *testing.T, name, from string) []esro.PDU {
	t.Helper()
	var out []esro.PDU
	for _, d := range captures.Get(name).Datagrams {
		if d.From != from {
			continue
		}
		p, err := esro.ParsePDU(d.Payload)
		must(t, err)
		if p.Type == esro.TypeResult || p.Type == esro.TypeError {
			out = append(out, p)
		}
	}
	return out
}

// Replays of the reference UA's submissions get the reference MTS's
// answers (with this server's message id), and produce the deliveries and
// relays their recipients call for.
func TestReplayCaptures(t *testing.T) {
	for _, tc := range []struct {
		name, from string
		deliveries []emsd.Address // local recipients
		relays     int
	}{
		{"emsd-submit-1", "2003", nil, 1},
		{"emsd-submit-multi-recipient-local", "127.0.0.11:2002", []emsd.Address{198036, 198037}, 2},
		{"emsd-submit-segmented", "127.0.0.11:2002", nil, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := startServer(t, testConfig(t))
			dev := newDevice(t, s, 198036, deviceOpts{ip: "127.0.0.11"})
			other := newDevice(t, s, 198037, deviceOpts{ip: "127.0.0.12", mode: store.ModeEfficient})
			invokes := captureInvokes(t, tc.name, tc.from)
			mtsFrom := "2002"
			if strings.Contains(tc.from, ":") {
				mtsFrom = "127.0.0.10:2002"
			}
			wantAns := captureAnswers(t, tc.name, mtsFrom)
			for i, p := range invokes {
				res, err := dev.ep.Invoke(context.Background(), &esro.Request{To: s.Addrs().EMSD, SAP: p.SAP,
					Operation: p.Operation, Encoding: p.Encoding, Handshake: esro.ThreeWay, Data: p.Data})
				must(t, err)
				want := wantAns[i].Data
				if i == len(invokes)-1 {
					// Final SubmitResult: same layout, this server's id.
					var sr emsd.SubmitResult
					must(t, sr.Unmarshal(res.Data, emsd.Options{}))
					if d := time.Since(sr.MessageID.SubmissionTime.UTC()); d < -2*time.Second || d > 5*time.Second ||
						sr.MessageID.Number != 1 || len(res.Data) != len(want) || !bytes.Equal(res.Data[:6], want[:6]) {
						t.Errorf("final answer %x, reference %x", res.Data, want)
					}
					continue
				}
				if !bytes.Equal(res.Data, want) {
					t.Errorf("answer %d: %x, reference %x", i, res.Data, want)
				}
			}
			for _, a := range tc.deliveries {
				d := map[emsd.Address]*testDevice{198036: dev, 198037: other}[a]
				del := d.next(t)
				if del.IPM == nil || !del.MessageID.IsLocal {
					t.Errorf("delivery to %s: %+v", a, del)
				}
			}
			eventually(t, "relays queued", func() bool {
				st := queueStats(t, s)
				return st.Relays[store.RelayQueued] == tc.relays
			})
		})
	}
}

// Submission and delivery with a device configured for EMSD 1.0: op 0
// submissions answered with the 1.0 SubmitResult (inner tag 25, see
// docs/protocol.md EMSD §4), and deliveries as op 1 on SAP 3, 3-way, in 1.0 encodings.
func TestVersion10Device(t *testing.T) {
	s := startServer(t, testConfig(t))
	raw := listenESRO(t, "127.0.0.1")
	addDevice(t, s, 198040, epAddr(raw), deviceOpts{version: emsd.V1_0})
	got := make(chan *esro.Invocation, 10)
	must(t, raw.HandleFunc(3, esro.ThreeWay, func(_ context.Context, w esro.ResponseWriter, inv *esro.Invocation) {
		got <- inv
		w.Result(esro.EncodingBER, nil)
	}))
	old := newDevice(t, s, 198041, deviceOpts{version: emsd.V1_0})

	// A 1.0 submission (op 0, no instance id), to both 1.0 devices.
	v10 := emsd.Options{Version: emsd.V1_0}
	ipm := testIPM("198.040", "198.041")
	arg := submitArg(t, nil, emsd.ContentIPM, ipm, v10)
	res, err := raw.Invoke(context.Background(), &esro.Request{To: s.Addrs().EMSD, SAP: 5, Operation: 0,
		Handshake: esro.ThreeWay, Data: arg})
	must(t, err)
	if len(res.Data) != 13 || res.Data[2] != 0x25 {
		t.Errorf("1.0 SubmitResult %x, want inner tag 25", res.Data)
	}
	select {
	case inv := <-got:
		if inv.Operation != 1 || inv.SAP != 3 {
			t.Errorf("delivery op %d on SAP %d, want op 1 on SAP 3", inv.Operation, inv.SAP)
		}
		var da emsd.DeliverArgument
		must(t, da.Unmarshal(inv.Data, v10))
		// 1.0: local MessageId as universal SEQUENCE, content type ENUMERATED.
		if !da.MessageID.IsLocal || da.ContentType != emsd.ContentIPM || !bytes.Contains(inv.Data, unhex("0a 01 20")) {
			t.Errorf("1.0 DeliverArgument %x", inv.Data)
		}
		c, err := da.Content(v10)
		must(t, err)
		if c.(*emsd.IPM).Heading.Subject != "t" {
			t.Errorf("1.0 IPM %+v", c)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no delivery to the 1.0 device")
	}
	del := old.next(t)
	if del.Version != emsd.V1_0 || del.IPM.Heading.Subject != "t" {
		t.Errorf("ua 1.0 delivery: version %s, %+v", del.Version, del.IPM.Heading)
	}
	// The ua client submits in 1.0 too.
	id, err := old.ua.Submit(context.Background(), &ua.Message{To: []string{"198.040"}, Subject: "from 1.0", Body: []byte("x\n")})
	must(t, err)
	if id.Number == 0 {
		t.Errorf("1.0 submission id %v", id)
	}
	select {
	case inv := <-got:
		var da emsd.DeliverArgument
		must(t, da.Unmarshal(inv.Data, v10))
		if da.MessageID != (emsd.MessageID{IsLocal: true, Local: id}) {
			t.Errorf("delivered %s, want %s", da.MessageID, id)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no delivery of the 1.0 submission")
	}
}

// rawDevice is a device socket driven datagram by datagram, for exchanges
// the ESRO engine would not produce (an unacknowledged RESULT).
type rawDevice struct {
	conn *net.UDPConn
	mts  netip.AddrPort
}

func newRawDevice(t *testing.T, s *Server, addr emsd.Address) *rawDevice {
	conn, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:0")))
	must(t, err)
	t.Cleanup(func() { conn.Close() })
	addDevice(t, s, addr, conn.LocalAddr().(*net.UDPAddr).AddrPort(), deviceOpts{})
	return &rawDevice{conn: conn, mts: s.Addrs().EMSD}
}

func (d *rawDevice) send(t *testing.T, p *esro.PDU) {
	b, err := esro.AppendPDU(nil, p)
	must(t, err)
	_, err = d.conn.WriteToUDPAddrPort(b, d.mts)
	must(t, err)
}

// recv returns the next PDU matching keep, within 10 s.
func (d *rawDevice) recv(t *testing.T, keep func(esro.PDU) bool) esro.PDU {
	t.Helper()
	buf := make([]byte, 2000)
	deadline := time.Now().Add(10 * time.Second)
	for {
		d.conn.SetReadDeadline(deadline)
		n, _, err := d.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatalf("raw device: %v", err)
		}
		p, err := esro.ParsePDU(append([]byte(nil), buf[:n]...))
		if err == nil && keep(p) {
			return p
		}
	}
}

// A submission whose RESULT the device never acknowledges is verified with
// op 6 to the device's SAP 7 (docs/protocol.md EMSD §9.5 step 8): "send" relays it,
// "drop" drops it, no answer sends it (Open Point 25).
func TestSubmissionVerify(t *testing.T) {
	for _, tc := range []struct {
		name   string
		answer []byte // SubmissionVerifyResult, nil = none
		relays int
	}{
		{"send", unhex("30 03 0a 01 01"), 1},
		{"drop", unhex("30 03 0a 01 02"), 0},
		{"no answer", nil, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := startServer(t, testConfig(t))
			d := newRawDevice(t, s, 198036)
			arg := submitArg(t, nil, emsd.ContentIPM, testIPM("bob@example.com"), emsd.Options{})
			d.send(t, &esro.PDU{Type: esro.TypeInvoke, SAP: 5, Ref: 9, Operation: 33, Data: emsd.PrependInstanceID(0, arg)})
			res := d.recv(t, func(p esro.PDU) bool { return p.Type == esro.TypeResult && p.Ref == 9 })
			var sr emsd.SubmitResult
			must(t, sr.Unmarshal(res.Data, emsd.Options{}))
			// No ACK: the server retransmits, gives up and verifies.
			inv := d.recv(t, func(p esro.PDU) bool { return p.Type == esro.TypeInvoke })
			if inv.SAP != 7 || inv.Operation != 6 {
				t.Fatalf("verify INVOKE on SAP %d op %d, want SAP 7 op 6", inv.SAP, inv.Operation)
			}
			var va emsd.SubmissionVerifyArgument
			must(t, va.Unmarshal(inv.Data, emsd.Options{}))
			if va.MessageID != (emsd.MessageID{IsLocal: true, Local: sr.MessageID}) {
				t.Errorf("verify asks for %s, submitted %s", va.MessageID, sr.MessageID)
			}
			if tc.answer != nil {
				d.send(t, &esro.PDU{Type: esro.TypeResult, Ref: inv.Ref, Data: tc.answer})
			}
			eventually(t, "submission resolved", func() bool { return queueStats(t, s).SubmissionsPending == 0 })
			if got := queueStats(t, s).Relays[store.RelayQueued]; got != tc.relays {
				t.Errorf("%d relays queued, want %d", got, tc.relays)
			}
		})
	}
}
