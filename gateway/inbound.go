package gateway

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/esro-emsdp/emsdp/mailconv"
)

// Receiver is what InboundServer hands mail to (the EMSD server
// implements it).
type Receiver interface {
	// Recipient is asked at RCPT time with the address as the client
	// wrote it (domains compare case-insensitively): nil accepts,
	// ErrUnknownRecipient
	// gives 550 5.1.1, a *PermanentError 550 5.7.1, an *smtp.SMTPError its
	// own reply, anything else 451 4.3.0.
	Recipient(ctx context.Context, addrSpec string) error
	// Deliver gets each complete message once, with its envelope (every
	// accepted recipient) and a Received: field prepended. It must have
	// stored the message durably before returning nil (the client then
	// gets 250). A *PermanentError gives 554 5.6.0, an *smtp.SMTPError its
	// own reply, anything else 451 4.3.0 (the client retries).
	Deliver(ctx context.Context, env *Envelope, msg []byte) error
}

// Envelope is the SMTP envelope of an inbound message, with the DSN
// parameters (RFC 3461) the client gave.
type Envelope struct {
	From string   // reverse path; "" = null (a bounce)
	To   []string // accepted recipients, as written, each once
	// Ret is RET (FULL or HDRS) and EnvID is ENVID, "" when not given.
	Ret   smtp.DSNReturn
	EnvID string
	// Rcpts holds each recipient's DSN parameters, in the order of To.
	Rcpts []RcptDSN
}

// RcptDSN is the DSN parameters of one recipient.
type RcptDSN struct {
	Notify []smtp.DSNNotify // NOTIFY; nil = not given (failures only, by default)
	// ORCPT as "type;address" (decoded), "" = not given.
	ORCPT string
}

// InboundOptions configure an InboundServer; zero values take defaults.
type InboundOptions struct {
	Domain          string // greeting and Received: host name; "" = "localhost"
	MaxMessageBytes int64  // larger messages get 552; 0 = 10 MiB
	MaxRecipients   int    // more RCPTs get 452; 0 = 100
	// ReadTimeout bounds each request: a command line, a message's
	// content or a TLS handshake, from its first read on; it is not moved
	// by each octet (see requestConn). 0 = 5 min, Postfix's
	// smtpd_timeout.
	ReadTimeout time.Duration
	// MinDataRate gives a request one second more for each MinDataRate
	// octets received, so that large messages at a fair rate complete.
	// 0 = 500 octets a second (Postfix's smtpd_min_data_rate); negative:
	// no extension.
	MinDataRate int
	// StressReadTimeout replaces ReadTimeout while more than three
	// quarters of MaxConns sessions are open (Postfix's overload mode).
	// 0 = 10 s.
	StressReadTimeout time.Duration
	// SessionTimeout bounds a whole session. 0 = 30 min; negative: none.
	SessionTimeout  time.Duration
	WriteTimeout    time.Duration // per reply; 0 = 1 min
	ReceiverTimeout time.Duration // bound on each Receiver call; 0 = 2 min
	TLSConfig       *tls.Config   // non-nil: STARTTLS is offered
	// RequireTLS refuses MAIL before STARTTLS with 530 5.7.0 (RFC 3207
	// §4); without TLSConfig that refuses every message.
	RequireTLS bool
	// OnTLS, if set, is called once for each connection whose STARTTLS
	// handshake completed (metrics, logs).
	OnTLS func(tls.ConnectionState)
	// MaxConns bounds the sessions open at once, MaxConnsPerIP those of
	// one client (an IPv4 address or an IPv6 /64); 0 = no limit (not a
	// default). A connection over either is answered 421 4.7.0 and
	// closed without becoming a session. SetConnLimits changes both.
	MaxConns, MaxConnsPerIP int
	// RefuseTimeout bounds the write of that 421; 0 = 1 s.
	RefuseTimeout time.Duration
	// OnRefused, if set, is called with LimitTotal or LimitIP for each
	// connection refused (metrics); it runs in the accepting goroutine,
	// so it must not block.
	OnRefused func(limit string)
	Logger    *slog.Logger // nil = no logs
}

