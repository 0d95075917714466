package ua

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"net/netip"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
)

// Delivery is one complete message delivered by the MTS (§10.3).
type Delivery struct {
	MessageID    emsd.MessageID
	DeliveryTime time.Time
	// SubmissionTime is the DeliverArgument's submission time, or the
	// time of a local message id; zero when neither is known (§10.3).
	SubmissionTime time.Time
	// Security is the security element the MTS sent, if any. It is not
	// checked: the reference accepts deliveries whatever their password
	// (§10.3 step 4, Open Point 4), and a server that keeps only password
	// hashes cannot send one.
	Security *emsd.SecurityElement
	Version  emsd.Version
	From     netip.AddrPort // the MTS endpoint that delivered it
	// Recipient is the device delivered to (Config.Address).
	Recipient emsd.Address
	// Exactly one of IPM and Report is set: Report for a delivery or
	// non-delivery report (content type 2), which a client takes only with
	// Config.AcceptReports.
	IPM    *emsd.IPM
	Report *emsd.ReportDelivery
}

// Fingerprint identifies a delivered message across the MTS's delivery
// attempts; see Delivery.Fingerprint. It is comparable and can key maps.
type Fingerprint [sha256.Size]byte

// String returns f in lower-case hex.
func (f Fingerprint) String() string { return hex.EncodeToString(f[:]) }

// Fingerprint returns a digest of what stays the same when the MTS
// delivers the same message again in a new attempt after a lost exchange
// or a crash (new instance ids, a new delivery time and new segmentation,
// §1.5, §8, §9.9): the message id, the submission time when known, the
// content type and the content (IPM or report) in its canonical encoding
// (EMSD 1.1), so that equal contents count as equal whichever protocol
// version carried them. It leaves out the delivery time, the security element,
// the version and the MTS endpoint (another server sharing the queue may
// make the next attempt). Two deliveries with the same id but different
// contents, as from an Internet sender that reuses a Message-ID, have
// different fingerprints. Two different messages with the same contents
// differ by their id only where the MTS gives each accepted message an id
// of its own, as emsdp serve does (an Internet sender's Message-ID then
// rides in a heading extension); under an MTS that delivers Internet mail
// under the sender's Message-ID, as the reference does, two identical
// mails reusing one Message-ID cannot be told from a re-delivery. It fails only for an IPM that cannot be encoded,
// which a decoded delivery always can be.
func (d *Delivery) Fingerprint() (Fingerprint, error) {
	var c emsd.Content
	switch {
	case d.IPM != nil:
		c = d.IPM
	case d.Report != nil:
		c = d.Report
	default:
		return Fingerprint{}, errors.New("ua: fingerprint: delivery without content")
	}
	content, err := c.Marshal(emsd.Options{})
	if err != nil {
		return Fingerprint{}, fmt.Errorf("ua: fingerprint: %w", err)
	}
	h := sha256.New()
	h.Write([]byte("emsdp delivery fingerprint 1\n"))
	if d.MessageID.IsLocal {
		l := d.MessageID.Local
		fingerprintField(h, 'l', binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, uint32(l.SubmissionTime)), l.Number))
	} else {
		fingerprintField(h, 'r', []byte(d.MessageID.RFC822))
	}
	if !d.SubmissionTime.IsZero() {
		fingerprintField(h, 's', binary.BigEndian.AppendUint64(nil, uint64(d.SubmissionTime.Unix())))
	}
	fingerprintField(h, 't', binary.BigEndian.AppendUint32(nil, uint32(c.ContentType())))
	fingerprintField(h, 'c', content)
	var f Fingerprint
	h.Sum(f[:0])
	return f, nil
}

// fingerprintField writes a tagged, length-prefixed field, so that no two
// different sets of fields hash the same octets.
func fingerprintField(h hash.Hash, tag byte, v []byte) {
	h.Write(binary.BigEndian.AppendUint32([]byte{tag}, uint32(len(v))))
	h.Write(v)
}

