// Package decode turns ESRO/EMSD datagrams into readable records: the ESRO
// header, the EMSD operation with its fields, segmented messages made
// whole, and retransmissions and duplicates marked. It serves `emsdp
// decode` (captures) and the PDU tracing of the server and the tools.
//
// A Decoder follows a conversation: it remembers each INVOKE so that the
// RESULT, ERROR, ACK or FAILURE answering it is decoded as that operation,
// and it buffers segments until their message is complete. That state is
// bounded (maxInvocations, the reassembler's limits), so a Decoder can run
// for the life of a server. Passwords are never shown: they are replaced
// by Mask.
package decode

import (
	"errors"
	"fmt"
	"hash/maphash"
	"net/netip"
	"strconv"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
)

// maxInvocations bounds the invocations a Decoder remembers; beyond it
// those older than invocationAge go first, then all of them.
const (
	maxInvocations = 8192
	invocationAge  = 10 * time.Minute
)

type invKey struct {
	invoker, performer netip.AddrPort
	ref                uint8
}

type invocation struct {
	frame    int
	at       time.Time
	op       uint8
	sap      uint8
	arg      uint64 // hash of the INVOKE's user data
	reply    uint64 // hash of the RESULT/ERROR octets, 0 = none yet
	replied  bool
	acked    bool
	failures int
	emsd     bool // BER: may be EMSD
}

type argKey struct {
	invoker, performer netip.AddrPort
	arg                uint64
}

// Decoder decodes the datagrams of a capture or a live endpoint in order.
// It is not safe for concurrent use.
type Decoder struct {
	seed  maphash.Seed
	invs  map[invKey]*invocation
	args  map[argKey]int // EMSD INVOKE user data → frame that first carried it
	reasm *emsd.Reassembler[string]
	frame int
}

// New returns a Decoder with no history.
func New() *Decoder {
	return &Decoder{
		seed: maphash.MakeSeed(),
		invs: make(map[invKey]*invocation),
		args: make(map[argKey]int),
		// The capture's own clock drives the timeout; a capture spanning
		// more than the MTS's two minutes per message is unusual.
		reasm: emsd.NewReassembler[string](emsd.ReassemblerConfig{Timeout: emsd.MTSReassemblyTimeout}),
	}
}

func (d *Decoder) hash(b []byte) uint64 {
	h := maphash.Bytes(d.seed, b)
	if h == 0 {
		h = 1 // 0 means "none"
	}
	return h
}

// Datagram decodes one UDP payload sent from src to dst at ts. Invalid
// addresses (a lone datagram given in hex) are allowed; the conversation
// state then matches only other datagrams without addresses. payload is
// not retained.
func (d *Decoder) Datagram(ts time.Time, src, dst netip.AddrPort, payload []byte) *Record {
	d.frame++
	// A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
	src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	r := &Record{Frame: d.frame, Length: len(payload)}
	if !ts.IsZero() {
		t := ts
		r.Time = &t
	}
	if src.IsValid() {
		r.Src = src.String()
	}
	if dst.IsValid() {
		r.Dst = dst.String()
	}
	p, err := esro.ParsePDU(payload)
	if err != nil {
		r.Malformed = malformed(err, payload)
		return r
	}
	info := &ESROInfo{Type: p.Type.String(), Ref: p.Ref, HeaderLength: p.Type.HeaderLen(), DataLength: len(p.Data)}
	r.ESRO = info
	switch p.Type {
	case esro.TypeInvoke:
		info.SAP, info.Operation = ptr(p.SAP), ptr(p.Operation)
		info.Encoding = encodingName(p.Encoding)
		d.invoke(ts, src, dst, &p, r)
	case esro.TypeResult, esro.TypeError:
		info.Encoding = encodingName(p.Encoding)
		if p.Type == esro.TypeError {
			info.ErrorValue = ptr(p.Value)
		}
		d.reply(ts, src, dst, &p, r)
	case esro.TypeAck:
		if inv := d.invs[invKey{src, dst, p.Ref}]; inv != nil {
			info.InvokeFrame = inv.frame
			if inv.acked {
				r.Marks = append(r.Marks, "duplicate")
			}
			inv.acked = true
		}
		if extra := len(payload) - 2; extra > 0 {
			info.DataLength = extra // ignored octets after the header
		} else {
			info.DataLength = 0
		}
	case esro.TypeFailure:
		info.FailureReason, info.FailureName = ptr(p.Value), failureName(p.Value)
		// A FAILURE PDU does not say which side it is for: it usually
		// answers an INVOKE of the receiver, else a reply of the sender.
		inv := d.invs[invKey{dst, src, p.Ref}]
		if inv == nil {
			inv = d.invs[invKey{src, dst, p.Ref}]
		}
		if inv != nil {
			info.InvokeFrame = inv.frame
			if inv.failures > 0 {
				r.Marks = append(r.Marks, "duplicate")
			}
			inv.failures++
		}
		info.DataLength = max(0, len(payload)-3)
	}
	return r
}

