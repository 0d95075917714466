package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"mime"
	"net/mail"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/esro/esrodtls"
	"github.com/esro-emsdp/emsdp/ua"
)

// cmdUA: "emsdp ua send|receive|verify", the device user agent (package ua).
func cmdUA(ctx context.Context, env *cmdEnv, args []string) int {
	return dispatch(ctx, env, "ua", args,
		subcommand{"send", uaSend},
		subcommand{"receive", uaReceive},
		subcommand{"verify", uaVerify},
	)
}

// uaMaxBody bounds what is read as a body: 32 segments hold less (§8), so
// larger input is refused without reading all of it.
const uaMaxBody = 64 << 10

// uaDevice holds the flags the ua subcommands share.
type uaDevice struct {
	server, address, password, local string
	protocol                         string
	pduSize                          int
	reference                        bool
	verifyList                       string
	timers                           timerFlags
	dtls                             dtlsFlags
	listenDTLS                       bool // receive: sessions come to --listen
	noLinger                         bool
	conn                             *esrodtls.Conn // with --dtls, once started
}

func (d *uaDevice) register(fs *flag.FlagSet, env *cmdEnv) {
	fs.StringVar(&d.server, "server", "", "MTS HOST:PORT (project default port 641; reference servers use 2002)")
	fs.StringVar(&d.address, "address", "", "this device's EMSD address, NNN.NNN")
	fs.StringVar(&d.password, "password", env.getenv("EMSDP_PASSWORD"), "device password (default $EMSDP_PASSWORD)")
	fs.StringVar(&d.protocol, "protocol", "1.1", "EMSD version the server has configured for this device: 1.1 or 1.0")
	fs.IntVar(&d.pduSize, "pdu-size", emsd.DefaultMaxUserData, "ESRO user-data size; submissions are segmented to it")
	fs.BoolVar(&d.reference, "reference-mts", false, "peer is a reference (C) MTS: no duplicate window, credentials as the reference UA sends them")
	fs.StringVar(&d.verifyList, "verify-list", "", "file of recent submission ids answering submission verify; give send and receive the same")
	d.timers.register(fs)
	d.dtls.register(fs, false)
}

// config validates the shared flags. needServer and needAddress say
// whether --server and --address are required.
func (d *uaDevice) config(env *cmdEnv, needServer, needAddress bool) (*esro.Config, ua.Config, error) {
	cfg := ua.Config{Password: d.password, PDUSize: d.pduSize,
		NoDuplicateWindow: d.reference, ReferenceSecurity: d.reference, Logger: stderrLogger(env)}
	var err error
	switch {
	case d.server != "":
		if cfg.Server, err = resolveUDP(d.server); err != nil {
			return nil, cfg, err
		}
	case needServer:
		return nil, cfg, usagef("--server HOST:PORT is required")
	}
	switch {
	case d.address != "":
		if cfg.Address, err = emsd.ParseAddress(d.address); err != nil {
			return nil, cfg, usagef("--address %q: want NNN.NNN", d.address)
		}
	case needAddress:
		return nil, cfg, usagef("--address NNN.NNN is required")
	case d.dtls.on:
		return nil, cfg, usagef("--dtls needs --address NNN.NNN: it is the key's identity")
	}
	if len(d.password) > emsd.MaxPassword {
		return nil, cfg, usagef("--password is %d octets, at most %d", len(d.password), emsd.MaxPassword)
	}
	if cfg.Version, err = emsd.ParseVersion(d.protocol); err != nil {
		return nil, cfg, usagef("--protocol %q: want 1.1 or 1.0", d.protocol)
	}
	if d.pduSize < 256 || d.pduSize > 65000 {
		return nil, cfg, usagef("--pdu-size %d out of range 256..65000", d.pduSize)
	}
	if d.verifyList != "" {
		cfg.VerifyList = ua.NewFileVerifyList(d.verifyList, ua.DefaultVerifyListSize)
	}
	ecfg, err := d.timers.config(env, cfg.Logger)
	if err != nil {
		return nil, cfg, err
	}
	ecfg.PDUSize = d.pduSize
	ecfg.NoLinger = d.noLinger
	return ecfg, cfg, nil
}

