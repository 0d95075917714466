package gateway

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/esro-emsdp/emsdp/mailconv"
)

// TLSMode selects STARTTLS use towards the smarthost. The names follow
// Postfix's smtp_tls_security_level where they overlap (none, may,
// verify/secure), so that an operator's expectations carry over.
type TLSMode uint8

// TLS modes. The zero value is TLSOpportunistic.
const (
	// TLSOpportunistic encrypts when STARTTLS is offered, without
	// verifying the certificate (RFC 7435; Postfix "may"): a smarthost's
	// self-signed or snakeoil certificate still gets encryption. When
	// STARTTLS is refused or its handshake fails, the message goes in
	// clear over a new connection, as Postfix does.
	TLSOpportunistic TLSMode = iota
	TLSNone                  // never STARTTLS
	// TLSVerify encrypts and verifies the certificate (against CAFile, or
	// the system roots) when STARTTLS is offered; a failed verification
	// defers the message. A smarthost that offers no STARTTLS gets it in
	// clear.
	TLSVerify
	// TLSRequired is TLSVerify without the clear fallback: no STARTTLS
	// (or a refused one) defers the message too.
	TLSRequired
)

// String returns the name ParseTLSMode accepts.
func (m TLSMode) String() string {
	switch m {
	case TLSOpportunistic:
		return "opportunistic"
	case TLSNone:
		return "none"
	case TLSVerify:
		return "verify"
	case TLSRequired:
		return "required"
	}
	return fmt.Sprintf("TLSMode(%d)", uint8(m))
}

// ParseTLSMode parses "none", "opportunistic" (or ""), "verify" and
// "required".
func ParseTLSMode(s string) (TLSMode, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "opportunistic":
		return TLSOpportunistic, nil
	case "none":
		return TLSNone, nil
	case "verify":
		return TLSVerify, nil
	case "required":
		return TLSRequired, nil
	}
	return 0, fmt.Errorf("gateway: unknown TLS mode %q (none, opportunistic, verify, required)", s)
}

// ErrTLSUnavailable: TLSRequired and the smarthost does not offer STARTTLS
// (or refuses it).
var ErrTLSUnavailable = errors.New("gateway: smarthost does not offer STARTTLS")

// ErrTLSVerify wraps a certificate the smarthost presented that TLSVerify
// or TLSRequired could not verify; the message is deferred.
var ErrTLSVerify = errors.New("gateway: smarthost certificate not verified")

// DefaultRelayTimeout bounds one Send when Relay.Timeout is zero.
const DefaultRelayTimeout = 5 * time.Minute

// Relay sends mail to a smarthost over SMTP (§9.7 Recommend: SMTP with
// proper status handling instead of piping to sendmail), with go-smtp's
// client. The zero value of each optional field is usable; a Relay may be
// used concurrently.
type Relay struct {
	Addr     string // smarthost host:port
	HeloName string // EHLO name; "" = "localhost"
	// Username and Password, when Username is set, authenticate with AUTH
	// PLAIN, which is only done over TLS unless AllowInsecureAuth.
	Username, Password string
	AllowInsecureAuth  bool
	TLS                TLSMode
	// CAFile is a PEM file of the certificates TLSVerify and TLSRequired
	// trust instead of the system roots (a private CA, or the smarthost's
	// self-signed certificate). It is read at every Send, so a renewed
	// file needs no restart.
	CAFile string
	// TLSConfig is the base for STARTTLS (e.g. RootCAs); ServerName
	// defaults to the host of Addr. Its verification settings are
	// overridden by TLS and CAFile.
	TLSConfig *tls.Config
	// Timeout bounds a whole Send (connect to QUIT), in addition to the
	// caller's context; 0 = DefaultRelayTimeout.
	Timeout time.Duration
	// Log receives a warning when opportunistic TLS falls back to clear
	// text; nil = none.
	Log *slog.Logger
}

// RecipientResult is the outcome for one recipient; Err nil = accepted.
type RecipientResult struct {
	Addr      string
	Err       error
	Permanent bool // a 5xx reply: do not retry, report non-delivery
}

