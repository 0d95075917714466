// Package uatest provides a small EMSD message transfer system (MTS) for
// testing device user agents without the real server: built from the esro
// and emsd packages, it answers submissions with a SubmitResult (checking
// credentials that carry an address, docs/protocol.md EMSD §9.3 Recommend), answers
// delivery control and delivery verify, and sends deliveries and
// submission verify on request, as the spec recommends an MTS do (§9.9:
// segmented, a new instance id per segment, reused when a segment is
// invoked again after an ESRO failure).
package uatest

import (
	"cmp"
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
)

// MTS is the fake message transfer system.
type MTS struct {
	t     testing.TB
	conn  net.PacketConn
	ep    *esro.Endpoint
	addr  netip.AddrPort
	reasm *emsd.Reassembler[netip.AddrPort]
	inst  emsd.InstanceCounter
	seq   emsd.SequenceCounter

	mu               sync.Mutex
	passwords        map[emsd.Address]string
	referenceControl bool
	invokes          []Invoke
	messages         []Submission
	number           uint32
	controls         []emsd.DeliveryControlArgument
	verify           map[emsd.MessageID]emsd.DeliveryStatus
}

// Invoke is one submission INVOKE as received.
type Invoke struct {
	Instance uint8
	Arg      []byte // the SubmitArgument octets after the instance id
}

// Submission is one complete submission.
type Submission struct {
	ID  emsd.LocalMessageID
	Arg *emsd.SubmitArgument // reassembled
	IPM *emsd.IPM
}

// NewMTS starts an MTS on conn (a loopback UDP socket or a lossynet
// socket) with the given ESRO timers; it is closed by t.Cleanup.
func NewMTS(t testing.TB, conn net.PacketConn, timers esro.Timers) *MTS {
	t.Helper()
	ep, err := esro.NewEndpoint(conn, &esro.Config{Timers: timers, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	a := ep.LocalAddr().(*net.UDPAddr).AddrPort()
	m := &MTS{
		t:         t,
		conn:      conn,
		ep:        ep,
		addr:      netip.AddrPortFrom(a.Addr().Unmap(), a.Port()),
		reasm:     emsd.NewReassembler[netip.AddrPort](emsd.ReassemblerConfig{}),
		passwords: map[emsd.Address]string{},
		verify:    map[emsd.MessageID]emsd.DeliveryStatus{},
	}
	t.Cleanup(func() { ep.Close() })
	if err := ep.HandleFunc(uint8(emsd.SAPMTSPerformer3Way), esro.ThreeWay, m.submit); err != nil {
		t.Fatal(err)
	}
	if err := ep.HandleFunc(uint8(emsd.SAPMTSPerformer2Way), esro.TwoWay, m.control); err != nil {
		t.Fatal(err)
	}
	return m
}

// Addr is the MTS's address.
func (m *MTS) Addr() netip.AddrPort { return m.addr }

// Conn is the MTS's socket.
func (m *MTS) Conn() net.PacketConn { return m.conn }

// Close stops the MTS.
func (m *MTS) Close() { m.ep.Close() }

// SetPassword registers a device. Submissions whose credentials carry an
// address get ERROR 4 (parameter 4) unless it is registered with that
// password.
func (m *MTS) SetPassword(a emsd.Address, pw string) {
	m.mu.Lock()
	m.passwords[a] = pw
	m.mu.Unlock()
}

// SetReferenceControl makes delivery control answer ERROR 7 without
// parameter, as the reference MTS does (§9.12), instead of a result.
func (m *MTS) SetReferenceControl(on bool) {
	m.mu.Lock()
	m.referenceControl = on
	m.mu.Unlock()
}

// SetDeliveryStatus sets what delivery verify answers for id (default
// no-report-sent).
func (m *MTS) SetDeliveryStatus(id emsd.MessageID, st emsd.DeliveryStatus) {
	m.mu.Lock()
	m.verify[id] = st
	m.mu.Unlock()
}

// Submissions returns the complete submissions so far.
func (m *MTS) Submissions() []Submission {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]Submission(nil), m.messages...)
}

// Invocations returns every submission INVOKE performed so far.
func (m *MTS) Invocations() []Invoke {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]Invoke(nil), m.invokes...)
}

