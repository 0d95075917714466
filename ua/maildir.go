package ua

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/mail"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/mailconv"
)

// Maildir is a Handler that stores each delivery as an RFC 5322 file
// (rendered by mailconv.FormatIPM) in a Maildir: written to tmp/, synced,
// renamed into new/ and the directory synced, before Deliver returns, so
// that a delivery the MTS considers done is on disk.
//
// It also recognises a re-delivery of a message it already stored: when
// the MTS crashes or loses the exchange after the device stored a message
// but before the MTS recorded it as delivered, it delivers the message
// again in a new attempt, which the client's instance-id window cannot
// tell from a new message (§1.5, §9.9). Maildir keeps the Fingerprint of
// every stored delivery in DeliveredIndexName in the Maildir's root, and
// answers a delivery with a known fingerprint as done without storing it
// again. The entry is written and synced after the message file and before
// Deliver returns, so a crash between the two at worst stores a message
// twice; an index that cannot be read or written is logged and never fails
// a delivery. Entries are kept for MaildirConfig.Retention, at most
// MaildirConfig.MaxDelivered of them. Processes sharing a Maildir see each
// other's entries (the file is re-read when it changed), so a Maildir
// shared by several devices stores a message delivered to more than one
// of them once.
type Maildir struct {
	dir      string
	domain   string
	host     string // for file names
	hostname string // for Received:
	now      func() time.Time
	log      *slog.Logger
	count    atomic.Uint64
	stored   atomic.Uint64
	dups     atomic.Uint64

	mu  sync.Mutex      // serialises check, store and record
	idx *deliveredIndex // nil: every delivery is stored
}

// MaildirConfig configures OpenMaildir.
type MaildirConfig struct {
	// Domain is the mail domain local EMSD addresses get in the stored
	// messages (hhh.lll@Domain); required.
	Domain string
	// KeepDuplicates stores every delivery, re-deliveries included, and
	// keeps no index.
	KeepDuplicates bool
	// Retention is how long a stored delivery is recognised when
	// delivered again. Zero: DefaultDeliveredRetention (30 days, far
	// beyond any MTS retry schedule).
	Retention time.Duration
	// MaxDelivered bounds the deliveries remembered (the most recent).
	// Zero: DefaultDeliveredMax.
	MaxDelivered int
	// Now is the clock. Nil: time.Now.
	Now func() time.Time
	// Logger receives diagnostics. Nil: slog.Default().
	Logger *slog.Logger
}

// MaildirStats counts what a Maildir did since it was opened.
type MaildirStats struct {
	Stored     uint64 // messages written into new/
	Duplicates uint64 // re-deliveries recognised and not stored again
}

// NewMaildir opens (creating if needed) the Maildir at dir with the
// default configuration. Local EMSD addresses in the stored messages are
// written as hhh.lll@domain.
func NewMaildir(dir, domain string) (*Maildir, error) {
	return OpenMaildir(dir, MaildirConfig{Domain: domain})
}

// OpenMaildir opens (creating if needed) the Maildir at dir, and reads its
// index of stored deliveries (a damaged one is logged, not an error).
func OpenMaildir(dir string, cfg MaildirConfig) (*Maildir, error) {
	if cfg.Domain == "" {
		return nil, errors.New("ua: maildir: no domain for local addresses")
	}
	if cfg.Retention < 0 || cfg.MaxDelivered < 0 {
		return nil, fmt.Errorf("ua: maildir: negative retention %v or maximum %d", cfg.Retention, cfg.MaxDelivered)
	}
	if cfg.Retention == 0 {
		cfg.Retention = DefaultDeliveredRetention
	}
	if cfg.MaxDelivered == 0 {
		cfg.MaxDelivered = DefaultDeliveredMax
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	for _, sub := range []string{"tmp", "new", "cur"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o700); err != nil {
			return nil, fmt.Errorf("ua: maildir: %w", err)
		}
	}
	hostname, err := os.Hostname()
	if err != nil || hostname == "" || strings.ContainsAny(hostname, " \t\r\n;()") {
		hostname = "localhost"
	}
	// Maildir names must not contain '/' or ':' (the info separator).
	host := strings.NewReplacer("/", `\057`, ":", `\072`).Replace(hostname)
	m := &Maildir{dir: dir, domain: cfg.Domain, host: host, hostname: hostname, now: cfg.Now, log: cfg.Logger}
	if !cfg.KeepDuplicates {
		m.idx = newDeliveredIndex(dir, cfg.Retention, cfg.MaxDelivered, cfg.Logger)
		if err := m.idx.load(cfg.Now()); err != nil {
			m.log.Warn("ua: maildir: reading the delivered-message index", "err", err)
		}
	}
	return m, nil
}