func malformed(err error, b []byte) string {
	switch {
	case errors.Is(err, esro.ErrEmptyPDU):
		return "empty datagram"
	case errors.Is(err, esro.ErrBadPDUType):
		return "invalid PDU type " + strconv.Itoa(int(b[0]&7))
	case errors.Is(err, esro.ErrShortPDU):
		t := esro.PDUType(b[0] & 7)
		return fmt.Sprintf("%s shorter than its %d-octet header", t, t.HeaderLen())
	}
	return err.Error()
}

func ptr[T any](v T) *T { return &v }

func encodingName(e esro.Encoding) string {
	switch e {
	case esro.EncodingBER:
		return "BER"
	case esro.EncodingPER:
		return "PER"
	}
	return "reserved-" + strconv.Itoa(int(e)-1)
}

func failureName(v uint8) string {
	switch v {
	case 0:
		return "transmission failure"
	case 1:
		return "local resource"
	case 2:
		return "user not responding"
	case 3:
		return "remote resource"
	}
	return "unknown"
}

func (d *Decoder) invoke(ts time.Time, src, dst netip.AddrPort, p *esro.PDU, r *Record) {
	k := invKey{src, dst, p.Ref}
	h := d.hash(p.Data)
	if inv := d.invs[k]; inv != nil && inv.arg == h && inv.op == p.Operation && inv.sap == p.SAP {
		r.Marks = append(r.Marks, "retransmission")
		r.ESRO.InvokeFrame = inv.frame
		// A retransmitted segment is not fed to the reassembler again,
		// but its fields are still shown.
		r.EMSD = d.emsdInvoke(ts, src, dst, p, r, false)
		return
	}
	d.prune(ts)
	d.invs[k] = &invocation{frame: r.Frame, at: ts, op: p.Operation, sap: p.SAP, arg: h, emsd: p.Encoding == esro.EncodingBER}
	ak := argKey{src, dst, h ^ uint64(p.Operation)<<56}
	fresh := true
	if first, ok := d.args[ak]; ok && emsdOperation(p.Operation) {
		// The same EMSD argument, instance id included, under a new
		// reference number: the invoker re-invoked after a failure.
		r.Marks = append(r.Marks, "duplicate of #"+strconv.Itoa(first))
		fresh = false
	} else {
		d.args[ak] = r.Frame
	}
	r.EMSD = d.emsdInvoke(ts, src, dst, p, r, fresh)
}

func (d *Decoder) reply(ts time.Time, src, dst netip.AddrPort, p *esro.PDU, r *Record) {
	inv := d.invs[invKey{dst, src, p.Ref}]
	h := d.hash(append([]byte{byte(p.Type), p.Value}, p.Data...))
	if inv != nil {
		r.ESRO.InvokeFrame = inv.frame
		if inv.replied && inv.reply == h {
			r.Marks = append(r.Marks, "retransmission")
		}
		inv.replied, inv.reply = true, h
	}
	r.EMSD = d.emsdReply(p, inv)
}

// prune keeps the conversation state bounded.
func (d *Decoder) prune(now time.Time) {
	if len(d.invs) < maxInvocations {
		return
	}
	for k, inv := range d.invs {
		if now.Sub(inv.at) > invocationAge || now.Before(inv.at) {
			delete(d.invs, k)
		}
	}
	if len(d.invs) >= maxInvocations {
		clear(d.invs)
	}
	if len(d.args) >= maxInvocations {
		clear(d.args)
	}
}