// Send relays msg (RFC 5322 with CRLF line ends) from the envelope sender
// from ("" = null reverse path, for bounces) to the recipients to, over one
// SMTP transaction. The results have one entry per recipient, in order.
// A non-nil error means the whole transaction failed; every recipient not
// already refused at RCPT then carries that error too. The error is a
// *PermanentError for a 5xx reply to MAIL or DATA and for messages the
// smarthost cannot take (SIZE, SMTPUTF8); everything else is transient.
func (r *Relay) Send(ctx context.Context, from string, to []string, msg []byte) ([]RecipientResult, error) {
	return r.SendDSN(ctx, from, to, msg, nil)
}

// DSNRequest asks the smarthost for delivery status notifications (RFC
// 3461). The parameters are sent only where the smarthost offers DSN.
type DSNRequest struct {
	Ret   smtp.DSNReturn // RET; "" = not given
	EnvID string         // ENVID (printable ASCII); "" = not given
	// Notify and ORCPT are per recipient, in the order of to; a nil
	// Notify or an empty ORCPT (an address) is not given.
	Notify [][]smtp.DSNNotify
	ORCPT  []string
}

// SendDSN is Send with DSN parameters (nil = none).
func (r *Relay) SendDSN(ctx context.Context, from string, to []string, msg []byte, dsn *DSNRequest) ([]RecipientResult, error) {
	res := make([]RecipientResult, len(to))
	for i, a := range to {
		res[i].Addr = a
	}
	timeout := r.Timeout
	if timeout <= 0 {
		timeout = DefaultRelayTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	fail := func(err error) ([]RecipientResult, error) {
		switch {
		case ctx.Err() != nil && !errors.Is(err, ctx.Err()):
			err = fmt.Errorf("%w: %w", ctx.Err(), err)
		case errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, context.DeadlineExceeded):
			// Connection deadlines are the context's (or go-smtp's command
			// timeout, which is not longer): report them alike, even when
			// the socket noticed before the context's timer.
			err = fmt.Errorf("%w: %w", context.DeadlineExceeded, err)
		}
		err = fmt.Errorf("gateway: relay via %s: %w", r.Addr, err)
		for i := range res {
			if res[i].Err == nil {
				res[i].Err, res[i].Permanent = err, IsPermanent(err)
			}
		}
		return res, err
	}
	if len(to) == 0 {
		return fail(errors.New("no recipients"))
	}
	helo := r.HeloName
	if helo == "" {
		helo = "localhost"
	}
	if strings.ContainsAny(helo, "\r\n ") {
		return fail(fmt.Errorf("invalid HELO name %q", helo))
	}
	c, secure, err := r.connect(ctx, helo, timeout)
	if err != nil {
		return fail(err)
	}
	defer c.Close()
	if r.Username != "" {
		if !secure && !r.AllowInsecureAuth {
			return fail(errors.New("refusing AUTH without TLS (set AllowInsecureAuth to permit it)"))
		}
		if !c.SupportsAuth(sasl.Plain) {
			return fail(errors.New("smarthost does not offer AUTH PLAIN"))
		}
		// An AUTH failure is our configuration's fault, not the message's:
		// transient, whatever the reply code.
		if err := c.Auth(sasl.NewPlainClient("", r.Username, r.Password)); err != nil {
			return fail(fmt.Errorf("AUTH PLAIN: %w", transient(err)))
		}
	}
	utf8 := !mailconv.IsASCII(from) || !mailconv.IsASCII(string(mailconv.HeaderSection(msg)))
	for _, a := range to {
		utf8 = utf8 || !mailconv.IsASCII(a)
	}
	if ok, _ := c.Extension("SMTPUTF8"); utf8 && !ok {
		return fail(&PermanentError{Err: errors.New("message needs SMTPUTF8, which the smarthost does not offer")})
	}
	if limit, ok := c.MaxMessageSize(); ok && limit > 0 && len(msg) > limit {
		return fail(&PermanentError{Err: fmt.Errorf("message of %d octets exceeds the smarthost's SIZE %d", len(msg), limit)})
	}
	mo := &smtp.MailOptions{Size: int64(len(msg)), UTF8: utf8}
	if dsn != nil {
		mo.Return = dsn.Ret
		if mailconv.IsASCII(dsn.EnvID) && !strings.ContainsAny(dsn.EnvID, " \t\r\n") {
			mo.EnvelopeID = dsn.EnvID
		}
	}
	if err := c.Mail(from, mo); err != nil {
		var se *smtp.SMTPError
		if r.Username == "" && errors.As(err, &se) && (se.Code == 530 || se.EnhancedCode == smtp.EnhancedCode{5, 7, 0}) {
			// The smarthost wants AUTH and we have no credentials: a
			// configuration problem, not the message's (RFC 4954 §6).
			return fail(fmt.Errorf("smarthost requires authentication: %w", transient(err)))
		}
		return fail(classify(err))
	}
	accepted := 0
	for i, a := range to {
		err := c.Rcpt(a, dsn.rcpt(i))
		if err == nil {
			accepted++
			continue
		}
		var se *smtp.SMTPError
		if !errors.As(err, &se) {
			return fail(err) // connection trouble: the transaction is gone
		}
		res[i].Err, res[i].Permanent = err, se.Code/100 == 5
	}
	if accepted == 0 {
		c.Reset()
		c.Quit()
		return res, nil
	}
	w, err := c.Data()
	if err != nil {
		return fail(classify(err))
	}
	if _, err := w.Write(msg); err != nil {
		return fail(err)
	}
	if err := w.Close(); err != nil {
		return fail(classify(err))
	}
	c.Quit() // the message is accepted; a failing QUIT changes nothing
	return res, nil
}