// start opens the endpoint and the client.
func (d *uaDevice) start(env *cmdEnv, ecfg *esro.Config, cfg ua.Config) (*esro.Endpoint, *ua.Client, error) {
	key, tcfg, err := d.dtls.config()
	if err != nil {
		return nil, nil, err
	}
	var ep *esro.Endpoint
	if key != nil {
		// The identity is the device's address, as the server shows it.
		tcfg.Logger = cfg.Logger
		conn, err := dtlsConn(tcfg, cfg.Address.String(), key, d.listenDTLS, d.local)
		if err != nil {
			return nil, nil, err
		}
		d.conn = conn
		if ep, err = esro.NewEndpoint(conn, ecfg); err != nil {
			conn.Close()
			return nil, nil, err
		}
	} else if ep, err = env.listenESRO("udp", d.local, ecfg); err != nil {
		return nil, nil, listenHint(err, d.local)
	}
	c, err := ua.New(ep, cfg)
	if err != nil {
		ep.Close()
		return nil, nil, err
	}
	return ep, c, nil
}

// stop lets the endpoint finish what the peer may still need (an answer
// owed, an ACK repeated for a retransmitted reply: the linger of
// --no-linger), within the ESRO timers; ctx (the signals) cuts it short.
func (d *uaDevice) stop(ctx context.Context, ep *esro.Endpoint) {
	ep.Shutdown(ctx)
}

// uaOutcome prints an EMSD error or ESRO failure and returns its exit code.
func uaOutcome(env *cmdEnv, cmd string, err error) int {
	var e *ua.Error
	var f *esro.Failure
	switch {
	case errors.Is(err, ua.ErrInvalidMessage):
		fmt.Fprintf(env.stderr, "emsdp ua %s: %v\n", cmd, err)
		return exitUsage
	case errors.As(err, &e):
		param := "none"
		if e.Parameter != nil {
			param = strconv.Itoa(int(*e.Parameter))
		}
		fmt.Fprintf(env.stdout, "error code=%d %s parameter=%s transient=%v\n", e.Code, e.Code.String(), param, e.Transient())
		return exitError
	case errors.As(err, &f):
		fmt.Fprintf(env.stdout, "failure reason=%d %s\n", f.Reason, f.Reason)
		return exitFailure
	}
	fmt.Fprintf(env.stderr, "emsdp ua %s: %v\n", cmd, err)
	return exitFailed
}

// outcome is uaOutcome for an operation on the started client. An ESRO
// failure over DTLS without a session ever established says why it most
// likely is: a wrong key gets no answer at all (the server drops the
// handshake message it cannot decrypt), which reads as a silent server.
func (d *uaDevice) outcome(env *cmdEnv, cmd string, err error) int {
	code := uaOutcome(env, cmd, err)
	if code == exitFailure && d.conn != nil && d.conn.Stats().HandshakesOK == 0 {
		fmt.Fprintf(env.stderr, "emsdp ua %s: no DTLS session with %s: the handshake did not complete; "+
			"a wrong key, or an --address the server has no key for, looks like this (check --psk or --psk-file, and that --server is its dtls.listen port)\n",
			cmd, d.server)
	}
	return code
}

// ---- send ----

// addrList is a repeatable flag taking comma-separated addresses.
type addrList []string

func (l *addrList) String() string { return strings.Join(*l, ",") }

func (l *addrList) Set(s string) error {
	parts := splitAddresses(s)
	if len(parts) == 0 {
		return errors.New("empty address list")
	}
	*l = append(*l, parts...)
	return nil
}

