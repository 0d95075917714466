package server

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/gateway"
	"github.com/esro-emsdp/emsdp/mailconv"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/storedid"
)

// receiver is the server's side of inbound SMTP (gateway.Receiver):
// Internet mail for device addresses becomes queued deliveries (see
// docs/protocol.md EMSD §9.8). It takes from the store only message
// numbers and the queueing of work.
type receiver struct {
	st       inboundStore
	log      *slog.Logger
	metrics  *metrics
	conf     func() *Config // the running configuration
	devs     *registrar     // which addresses are devices
	sched    deliveryScheduler
	domain   string // the device mail domain
	hostname string // the reporting MTA of DSNs
}

// inboundStore is the part of the store inbound mail uses.
type inboundStore interface {
	store.Enqueuer
	NextMessageNumber(ctx context.Context, t time.Time) (uint32, error)
}

// Recipient accepts device addresses (number@domain for the EMSD domains,
// and aliases) and refuses everything else at RCPT time: addresses in
// other domains as relaying denied, the rest as unknown. An address not
// known yet is looked up again after a registry reload when the store's
// registry changed (a device added a moment ago, before the next
// registry_poll), as the ESRO side does for an unknown device.
func (rv *receiver) Recipient(ctx context.Context, spec string) error {
	if _, ok := rv.devs.resolve(spec); ok {
		return nil
	}
	if rv.devs.reloadIfChanged(ctx, "unknown recipient") {
		if _, ok := rv.devs.resolve(spec); ok {
			return nil
		}
	}
	if !rv.devs.inDomain(spec) {
		rv.metrics.inbound.WithLabelValues("relay_denied").Inc()
		return gateway.ErrRelayDenied
	}
	rv.metrics.inbound.WithLabelValues("unknown_recipient").Inc()
	return gateway.ErrUnknownRecipient
}