// rcpt is recipient i's RCPT options (nil = none).
func (d *DSNRequest) rcpt(i int) *smtp.RcptOptions {
	if d == nil {
		return nil
	}
	o := &smtp.RcptOptions{}
	if i < len(d.Notify) {
		o.Notify = d.Notify[i]
	}
	if i < len(d.ORCPT) && d.ORCPT[i] != "" {
		o.OriginalRecipientType, o.OriginalRecipient = smtp.DSNAddressTypeRFC822, d.ORCPT[i]
		if !mailconv.IsASCII(d.ORCPT[i]) {
			o.OriginalRecipientType = smtp.DSNAddressTypeUTF8 // RFC 6533 §6
		}
	}
	if o.Notify == nil && o.OriginalRecipient == "" {
		return nil
	}
	return o
}

// classify makes a 5xx reply a *PermanentError.
func classify(err error) error {
	var se *smtp.SMTPError
	if errors.As(err, &se) && se.Code/100 == 5 {
		return &PermanentError{Err: err}
	}
	return err
}

// transient hides a 5xx code from IsPermanent by keeping only its text.
func transient(err error) error {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return fmt.Errorf("%d %d.%d.%d %s", se.Code, se.EnhancedCode[0], se.EnhancedCode[1], se.EnhancedCode[2], se.Message)
	}
	return err
}

// connect dials the smarthost and says EHLO, with STARTTLS as r.TLS
// says; secure reports an encrypted session. Opportunistic TLS that fails
// (STARTTLS refused, or a failed handshake) and verify mode without an
// offer start again in clear on a new connection, since a failed
// handshake leaves nothing to continue on (Postfix does the same).
func (r *Relay) connect(ctx context.Context, helo string, timeout time.Duration) (c *smtp.Client, secure bool, err error) {
	if r.TLS == TLSNone {
		c, err := r.dial(ctx, helo, timeout, nil)
		return c, false, err
	}
	cfg, err := r.tlsConfig()
	if err != nil {
		return nil, false, err
	}
	c, err = r.dial(ctx, helo, timeout, cfg)
	if err == nil {
		return c, true, nil
	}
	var nost *noStartTLSError
	switch {
	case ctx.Err() != nil:
		return nil, false, err
	case errors.As(err, &nost) && r.TLS == TLSRequired:
		return nil, false, fmt.Errorf("%w: %w", ErrTLSUnavailable, nost.err)
	case errors.As(err, &nost):
	case errors.Is(err, errHandshake) && r.TLS == TLSOpportunistic:
	default:
		return nil, false, err
	}
	if r.Log != nil {
		r.Log.Warn("smarthost: no TLS, sending in clear", "smarthost", r.Addr, "tls", r.TLS.String(), "err", err)
	}
	c, err = r.dial(ctx, helo, timeout, nil)
	return c, false, err
}

// errHandshake marks a failed TLS handshake after STARTTLS.
var errHandshake = errors.New("TLS handshake failed")