// splitAddresses splits at commas outside quoted strings and angle
// brackets, so that `"Doe, Jane" <jane@example.com>,198.037` is two.
func splitAddresses(s string) []string {
	var out []string
	var quoted, escaped bool
	depth, start := 0, 0
	flush := func(end int) {
		if p := strings.TrimSpace(s[start:end]); p != "" {
			out = append(out, p)
		}
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case escaped:
			escaped = false
		case quoted && c == '\\':
			escaped = true
		case c == '"':
			quoted = !quoted
		case quoted:
		case c == '<':
			depth++
		case c == '>' && depth > 0:
			depth--
		case c == ',' && depth == 0:
			flush(i)
			start = i + 1
		}
	}
	flush(len(s))
	return out
}

func uaSend(ctx context.Context, env *cmdEnv, args []string) int {
	fs := flag.NewFlagSet("emsdp ua send", flag.ContinueOnError)
	var d uaDevice
	d.register(fs, env)
	fs.StringVar(&d.local, "local", ":0", "local UDP address to send from")
	fs.BoolVar(&d.noLinger, "no-linger", false, noLingerUsage)
	var msg ua.Message
	fs.Var((*addrList)(&msg.To), "to", "recipients: NNN.NNN or Internet addresses, comma-separated or repeated")
	fs.Var((*addrList)(&msg.Cc), "cc", "copy recipients")
	fs.Var((*addrList)(&msg.Bcc), "bcc", "blind copy recipients")
	fs.Var((*addrList)(&msg.ReplyTo), "reply-to", "reply-to addresses")
	fs.StringVar(&msg.Subject, "subject", "", "subject (UTF-8, at most 127 octets)")
	fs.StringVar(&msg.InReplyTo, "in-reply-to", "", "id of the message replied to")
	file := fs.String("file", "", "read the body from this file (default: standard input)")
	deliveryReport := fs.Bool("delivery-report", false, "ask for delivery reports")
	priority := fs.String("priority", "normal", "urgent, normal or non-urgent")
	importance := fs.String("importance", "normal", "high, normal or low")
	if _, done, code := parseFlags(fs, env, args, 0); done {
		return code
	}
	msg.DeliveryReport = *deliveryReport
	switch *priority {
	case "urgent":
		msg.Priority = ua.PriorityUrgent
	case "normal":
	case "non-urgent":
		msg.Priority = ua.PriorityNonUrgent
	default:
		return fail(env, usagef("--priority must be urgent, normal or non-urgent"))
	}
	switch *importance {
	case "high":
		msg.Importance = ua.ImportanceHigh
	case "normal":
	case "low":
		msg.Importance = ua.ImportanceLow
	default:
		return fail(env, usagef("--importance must be high, normal or low"))
	}
	ecfg, cfg, err := d.config(env, true, true)
	if err != nil {
		return fail(env, err)
	}
	if len(msg.To)+len(msg.Cc)+len(msg.Bcc) == 0 {
		return fail(env, usagef("give at least one recipient with --to, --cc or --bcc"))
	}
	// Check the message before reading a body or opening a socket.
	if _, err := msg.IPM(cfg.Address); err != nil {
		return uaOutcome(env, "send", err)
	}
	if msg.Body, err = uaReadBody(env, *file); err != nil {
		return fail(env, err)
	}
	ep, c, err := d.start(env, ecfg, cfg)
	if err != nil {
		return fail(env, err)
	}
	defer d.stop(ctx, ep)
	defer c.Close()
	id, err := c.Submit(ctx, &msg)
	if err != nil {
		return d.outcome(env, "send", err)
	}
	fmt.Fprintf(env.stdout, "submitted message-id=%s\n", id)
	return exitOK
}

func uaReadBody(env *cmdEnv, path string) ([]byte, error) {
	r := env.stdin
	if path != "" {
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		r = f
	}
	b, err := io.ReadAll(io.LimitReader(r, uaMaxBody+1))
	if err != nil {
		return nil, fmt.Errorf("reading the body: %w", err)
	}
	if len(b) > uaMaxBody {
		return nil, usagef("the body is larger than %d octets; EMSD carries at most 32 segments (about 45 KB)", uaMaxBody)
	}
	return b, nil
}