// Controls returns the delivery control arguments received.
func (m *MTS) Controls() []emsd.DeliveryControlArgument {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]emsd.DeliveryControlArgument(nil), m.controls...)
}

func emsdError(w esro.ResponseWriter, code emsd.ErrorCode, param bool) {
	var p []byte
	if param {
		p, _ = emsd.ErrorParameter(code).Marshal(emsd.Options{})
	}
	w.Error(esro.EncodingBER, uint8(code), p)
}

// submit performs op 33 on SAP 5 (§9.5).
func (m *MTS) submit(_ context.Context, w esro.ResponseWriter, inv *esro.Invocation) {
	if inv.Operation != uint8(emsd.OpSubmission) || inv.Encoding != esro.EncodingBER {
		emsdError(w, emsd.CodeProtocolViolation, false)
		return
	}
	id, arg, err := emsd.StripInstanceID(emsd.OpSubmission, inv.Data)
	if err != nil {
		emsdError(w, emsd.CodeProtocolViolation, false)
		return
	}
	m.mu.Lock()
	m.invokes = append(m.invokes, Invoke{id, append([]byte(nil), arg...)})
	m.mu.Unlock()
	var a emsd.SubmitArgument
	if err := a.Unmarshal(arg, emsd.Options{}); err != nil {
		emsdError(w, emsd.CodeProtocolViolation, false)
		return
	}
	if s := a.Security; s != nil && s.Address != nil {
		m.mu.Lock()
		pw, ok := m.passwords[s.Address.Address]
		m.mu.Unlock()
		if !ok || pw != s.Password {
			emsdError(w, emsd.CodeSecurity, true)
			return
		}
	}
	full, err := m.reasm.AddSubmit(time.Now(), inv.Peer, &a)
	if err != nil {
		emsdError(w, emsd.CodeOf(err), false)
		return
	}
	if full == nil {
		b, _ := (&emsd.SubmitResult{}).Marshal(emsd.Options{})
		w.Result(esro.EncodingBER, b)
		return
	}
	var ipm emsd.IPM
	if full.ContentType != emsd.ContentIPM || ipm.Unmarshal(full.Contents, emsd.Options{}) != nil {
		emsdError(w, emsd.CodeProtocolViolation, false)
		return
	}
	m.mu.Lock()
	m.number++
	lid := emsd.LocalMessageID{SubmissionTime: emsd.TimeOf(time.Now()), Number: m.number}
	m.messages = append(m.messages, Submission{lid, full, &ipm})
	m.mu.Unlock()
	b, _ := (&emsd.SubmitResult{MessageID: lid}).Marshal(emsd.Options{})
	w.Result(esro.EncodingBER, b)
}

// control performs delivery control (op 2) and delivery verify (op 5) on
// SAP 9.
func (m *MTS) control(_ context.Context, w esro.ResponseWriter, inv *esro.Invocation) {
	switch emsd.Operation(inv.Operation) {
	case emsd.OpDeliveryControl:
		var a emsd.DeliveryControlArgument
		if err := a.Unmarshal(inv.Data, emsd.Options{}); err != nil {
			emsdError(w, emsd.CodeProtocolViolation, false)
			return
		}
		m.mu.Lock()
		m.controls = append(m.controls, a)
		ref := m.referenceControl
		m.mu.Unlock()
		if ref {
			emsdError(w, emsd.CodeProtocolViolation, false)
			return
		}
		ops := emsd.Operations(emsd.OpDelivery)
		r := emsd.DeliveryControlResult{WaitingOperations: &ops, WaitingContentTypes: []emsd.ContentType{emsd.ContentIPM}}
		b, _ := r.Marshal(emsd.Options{})
		w.Result(esro.EncodingBER, b)
	case emsd.OpDeliveryVerify:
		var a emsd.DeliveryVerifyArgument
		if err := a.Unmarshal(inv.Data, emsd.Options{}); err != nil {
			emsdError(w, emsd.CodeProtocolViolation, false)
			return
		}
		m.mu.Lock()
		st, ok := m.verify[a.MessageID]
		m.mu.Unlock()
		if !ok {
			st = emsd.NoReportSent
		}
		b, _ := (&emsd.DeliveryVerifyResult{Status: st}).Marshal(emsd.Options{})
		w.Result(esro.EncodingBER, b)
	default:
		emsdError(w, emsd.CodeProtocolViolation, false)
	}
}

