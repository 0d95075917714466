package emsd

import (
	"math/rand/v2"
	"reflect"
	"testing"
)

// gen produces random valid values (within the limits of its version)
// in the canonical form decoders return: nil for absent or empty
// optional slices except where presence is kept (ReplyTo, UserFeatures).
type gen struct {
	r *rand.Rand
	v Version
}

func newGen(seed uint64, v Version) *gen { return &gen{rand.New(rand.NewPCG(seed, 0x5eed)), v} }

func (g *gen) bool() bool { return g.r.IntN(2) == 0 }

// u32 is biased towards the INTEGER size boundaries.
func (g *gen) u32() uint32 {
	edges := []uint32{0, 1, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0x8000, 0xffff, 0x10000, 0xffffff,
		0x1000000, 0x7fffffff, 0x80000000, 0xffffffff}
	if g.r.IntN(3) == 0 {
		return edges[g.r.IntN(len(edges))]
	}
	return g.r.Uint32() >> (g.r.IntN(4) * 8)
}

func (g *gen) bytes(max int) []byte {
	n := g.r.IntN(max + 1)
	if g.r.IntN(4) == 0 {
		n = max // often exactly at the limit
	}
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(g.r.Uint32())
	}
	return b
}

func (g *gen) str(max int) string { return string(g.bytes(max)) }

func (g *gen) optStr(max int) string {
	if g.bool() {
		return ""
	}
	s := g.str(max)
	if s == "" {
		s = "x"
	}
	return s
}

func (g *gen) optBytes(max int) []byte {
	if g.bool() {
		return nil
	}
	b := g.bytes(max)
	if len(b) == 0 {
		b = []byte{0}
	}
	return b
}

// limit returns max, or a larger size for 1.0, which does not limit the
// heading strings (§4).
func (g *gen) limit(max int) int {
	if g.v == V1_0 && g.r.IntN(4) == 0 {
		return max + 200
	}
	return max
}

func (g *gen) count(max int) int {
	switch g.r.IntN(10) {
	case 0:
		return max
	case 1, 2, 3:
		return 0
	}
	return 1 + g.r.IntN(4)
}

func (g *gen) or() ORAddress {
	if g.bool() {
		return LocalOR(Address(g.u32()), g.optStr(MaxEMSDName))
	}
	return RFC822OR(g.str(MaxRFC822Address))
}

func (g *gen) msgID() MessageID {
	if g.bool() {
		return LocalID(Time(g.u32()), g.u32())
	}
	return RFC822ID(g.str(MaxMessageID))
}

func (g *gen) security() *SecurityElement {
	if g.bool() {
		return nil
	}
	s := &SecurityElement{Password: g.optStr(MaxPassword)}
	if g.bool() {
		s.Address = &EMSDAddress{Address(g.u32()), g.optStr(MaxEMSDName)}
	}
	if g.r.IntN(4) == 0 {
		s.ContentIntegrityCheck = ptr(g.u32())
	}
	return s
}

func (g *gen) segment() *SegmentInfo {
	if g.bool() {
		return nil
	}
	return &SegmentInfo{First: g.bool(), SequenceID: g.u32(), Value: g.u32()}
}

func (g *gen) opt32() *uint32 {
	if g.bool() {
		return nil
	}
	return ptr(g.u32())
}

func (g *gen) ipm() *IPM {
	h := Heading{Originator: g.or(), Subject: g.optStr(g.limit(MaxSubject))}
	if g.bool() {
		h.Sender = ptr(g.or())
	}
	for range g.count(MaxRecipients) {
		h.Recipients = append(h.Recipients, RecipientData{g.or(), PerRecipientFlags(g.r.Uint32())})
	}
	h.Flags = PerMessageFlags(g.r.Uint32() & 0x1f)
	if g.bool() {
		h.ReplyTo = []ORAddress{}
		for range g.count(MaxReplyTo) {
			h.ReplyTo = append(h.ReplyTo, g.or())
		}
	}
	if g.bool() {
		h.RepliedTo = ptr(g.msgID())
	}
	nExt := g.count(MaxExtensions)
	if g.v == V1_0 && g.r.IntN(8) == 0 {
		nExt = MaxExtensions + 3
	}
	for range nExt {
		h.Extensions = append(h.Extensions, Extension{g.str(20), g.str(200)})
	}
	h.MIMEVersion = g.optStr(g.limit(MaxMIMEVersion))
	h.MIMEContentType = g.optStr(g.limit(MaxMIMEField))
	h.MIMEContentID = g.optStr(g.limit(MaxMIMEField))
	h.MIMEContentDescription = g.optStr(g.limit(MaxMIMEField))
	h.MIMEContentTransferEncoding = g.optStr(g.limit(MaxMIMEField))
	m := &IPM{Heading: h}
	if g.r.IntN(5) != 0 {
		m.Body = &Body{Text: g.optBytes(2000)}
		if g.r.IntN(4) == 0 {
			m.Body.CompressionMethod = ptr(CompressionMethod(g.u32()))
		}
	}
	return m
}

func (g *gen) report() *ReportDelivery {
	r := &ReportDelivery{ReportedMessageID: g.msgID()}
	for range g.count(MaxRecipients) {
		p := PerRecipReportData{Recipient: g.or()}
		if g.bool() {
			p.Delivery = &DeliveryReport{Time(g.u32())}
		} else {
			p.NonDelivery = &NonDeliveryReport{Reason: NonDeliveryReason(g.u32()),
				Diagnostic: (*Diagnostic)(g.opt32()), Explanation: g.optStr(300)}
		}
		r.Recipients = append(r.Recipients, p)
	}
	if g.bool() {
		r.ReturnedContent = &ReturnedContent{ContentType(g.u32()), g.optBytes(500)}
	}
	return r
}