// ---- receive ----

func uaReceive(ctx context.Context, env *cmdEnv, args []string) int {
	fs := flag.NewFlagSet("emsdp ua receive", flag.ContinueOnError)
	var d uaDevice
	d.register(fs, env)
	fs.StringVar(&d.local, "listen", "", "UDP address deliveries come to: the device's registered IP and port; with --poll any (default :0)")
	dir := fs.String("maildir", "", "Maildir to store delivered messages in (created if needed); required")
	domain := fs.String("domain", "emsd.invalid", "mail domain for local addresses in stored messages (hhh.lll@domain)")
	poll := fs.Bool("poll", false, "poll with delivery control from the receiving socket, at once and every --poll-interval: "+
		"queued mail flows, and the server delivers to the address the polls come from (behind a NAT too)")
	pollEvery := fs.Duration("poll-interval", ua.DefaultPollInterval, "time between polls with --poll; within the NAT's UDP timeout "+
		"(often 30s) and the server's delivery.contact_lifetime; 0 = poll once at start")
	refuseReports := fs.Bool("refuse-reports", false,
		"refuse delivery reports (content type 2) as the reference UA does; the server then sends them as text notices")
	if _, done, code := parseFlags(fs, env, args, 0); done {
		return code
	}
	if d.local == "" && *poll {
		d.local = ":0"
	}
	if d.local == "" {
		return fail(env, usagef("--listen ADDR is required (or --poll, which receives wherever it polls from)"))
	}
	if *pollEvery < 0 || (*pollEvery > 0 && *pollEvery < 100*time.Millisecond) {
		return fail(env, usagef("--poll-interval %v: want 0 (once) or at least 100ms", *pollEvery))
	}
	if *dir == "" {
		return fail(env, usagef("--maildir DIR is required"))
	}
	if *domain == "" {
		return fail(env, usagef("--domain must not be empty"))
	}
	d.listenDTLS = true
	ecfg, cfg, err := d.config(env, *poll, *poll || d.dtls.on)
	if err != nil {
		return fail(env, err)
	}
	cfg.AcceptReports = !*refuseReports
	md, err := ua.OpenMaildir(*dir, ua.MaildirConfig{Domain: *domain, Logger: cfg.Logger})
	if err != nil {
		return fail(env, err)
	}
	cfg.Handler = ua.HandlerFunc(func(ctx context.Context, dl *ua.Delivery) error {
		path, err := md.Store(dl)
		if err != nil {
			return err
		}
		// A message the server delivers again after losing track of the
		// first delivery is answered as done, not stored twice.
		what := "delivered"
		if path == "" {
			what = "duplicate"
		}
		if dl.Report != nil {
			fmt.Fprintf(env.stdout, "%s report message-id=%s reported=%s recipients=%d\n", what,
				dl.MessageID, dl.Report.ReportedMessageID, len(dl.Report.Recipients))
			return nil
		}
		fmt.Fprintf(env.stdout, "%s message-id=%s from=%s subject=%s\n", what,
			dl.MessageID, uaShowAddress(dl.IPM.Heading.Originator), strconv.Quote(uaShowText(dl.IPM.Heading.Subject)))
		return nil
	})
	ep, c, err := d.start(env, ecfg, cfg)
	if err != nil {
		return fail(env, err)
	}
	fmt.Fprintf(env.stderr, "emsdp ua receive: listening on %s, storing in %s\n", ep.LocalAddr(), *dir)
	var wg sync.WaitGroup
	if *poll {
		wg.Go(func() { uaPoll(ctx, env, c, *pollEvery) })
	}
	<-ctx.Done()
	// Deliveries being stored finish and their answers go out; the poll
	// ends with the endpoint at the latest.
	sctx, cancel := context.WithTimeout(context.Background(), d.timers.t.LastWait()+d.timers.t.RetransmitInterval())
	d.stop(sctx, ep)
	cancel()
	wg.Wait()
	c.Close()
	return exitOK
}