// DeliverOptions select how the MTS delivers.
type DeliverOptions struct {
	TwoWay bool // "Efficient" mode: SAP 6 → 7 (§9.9)
	Tries  int  // ESRO attempts per segment, same instance id; 0: 2 (§9.9)
	// SubmissionTime and DeliveryTime go into the DeliverArgument; zero:
	// now. A new attempt to deliver a message keeps its submission time
	// and takes a new delivery time (§9.9).
	SubmissionTime, DeliveryTime time.Time
}

// Deliver sends ipm to the device at to (§9.9) and returns the EMSD error
// (*esro.ErrorReply) or failure that ended the delivery, or nil once the
// device answered RESULT for every segment.
func (m *MTS) Deliver(ctx context.Context, to netip.AddrPort, id emsd.MessageID, ipm *emsd.IPM, o DeliverOptions) error {
	content, err := ipm.Marshal(emsd.Options{})
	if err != nil {
		return err
	}
	now := time.Now()
	st, dt := emsd.TimeOf(cmp.Or(o.SubmissionTime, now)), emsd.TimeOf(cmp.Or(o.DeliveryTime, now))
	env := &emsd.DeliverArgument{MessageID: id, DeliveryTime: dt, SubmissionTime: &st, ContentType: emsd.ContentIPM}
	segs, err := (&emsd.Splitter{}).SplitDeliver(env, content, m.seq.Next())
	if err != nil {
		return err
	}
	return m.DeliverSegments(ctx, to, segs, o)
}

// DeliverSegments sends encoded DeliverArguments, one operation each, with
// a new instance id per segment.
func (m *MTS) DeliverSegments(ctx context.Context, to netip.AddrPort, segs [][]byte, o DeliverOptions) error {
	sap, hs := emsd.SAPUAPerformer3Way, esro.ThreeWay
	if o.TwoWay {
		sap, hs = emsd.SAPUAPerformer2Way, esro.TwoWay
	}
	tries := o.Tries
	if tries == 0 {
		tries = 2
	}
	for _, seg := range segs {
		data := emsd.PrependInstanceID(m.inst.Next(), seg)
		for try := 1; ; try++ {
			res, err := m.ep.Invoke(ctx, &esro.Request{To: to, SAP: uint8(sap), Operation: uint8(emsd.OpDelivery), Handshake: hs, Data: data})
			var f *esro.Failure
			if errors.As(err, &f) && try < tries {
				continue
			}
			if err != nil {
				return err
			}
			if len(res.Data) != 0 {
				m.t.Errorf("uatest: delivery RESULT with data % x", res.Data)
			}
			break
		}
	}
	return nil
}

// Invoke sends one raw INVOKE to the device (SAP 7 is 2-way, others
// 3-way).
func (m *MTS) Invoke(ctx context.Context, to netip.AddrPort, sap emsd.SAP, op uint8, enc esro.Encoding, data []byte) (*esro.Result, error) {
	hs := esro.ThreeWay
	if sap == emsd.SAPUAPerformer2Way {
		hs = esro.TwoWay
	}
	return m.ep.Invoke(ctx, &esro.Request{To: to, SAP: uint8(sap), Operation: op, Encoding: enc, Handshake: hs, Data: data})
}

// SubmissionVerify invokes op 6 on the device (§9.5 step 8).
func (m *MTS) SubmissionVerify(ctx context.Context, to netip.AddrPort, id emsd.MessageID) (emsd.SubmissionStatus, error) {
	b, err := (&emsd.SubmissionVerifyArgument{MessageID: id}).Marshal(emsd.Options{})
	if err != nil {
		return 0, err
	}
	res, err := m.Invoke(ctx, to, emsd.SAPUAPerformer2Way, uint8(emsd.OpSubmissionVerify), esro.EncodingBER, b)
	if err != nil {
		return 0, err
	}
	var r emsd.SubmissionVerifyResult
	if err := r.Unmarshal(res.Data, emsd.Options{}); err != nil {
		return 0, err
	}
	return r.Status, nil
}
