package server

import (
	"errors"
	"fmt"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/storedid"
)

// prepared is a claimed delivery made ready to send: its segments, or
// why it cannot be sent.
type prepared struct {
	fail    *attemptResult
	ct      emsd.ContentType
	segs    [][]byte
	op      emsd.Operation
	sap     emsd.SAP
	hs      esro.Handshake
	carries bool // the operation carries an instance id
}

// prepare encodes d for dev and splits it into segments
// (docs/protocol.md EMSD §9.9).
func (s *scheduler) prepare(dev *device, d *store.Delivery) prepared {
	p := prepared{ct: emsd.ContentType(d.ContentType)}
	fail := func(reason emsd.NonDeliveryReason, diag emsd.Diagnostic, format string, a ...any) prepared {
		text := fmt.Sprintf(format, a...)
		p.fail = &attemptResult{kind: attemptFailed, o: failed(reason, diag, text), err: text}
		return p
	}
	o := s.conf().emsdOptions(dev.version)
	content := d.Content
	if o != (emsd.Options{}) { // stored as 1.1 in list order; re-encode for this device
		c, err := emsd.DecodeContents(p.ct, content, emsd.Options{})
		if err == nil {
			content, err = c.Marshal(o)
		}
		if err != nil {
			return fail(emsd.ReasonUnableToTransfer, emsd.DiagContentTypeNotSupported, "cannot encode for EMSD %s: %v", dev.version, err)
		}
	}
	mid, err := storedid.ParseMessageID(d.MessageID)
	if err != nil {
		return fail(emsd.ReasonUnableToTransfer, emsd.DiagProtocolViolation, "%v", err)
	}
	env := &emsd.DeliverArgument{MessageID: mid, DeliveryTime: emsd.TimeOf(time.Now()), ContentType: p.ct}
	if d.SubmissionTime != nil {
		t := emsd.Time(*d.SubmissionTime)
		env.SubmissionTime = &t
	}
	sp := emsd.Splitter{Options: o, MaxUserData: s.conf().EMSD.PDUSize}
	if p.segs, err = sp.SplitDeliver(env, content, s.seq.Next()); err != nil {
		var sl *emsd.SegmentLimitError
		if errors.As(err, &sl) {
			return fail(emsd.ReasonUnableToTransfer, sl.Diagnostic(), "%v", err)
		}
		return fail(emsd.ReasonUnableToTransfer, emsd.DiagSizeConstraintViolated, "%v", err)
	}
	p.op = deliveryOp(dev.version)
	p.sap, p.hs = emsd.SAPUAPerformer3Way, esro.ThreeWay
	if dev.version == emsd.V1_1 && dev.Mode == store.ModeEfficient {
		p.sap, p.hs = emsd.SAPUAPerformer2Way, esro.TwoWay
	}
	p.carries = emsd.CarriesInstanceID(p.op)
	return p
}
