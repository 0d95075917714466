package gateway

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/textproto"
	"os"
	"strings"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

// TLSMode selects STARTTLS use towards the smarthost.
type TLSMode uint8

// TLS modes. The zero value is TLSOpportunistic.
const (
	TLSOpportunistic TLSMode = iota // STARTTLS when offered (the default)
	TLSNone                         // never
	TLSRequired                     // fail (transiently) when not offered
)

// String returns the name ParseTLSMode accepts.
func (m TLSMode) String() string {
	switch m {
	case TLSOpportunistic:
		return "opportunistic"
	case TLSNone:
		return "none"
	case TLSRequired:
		return "required"
	}
	return fmt.Sprintf("TLSMode(%d)", uint8(m))
}

// ParseTLSMode parses "none", "opportunistic" (or "") and "required".
func ParseTLSMode(s string) (TLSMode, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "opportunistic":
		return TLSOpportunistic, nil
	case "none":
		return TLSNone, nil
	case "required":
		return TLSRequired, nil
	}
	return 0, fmt.Errorf("gateway: unknown TLS mode %q (none, opportunistic, required)", s)
}

// ErrTLSUnavailable: TLSRequired and the smarthost does not offer STARTTLS
// (or refuses it).
var ErrTLSUnavailable = errors.New("gateway: smarthost does not offer STARTTLS")

// DefaultRelayTimeout bounds one Send when Relay.Timeout is zero.
const DefaultRelayTimeout = 5 * time.Minute

