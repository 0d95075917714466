package ua

import (
	"context"
	"errors"
	"fmt"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
)

// Submit sends m to the MTS and returns the local message id the MTS
// assigned (§10.2). See SubmitIPM for the protocol and the errors.
func (c *Client) Submit(ctx context.Context, m *Message) (emsd.LocalMessageID, error) {
	ipm, err := m.IPM(c.cfg.Address)
	if err != nil {
		return emsd.LocalMessageID{}, err
	}
	return c.SubmitIPM(ctx, ipm)
}

// SubmitIPM submits an IPM built by the caller, for instance from an
// RFC 5322 message by a gateway box (§10.2).
//
// The encoded IPM is segmented to the ESRO PDU size (§8) and each segment
// is one 3-way operation 33 from UA SAP 4 to MTS SAP 5, sent after the
// RESULT of the previous one (stop and wait), with a new instance id
// (§1.5). A segment that ends in an ESRO failure is invoked once more with
// the same instance id. Results of intermediate segments are ignored; the
// last one's id is recorded in the verify list and returned.
//
// Errors: ErrInvalidMessage (nothing sent: the IPM does not encode or needs
// more than 32 segments), *Error (the MTS answered an EMSD error; Transient
// tells whether to retry later), an error wrapping *esro.Failure (no
// answer: the outcome is unknown and the MTS may verify it, §9.5), the
// context's error, or ErrBadResult.
func (c *Client) SubmitIPM(ctx context.Context, ipm *emsd.IPM) (emsd.LocalMessageID, error) {
	var zero emsd.LocalMessageID
	if !c.cfg.Server.IsValid() {
		return zero, ErrNoServer
	}
	content, err := ipm.Marshal(c.opts)
	if err != nil {
		return zero, fmt.Errorf("%w: %w", ErrInvalidMessage, err)
	}
	segs, err := c.split(content)
	if err != nil {
		return zero, err
	}
	// One submission at a time: the reference MTS loses a segment that
	// overtakes the confirmation of the previous one (Open Point 6), and a
	// device's link is rarely wide enough to gain from more.
	select {
	case c.submitMu <- struct{}{}:
	case <-ctx.Done():
		return zero, ctx.Err()
	}
	defer func() { <-c.submitMu }()

	op := emsd.OpSubmission
	wire, _ := op.Wire(c.cfg.Version)
	var res *esro.Result
	for i, arg := range segs {
		data := arg
		if emsd.CarriesInstanceID(wire) {
			data = emsd.PrependInstanceID(c.instance.Next(), arg)
		}
		res, err = c.invoke(ctx, emsd.SAPMTSPerformer3Way, op, esro.ThreeWay, data)
		// A segment that went unanswered is invoked once more (its
		// answer may be what was lost). Not after an ICMP error: the
		// server is not there, and a second INVOKE would only get the
		// same error.
		var f *esro.Failure
		if errors.As(err, &f) && f.Reason != esro.Unreachable && ctx.Err() == nil {
			c.log.Warn("ua: submission segment failed, invoking it again", "segment", i, "segments", len(segs), "err", err)
			res, err = c.invoke(ctx, emsd.SAPMTSPerformer3Way, op, esro.ThreeWay, data)
		}
		if err != nil {
			err = invokeError(op, err, c.opts)
			if len(segs) > 1 {
				err = fmt.Errorf("segment %d of %d: %w", i+1, len(segs), err)
			}
			return zero, err
		}
	}
	var r emsd.SubmitResult
	if err := r.Unmarshal(res.Data, c.opts); err != nil {
		return zero, fmt.Errorf("%w: %w", ErrBadResult, err)
	}
	if err := c.verify.Add(r.MessageID); err != nil {
		// The MTS has the message; failing here would invite a duplicate
		// resubmission. A later verify is answered "drop" at worst.
		c.log.Error("ua: recording submission for verify", "id", r.MessageID, "err", err)
	}
	return r.MessageID, nil
}

// split cuts the encoded content into Submit arguments that fit the PDU
// size, with a new sequence id when it has to be segmented (§8).
func (c *Client) split(content []byte) ([][]byte, error) {
	env := &emsd.SubmitArgument{Security: c.credentials(), ContentType: emsd.ContentIPM}
	s := emsd.Splitter{Options: c.opts, MaxUserData: c.cfg.PDUSize}
	c.seqMu.Lock()
	defer c.seqMu.Unlock()
	seq := c.seq + 1
	if seq == 0 {
		seq = 1
	}
	segs, err := s.SplitSubmit(env, content, seq)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidMessage, err)
	}
	if len(segs) > 1 {
		c.seq = seq
	}
	return segs, nil
}