// Deliver converts the message once per device (so that one device's Bcc
// stays hidden from another) and queues the deliveries in one transaction
// before the SMTP client hears 250.
func (rv *receiver) Deliver(ctx context.Context, env *gateway.Envelope, msg []byte) error {
	from, to := env.From, env.To
	byDev := map[emsd.Address][]string{}
	var order []emsd.Address
	for _, rc := range to {
		a, ok := rv.devs.resolve(rc)
		if !ok {
			continue // removed from the registry since RCPT
		}
		if byDev[a] == nil {
			order = append(order, a)
		}
		byDev[a] = append(byDev[a], rc)
	}
	if len(order) == 0 {
		rv.metrics.inbound.WithLabelValues("rejected").Inc()
		return &gateway.PermanentError{Err: gateway.ErrUnknownRecipient}
	}
	now := time.Now()
	// Every accepted message gets an id of its own, from the store's
	// counter: two mails with the same octets, or reusing one Message-ID,
	// stay two messages at the device (which drops re-deliveries by id).
	number, err := rv.st.NextMessageNumber(ctx, now)
	if err != nil {
		rv.log.Error("allocate a message id for inbound mail", "err", err)
		return fmt.Errorf("server: message id: %w", err) // transient: 451, the client retries
	}
	local := emsd.LocalID(emsd.TimeOf(now), number)
	senderIDs := rv.conf().Compat.RFC822DeliveryIDs
	headers := headerSection(msg)
	cfg := rv.conf()
	var w store.Work
	var cuts []mailconv.DSNRecipient // devices that get a shortened copy
	for _, a := range order {
		in, err := mailconv.ParseMessage(msg, rv.devs.mapping(), mailconv.ParseOptions{Now: now, Domain: rv.domain,
			Number: number, KeepMessageID: !senderIDs,
			EnvelopeFrom: from, EnvelopeTo: byDev[a], MaxContent: rv.maxContent()})
		if err != nil {
			rv.metrics.inbound.WithLabelValues("rejected").Inc()
			return &gateway.PermanentError{Err: err}
		}
		var content []byte
		prio := uint8(1)
		switch {
		case in.IPM != nil:
			content, err = in.IPM.Marshal(emsd.Options{})
			prio = priorityOf(in.IPM)
		case in.Report != nil:
			content, err = in.Report.Marshal(emsd.Options{})
		default:
			err = fmt.Errorf("no content")
		}
		if err != nil {
			rv.metrics.inbound.WithLabelValues("rejected").Inc()
			return &gateway.PermanentError{Err: fmt.Errorf("convert: %w", err)}
		}
		var st *uint32
		if in.SubmissionTime != nil {
			v := uint32(*in.SubmissionTime)
			st = &v
		}
		if in.BodyCut != "" {
			if cfg.SMTP.Oversize != OversizeTruncate {
				rv.metrics.inbound.WithLabelValues("too_big").Inc()
				rv.log.Info("inbound mail too big for a device", "from", from, "device", a, "id", in.MessageID, "why", in.BodyCut)
				return &smtp.SMTPError{Code: 552, EnhancedCode: smtp.EnhancedCode{5, 3, 4},
					Message: fmt.Sprintf("Message too big for %s: its text would be cut (%s)", byDev[a][0], in.BodyCut)}
			}
			// Told unless the sender wants no DSN at all: the copy is
			// delivered but not whole.
			if p := dsnParamsFor(env, byDev[a][0], now); from != "" && !p.never() {
				cuts = append(cuts, mailconv.DSNRecipient{Addr: byDev[a][0], Action: mailconv.ActionDelivered,
					Status: "2.0.0", Diagnostic: "x-emsd; delivered shortened: " + in.BodyCut, OriginalRecipient: p.orcpt})
			}
		}
		for _, note := range in.Truncated {
			rv.log.Info("inbound mail shortened", "device", a, "id", local.Local, "message_id", in.MessageID, "note", note)
		}
		delivered := local
		if senderIDs {
			delivered = emsd.RFC822ID(in.MessageID)
		}
		w.Deliveries = append(w.Deliveries, store.NewDelivery{Device: uint32(a),
			MessageID: storedid.MessageID(delivered).String(), SubmissionTime: st, ContentType: uint32(in.ContentType),
			Content: content, Priority: prio, NextAttempt: now, Expires: now.Add(time.Duration(rv.conf().Delivery.Expiry)),
			Report: store.Report{Mail: from, Recipient: storedid.Internet(byDev[a][0]), MessageID: storedid.MessageID(emsd.RFC822ID(in.MessageID)).String(),
				Headers: headers, DSN: dsnParamsFor(env, byDev[a][0], now).encode()}})
	}
	if len(cuts) > 0 {
		// smtp.oversize = "truncate": the sender hears that the copy is
		// shortened, in the same transaction as the deliveries.
		dsn, err := mailconv.DSN(mailconv.DSNOptions{ReportingMTA: rv.hostname, To: from, Date: now, ArrivalDate: now,
			OriginalHeaders: headers, Recipients: cuts, EnvelopeID: env.EnvID,
			Explanation: "Your message was delivered, but shortened: it is more than the recipient's device\r\n" +
				"can take. Send the rest in a separate, shorter message if it matters.\r\n"})
		if err != nil {
			rv.log.Warn("DSN for a shortened message", "from", from, "err", err)
		} else {
			rv.metrics.reports.WithLabelValues("dsn").Inc()
			w.Relays = append(w.Relays, store.NewRelay{Message: dsn, Recipients: []store.RelayRecipient{{Addr: from}},
				NextAttempt: now, Expires: now.Add(time.Duration(cfg.Relay.Expiry))})
		}
	}
	if err := rv.st.Enqueue(ctx, w); err != nil {
		rv.log.Error("queue inbound mail", "err", err)
		return fmt.Errorf("server: queue: %w", err) // transient: 451, the client retries
	}
	rv.metrics.inbound.WithLabelValues("accepted").Inc()
	rv.log.Info("inbound mail", "id", local.Local, "from", from, "devices", len(order), "octets", len(msg))
	rv.sched.noteQueued(w)
	return nil
}

// maxContent is the content budget of 32 segments at the configured PDU
// size (docs/protocol.md EMSD §8); the gateway default is for 1500 octets.
func (rv *receiver) maxContent() int {
	pdu := rv.conf().EMSD.PDUSize
	if pdu == 1500 {
		return 0
	}
	// Largest DeliverArgument envelope: 127-octet message id, both times,
	// segment info, content type, instance id and length octets: 160.
	return max(emsd.MaxSegments*(pdu-160), mailconv.MinMaxContent)
}

// headerSection is the message's header, kept for a DSN.
func headerSection(msg []byte) []byte {
	for _, sep := range [][]byte{[]byte("\r\n\r\n"), []byte("\n\n")} {
		if i := bytes.Index(msg, sep); i >= 0 {
			return bytes.Clone(msg[:i+len(sep)])
		}
	}
	return bytes.Clone(msg[:min(len(msg), 32<<10)])
}