// Stats returns the counters.
func (m *Maildir) Stats() MaildirStats {
	return MaildirStats{Stored: m.stored.Load(), Duplicates: m.dups.Load()}
}

// Deliver stores d; see Store.
func (m *Maildir) Deliver(_ context.Context, d *Delivery) error {
	_, err := m.Store(d)
	return err
}

// Store writes d into new/ and returns the file's path, or "" and no
// error when d is a re-delivery of a message already stored (see
// Maildir).
func (m *Maildir) Store(d *Delivery) (string, error) {
	if m.idx == nil {
		return m.write(d)
	}
	fp, err := d.Fingerprint()
	if err != nil {
		// Storing it is better than refusing it for ever.
		m.log.Warn("ua: maildir: storing a delivery without the re-delivery check", "id", d.MessageID, "err", err)
		return m.write(d)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.now()
	m.idx.refresh(now)
	if m.idx.contains(fp) {
		m.dups.Add(1)
		m.log.Info("ua: maildir: re-delivery of a message already stored; not stored again",
			"id", d.MessageID, "fingerprint", fp, "delivery_time", d.DeliveryTime)
		return "", nil
	}
	path, err := m.write(d)
	if err != nil {
		return "", err
	}
	// The message is safe: failing now would only make the MTS deliver
	// it again, and store it again.
	if err := m.idx.add(fp, now); err != nil {
		m.log.Error("ua: maildir: recording a stored delivery; a re-delivery of it would be stored again",
			"id", d.MessageID, "err", err)
	}
	return path, nil
}

// write stores d in new/ and returns the file's path.
func (m *Maildir) write(d *Delivery) (string, error) {
	msg, err := m.Format(d)
	if err != nil {
		return "", err
	}
	name := m.uniqueName(m.now())
	tmp := filepath.Join(m.dir, "tmp", name)
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", fmt.Errorf("ua: maildir: %w", err)
	}
	_, err = f.Write(msg)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	final := filepath.Join(m.dir, "new", name)
	if err == nil {
		err = os.Rename(tmp, final)
	}
	if err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("ua: maildir: %w", err)
	}
	// The rename is durable only once the directory is.
	if err := syncDir(filepath.Join(m.dir, "new")); err != nil {
		return "", fmt.Errorf("ua: maildir: %w", err)
	}
	m.stored.Add(1)
	return final, nil
}

// Format renders d as the message Store writes, with LF line ends as
// Maildir readers expect, and the trace fields a delivery agent adds:
// Return-Path (the originator; <> for a report), Delivered-To (the device)
// and a Received: for the EMSD hop from the MTS. An IPM goes through
// mailconv.FormatIPM, dated by its submission time (else its delivery
// time), with the Internet sender's Message-ID when the server carried it
// in a heading extension (mailconv.SenderMessageID), else the delivered
// message id (a local id as <EMSD.%08x.%08x@domain>, Open Point 10). A
// report (content type 2) becomes a multipart/report (RFC 3464) a mail
// reader shows as a delivery status notification.
func (m *Maildir) Format(d *Delivery) ([]byte, error) {
	id := d.MessageID.RFC822
	if d.MessageID.IsLocal {
		id = m.localID(d.MessageID.Local)
	}
	var body []byte
	returnPath := ""
	switch {
	case d.IPM != nil:
		// Devices addressed by an alias are shown so; the extensions
		// recording that are not shown themselves.
		ipm := *d.IPM
		var rest []emsd.Extension
		o := mailconv.FormatOptions{Domain: m.domain, Date: d.SubmissionTime, MessageID: id}
		o.Aliases, rest = mailconv.Aliases(d.IPM)
		ipm.Heading.Extensions = rest
		if sid := mailconv.SenderMessageID(d.IPM); sid != "" {
			o.MessageID = sid
		}
		if o.Date.IsZero() {
			o.Date = d.DeliveryTime
		}
		out, err := mailconv.FormatIPM(&ipm, o)
		if err != nil {
			return nil, fmt.Errorf("ua: maildir: %w", err)
		}
		body, returnPath = out.Message, m.addrSpec(d.IPM.Heading.Originator)
	case d.Report != nil:
		b, err := m.formatReport(d, id)
		if err != nil {
			return nil, err
		}
		body = b
	default:
		return nil, errors.New("ua: maildir: delivery without content")
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "Return-Path: <%s>\n", returnPath)
	to := ""
	if d.Recipient != 0 {
		to = d.Recipient.String() + "@" + m.domain
		fmt.Fprintf(&b, "Delivered-To: %s\n", to)
	}
	from := "unknown"
	if d.From.IsValid() {
		from = "[" + d.From.Addr().Unmap().String() + "]"
	}
	when := d.DeliveryTime
	if when.IsZero() {
		when = m.now()
	}
	fmt.Fprintf(&b, "Received: from %s\n\tby %s (emsdp ua, EMSD %s) with EMSD", from, m.hostname, d.Version)
	if msgID := strings.Trim(id, "<>"); msgID != "" && !strings.ContainsAny(msgID, " \t\r\n;") {
		fmt.Fprintf(&b, " id <%s>", msgID)
	}
	if to != "" {
		fmt.Fprintf(&b, "\n\tfor <%s>", to)
	}
	fmt.Fprintf(&b, "; %s\n", when.UTC().Format("Mon, 02 Jan 2006 15:04:05 -0700"))
	b.Write(bytes.ReplaceAll(body, []byte("\r\n"), []byte("\n")))
	return b.Bytes(), nil
}

