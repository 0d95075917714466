package decode

import (
	"fmt"
	"net/netip"
	"strconv"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
)

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
