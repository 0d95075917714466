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
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/storedid"
)

// performer performs the EMSD operations devices invoke (docs/protocol.md
// EMSD §1.4, §9): submission (submit.go) with its release into deliveries
// and relays (release.go), delivery control and delivery verify (here).
// It identifies devices through the registrar, records their contacts,
// and tells the delivery scheduler what it queued or who polled; it
// takes only the store's submission and delivery-control methods.
type performer struct {
	st       performerStore
	log      *slog.Logger
	metrics  *metrics
	conf     func() *Config // the running configuration
	devs     *registrar
	contacts *contactBook
	sched    deliveryScheduler
	reports  reportWorker
	routes   verifyRoutes
	// ctx lives until Close: waits for confirmations, submission
	// verifies and releases use it.
	ctx      context.Context
	domain   string // the device mail domain
	hostname string // this host, in Received: fields

	reasm *emsd.Reassembler[submitter]
	segs  segCache
	subs  activeSubs
}

// performerStore is the part of the store the operation handlers use.
type performerStore interface {
	store.Submissions
	SetDeliveryControl(ctx context.Context, addr uint32, c store.DeliveryControl) error
	QueuedDeliveries(ctx context.Context, addr uint32) ([]store.DeliveryInfo, error)
	DeliveryStatus(ctx context.Context, addr uint32, messageID string) (uint8, error)
}

// deliveryScheduler is what the operation handlers tell the delivery
// scheduler (schedule.go).
type deliveryScheduler interface {
	// wake: the device invoked an operation, so it is reachable now
	// (authenticated: it proved itself with its password).
	wake(a emsd.Address, authenticated bool)
	// touch: the device's deliveries may go now.
	touch(a emsd.Address, authenticated bool)
	// noteQueued: w was committed to the store.
	noteQueued(w store.Work)
}

// reportWorker makes the reports about recipients refused at submission
// (reports.go).
type reportWorker interface {
	reportWork(ctx context.Context, items []reportItem) (store.Work, error)
}

// verifyRoutes are the server's endpoints as the operation handlers see
// them (dtls.go).
type verifyRoutes interface {
	// verifyRoute is where a submission verify to dev goes, plain the
	// addresses in clear.
	verifyRoute(dev *device, plain []netip.AddrPort) (*esro.Endpoint, []netip.AddrPort)
	// polledOverDTLS: device a polled over its DTLS session from peer.
	polledOverDTLS(a emsd.Address, peer netip.AddrPort)
}

// opts are the codec options for a device of version v.
func (p *performer) opts(v emsd.Version) emsd.Options { return p.conf().emsdOptions(v) }

// serve is the handler of both MTS performer SAPs (5, 3-way; 9,
// 2-way). It routes each INVOKE to the operation's handler (docs/protocol.md EMSD
// §1.4, §9).
func (p *performer) serve(ctx context.Context, w esro.ResponseWriter, inv *esro.Invocation) {
	peer := netip.AddrPortFrom(inv.Peer.Addr().Unmap(), inv.Peer.Port())
	ipOnly := p.conf().Compat.IPOnlyIdentification
	hint := p.devs.current().byPeer(peer, ipOnly)
	v := emsd.V1_1
	if a, ok := dtlsDevice(ctx); ok {
		hint = p.devs.current().get(a)
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
		p.sched.wake(hint.addr, false)
	}
	if inv.Encoding != esro.EncodingBER { // docs/protocol.md EMSD §1.2, captured
		p.refuse(w, "any", emsd.CodeProtocolViolation, "encoding type")
		return
	}
	sap := emsd.SAP(inv.SAP)
	switch {
	case ok && op == emsd.OpSubmission && sap == emsd.SAPMTSPerformer3Way:
		p.metrics.invokes.WithLabelValues("submission").Inc()
		start := time.Now()
		p.handleSubmit(ctx, w, inv, peer, v, woken)
		p.metrics.submitTime.Observe(time.Since(start).Seconds())
	case ok && op == emsd.OpDeliveryControl && sap == emsd.SAPMTSPerformer2Way:
		p.metrics.invokes.WithLabelValues("delivery_control").Inc()
		p.handleDeliveryControl(ctx, w, inv, peer, v, woken)
	case ok && op == emsd.OpDeliveryVerify && v == emsd.V1_1:
		// Accepted on either performer SAP (Open Point 12).
		p.metrics.invokes.WithLabelValues("delivery_verify").Inc()
		p.handleDeliveryVerify(ctx, w, inv, peer)
	default:
		// Wrong SAP, get/set configuration, submission control, unknown
		// operations: protocol violation (docs/protocol.md EMSD §1.4, Open Point 20).
		p.metrics.invokes.WithLabelValues("other").Inc()
		p.refuse(w, "other", emsd.CodeProtocolViolation, "operation "+op.String()+" on SAP "+strconv.Itoa(int(sap)))
	}
}

