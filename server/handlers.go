package server

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"slices"
	"strconv"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/server/internal/storedid"
	"github.com/esro-emsdp/emsdp/store"
)

func (s *Server) opts(v emsd.Version) emsd.Options {
	return emsd.Options{Version: v, ReverseSequenceOf: s.conf().Compat.ReverseSequenceOf}
}

// serveESRO is the handler of both MTS performer SAPs (5, 3-way; 9,
// 2-way). It routes each INVOKE to the operation's handler (docs/protocol.md EMSD
// §1.4, §9).
func (s *Server) serveESRO(ctx context.Context, w esro.ResponseWriter, inv *esro.Invocation) {
	peer := netip.AddrPortFrom(inv.Peer.Addr().Unmap(), inv.Peer.Port())
	ipOnly := s.conf().Compat.IPOnlyIdentification
	hint := s.registry().byPeer(peer, ipOnly)
	v := emsd.V1_1
	if a, ok := dtlsDevice(ctx); ok {
		hint = s.registry().get(a)
	}
	if hint != nil {
		v = hint.version
	}
	op, ok := emsd.ParseOperation(emsd.Operation(inv.Operation), v)
	// Any INVOKE from a device wakes its queue, before anything else and
	// even when it is then refused (docs/protocol.md EMSD §9.4). Not so an
	// operation that carries the password of a device that has one: it
	// wakes the queue once the password checked out and the source
	// became the device's contact (contact.go), so that the deliveries it
	// starts go there, and a wrong password starts nothing.
	authOp := ok && (op == emsd.OpSubmission || op == emsd.OpDeliveryControl)
	woken := hint != nil && (!authOp || hint.PasswordHash == "" || ipOnly)
	if woken {
		s.wake(hint.addr, false)
	}
	if inv.Encoding != esro.EncodingBER { // docs/protocol.md EMSD §1.2, captured
		s.refuse(w, "any", emsd.CodeProtocolViolation, "encoding type")
		return
	}
	sap := emsd.SAP(inv.SAP)
	switch {
	case ok && op == emsd.OpSubmission && sap == emsd.SAPMTSPerformer3Way:
		s.metrics.invokes.WithLabelValues("submission").Inc()
		start := time.Now()
		s.handleSubmit(ctx, w, inv, peer, v, woken)
		s.metrics.submitTime.Observe(time.Since(start).Seconds())
	case ok && op == emsd.OpDeliveryControl && sap == emsd.SAPMTSPerformer2Way:
		s.metrics.invokes.WithLabelValues("delivery_control").Inc()
		s.handleDeliveryControl(ctx, w, inv, peer, v, woken)
	case ok && op == emsd.OpDeliveryVerify && v == emsd.V1_1:
		// Accepted on either performer SAP (Open Point 12).
		s.metrics.invokes.WithLabelValues("delivery_verify").Inc()
		s.handleDeliveryVerify(ctx, w, inv, peer)
	default:
		// Wrong SAP, get/set configuration, submission control, unknown
		// operations: protocol violation (docs/protocol.md EMSD §1.4, Open Point 20).
		s.metrics.invokes.WithLabelValues("other").Inc()
		s.refuse(w, "other", emsd.CodeProtocolViolation, "operation "+op.String()+" on SAP "+strconv.Itoa(int(sap)))
	}
}

// refuse answers an EMSD error (docs/protocol.md EMSD §1.6): value = code, with an
// ErrorParameter only for security and resource errors, whose parameter
// tells a device what to do; protocol violations go without one, as the
// captures show.
func (s *Server) refuse(w esro.ResponseWriter, op string, code emsd.ErrorCode, why string) {
	var data []byte
	if code == emsd.CodeSecurity || code == emsd.CodeResource {
		data, _ = emsd.ErrorParameter(code).Marshal(emsd.Options{})
	}
	s.metrics.errors.WithLabelValues(op, code.String()).Inc()
	s.log.Debug("emsd error", "op", op, "code", code, "why", why)
	esro.Refuse(w, esro.EncodingBER, uint8(code), data)
}