// emsdOperation reports whether an operation value is one EMSD defines in
// either version.
func emsdOperation(op uint8) bool {
	_, ok11 := emsd.ParseOperation(emsd.Operation(op), emsd.V1_1)
	_, ok10 := emsd.ParseOperation(emsd.Operation(op), emsd.V1_0)
	return ok11 || ok10
}

// versions returns the EMSD versions an operation value may be, most
// likely first: 33 and 35 are 1.1 only, 0 and 1 are 1.0 only.
func versions(op uint8) []emsd.Version {
	var vs []emsd.Version
	for _, v := range []emsd.Version{emsd.V1_1, emsd.V1_0} {
		if _, ok := emsd.ParseOperation(emsd.Operation(op), v); ok {
			vs = append(vs, v)
		}
	}
	return vs
}

func (d *Decoder) emsdInvoke(ts time.Time, src, dst netip.AddrPort, p *esro.PDU, r *Record, fresh bool) *EMSDInfo {
	if p.Encoding != esro.EncodingBER {
		return nil // EMSD is always BER; this is another ESRO user
	}
	vs := versions(p.Operation)
	if len(vs) == 0 {
		if p.SAP == 0 || p.Encoding != esro.EncodingBER {
			return nil
		}
		return &EMSDInfo{Note: "operation " + strconv.Itoa(int(p.Operation)) + " is not an EMSD operation"}
	}
	var first *EMSDInfo
	for _, v := range vs {
		op, _ := emsd.ParseOperation(emsd.Operation(p.Operation), v)
		e := &EMSDInfo{Operation: op.String(), Version: v.String()}
		data := p.Data
		if emsd.CarriesInstanceID(emsd.Operation(p.Operation)) {
			if len(data) == 0 {
				e.Malformed = "instance-id octet missing"
				return e
			}
			e.InstanceID = ptr(data[0])
			data = data[1:]
		}
		if d.argument(ts, src, dst, op, data, emsd.Options{Version: v}, e, fresh) {
			return e
		}
		if first == nil {
			first = e
		}
	}
	return first
}

// argument decodes an INVOKE argument into e and reports whether it
// decoded.
func (d *Decoder) argument(ts time.Time, src, dst netip.AddrPort, op emsd.Operation, b []byte, o emsd.Options, e *EMSDInfo, fresh bool) bool {
	var err error
	switch op {
	case emsd.OpSubmission:
		e.PDU = "SubmitArgument"
		var a emsd.SubmitArgument
		if err = a.Unmarshal(b, o); err == nil {
			e.Security = security(a.Security)
			e.Segment = segment(a.Segment)
			e.Content = a.ContentType.String()
			e.ContentLen = ptr(len(a.Contents))
			whole := &a
			if a.Segment != nil && fresh {
				whole, err = d.reasm.AddSubmit(ts, src.String()+">"+dst.String(), &a)
				e.Reassembly = reassembly(a.Segment, whole, err)
				err = nil
			} else if a.Segment != nil {
				whole = nil
			}
			if whole != nil {
				e.Body = content(whole.ContentType, whole.Contents, o)
			}
		}
	case emsd.OpDelivery:
		e.PDU = "DeliverArgument"
		var a emsd.DeliverArgument
		if err = a.Unmarshal(b, o); err == nil {
			e.MessageID = a.MessageID.String()
			if a.DeliveryTime != 0 {
				e.Delivered = a.DeliveryTime.String()
			}
			if a.SubmissionTime != nil {
				e.Submitted = a.SubmissionTime.String()
			}
			e.Security = security(a.Security)
			e.Segment = segment(a.Segment)
			e.Content = a.ContentType.String()
			e.ContentLen = ptr(len(a.Contents))
			whole := &a
			if a.Segment != nil && fresh {
				whole, err = d.reasm.AddDeliver(ts, src.String()+">"+dst.String(), &a)
				e.Reassembly = reassembly(a.Segment, whole, err)
				err = nil
			} else if a.Segment != nil {
				whole = nil
			}
			if whole != nil {
				e.Body = content(whole.ContentType, whole.Contents, o)
			}
		}
	case emsd.OpDeliveryControl:
		e.PDU = "DeliveryControlArgument"
		var a emsd.DeliveryControlArgument
		if err = a.Unmarshal(b, o); err == nil {
			if a.Restrict != nil {
				e.Control = append(e.Control, Field{"restrict", restrictName(*a.Restrict)})
			}
			if a.PermissibleOperations != nil {
				e.Control = append(e.Control, Field{"permissible-operations", opSet(*a.PermissibleOperations)})
			}
			if a.PermissibleMaxContentLength != nil {
				e.Control = append(e.Control, Field{"permissible-max-content-length", strconv.FormatUint(uint64(*a.PermissibleMaxContentLength), 10)})
			}
			if a.PermissibleLowestPriority != nil {
				e.Control = append(e.Control, Field{"permissible-lowest-priority", priorityName(*a.PermissibleLowestPriority)})
			}
			e.Security = security(a.Security)
			if a.UserFeatures != nil {
				e.Control = append(e.Control, Field{"user-features", fmt.Sprintf("%d octets", len(a.UserFeatures))})
			}
		}
	case emsd.OpDeliveryVerify:
		e.PDU = "DeliveryVerifyArgument"
		var a emsd.DeliveryVerifyArgument
		if err = a.Unmarshal(b, o); err == nil {
			e.MessageID = a.MessageID.String()
		}
	case emsd.OpSubmissionVerify:
		e.PDU = "SubmissionVerifyArgument"
		var a emsd.SubmissionVerifyArgument
		if err = a.Unmarshal(b, o); err == nil {
			e.MessageID = a.MessageID.String()
		}
	default:
		// Submission control and the configuration operations have no
		// argument defined.
		if len(b) > 0 {
			e.Note = fmt.Sprintf("%d octets of argument, not defined by EMSD", len(b))
		}
		return true
	}
	if err != nil {
		e.Malformed = err.Error()
		return false
	}
	return true
}