// refuse answers an EMSD error (docs/protocol.md EMSD §1.6): value = code, with an
// ErrorParameter only for security and resource errors, whose parameter
// tells a device what to do; protocol violations go without one, as the
// captures show.
func (p *performer) refuse(w esro.ResponseWriter, op string, code emsd.ErrorCode, why string) {
	var data []byte
	if code == emsd.CodeSecurity || code == emsd.CodeResource {
		data, _ = emsd.ErrorParameter(code).Marshal(emsd.Options{})
	}
	p.metrics.errors.WithLabelValues(op, code.String()).Inc()
	p.log.Debug("emsd error", "op", op, "code", code, "why", why)
	esro.Refuse(w, esro.EncodingBER, uint8(code), data)
}

// refuseIdentity answers an unknown device or a wrong password: ERROR 4
// with parameter 4 (docs/protocol.md EMSD §9.3 Recommend), or the reference's
// ERROR 7 without parameter under compat.ip_only_identification.
func (p *performer) refuseIdentity(w esro.ResponseWriter, op string, peer netip.AddrPort, err error) {
	lv := slog.LevelInfo
	busy := errors.Is(err, errAuthLimited) || errors.Is(err, errAuthBusy)
	if busy {
		lv = slog.LevelDebug // identify warns, at most once a minute: not a line per datagram
	}
	p.log.Log(p.ctx, lv, "refused", "op", op, "peer", peer, "why", err)
	if busy {
		p.refuse(w, op, emsd.CodeResource, err.Error())
		return
	}
	if p.conf().Compat.IPOnlyIdentification {
		p.refuse(w, op, emsd.CodeProtocolViolation, err.Error())
		return
	}
	p.refuse(w, op, emsd.CodeSecurity, err.Error())
}

// handleDeliveryControl performs Delivery control (op 2 on SAP 9, see
// docs/protocol.md EMSD §9.12 Recommend): it records the device's limits and answers
// what is held back by them. Its poll side effect (§9.4) already ran.
func (p *performer) handleDeliveryControl(ctx context.Context, w esro.ResponseWriter, inv *esro.Invocation, peer netip.AddrPort, v emsd.Version, woken bool) {
	o := p.opts(v)
	var a emsd.DeliveryControlArgument
	if err := a.Unmarshal(inv.Data, o); err != nil {
		p.refuse(w, "delivery_control", emsd.CodeOf(err), err.Error())
		return
	}
	dev, authed, err := p.devs.identify(ctx, w, peer, a.Security, true)
	if err != nil {
		p.refuseIdentity(w, "delivery_control", peer, err)
		return
	}
	if authed {
		p.contacts.heard(dev, peer, true)
	} else if a, ok := dtlsDevice(ctx); ok {
		p.routes.polledOverDTLS(a, peer)
	}
	if !woken {
		p.sched.wake(dev.addr, authed)
	} else if authed {
		p.sched.touch(dev.addr, true)
	}
	if p.conf().Compat.DeliveryControlError {
		p.refuse(w, "delivery_control", emsd.CodeProtocolViolation, "compat.delivery_control_error")
		return
	}
	ctl := applyRestrict(dev.Control, &a)
	if !sameCtl(ctl, dev.Control) {
		if err := p.st.SetDeliveryControl(ctx, uint32(dev.addr), ctl); err != nil {
			p.log.Error("store delivery control", "device", dev.addr, "err", err)
			p.refuse(w, "delivery_control", emsd.CodeResource, "store")
			return
		}
		p.devs.reloadIfChanged(ctx, "delivery control")
	}
	queued, err := p.st.QueuedDeliveries(ctx, uint32(dev.addr))
	if err != nil {
		p.log.Error("queued deliveries", "device", dev.addr, "err", err)
		p.refuse(w, "delivery_control", emsd.CodeResource, "store")
		return
	}
	res, err := controlResult(ctl, deliveryOp(dev.version), queued).Marshal(o)
	if err != nil {
		p.refuse(w, "delivery_control", emsd.CodeResource, err.Error())
		return
	}
	w.Result(esro.EncodingBER, res)
	p.sched.touch(dev.addr, authed) // its limits may allow what they held back
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
func (p *performer) handleDeliveryVerify(ctx context.Context, w esro.ResponseWriter, inv *esro.Invocation, peer netip.AddrPort) {
	o := p.opts(emsd.V1_1)
	var a emsd.DeliveryVerifyArgument
	if err := a.Unmarshal(inv.Data, o); err != nil {
		p.refuse(w, "delivery_verify", emsd.CodeOf(err), err.Error())
		return
	}
	dev, _, err := p.devs.identify(ctx, w, peer, nil, false) // no credentials: never a contact
	if err != nil {
		p.refuseIdentity(w, "delivery_verify", peer, err)
		return
	}
	status := emsd.NoReportSent
	st, err := p.st.DeliveryStatus(ctx, uint32(dev.addr), storedid.MessageID(a.MessageID).String())
	switch {
	case err == nil:
		status = emsd.DeliveryStatus(st)
	case !errors.Is(err, store.ErrNotFound):
		p.log.Error("delivery status", "device", dev.addr, "err", err)
		p.refuse(w, "delivery_verify", emsd.CodeResource, "store")
		return
	}
	res, err := (&emsd.DeliveryVerifyResult{Status: status}).Marshal(o)
	if err != nil {
		p.refuse(w, "delivery_verify", emsd.CodeResource, err.Error())
		return
	}
	w.Result(esro.EncodingBER, res)
}