// refuseIdentity answers an unknown device or a wrong password: ERROR 4
// with parameter 4 (docs/protocol.md EMSD §9.3 Recommend), or the reference's
// ERROR 7 without parameter under compat.ip_only_identification.
func (s *Server) refuseIdentity(w esro.ResponseWriter, op string, peer netip.AddrPort, err error) {
	lv := slog.LevelInfo
	busy := errors.Is(err, errAuthLimited) || errors.Is(err, errAuthBusy)
	if busy {
		lv = slog.LevelDebug // identify warns, at most once a minute: not a line per datagram
	}
	s.log.Log(s.ctx, lv, "refused", "op", op, "peer", peer, "why", err)
	if busy {
		s.refuse(w, op, emsd.CodeResource, err.Error())
		return
	}
	if s.conf().Compat.IPOnlyIdentification {
		s.refuse(w, op, emsd.CodeProtocolViolation, err.Error())
		return
	}
	s.refuse(w, op, emsd.CodeSecurity, err.Error())
}

// handleDeliveryControl performs Delivery control (op 2 on SAP 9, see
// docs/protocol.md EMSD §9.12 Recommend): it records the device's limits and answers
// what is held back by them. Its poll side effect (§9.4) already ran.
func (s *Server) handleDeliveryControl(ctx context.Context, w esro.ResponseWriter, inv *esro.Invocation, peer netip.AddrPort, v emsd.Version, woken bool) {
	o := s.opts(v)
	var a emsd.DeliveryControlArgument
	if err := a.Unmarshal(inv.Data, o); err != nil {
		s.refuse(w, "delivery_control", emsd.CodeOf(err), err.Error())
		return
	}
	dev, authed, err := s.devs.identify(ctx, w, peer, a.Security, true)
	if err != nil {
		s.refuseIdentity(w, "delivery_control", peer, err)
		return
	}
	if authed {
		s.contacts.heard(dev, peer, true)
	} else if a, ok := dtlsDevice(ctx); ok {
		s.dtls.polled(a, peer)
	}
	if !woken {
		s.wake(dev.addr, authed)
	} else if authed {
		s.touch(dev.addr, true)
	}
	if s.conf().Compat.DeliveryControlError {
		s.refuse(w, "delivery_control", emsd.CodeProtocolViolation, "compat.delivery_control_error")
		return
	}
	ctl := applyRestrict(dev.Control, &a)
	if !sameCtl(ctl, dev.Control) {
		if err := s.st.SetDeliveryControl(ctx, uint32(dev.addr), ctl); err != nil {
			s.log.Error("store delivery control", "device", dev.addr, "err", err)
			s.refuse(w, "delivery_control", emsd.CodeResource, "store")
			return
		}
		s.devs.reloadIfChanged(ctx, "delivery control")
	}
	queued, err := s.st.QueuedDeliveries(ctx, uint32(dev.addr))
	if err != nil {
		s.log.Error("queued deliveries", "device", dev.addr, "err", err)
		s.refuse(w, "delivery_control", emsd.CodeResource, "store")
		return
	}
	res, err := controlResult(ctl, deliveryOp(dev.version), queued).Marshal(o)
	if err != nil {
		s.refuse(w, "delivery_control", emsd.CodeResource, err.Error())
		return
	}
	w.Result(esro.EncodingBER, res)
	s.touch(dev.addr, authed) // its limits may allow what they held back
}

// applyRestrict merges a delivery control argument into the stored limits:
// restrict update (the default) sets each limit present, remove clears
// each limit present, or all of them when none is (docs/protocol.md EMSD §9.12).
func applyRestrict(c store.DeliveryControl, a *emsd.DeliveryControlArgument) store.DeliveryControl {
	remove := a.Restrict != nil && *a.Restrict == emsd.RestrictRemove
	if remove && a.PermissibleOperations == nil && a.PermissibleMaxContentLength == nil && a.PermissibleLowestPriority == nil {
		return store.DeliveryControl{}
	}
	if a.PermissibleOperations != nil {
		c.Operations = nil
		if !remove {
			v := uint64(*a.PermissibleOperations)
			c.Operations = &v
		}
	}
	if a.PermissibleMaxContentLength != nil {
		c.MaxContentLength = nil
		if !remove {
			v := *a.PermissibleMaxContentLength
			c.MaxContentLength = &v
		}
	}
	if a.PermissibleLowestPriority != nil {
		c.LowestPriority = nil
		if !remove {
			v := uint8(min(*a.PermissibleLowestPriority, 2))
			c.LowestPriority = &v
		}
	}
	return c
}