// Handler receives deliveries. Deliver must have stored the message
// durably when it returns nil: the MTS is told the delivery is complete
// only then. An error makes the client answer a transient EMSD error
// (resource error, 6) so that the MTS keeps the message and retries later.
// Deliver is called for one delivery at a time.
type Handler interface {
	Deliver(ctx context.Context, d *Delivery) error
}

// HandlerFunc adapts a function to a Handler.
type HandlerFunc func(ctx context.Context, d *Delivery) error

// Deliver calls f.
func (f HandlerFunc) Deliver(ctx context.Context, d *Delivery) error { return f(ctx, d) }

// serve performs an INVOKE on SAP 3 or 7: a device performs only Delivery
// and Submission verify (§1.4); everything else is a protocol violation.
func (c *Client) serve(ctx context.Context, w esro.ResponseWriter, inv *esro.Invocation) {
	code := c.perform(ctx, w, inv)
	if code == 0 {
		return
	}
	// The UA always attaches the code as ErrorParameter (§1.6).
	p, _ := emsd.ErrorParameter(code).Marshal(emsd.Options{})
	if err := w.Error(esro.EncodingBER, uint8(code), p); err != nil {
		c.log.Debug("ua: answering", "peer", inv.Peer, "err", err)
	}
}

// perform answers inv itself and returns 0, or returns the EMSD error code
// to answer with.
func (c *Client) perform(ctx context.Context, w esro.ResponseWriter, inv *esro.Invocation) emsd.ErrorCode {
	if inv.Encoding != esro.EncodingBER {
		// Only BER exists (§1.2, captured: ERROR 7 with parameter 7).
		return emsd.CodeProtocolViolation
	}
	switch op := emsd.Operation(inv.Operation); {
	case op == emsd.OpDelivery:
		return c.deliver(ctx, w, inv, emsd.V1_1)
	case op == emsd.OpDeliveryV1_0 && inv.SAP == uint8(emsd.SAPUAPerformer3Way):
		// 1.0 deliveries are 3-way only (§9.9).
		return c.deliver(ctx, w, inv, emsd.V1_0)
	case op == emsd.OpSubmissionVerify:
		return c.submissionVerify(w, inv)
	}
	// Submission control (4), configuration (7, 8) and unknown operations
	// (§1.4, Open Point 20).
	return emsd.CodeProtocolViolation
}

// deliver performs one delivery INVOKE (§10.3).
func (c *Client) deliver(ctx context.Context, w esro.ResponseWriter, inv *esro.Invocation, v emsd.Version) emsd.ErrorCode {
	id, arg, err := emsd.StripInstanceID(emsd.Operation(inv.Operation), inv.Data)
	if err != nil {
		return emsd.CodeProtocolViolation
	}
	c.recvMu.Lock()
	defer c.recvMu.Unlock()
	carries := emsd.CarriesInstanceID(emsd.Operation(inv.Operation))
	if carries && c.dup.Duplicate(id, arg) {
		// Already performed: confirm again, do nothing else (§1.5).
		c.log.Debug("ua: duplicate delivery", "peer", inv.Peer, "instance", id)
		c.result(w, inv)
		return 0
	}
	code := c.deliverArg(ctx, inv, arg, v)
	if code != 0 {
		// Not recorded: an INVOKE that got an ERROR must be processed
		// again if the MTS re-sends it (§1.5).
		return code
	}
	if carries {
		c.dup.Record(id, arg)
	}
	c.result(w, inv)
	return 0
}

// result answers RESULT with no data (§10.3 step 5, §8: every segment,
// without waiting for the previous confirmation).
func (c *Client) result(w esro.ResponseWriter, inv *esro.Invocation) {
	if err := w.Result(esro.EncodingBER, nil); err != nil {
		c.log.Debug("ua: answering", "peer", inv.Peer, "err", err)
	}
}