// MaxHops is the number of Received: fields beyond which a message is
// refused as looping (554 5.4.6, RFC 5321 §6.3).
const MaxHops = 100

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("gateway: inbound server closed")

// InboundServer is the SMTP side of the gateway: an MX-like receiver for
// the device domains. It offers no AUTH, since it never relays: it only
// accepts recipients its Receiver accepts.
type InboundServer struct {
	r      Receiver
	o      InboundOptions
	log    *slog.Logger
	srv    *smtp.Server
	base   context.Context // cancelled by Close: aborts Receiver calls
	cancel context.CancelFunc
	// requireTLS is o.RequireTLS, changeable while serving (SetRequireTLS).
	requireTLS atomic.Bool
	// lim counts the sessions of every listener against o.MaxConns and
	// o.MaxConnsPerIP, changeable while serving (SetConnLimits).
	lim connLimits

	mu      sync.Mutex
	closing bool
	lns     []*limitListener
	conns   map[*trackedConn]struct{}
	changed chan struct{} // a transaction ended (buffered 1)
	drained chan error    // result of the go-smtp shutdown, once started
}

// NewInboundServer returns a server that hands mail to r; start it with
// Serve.
func NewInboundServer(r Receiver, o InboundOptions) *InboundServer {
	if o.Domain == "" {
		o.Domain = "localhost"
	}
	if o.MaxMessageBytes <= 0 {
		o.MaxMessageBytes = 10 << 20
	}
	if o.MaxRecipients <= 0 {
		o.MaxRecipients = 100
	}
	if o.ReadTimeout <= 0 {
		o.ReadTimeout = 5 * time.Minute
	}
	if o.MinDataRate == 0 {
		o.MinDataRate = 500
	}
	if o.StressReadTimeout <= 0 {
		o.StressReadTimeout = 10 * time.Second
	}
	if o.SessionTimeout == 0 {
		o.SessionTimeout = 30 * time.Minute
	}
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = time.Minute
	}
	if o.ReceiverTimeout <= 0 {
		o.ReceiverTimeout = 2 * time.Minute
	}
	if o.RefuseTimeout <= 0 {
		o.RefuseTimeout = defaultRefuseTimeout
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &InboundServer{r: r, o: o, log: log, conns: map[*trackedConn]struct{}{}, changed: make(chan struct{}, 1)}
	s.base, s.cancel = context.WithCancel(context.Background())
	s.requireTLS.Store(o.RequireTLS)
	s.lim.set(o.MaxConns, o.MaxConnsPerIP)
	srv := smtp.NewServer(smtp.BackendFunc(s.newSession))
	srv.Domain = o.Domain
	srv.MaxMessageBytes = o.MaxMessageBytes
	srv.MaxRecipients = o.MaxRecipients
	srv.WriteTimeout = o.WriteTimeout // reads: requestConn
	srv.TLSConfig = o.TLSConfig
	srv.EnableSMTPUTF8 = true // mailconv.ParseMessage reads UTF-8 headers (RFC 6532)
	srv.EnableDSN = true      // NOTIFY, RET, ENVID and ORCPT reach the Receiver
	srv.ErrorLog = slogPrinter{log}
	s.srv = srv
	return s
}

// Serve accepts connections on ln until Shutdown or Close, then returns
// ErrServerClosed.
func (s *InboundServer) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return ErrServerClosed
	}
	ll := newLimitListener(ln, &s.lim, s.o.Domain, s.o.RefuseTimeout, s.o.OnRefused, s.log)
	s.lns = append(s.lns, ll)
	s.mu.Unlock()
	err := s.srv.Serve(&trackingListener{Listener: ll, s: s})
	s.mu.Lock()
	closing := s.closing
	s.mu.Unlock()
	if closing {
		return ErrServerClosed
	}
	return err
}