func (m *Maildir) localID(l emsd.LocalMessageID) string {
	return fmt.Sprintf("<EMSD.%08x.%08x@%s>", uint32(l.SubmissionTime), l.Number, m.domain)
}

// addrSpec is the addr-spec of an originator, "" when it has none.
func (m *Maildir) addrSpec(a emsd.ORAddress) string {
	if a.IsLocal {
		return a.Local.String() + "@" + m.domain
	}
	if p, err := mail.ParseAddress(a.RFC822); err == nil {
		return p.Address
	}
	return ""
}

// formatReport renders an EMSD report as an RFC 3464 delivery status
// notification to the device: one recipient block per reported recipient,
// the EMSD reason and diagnostic in Diagnostic-Code, threaded with the
// reported message by In-Reply-To.
func (m *Maildir) formatReport(d *Delivery, id string) ([]byte, error) {
	rep := d.Report
	reported := rep.ReportedMessageID.RFC822
	if rep.ReportedMessageID.IsLocal {
		reported = m.localID(rep.ReportedMessageID.Local)
	}
	var rcpts []mailconv.DSNRecipient
	for _, e := range rep.Recipients {
		r := mailconv.DSNRecipient{Addr: m.addrSpec(e.Recipient)}
		if r.Addr == "" {
			r.Addr = strings.Join(strings.Fields(e.Recipient.String()), "")
		}
		switch {
		case e.Delivery != nil && !e.Recipient.IsLocal:
			// An EMSD MTS delivers to devices only: a positive report on an
			// Internet address means it handed the message on (RFC 3464
			// "relayed"), not that it reached the mailbox.
			r.Action, r.LastAttempt = mailconv.ActionRelayed, e.Delivery.DeliveryTime.UTC()
		case e.Delivery != nil:
			r.Action, r.LastAttempt = mailconv.ActionDelivered, e.Delivery.DeliveryTime.UTC()
		case e.NonDelivery != nil:
			nd := e.NonDelivery
			r.Action = mailconv.ActionFailed
			text := fmt.Sprintf("x-emsd; %s (reason %d)", nd.Reason, nd.Reason)
			if nd.Diagnostic != nil {
				r.Status = mailconv.StatusFor(*nd.Diagnostic)
				text += fmt.Sprintf(", %s (diagnostic %d)", *nd.Diagnostic, *nd.Diagnostic)
			}
			if nd.Explanation != "" {
				text += ": " + nd.Explanation
			}
			r.Diagnostic = text
		}
		rcpts = append(rcpts, r)
	}
	if len(rcpts) == 0 {
		return nil, errors.New("ua: maildir: report without recipients")
	}
	to := m.domain
	if d.Recipient != 0 {
		to = d.Recipient.String() + "@" + m.domain
	}
	out, err := mailconv.DSN(mailconv.DSNOptions{ReportingMTA: m.domain, To: to, Date: d.DeliveryTime, MessageID: id,
		InReplyTo: reported, Recipients: rcpts})
	if err != nil {
		return nil, fmt.Errorf("ua: maildir: report: %w", err)
	}
	return out, nil
}

// uniqueName follows the Maildir convention time.MusecPpidQn_Rrandom.host.
func (m *Maildir) uniqueName(now time.Time) string {
	var r [6]byte
	rand.Read(r[:])
	return fmt.Sprintf("%d.M%06dP%dQ%dR%s.%s", now.Unix(), now.Nanosecond()/1000, os.Getpid(), m.count.Add(1), hex.EncodeToString(r[:]), m.host)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}