func (c *Client) deliverArg(ctx context.Context, inv *esro.Invocation, arg []byte, v emsd.Version) emsd.ErrorCode {
	o := emsd.Options{Version: v}
	var a emsd.DeliverArgument
	if err := a.Unmarshal(arg, o); err != nil {
		c.log.Info("ua: undecodable delivery", "peer", inv.Peer, "err", err)
		return emsd.CodeOf(err)
	}
	if a.ContentType != emsd.ContentIPM && (a.ContentType != emsd.ContentDeliveryReport || !c.cfg.AcceptReports) {
		// The reference UA accepts IPMs only (§3 notes, captured TV11);
		// this one takes reports too when configured to. Every segment
		// repeats the content type, so a segmented report is refused at
		// its first segment rather than after the last.
		c.log.Info("ua: delivery of unsupported content type", "peer", inv.Peer, "id", a.MessageID, "type", a.ContentType)
		return emsd.CodeProtocolViolation
	}
	full, err := c.reasm.AddDeliver(c.cfg.Now(), inv.Peer, &a)
	if err != nil {
		c.log.Info("ua: delivery segment rejected", "peer", inv.Peer, "err", err)
		return emsd.CodeOf(err)
	}
	if full == nil {
		return 0 // an intermediate segment: RESULT (§8)
	}
	d := &Delivery{
		MessageID:    full.MessageID,
		DeliveryTime: full.DeliveryTime.UTC(),
		Security:     full.Security,
		Version:      v,
		From:         inv.Peer,
		Recipient:    c.cfg.Address,
	}
	if full.ContentType == emsd.ContentDeliveryReport {
		var rep emsd.ReportDelivery
		if err := rep.Unmarshal(full.Contents, o); err != nil {
			c.log.Info("ua: undecodable delivered report", "peer", inv.Peer, "id", full.MessageID, "err", err)
			return emsd.CodeOf(err)
		}
		d.Report = &rep
	} else {
		var ipm emsd.IPM
		if err := ipm.Unmarshal(full.Contents, o); err != nil {
			c.log.Info("ua: undecodable delivered IPM", "peer", inv.Peer, "id", full.MessageID, "err", err)
			return emsd.CodeOf(err)
		}
		if ipm.Body == nil {
			ipm.Body = &emsd.Body{} // a missing body is an empty one (Open Point 18)
		}
		d.IPM = &ipm
	}
	switch {
	case full.SubmissionTime != nil:
		d.SubmissionTime = full.SubmissionTime.UTC()
	case full.MessageID.IsLocal:
		d.SubmissionTime = full.MessageID.Local.SubmissionTime.UTC()
	}
	if c.cfg.Handler == nil {
		return emsd.CodeResource
	}
	if err := c.cfg.Handler.Deliver(ctx, d); err != nil {
		c.log.Warn("ua: delivery handler failed; the MTS will retry", "id", d.MessageID, "err", err)
		return emsd.CodeResource
	}
	return 0
}

// submissionVerify answers op 6 from the verify list (§10.4).
func (c *Client) submissionVerify(w esro.ResponseWriter, inv *esro.Invocation) emsd.ErrorCode {
	var a emsd.SubmissionVerifyArgument
	if err := a.Unmarshal(inv.Data, c.opts); err != nil {
		return emsd.CodeOf(err)
	}
	found, err := c.verify.Contains(a.MessageID)
	if err != nil {
		c.log.Error("ua: reading the verify list", "err", err)
		return emsd.CodeResource
	}
	r := emsd.SubmissionVerifyResult{Status: emsd.DropMessage}
	if found {
		r.Status = emsd.SendMessage
	}
	b, err := r.Marshal(c.opts)
	if err != nil {
		return emsd.CodeResource
	}
	c.log.Info("ua: submission verify", "id", a.MessageID, "status", r.Status)
	if err := w.Result(esro.EncodingBER, b); err != nil && !errors.Is(err, esro.ErrAnswered) {
		c.log.Debug("ua: answering", "peer", inv.Peer, "err", err)
	}
	return 0
}