func (g *gen) probe() *ProbeSubmission {
	p := &ProbeSubmission{Sender: g.or()}
	for range g.count(MaxRecipients) {
		p.Recipients = append(p.Recipients, g.or())
	}
	p.ProbedContentType = (*ContentType)(g.opt32())
	if p.ProbedContentType != nil || g.v == V1_1 {
		p.ContentLength = g.opt32()
	}
	return p
}

func (g *gen) opSet() *OperationSet {
	if g.bool() {
		return nil
	}
	return ptr(OperationSet(g.r.Uint64() >> g.r.IntN(64)))
}

// value returns a random value of the same type as like.
func (g *gen) value(like pdu) pdu {
	switch like.(type) {
	case *SubmitArgument:
		return &SubmitArgument{g.security(), g.segment(), ContentType(g.u32()), g.optBytes(3000)}
	case *SubmitResult:
		return &SubmitResult{LocalMessageID{Time(g.u32()), g.u32()}}
	case *DeliverArgument:
		return &DeliverArgument{g.msgID(), Time(g.u32()), (*Time)(g.opt32()), g.security(), g.segment(),
			ContentType(g.u32()), g.optBytes(3000)}
	case *DeliveryControlArgument:
		a := &DeliveryControlArgument{Restrict: (*Restrict)(g.opt32()), PermissibleOperations: g.opSet(),
			PermissibleMaxContentLength: g.opt32(), PermissibleLowestPriority: (*Priority)(g.opt32()),
			Security: g.security()}
		if g.bool() {
			a.UserFeatures = g.bytes(50)
		}
		return a
	case *DeliveryControlResult:
		r := &DeliveryControlResult{WaitingOperations: g.opSet()}
		if g.bool() {
			r.WaitingMessages = ptr(WaitingMessages(g.r.Uint32()))
		}
		for range g.count(MaxWaitingContentTypes) {
			r.WaitingContentTypes = append(r.WaitingContentTypes, ContentType(g.u32()))
		}
		return r
	case *DeliveryVerifyArgument:
		return &DeliveryVerifyArgument{g.msgID()}
	case *SubmissionVerifyArgument:
		return &SubmissionVerifyArgument{g.msgID()}
	case *DeliveryVerifyResult:
		return &DeliveryVerifyResult{DeliveryStatus(g.u32())}
	case *SubmissionVerifyResult:
		return &SubmissionVerifyResult{SubmissionStatus(g.u32())}
	case *ErrorParameter:
		return ptr(ErrorParameter(g.r.Uint32()))
	case *IPM:
		return g.ipm()
	case *ReportDelivery:
		return g.report()
	case *ProbeSubmission:
		return g.probe()
	}
	panic("no generator")
}

var allTypes = []pdu{
	&SubmitArgument{}, &SubmitResult{}, &DeliverArgument{}, &DeliveryControlArgument{},
	&DeliveryControlResult{}, &DeliveryVerifyArgument{}, &SubmissionVerifyArgument{},
	&DeliveryVerifyResult{}, &SubmissionVerifyResult{}, new(ErrorParameter), &IPM{},
	&ReportDelivery{}, &ProbeSubmission{},
}

// reverseAll returns v with every SEQUENCE OF reversed, the value a
// decoder sees after encoding v with ReverseSequenceOf.
func reverseAll(v pdu) pdu {
	switch x := v.(type) {
	case *IPM:
		return reversedIPM(x)
	case *ReportDelivery:
		c := *x
		c.Recipients = reversed(c.Recipients)
		return &c
	case *ProbeSubmission:
		c := *x
		c.Recipients = reversed(c.Recipients)
		return &c
	case *DeliveryControlResult:
		c := *x
		c.WaitingContentTypes = reversed(c.WaitingContentTypes)
		return &c
	}
	return v
}

func TestRoundTrip(t *testing.T) {
	for _, v := range []Version{V1_1, V1_0} {
		for _, like := range allTypes {
			name := reflect.TypeOf(like).Elem().Name() + "/" + v.String()
			t.Run(name, func(t *testing.T) {
				g := newGen(uint64(len(name))*7919, v)
				for i := range 1500 {
					val := g.value(like)
					for _, rev := range []bool{false, true} {
						o := Options{Version: v, ReverseSequenceOf: rev}
						b, err := val.Marshal(o)
						if err != nil {
							t.Fatalf("#%d encode %s: %v", i, dump(val), err)
						}
						got := newLike(like)
						if err := got.Unmarshal(b, o); err != nil {
							t.Fatalf("#%d decode %s\n% x: %v", i, dump(val), b, err)
						}
						want := val
						if rev {
							want = reverseAll(val)
						}
						if !reflect.DeepEqual(got, want) {
							t.Fatalf("#%d rev=%v:\n got  %s\n want %s", i, rev, dump(got), dump(want))
						}
						// got is in wire order: natural encoding reproduces b.
						again, err := got.Marshal(Options{Version: v})
						if err != nil {
							t.Fatal(err)
						}
						mustEqualBytes(t, "second encoding", again, b)
					}
				}
			})
		}
	}
}