// Relay sends mail to a smarthost over SMTP (§9.7 Recommend: SMTP with
// proper status handling instead of piping to sendmail). The zero value of
// each optional field is usable; a Relay may be used concurrently.
type Relay struct {
	Addr     string // smarthost host:port
	HeloName string // EHLO name; "" = "localhost"
	// Username and Password, when Username is set, authenticate with AUTH
	// PLAIN, which is only done over TLS unless AllowInsecureAuth.
	Username, Password string
	AllowInsecureAuth  bool
	TLS                TLSMode
	// TLSConfig is the base for STARTTLS (e.g. RootCAs); ServerName
	// defaults to the host of Addr.
	TLSConfig *tls.Config
	// InsecureSkipVerify accepts any certificate (tests only).
	InsecureSkipVerify bool
	// Timeout bounds a whole Send (connect to QUIT), in addition to the
	// caller's context; 0 = DefaultRelayTimeout.
	Timeout time.Duration
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
	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", r.Addr)
	if err != nil {
		return fail(err)
	}
	defer raw.Close()
	// Cancellation closes the connection, which unblocks any I/O; deadlines
	// come from the context as well (go-smtp's own per-command deadlines
	// are clamped to it).
	stop := context.AfterFunc(ctx, func() { raw.Close() })
	defer stop()
	deadline, _ := ctx.Deadline()
	conn := net.Conn(&deadlineConn{Conn: raw, limit: deadline})
	conn.SetDeadline(time.Time{})

	helo := r.HeloName
	if helo == "" {
		helo = "localhost"
	}
	if strings.ContainsAny(helo, "\r\n ") {
		return fail(fmt.Errorf("invalid HELO name %q", helo))
	}
	conn, secure, err := r.startTLS(ctx, conn, helo)
	if err != nil {
		return fail(err)
	}
	c := smtp.NewClient(conn)
	defer c.Close()
	c.CommandTimeout, c.SubmissionTimeout = timeout, timeout
	if err := c.Hello(helo); err != nil {
		// A refused greeting or EHLO is the smarthost's or our
		// configuration's problem, not the message's: transient.
		return fail(transient(err))
	}
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
	utf8 := !isASCII(from) || !isASCII(string(headerSection(msg)))
	for _, a := range to {
		utf8 = utf8 || !isASCII(a)
	}
	if ok, _ := c.Extension("SMTPUTF8"); utf8 && !ok {
		return fail(&PermanentError{Err: errors.New("message needs SMTPUTF8, which the smarthost does not offer")})
	}
	if limit, ok := c.MaxMessageSize(); ok && limit > 0 && len(msg) > limit {
		return fail(&PermanentError{Err: fmt.Errorf("message of %d octets exceeds the smarthost's SIZE %d", len(msg), limit)})
	}
	if err := c.Mail(from, &smtp.MailOptions{Size: int64(len(msg)), UTF8: utf8}); err != nil {
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
		err := c.Rcpt(a, nil)
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

// startTLS reads the greeting, says EHLO and, when offered and wanted,
// upgrades the connection with STARTTLS before go-smtp takes over (go-smtp
// cannot STARTTLS after an EHLO with our name). go-smtp then reads a
// replayed greeting and says EHLO itself, as RFC 3207 requires after TLS.
// Without TLS the session stays as it is: go-smtp gets the greeting and
// our EHLO's reply replayed, and its own EHLO is not sent, since a second
// EHLO in one session may be refused (RFC 5321 §4.1.4; Python's smtpd
// answers 503, which failed every relay through such a smarthost).
func (r *Relay) startTLS(ctx context.Context, conn net.Conn, helo string) (net.Conn, bool, error) {
	if r.TLS == TLSNone {
		return conn, false, nil
	}
	tp := textproto.NewConn(conn)
	if _, _, err := tp.ReadResponse(220); err != nil {
		return nil, false, transient(smtpErr(err))
	}
	replay := func(c net.Conn) net.Conn {
		return &replayConn{Conn: c, pre: []byte("220 replayed greeting\r\n")}
	}
	// Our reader must not hold back anything go-smtp should see.
	unread := func() error {
		if tp.R.Buffered() > 0 {
			return errors.New("smarthost sent unsolicited data")
		}
		return nil
	}
	if err := tp.PrintfLine("EHLO %s", helo); err != nil {
		return nil, false, err
	}
	_, msg, err := tp.ReadResponse(250)
	if err != nil {
		return nil, false, transient(smtpErr(err))
	}
	// The same session without TLS: go-smtp's EHLO is answered with this
	// one's reply.
	plain := func() net.Conn {
		var b strings.Builder
		b.WriteString("220 replayed greeting\r\n")
		lines := strings.Split(msg, "\n")
		for i, l := range lines {
			sep := "-"
			if i == len(lines)-1 {
				sep = " "
			}
			b.WriteString("250" + sep + l + "\r\n")
		}
		return &replayConn{Conn: conn, pre: []byte(b.String()), swallow: "EHLO "}
	}
	offered := false
	for i, line := range strings.Split(msg, "\n") {
		if f := strings.Fields(line); i > 0 && len(f) > 0 && strings.EqualFold(f[0], "STARTTLS") {
			offered = true
		}
	}
	if !offered {
		if r.TLS == TLSRequired {
			return nil, false, ErrTLSUnavailable
		}
		return plain(), false, unread()
	}
	if err := tp.PrintfLine("STARTTLS"); err != nil {
		return nil, false, err
	}
	if _, _, err := tp.ReadResponse(220); err != nil {
		var te *textproto.Error
		if r.TLS != TLSRequired && errors.As(err, &te) {
			return plain(), false, unread() // refused: carry on in clear
		}
		return nil, false, fmt.Errorf("%w: %w", ErrTLSUnavailable, smtpErr(err))
	}
	// Anything the server sent after its 220 would be plaintext injected
	// into the TLS session (CVE-2011-0411 class).
	if err := unread(); err != nil {
		return nil, false, err
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if r.TLSConfig != nil {
		cfg = r.TLSConfig.Clone()
	}
	if cfg.ServerName == "" {
		if host, _, err := net.SplitHostPort(r.Addr); err == nil {
			cfg.ServerName = host
		}
	}
	if r.InsecureSkipVerify {
		cfg.InsecureSkipVerify = true
	}
	tc := tls.Client(conn, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, false, fmt.Errorf("TLS handshake: %w", err)
	}
	return replay(tc), true, nil
}

// smtpErr turns a net/textproto reply error into go-smtp's type, so that
// reply codes are handled alike.
func smtpErr(err error) error {
	var te *textproto.Error
	if errors.As(err, &te) {
		return &smtp.SMTPError{Code: te.Code, Message: te.Msg}
	}
	return err
}

// headerSection returns the header of msg (up to the first empty line).
func headerSection(msg []byte) []byte {
	if i := bytes.Index(msg, []byte("\r\n\r\n")); i >= 0 {
		return msg[:i]
	}
	if i := bytes.Index(msg, []byte("\n\n")); i >= 0 {
		return msg[:i]
	}
	return msg
}

// deadlineConn never lets a deadline pass the context's: go-smtp sets and
// clears deadlines per command, and a cleared one would outlive Send.
type deadlineConn struct {
	net.Conn
	limit time.Time
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

// replayConn serves pre before reading from the connection. With
// swallow set, the first command line written is dropped when it starts
// with swallow (its reply is in pre) and written through otherwise.
type replayConn struct {
	net.Conn
	pre     []byte
	swallow string
	line    []byte // the first command, until its CRLF
}

func (c *replayConn) Write(b []byte) (int, error) {
	if c.swallow == "" {
		return c.Conn.Write(b)
	}
	c.line = append(c.line, b...)
	i := bytes.Index(c.line, []byte("\r\n"))
	if i < 0 {
		return len(b), nil
	}
	line, rest := c.line[:i+2], c.line[i+2:]
	drop := len(line) >= len(c.swallow) && strings.EqualFold(string(line[:len(c.swallow)]), c.swallow)
	c.swallow, c.line = "", nil
	out := rest
	if !drop {
		out = append(line, rest...)
	}
	if len(out) > 0 {
		if _, err := c.Conn.Write(out); err != nil {
			return 0, err
		}
	}
	return len(b), nil
}

func (c *replayConn) Read(b []byte) (int, error) {
	if len(c.pre) > 0 {
		n := copy(b, c.pre)
		c.pre = c.pre[n:]
		return n, nil
	}
	return c.Conn.Read(b)
}