func reassembly(s *emsd.SegmentInfo, whole any, err error) *Reassembly {
	if err != nil {
		return &Reassembly{Error: err.Error()}
	}
	switch w := whole.(type) {
	case *emsd.SubmitArgument:
		if w != nil {
			return &Reassembly{Complete: true, Segments: segCount(s), Length: len(w.Contents)}
		}
	case *emsd.DeliverArgument:
		if w != nil {
			return &Reassembly{Complete: true, Segments: segCount(s), Length: len(w.Contents)}
		}
	}
	return nil
}

// segCount is the number of segments of a message whose last segment is s.
func segCount(s *emsd.SegmentInfo) uint32 {
	if s.First {
		return s.Value
	}
	return s.Value + 1
}

func (d *Decoder) emsdReply(p *esro.PDU, inv *invocation) *EMSDInfo {
	if p.Type == esro.TypeError {
		if (inv != nil && !inv.emsd) || (inv == nil && p.Encoding != esro.EncodingBER) {
			return nil
		}
		e := &EMSDInfo{PDU: "ErrorParameter", Error: &ErrorInfo{Code: p.Value, Name: emsd.ErrorCode(p.Value).String()}}
		if inv != nil {
			if vs := versions(inv.op); len(vs) > 0 {
				op, _ := emsd.ParseOperation(emsd.Operation(inv.op), vs[0])
				e.Operation = op.String()
			}
		}
		if len(p.Data) > 0 {
			var ep emsd.ErrorParameter
			if err := ep.Unmarshal(p.Data, emsd.Options{}); err != nil {
				e.Malformed = err.Error()
			} else {
				e.Error.Parameter = ptr(uint8(ep))
			}
		}
		return e
	}
	if inv == nil {
		if len(p.Data) == 0 || p.Encoding != esro.EncodingBER {
			return nil
		}
		return &EMSDInfo{Note: "the INVOKE is not in the capture: operation unknown"}
	}
	if !inv.emsd {
		return nil
	}
	vs := versions(inv.op)
	if len(vs) == 0 {
		return nil
	}
	var first *EMSDInfo
	for _, v := range vs {
		op, _ := emsd.ParseOperation(emsd.Operation(inv.op), v)
		e := &EMSDInfo{Operation: op.String(), Version: v.String()}
		if result(op, p.Data, emsd.Options{Version: v}, e) {
			return e
		}
		if first == nil {
			first = e
		}
	}
	return first
}