// SetRequireTLS changes InboundOptions.RequireTLS while the server runs;
// it applies from the next MAIL command, in every session.
func (s *InboundServer) SetRequireTLS(on bool) { s.requireTLS.Store(on) }

// SetConnLimits changes InboundOptions.MaxConns and MaxConnsPerIP while
// the server runs; they apply from the next connection, and sessions
// already open over a lowered limit stay open.
func (s *InboundServer) SetConnLimits(total, perIP int) { s.lim.set(total, perIP) }

// Sessions returns the number of connections open (accepted and not
// yet closed), which InboundOptions.MaxConns bounds.
func (s *InboundServer) Sessions() int { return s.lim.sessions() }

// Addr returns the address of the first listener passed to Serve, nil
// before.
func (s *InboundServer) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.lns) == 0 {
		return nil
	}
	return s.lns[0].Addr()
}

// stop marks the server closing and closes the listeners (ending the
// refusals they are writing); it returns whether this was the first
// call.
func (s *InboundServer) stop() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	first := !s.closing
	s.closing = true
	for _, ln := range s.lns {
		ln.Close()
	}
	if first {
		s.drained = make(chan error, 1)
		go func() { s.drained <- s.srv.Shutdown(context.Background()) }()
	}
	return first
}

// Shutdown stops accepting connections, closes idle sessions, lets every
// transaction in progress (MAIL to the reply after DATA) finish and then
// closes its session too. When ctx ends first it closes everything, aborts
// Receiver calls and returns ctx.Err().
func (s *InboundServer) Shutdown(ctx context.Context) error {
	s.stop()
	for {
		s.closeSessions(false)
		select {
		case err := <-s.drained:
			s.drained <- err // for later calls
			s.cancel()
			if errors.Is(err, smtp.ErrServerClosed) || errors.Is(err, net.ErrClosed) {
				err = nil // the listeners were closed by stop already
			}
			return err
		case <-s.changed:
		case <-ctx.Done():
			s.closeSessions(true)
			s.cancel()
			return ctx.Err()
		}
	}
}

// Close closes the listeners and every connection at once, aborting
// Receiver calls; messages not yet acknowledged are the clients' to retry.
func (s *InboundServer) Close() error {
	s.stop()
	s.closeSessions(true)
	s.cancel()
	return nil
}

// closeSessions closes the connections that are not inside a transaction
// (between MAIL and the reply to DATA), or all of them.
func (s *InboundServer) closeSessions(all bool) {
	s.mu.Lock()
	var victims []net.Conn
	for c := range s.conns {
		if all || !c.busy {
			victims = append(victims, c.Conn)
		}
	}
	s.mu.Unlock()
	for _, c := range victims {
		c.Close()
	}
}

func (s *InboundServer) newSession(c *smtp.Conn) (smtp.Session, error) {
	s.mu.Lock()
	closing := s.closing
	s.mu.Unlock()
	if closing {
		return nil, errors.New("shutting down")
	}
	nc := c.Conn()
	if tc, ok := nc.(*tls.Conn); ok {
		nc = tc.NetConn()
	}
	tc, _ := nc.(*trackedConn)
	s.noteTLS(tc, c) // a client that sent STARTTLS before any EHLO
	return &session{s: s, conn: c, tc: tc}, nil
}

// noteTLS calls OnTLS once per connection that runs TLS. go-smtp has no
// hook for a completed STARTTLS; it ends the plaintext session (Logout)
// right after the handshake, and a client that had no session yet is
// seen at its first EHLO on the TLS connection.
func (s *InboundServer) noteTLS(tc *trackedConn, c *smtp.Conn) {
	if s.o.OnTLS == nil || tc == nil {
		return
	}
	st, ok := c.TLSConnectionState()
	if !ok {
		return
	}
	s.mu.Lock()
	first := !tc.tlsSeen
	tc.tlsSeen = true
	s.mu.Unlock()
	if first {
		s.o.OnTLS(st)
	}
}