func sameCtl(a, b store.DeliveryControl) bool {
	return ptrEq(a.Operations, b.Operations) && ptrEq(a.MaxContentLength, b.MaxContentLength) &&
		ptrEq(a.LowestPriority, b.LowestPriority)
}

func ptrEq[T comparable](a, b *T) bool {
	if a == nil || b == nil {
		return a == b
	}
	return *a == *b
}

// deliveryOp is the operation value deliveries to a device use.
func deliveryOp(v emsd.Version) emsd.Operation {
	op, _ := emsd.OpDelivery.Wire(v)
	return op
}

// held reports why a queued delivery is held back by the device's limits.
func held(c store.DeliveryControl, op emsd.Operation, q store.DeliveryInfo) (hold bool, why emsd.WaitingMessages) {
	if c.Operations != nil && !emsd.OperationSet(*c.Operations).Has(op) {
		hold = true
	}
	if c.MaxContentLength != nil && uint64(q.Length) > uint64(*c.MaxContentLength) {
		hold, why = true, why|emsd.WaitingLongContent
	}
	if c.LowestPriority != nil && q.Priority < *c.LowestPriority {
		hold, why = true, why|emsd.WaitingLowPriority
	}
	return hold, why
}

// controlResult is the DeliveryControlResult for the held deliveries
// (docs/protocol.md EMSD §9.12 Recommend): waiting-operations carries the delivery
// operation's bit (Open Point 11), waiting-messages why messages wait, and
// waiting-content-types their types. Nothing held: 30 02 30 00.
func controlResult(c store.DeliveryControl, op emsd.Operation, queued []store.DeliveryInfo) *emsd.DeliveryControlResult {
	r := &emsd.DeliveryControlResult{}
	var why emsd.WaitingMessages
	waiting := false
	for _, q := range queued {
		h, w := held(c, op, q)
		if !h {
			continue
		}
		waiting = true
		why |= w
		ct := emsd.ContentType(q.ContentType)
		if !slices.Contains(r.WaitingContentTypes, ct) && len(r.WaitingContentTypes) < emsd.MaxWaitingContentTypes {
			r.WaitingContentTypes = append(r.WaitingContentTypes, ct)
		}
	}
	if waiting {
		ops := emsd.Operations(op)
		r.WaitingOperations = &ops
		if why != 0 {
			r.WaitingMessages = &why
		}
	}
	return r
}

// handleDeliveryVerify performs Delivery verify (op 5, docs/protocol.md EMSD
// §9.13 Recommend): the status recorded for the exact message id
// delivered to this device; 1 (no report sent) when none is.
func (s *Server) handleDeliveryVerify(ctx context.Context, w esro.ResponseWriter, inv *esro.Invocation, peer netip.AddrPort) {
	o := s.opts(emsd.V1_1)
	var a emsd.DeliveryVerifyArgument
	if err := a.Unmarshal(inv.Data, o); err != nil {
		s.refuse(w, "delivery_verify", emsd.CodeOf(err), err.Error())
		return
	}
	dev, _, err := s.devs.identify(ctx, w, peer, nil, false) // no credentials: never a contact
	if err != nil {
		s.refuseIdentity(w, "delivery_verify", peer, err)
		return
	}
	status := emsd.NoReportSent
	st, err := s.st.DeliveryStatus(ctx, uint32(dev.addr), storedid.MessageID(a.MessageID).String())
	switch {
	case err == nil:
		status = emsd.DeliveryStatus(st)
	case !errors.Is(err, store.ErrNotFound):
		s.log.Error("delivery status", "device", dev.addr, "err", err)
		s.refuse(w, "delivery_verify", emsd.CodeResource, "store")
		return
	}
	res, err := (&emsd.DeliveryVerifyResult{Status: status}).Marshal(o)
	if err != nil {
		s.refuse(w, "delivery_verify", emsd.CodeResource, err.Error())
		return
	}
	w.Result(esro.EncodingBER, res)
}