func result(op emsd.Operation, b []byte, o emsd.Options, e *EMSDInfo) bool {
	var err error
	switch op {
	case emsd.OpSubmission:
		e.PDU = "SubmitResult"
		if len(b) == 0 {
			// The answer to a duplicate or to a segment other than the last.
			e.Note = "empty result (segment accepted, or a duplicate)"
			return true
		}
		var r emsd.SubmitResult
		if err = r.Unmarshal(b, o); err == nil {
			e.MessageID = r.MessageID.String()
		}
	case emsd.OpDelivery:
		e.PDU = "DeliverResult"
		if len(b) > 0 {
			e.Note = fmt.Sprintf("%d unexpected octets", len(b))
		}
		return true
	case emsd.OpDeliveryControl:
		e.PDU = "DeliveryControlResult"
		var r emsd.DeliveryControlResult
		if err = r.Unmarshal(b, o); err == nil {
			if r.WaitingOperations != nil {
				e.Control = append(e.Control, Field{"waiting-operations", opSet(*r.WaitingOperations)})
			}
			if r.WaitingMessages != nil {
				e.Control = append(e.Control, Field{"waiting-messages", waitingName(*r.WaitingMessages)})
			}
			if len(r.WaitingContentTypes) > 0 {
				s := ""
				for i, c := range r.WaitingContentTypes {
					if i > 0 {
						s += ", "
					}
					s += c.String()
				}
				e.Control = append(e.Control, Field{"waiting-content-types", s})
			}
		}
	case emsd.OpDeliveryVerify:
		e.PDU = "DeliveryVerifyResult"
		var r emsd.DeliveryVerifyResult
		if err = r.Unmarshal(b, o); err == nil {
			e.Status = r.Status.String()
		}
	case emsd.OpSubmissionVerify:
		e.PDU = "SubmissionVerifyResult"
		var r emsd.SubmissionVerifyResult
		if err = r.Unmarshal(b, o); err == nil {
			e.Status = r.Status.String()
		}
	default:
		if len(b) > 0 {
			e.Note = fmt.Sprintf("%d octets of result, not defined by EMSD", len(b))
		}
		return true
	}
	if err != nil {
		e.Malformed = err.Error()
		return false
	}
	return true
}

func security(s *emsd.SecurityElement) *Security {
	if s == nil {
		return nil
	}
	out := &Security{}
	if s.Address != nil {
		out.Address, out.Name = s.Address.Address.String(), s.Address.Name
	}
	if s.Password != "" {
		out.Password = Mask
	}
	return out
}

func segment(s *emsd.SegmentInfo) *Segment {
	if s == nil {
		return nil
	}
	out := &Segment{SequenceID: s.SequenceID, First: s.First}
	if s.First {
		out.Total = s.Value
	} else {
		out.Number = s.Value
	}
	return out
}

// content decodes whole contents; a failure is reported inside.
func content(ct emsd.ContentType, b []byte, o emsd.Options) *ContentInfo {
	c, err := emsd.DecodeContents(ct, b, o)
	if err != nil {
		return &ContentInfo{Type: ct.String(), Malformed: err.Error()}
	}
	return contentInfo(c, o)
}

