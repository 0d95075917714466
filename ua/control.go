package ua

import (
	"context"
	"fmt"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
)

// DeliveryControl sends delivery control (op 2, UA SAP 8 → MTS SAP 9,
// 2-way, §10.5). Any answer tells the MTS the device is reachable, so
// queued deliveries follow at once (§9.4) as separate operations. arg may
// be nil (all fields absent, as the reference UA sends it); when it has no
// security element the client's credentials are added so that the MTS can
// identify the device.
//
// A reference MTS always answers ERROR 7 (§9.12): that comes back as an
// *Error with Code emsd.CodeProtocolViolation, and still means "the MTS
// answered". An empty RESULT is returned as an empty result.
func (c *Client) DeliveryControl(ctx context.Context, arg *emsd.DeliveryControlArgument) (*emsd.DeliveryControlResult, error) {
	a := emsd.DeliveryControlArgument{}
	if arg != nil {
		a = *arg
	}
	if a.Security == nil {
		a.Security = c.credentials()
	}
	b, err := a.Marshal(c.opts)
	if err != nil {
		return nil, fmt.Errorf("ua: delivery control argument: %w", err)
	}
	op := emsd.OpDeliveryControl
	res, err := c.invoke(ctx, emsd.SAPMTSPerformer2Way, op, esro.TwoWay, b)
	if err != nil {
		return nil, invokeError(op, err, c.opts)
	}
	var r emsd.DeliveryControlResult
	if len(res.Data) > 0 {
		if err := r.Unmarshal(res.Data, c.opts); err != nil {
			return nil, fmt.Errorf("%w: delivery control: %w", ErrBadResult, err)
		}
	}
	return &r, nil
}

// DeliveryVerify asks the MTS whether it knows the outcome of the delivery
// of message id (op 5, UA SAP 8 → MTS SAP 9, 2-way: the binding Open Point
// 12 recommends; the reference MTS never answers it, §9.13). It exists in
// EMSD 1.1 only.
func (c *Client) DeliveryVerify(ctx context.Context, id emsd.MessageID) (emsd.DeliveryStatus, error) {
	a := emsd.DeliveryVerifyArgument{MessageID: id}
	b, err := a.Marshal(c.opts)
	if err != nil {
		return 0, fmt.Errorf("%w: %w", ErrInvalidMessage, err)
	}
	op := emsd.OpDeliveryVerify
	res, err := c.invoke(ctx, emsd.SAPMTSPerformer2Way, op, esro.TwoWay, b)
	if err != nil {
		return 0, invokeError(op, err, c.opts)
	}
	var r emsd.DeliveryVerifyResult
	if err := r.Unmarshal(res.Data, c.opts); err != nil {
		return 0, fmt.Errorf("%w: delivery verify: %w", ErrBadResult, err)
	}
	return r.Status, nil
}

// DefaultPollInterval is KeepPolling's interval when none is given: below
// the 30 s within which many home and carrier-grade NATs drop an idle UDP
// binding (RFC 4787 REQ-5 asks for 2 minutes; many keep 30-60 s), and
// within the MTS's default contact lifetime, so that a polling device
// stays reachable.
const DefaultPollInterval = 25 * time.Second

// KeepPolling sends delivery control at once and then every interval
// (DefaultPollInterval when zero or less) until ctx ends, and returns
// ctx's error. Each answered poll tells the MTS where the device is now
// (its source address: behind a NAT, the binding the poll opened) and
// makes queued deliveries flow; the deliveries come back over the same
// socket, the client's endpoint, which the polls keep open in the NAT.
// report, when not nil, receives each poll's outcome (nil: answered; an
// *Error answer, as a reference MTS's ERROR 7, is an answer too).
func (c *Client) KeepPolling(ctx context.Context, interval time.Duration, report func(error)) error {
	if interval <= 0 {
		interval = DefaultPollInterval
	}
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		_, err := c.DeliveryControl(ctx, nil)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if report != nil {
			report(err)
		}
		t.Reset(interval)
	}
}