// uaPoll polls the server from the receiving socket: once when every is
// 0, else until ctx ends. It reports the first answer and every change
// between answered and not, not each poll.
func uaPoll(ctx context.Context, env *cmdEnv, c *ua.Client, every time.Duration) {
	answered := -1 // unknown, no, yes
	report := func(err error) {
		var e *ua.Error
		switch {
		case err == nil:
			if answered != 1 {
				fmt.Fprintln(env.stderr, "emsdp ua receive: delivery control answered")
			}
			answered = 1
		case errors.As(err, &e):
			// A reference MTS always answers ERROR 7 (§9.12): it
			// answered, and queued deliveries follow all the same.
			if answered != 1 {
				fmt.Fprintf(env.stderr, "emsdp ua receive: delivery control answered with %v\n", e)
			}
			answered = 1
		case ctx.Err() == nil:
			if answered != 0 {
				fmt.Fprintf(env.stderr, "emsdp ua receive: delivery control: %v\n", err)
			}
			answered = 0
		}
	}
	if every == 0 {
		_, err := c.DeliveryControl(ctx, nil)
		report(err)
		return
	}
	c.KeepPolling(ctx, every, report)
}

// uaShowAddress renders an originator for the one-line report: hhh.lll for
// a local address, the addr-spec of an Internet address, or the text as
// given (quoted when it has blanks) when it is not a mailbox.
func uaShowAddress(a emsd.ORAddress) string {
	if a.IsLocal {
		return a.Local.String()
	}
	if m, err := mail.ParseAddress(a.RFC822); err == nil {
		return m.Address
	}
	if a.RFC822 == "" || strings.ContainsFunc(a.RFC822, func(r rune) bool { return unicode.IsSpace(r) || !unicode.IsPrint(r) }) {
		return strconv.Quote(a.RFC822)
	}
	return a.RFC822
}

// uaShowText decodes RFC 2047 words that Internet mail may have left in a
// subject; anything else is shown as carried.
func uaShowText(s string) string {
	if strings.Contains(s, "=?") {
		if t, err := new(mime.WordDecoder).DecodeHeader(s); err == nil {
			return t
		}
	}
	return s
}

// ---- verify ----

func uaVerify(ctx context.Context, env *cmdEnv, args []string) int {
	fs := flag.NewFlagSet("emsdp ua verify", flag.ContinueOnError)
	var d uaDevice
	d.register(fs, env)
	fs.StringVar(&d.local, "local", ":0", "local UDP address to send from (the MTS identifies op 5 by IP address and port)")
	fs.BoolVar(&d.noLinger, "no-linger", false, noLingerUsage)
	pos, done, code := parseFlags(fs, env, args, -1)
	if done {
		return code
	}
	if len(pos) != 1 {
		return fail(env, usagef("usage: emsdp ua verify --server HOST:PORT [--address NNN.NNN --password PW] MESSAGE-ID"))
	}
	id, err := ua.ParseMessageID(pos[0])
	if err != nil {
		return uaOutcome(env, "verify", err)
	}
	ecfg, cfg, err := d.config(env, true, false)
	if err != nil {
		return fail(env, err)
	}
	ep, c, err := d.start(env, ecfg, cfg)
	if err != nil {
		return fail(env, err)
	}
	defer d.stop(ctx, ep)
	defer c.Close()
	st, err := c.DeliveryVerify(ctx, id)
	if err != nil {
		return d.outcome(env, "verify", err)
	}
	fmt.Fprintf(env.stdout, "status=%d %s\n", st, st)
	if st == emsd.NoReportSent {
		// The protocol cannot tell an id the server never saw from a
		// message not reported on yet: say so, and exit 1 so that a
		// script does not take it for an answer about the message.
		fmt.Fprintf(env.stderr, "emsdp ua verify: the server has no report on %s for this device: the id is unknown "+
			"to it (mistyped, another device's, or older than its status_retention), or the message is not delivered yet\n", pos[0])
		return exitFailed
	}
	return exitOK
}