func contentInfo(c emsd.Content, o emsd.Options) *ContentInfo {
	out := &ContentInfo{Type: c.ContentType().String()}
	switch c := c.(type) {
	case *emsd.IPM:
		h := &c.Heading
		if h.Sender != nil {
			out.Sender = h.Sender.String()
		}
		out.Originator = h.Originator.String()
		for _, r := range h.Recipients {
			s := r.Recipient.String()
			if r.Flags != 0 {
				s += " (" + r.Flags.String() + ")"
			}
			out.Recipients = append(out.Recipients, s)
		}
		for _, a := range h.ReplyTo {
			out.ReplyTo = append(out.ReplyTo, a.String())
		}
		subj := h.Subject
		out.Subject = &subj
		if h.Flags != 0 {
			out.Flags = h.Flags.String()
		}
		out.MIMEType = h.MIMEContentType
		n := 0
		if c.Body != nil {
			n = len(c.Body.Text)
		}
		out.BodyLength = &n
	case *emsd.ReportDelivery:
		out.Reported = c.ReportedMessageID.String()
		for _, p := range c.Recipients {
			oc := Outcome{Recipient: p.Recipient.String()}
			switch {
			case p.Delivery != nil:
				oc.Delivered = p.Delivery.DeliveryTime.String()
			case p.NonDelivery != nil:
				oc.Reason = p.NonDelivery.Reason.String()
				if p.NonDelivery.Diagnostic != nil {
					oc.Diagnostic = p.NonDelivery.Diagnostic.String()
				}
				oc.Explanation = p.NonDelivery.Explanation
			default:
				oc.Reason = "no report"
			}
			out.Outcomes = append(out.Outcomes, oc)
		}
		if rc := c.ReturnedContent; rc != nil && rc.Contents != nil {
			out.Returned = content(rc.ContentType, rc.Contents, o)
		}
	case *emsd.ProbeSubmission:
		out.Sender = c.Sender.String()
		for _, r := range c.Recipients {
			out.Recipients = append(out.Recipients, r.String())
		}
		out.ProbeLength = c.ContentLength
	}
	return out
}

func restrictName(r emsd.Restrict) string {
	switch r {
	case emsd.RestrictUpdate:
		return "update"
	case emsd.RestrictRemove:
		return "remove"
	}
	return strconv.FormatUint(uint64(r), 10)
}

func priorityName(p emsd.Priority) string {
	switch p {
	case emsd.PriorityNonUrgent:
		return "non-urgent"
	case emsd.PriorityNormal:
		return "normal"
	case emsd.PriorityUrgent:
		return "urgent"
	}
	return strconv.FormatUint(uint64(p), 10)
}

func opSet(s emsd.OperationSet) string {
	out := ""
	for i := range 64 {
		if s.Has(emsd.Operation(i)) {
			if out != "" {
				out += ", "
			}
			out += emsd.Operation(i).String()
		}
	}
	if out == "" {
		return "none"
	}
	return out
}

func waitingName(w emsd.WaitingMessages) string {
	var out string
	add := func(s string) {
		if out != "" {
			out += ", "
		}
		out += s
	}
	if w.Has(emsd.WaitingLongContent) {
		add("long-content")
	}
	if w.Has(emsd.WaitingLowPriority) {
		add("low-priority")
	}
	if rest := w &^ (emsd.WaitingLongContent | emsd.WaitingLowPriority); rest != 0 {
		add(fmt.Sprintf("other 0x%02x", uint8(rest)))
	}
	if out == "" {
		return "none"
	}
	return out
}

// Plausible reports whether a datagram on a port outside the selection
// looks like ESRO carrying EMSD: an INVOKE of an EMSD operation on an EMSD
// SAP whose argument decodes, or the answer to an INVOKE this Decoder has
// seen. It does not change the Decoder's state.
func (d *Decoder) Plausible(src, dst netip.AddrPort, payload []byte) bool {
	p, err := esro.ParsePDU(payload)
	if err != nil {
		return false
	}
	switch p.Type {
	case esro.TypeInvoke:
		if p.Encoding != esro.EncodingBER || p.SAP < 3 || p.SAP > 13 || p.SAP%2 == 0 || !emsdOperation(p.Operation) {
			return false
		}
		for _, v := range versions(p.Operation) {
			op, _ := emsd.ParseOperation(emsd.Operation(p.Operation), v)
			data := p.Data
			if emsd.CarriesInstanceID(emsd.Operation(p.Operation)) {
				if len(data) == 0 {
					return false
				}
				data = data[1:]
			}
			var e EMSDInfo
			scratch := &Decoder{reasm: emsd.NewReassembler[string](emsd.ReassemblerConfig{})}
			if len(data) > 0 && scratch.argument(time.Time{}, src, dst, op, data, emsd.Options{Version: v}, &e, false) {
				return true
			}
		}
		return false
	case esro.TypeResult, esro.TypeError:
		return d.invs[invKey{dst, src, p.Ref}] != nil
	case esro.TypeAck:
		return d.invs[invKey{src, dst, p.Ref}] != nil
	case esro.TypeFailure:
		return d.invs[invKey{dst, src, p.Ref}] != nil || d.invs[invKey{src, dst, p.Ref}] != nil
	}
	return false
}