// trackingListener registers every accepted connection, so that Shutdown
// and Close reach connections that have no session yet.
type trackingListener struct {
	net.Listener
	s *InboundServer
}

func (l *trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	tc := &trackedConn{Conn: newRequestConn(c, &l.s.o, l.s.lim.crowded), s: l.s}
	l.s.mu.Lock()
	l.s.conns[tc] = struct{}{}
	closing := l.s.closing
	l.s.mu.Unlock()
	if closing {
		c.Close()
	}
	return tc, nil
}

type trackedConn struct {
	net.Conn
	s       *InboundServer
	busy    bool // guarded by s.mu
	tlsSeen bool // OnTLS was called; guarded by s.mu
}

func (c *trackedConn) Close() error {
	c.s.mu.Lock()
	delete(c.s.conns, c)
	c.s.mu.Unlock()
	return c.Conn.Close()
}

// session is one SMTP connection's transaction state.
type session struct {
	s    *InboundServer
	conn *smtp.Conn
	tc   *trackedConn // nil only if go-smtp wrapped the connection unexpectedly
	from string
	to   []string
	env  Envelope // DSN parameters; From and To are filled in at DATA
}

func (se *session) setBusy(b bool) {
	se.s.mu.Lock()
	if se.tc != nil {
		se.tc.busy = b
	}
	closing := se.s.closing
	se.s.mu.Unlock()
	if !b && closing {
		select { // wake Shutdown, which closes idle sessions
		case se.s.changed <- struct{}{}:
		default:
		}
	}
}

func (se *session) Mail(from string, opts *smtp.MailOptions) error {
	se.s.mu.Lock()
	closing := se.s.closing
	se.s.mu.Unlock()
	if closing {
		return &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "Shutting down, try again later"}
	}
	if se.s.requireTLS.Load() {
		if _, ok := se.conn.TLSConnectionState(); !ok {
			se.s.log.Info("smtp: MAIL before STARTTLS refused", "from", from, "remote", se.remote())
			return &smtp.SMTPError{Code: 530, EnhancedCode: smtp.EnhancedCode{5, 7, 0}, Message: "Must issue a STARTTLS command first"}
		}
	}
	se.from, se.to, se.env = from, nil, Envelope{}
	if opts != nil {
		se.env.Ret, se.env.EnvID = opts.Return, opts.EnvelopeID
	}
	se.setBusy(true)
	return nil
}

func (se *session) Rcpt(to string, opts *smtp.RcptOptions) error {
	for _, a := range se.to {
		if strings.EqualFold(a, to) {
			return nil // already accepted; deliver once
		}
	}
	ctx, cancel := context.WithTimeout(se.s.base, se.s.o.ReceiverTimeout)
	defer cancel()
	err := se.s.r.Recipient(ctx, to)
	if err == nil {
		se.to = append(se.to, to)
		var d RcptDSN
		if opts != nil {
			d.Notify = opts.Notify
			if opts.OriginalRecipient != "" {
				d.ORCPT = strings.ToLower(string(opts.OriginalRecipientType)) + ";" + opts.OriginalRecipient
			}
		}
		se.env.Rcpts = append(se.env.Rcpts, d)
		return nil
	}
	var sErr *smtp.SMTPError
	switch {
	case errors.As(err, &sErr):
		return sErr
	case errors.Is(err, ErrUnknownRecipient):
		se.s.log.Info("smtp: unknown recipient", "to", to, "from", se.from, "remote", se.remote())
		return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "No such user here"}
	case errors.Is(err, ErrRelayDenied):
		se.s.log.Info("smtp: relaying denied", "to", to, "from", se.from, "remote", se.remote())
		return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "Relaying denied: not a domain of this server"}
	case IsPermanent(err):
		return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "Recipient refused"}
	}
	se.s.log.Warn("smtp: recipient check failed", "to", to, "err", err)
	return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "Temporary failure, try again later"}
}