// noStartTLSError: the smarthost did not offer STARTTLS, refused it, or
// failed before it could be asked (the clear retry then tells which).
type noStartTLSError struct{ err error }

func (e *noStartTLSError) Error() string { return "no STARTTLS: " + e.err.Error() }
func (e *noStartTLSError) Unwrap() error { return e.err }

// tlsConfig is the STARTTLS configuration of r.TLS: no verification for
// opportunistic TLS, CAFile's roots (else TLSConfig's, else the system's)
// for verify and required.
func (r *Relay) tlsConfig() (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if r.TLSConfig != nil {
		cfg = r.TLSConfig.Clone()
	}
	if cfg.ServerName == "" {
		if host, _, err := net.SplitHostPort(r.Addr); err == nil {
			cfg.ServerName = host
		}
	}
	if r.TLS == TLSOpportunistic {
		cfg.InsecureSkipVerify = true
		return cfg, nil
	}
	cfg.InsecureSkipVerify = false
	if r.CAFile != "" {
		pem, err := os.ReadFile(r.CAFile)
		if err != nil {
			return nil, fmt.Errorf("CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("CA file %s: no PEM certificate in it", r.CAFile)
		}
		cfg.RootCAs = pool
	}
	return cfg, nil
}

// dial opens one SMTP session and says EHLO; with cfg it does STARTTLS
// first. go-smtp's client then says the first EHLO as "localhost" (it has
// no way to name itself before STARTTLS); the one after the handshake,
// which is the one that counts (RFC 3207 §4.2), carries helo.
func (r *Relay) dial(ctx context.Context, helo string, timeout time.Duration, cfg *tls.Config) (*smtp.Client, error) {
	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", r.Addr)
	if err != nil {
		return nil, err
	}
	// Cancellation closes the connection, which unblocks any I/O;
	// deadlines come from the context as well (go-smtp's own per-command
	// deadlines are clamped to it).
	stop := context.AfterFunc(ctx, func() { raw.Close() })
	deadline, _ := ctx.Deadline()
	conn := &deadlineConn{Conn: raw, limit: deadline, stop: stop}
	conn.SetDeadline(time.Time{})
	var c *smtp.Client
	if cfg == nil {
		c = smtp.NewClient(conn)
	} else if c, err = smtp.NewClientStartTLS(conn, cfg); err != nil {
		conn.Close()
		return nil, &noStartTLSError{transient(err)}
	}
	c.CommandTimeout, c.SubmissionTimeout = timeout, timeout
	if err := c.Hello(helo); err != nil {
		c.Close()
		var ve *tls.CertificateVerificationError
		var se *smtp.SMTPError
		switch {
		case errors.As(err, &ve):
			return nil, fmt.Errorf("%w (set relay.ca_file to the certificate or its CA, or tls = \"opportunistic\"): %w", ErrTLSVerify, err)
		case cfg != nil && !errors.As(err, &se) && ctx.Err() == nil:
			if st, _ := c.TLSConnectionState(); !st.HandshakeComplete {
				return nil, fmt.Errorf("%w: %w", errHandshake, err)
			}
		}
		// A refused greeting or EHLO is the smarthost's or our
		// configuration's problem, not the message's: transient.
		return nil, transient(err)
	}
	return c, nil
}

// deadlineConn never lets a deadline pass the context's: go-smtp sets and
// clears deadlines per command, and a cleared one would outlive Send.
type deadlineConn struct {
	net.Conn
	limit time.Time
	stop  func() bool // the context's AfterFunc, released at Close
}

func (c *deadlineConn) Close() error {
	c.stop()
	return c.Conn.Close()
}

func (c *deadlineConn) clamp(t time.Time) time.Time {
	if t.IsZero() || (!c.limit.IsZero() && t.After(c.limit)) {
		return c.limit
	}
	return t
}

func (c *deadlineConn) SetDeadline(t time.Time) error     { return c.Conn.SetDeadline(c.clamp(t)) }
func (c *deadlineConn) SetReadDeadline(t time.Time) error { return c.Conn.SetReadDeadline(c.clamp(t)) }
func (c *deadlineConn) SetWriteDeadline(t time.Time) error {
	return c.Conn.SetWriteDeadline(c.clamp(t))
}