func (se *session) Data(r io.Reader) error {
	msg, err := io.ReadAll(r)
	if err != nil {
		var sErr *smtp.SMTPError
		if errors.As(err, &sErr) { // 552 from go-smtp's size limit
			se.s.log.Info("smtp: message too large", "from", se.from, "remote", se.remote())
			return sErr
		}
		return err
	}
	if hops := countReceived(msg); hops > MaxHops {
		se.s.log.Warn("smtp: mail loop", "from", se.from, "hops", hops)
		return &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 4, 6}, Message: "Too many hops, mail loop"}
	}
	msg = append(se.received(), msg...)
	ctx, cancel := context.WithTimeout(se.s.base, se.s.o.ReceiverTimeout)
	defer cancel()
	env := se.env
	env.From, env.To = se.from, se.to
	if err := se.s.r.Deliver(ctx, &env, msg); err != nil {
		var sErr *smtp.SMTPError
		switch {
		case errors.As(err, &sErr):
			return sErr
		case IsPermanent(err):
			se.s.log.Info("smtp: message refused", "from", se.from, "err", err)
			return &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 6, 0}, Message: "Message refused"}
		}
		se.s.log.Warn("smtp: delivery to queue failed", "from", se.from, "err", err)
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "Temporary failure, try again later"}
	}
	se.s.log.Info("smtp: message accepted", "from", se.from, "rcpts", len(se.to), "size", len(msg), "remote", se.remote())
	return nil
}

// Reset ends a transaction. go-smtp calls it after the reply to DATA has
// been written, so a closing server may then drop the connection.
func (se *session) Reset() {
	se.from, se.to, se.env = "", nil, Envelope{}
	se.setBusy(false)
}

func (se *session) Logout() error {
	se.setBusy(false)
	se.s.noteTLS(se.tc, se.conn) // go-smtp logs a session out right after STARTTLS
	return nil
}

func (se *session) remote() string {
	if c := se.conn.Conn(); c != nil {
		return c.RemoteAddr().String()
	}
	return ""
}

// received writes the trace field RFC 5321 §4.4 requires of a receiver.
func (se *session) received() []byte {
	clean := func(s string) string {
		return strings.Map(func(r rune) rune {
			if r <= ' ' || r >= 0x7f || r == '(' || r == ')' || r == ';' {
				return -1
			}
			return r
		}, s)
	}
	helo := clean(se.conn.Hostname())
	if helo == "" {
		helo = "unknown"
	}
	ip := ""
	if c := se.conn.Conn(); c != nil {
		if h, _, err := net.SplitHostPort(c.RemoteAddr().String()); err == nil {
			ip = " ([" + clean(h) + "])"
		}
	}
	with := "ESMTP"
	if _, ok := se.conn.TLSConnectionState(); ok {
		with = "ESMTPS"
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "Received: from %s%s\r\n\tby %s (emsdp) with %s", helo, ip, clean(se.s.o.Domain), with)
	if len(se.to) == 1 && mailconv.IsASCII(se.to[0]) && !strings.ContainsAny(se.to[0], "\r\n<>") {
		fmt.Fprintf(&b, "\r\n\tfor <%s>", se.to[0])
	}
	fmt.Fprintf(&b, "; %s\r\n", time.Now().UTC().Format("Mon, 02 Jan 2006 15:04:05 -0700"))
	return b.Bytes()
}

// countReceived counts Received: fields in the header section.
func countReceived(msg []byte) int {
	n := 0
	for line := range bytes.SplitSeq(mailconv.HeaderSection(msg), []byte("\n")) {
		if len(line) >= 9 && bytes.EqualFold(line[:9], []byte("Received:")) {
			n++
		}
	}
	return n
}

// slogPrinter adapts go-smtp's internal error log to slog.
type slogPrinter struct{ l *slog.Logger }

func (p slogPrinter) Printf(format string, v ...any) {
	p.l.Warn("smtp: " + strings.TrimSpace(fmt.Sprintf(format, v...)))
}

func (p slogPrinter) Println(v ...any) { p.l.Warn("smtp: " + strings.TrimSpace(fmt.Sprintln(v...))) }
