package main

import (
	"cmp"
	"context"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/esro-emsdp/emsdp/decode"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/esro/esrodtls"
)

func cmdESRO(ctx context.Context, env *cmdEnv, args []string) int {
	return dispatch(ctx, env, "esro", args,
		subcommand{"perform", esroPerform},
		subcommand{"invoke", esroInvoke},
	)
}

// usageError marks a bad flag value: exit 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return &usageError{fmt.Sprintf(format, a...)} }

// msDuration is a duration flag that also takes a bare number of
// milliseconds, the unit of the reference's ini files.
type msDuration struct{ d *time.Duration }

func (m msDuration) String() string {
	if m.d == nil {
		return ""
	}
	return m.d.String()
}

func (m msDuration) Set(s string) error {
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		*m.d = time.Duration(n) * time.Millisecond
		return nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return errors.New("want a duration such as 2s or 1500ms, or milliseconds")
	}
	*m.d = d
	return nil
}

// timerFlags registers the ESRO timer flags shared by every command that
// runs an endpoint; their defaults are the reference's shipped erop.ini.
type timerFlags struct {
	t     esro.Timers
	fixed bool
	trace bool
}

func (tf *timerFlags) register(fs *flag.FlagSet) {
	tf.t = esro.ShippedTimers()
	fs.Var(msDuration{&tf.t.Retransmit}, "retransmit", "retransmit interval R (T_retx = R + roundtrip)")
	fs.Var(msDuration{&tf.t.Roundtrip}, "roundtrip", "round-trip estimate RT")
	fs.Var(msDuration{&tf.t.Acknowledgement}, "ack-delay", "acknowledgement delay A (enters T_last)")
	fs.Var(msDuration{&tf.t.NSDULifetime}, "nsdu-lifetime", "maximum datagram lifetime L (enters T_ref)")
	fs.IntVar(&tf.t.RetransmitCount, "retries", tf.t.RetransmitCount, "retransmissions N before giving up")
	fs.BoolVar(&tf.fixed, "fixed-timers", false, "the reference's fixed timers instead of adaptive RTT")
	fs.BoolVar(&tf.trace, "trace", false, "log every PDU in and out to stderr, decoded, passwords masked")
}

// config builds the endpoint configuration; log gets its diagnostics, and
// with --trace every PDU goes to env's stderr.
func (tf *timerFlags) config(env *cmdEnv, log *slog.Logger) (*esro.Config, error) {
	c := &esro.Config{Timers: tf.t, FixedTimers: tf.fixed, Logger: log}
	if tf.trace {
		c.Trace = decode.NewTracer(slog.New(slog.NewTextHandler(env.stderr,
			&slog.HandlerOptions{Level: decode.LevelTrace, ReplaceAttr: decode.ReplaceLevel})))
	}
	if err := c.Validate(); err != nil {
		return nil, &usageError{err.Error()}
	}
	return c, nil
}

func fail(env *cmdEnv, err error) int {
	if msg := err.Error(); env.store != "" && !strings.Contains(msg, env.store) {
		// An error of a command working on a store names the store, so
		// that one given the wrong store says so.
		err = fmt.Errorf("%w (store %s)", err, env.store)
	}
	fmt.Fprintln(env.stderr, "emsdp:", err)
	var ue *usageError
	if errors.As(err, &ue) {
		return exitUsage
	}
	return exitFailed
}

func stderrLogger(env *cmdEnv) *slog.Logger {
	return slog.New(slog.NewTextHandler(env.stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

func uint8Flag(name string, v, lo, hi int) (uint8, error) {
	if v < lo || v > hi {
		return 0, usagef("--%s %d out of range %d..%d", name, v, lo, hi)
	}
	return uint8(v), nil
}

func handshakeFlag(v int) (esro.Handshake, error) {
	if v != 2 && v != 3 {
		return 0, usagef("--handshake must be 2 or 3, not %d", v)
	}
	return esro.Handshake(v), nil
}

// ---- perform ----

type replyMode struct {
	kind  string // echo, date, error, none
	value uint8
}

func parseReplyMode(s string) (replyMode, error) {
	switch s {
	case "echo", "date", "none":
		return replyMode{kind: s}, nil
	}
	if v, ok := strings.CutPrefix(s, "error:"); ok {
		n, err := strconv.ParseUint(v, 10, 8)
		if err != nil {
			return replyMode{}, usagef("--reply error:V needs V in 0..255, got %q", v)
		}
		return replyMode{kind: "error", value: uint8(n)}, nil
	}
	return replyMode{}, usagef("--reply must be echo, date, error:V or none, not %q", s)
}

func esroPerform(ctx context.Context, env *cmdEnv, args []string) int {
	fs := flag.NewFlagSet("emsdp esro perform", flag.ContinueOnError)
	listen := fs.String("listen", ":641", "UDP address to listen on (the reference used port 2002)")
	sap := fs.Int("sap", 13, "SAP selector to bind, 1..15")
	hsv := fs.Int("handshake", 3, "2-way or 3-way handshake")
	reply := fs.String("reply", "echo", "echo, date, error:V or none")
	amp := fs.Float64("amplification", 1, "at most this many times the octets an invoker sent go back to it (0: no limit)")
	var tf timerFlags
	tf.register(fs)
	var df dtlsFlags
	df.register(fs, true)
	if _, done, code := parseFlags(fs, env, args, 0); done {
		return code
	}
	if *amp < 0 || math.IsNaN(*amp) {
		return fail(env, &usageError{fmt.Sprintf("--amplification %v: want 0 (no limit) or more", *amp)})
	}
	key, dcfg, err := df.config()
	if err != nil {
		return fail(env, err)
	}
	if key != nil && df.identity == "" {
		return fail(env, usagef("--dtls needs --psk-identity: the identity invokers present"))
	}
	s, err := uint8Flag("sap", *sap, 1, esro.MaxSAP)
	if err != nil {
		return fail(env, err)
	}
	hs, err := handshakeFlag(*hsv)
	if err != nil {
		return fail(env, err)
	}
	mode, err := parseReplyMode(*reply)
	if err != nil {
		return fail(env, err)
	}
	cfg, err := tf.config(env, stderrLogger(env))
	if err != nil {
		return fail(env, err)
	}
	cfg.AmplificationFactor = *amp
	if *amp == 0 {
		cfg.AmplificationFactor = -1
	}
	ep, conn, err := env.esroEndpoint(key, dcfg, df.identity, true, *listen, cfg)
	if err != nil {
		return fail(env, err)
	}
	defer ep.Close()
	var outMu sync.Mutex
	err = ep.HandleFunc(s, hs, func(_ context.Context, w esro.ResponseWriter, inv *esro.Invocation) {
		outMu.Lock()
		who := ""
		if conn != nil {
			if p, ok := conn.Peer(inv.Peer); ok {
				who = " identity=" + p.Identity + " suite=" + p.CipherSuite
			}
		}
		fmt.Fprintf(env.stdout, "invoke peer=%s sap=%d op=%d enc=%d len=%d%s\n", inv.Peer, inv.SAP, inv.Operation, inv.Encoding, len(inv.Data), who)
		outMu.Unlock()
		switch mode.kind {
		case "echo":
			w.Result(inv.Encoding, inv.Data)
		case "date":
			// ctime(3) text, as the reference's example performer answers.
			w.Result(inv.Encoding, []byte(time.Now().Format("Mon Jan _2 15:04:05 2006\n")))
		case "error":
			w.Error(inv.Encoding, mode.value, inv.Data)
		}
	})
	if err != nil {
		return fail(env, err)
	}
	fmt.Fprintf(env.stderr, "emsdp esro perform: listening on %s, SAP %d, %v, reply %s\n", ep.LocalAddr(), s, hs, *reply)
	<-ctx.Done()
	return exitOK
}

// esroEndpoint opens a plain UDP endpoint on local, or with a key one over
// DTLS: listening on local (perform) or opening sessions (invoke).
func (env *cmdEnv) esroEndpoint(key []byte, dcfg esrodtls.Config, identity string, listen bool, local string, cfg *esro.Config) (*esro.Endpoint, *esrodtls.Conn, error) {
	if key == nil {
		ep, err := env.listenESRO("udp", local, cfg)
		if err != nil {
			return nil, nil, listenHint(err, local)
		}
		return ep, nil, nil
	}
	dcfg.Logger = cfg.Logger
	conn, err := dtlsConn(dcfg, identity, key, listen, local)
	if err != nil {
		return nil, nil, err
	}
	ep, err := esro.NewEndpoint(conn, cfg)
	if err != nil {
		conn.Close()
		return nil, nil, err
	}
	return ep, conn, nil
}

// listenESRO starts an endpoint on a socket from env.listenPacket, or on
// a UDP socket.
func (env *cmdEnv) listenESRO(network, address string, cfg *esro.Config) (*esro.Endpoint, error) {
	if env.listenPacket == nil {
		return esro.Listen(network, address, cfg)
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	c, err := env.listenPacket(network, address)
	if err != nil {
		return nil, err
	}
	ep, err := esro.NewEndpoint(c, cfg)
	if err != nil {
		c.Close()
		return nil, err
	}
	return ep, nil
}

// listenHint explains the usual reasons a UDP bind fails.
func listenHint(err error, addr string) error {
	switch {
	case errors.Is(err, os.ErrPermission):
		return fmt.Errorf("%w (ports below 1024 need root or CAP_NET_BIND_SERVICE; choose another with --listen)", err)
	case strings.Contains(err.Error(), "address already in use"):
		return fmt.Errorf("%w (another program uses %s: 'emsdp ports' shows which)", err, addr)
	}
	return err
}

// ---- invoke ----

// esroDefaultPDU is the endpoint's user-data size when none is set
// (esro.Config.PDUSize).
const esroDefaultPDU = 1500

func esroInvoke(ctx context.Context, env *cmdEnv, args []string) int {
	fs := flag.NewFlagSet("emsdp esro invoke", flag.ContinueOnError)
	to := fs.String("to", "", "performer HOST:PORT (required)")
	sap := fs.Int("sap", -1, "performer SAP selector, 0..15 (required)")
	hsv := fs.Int("handshake", 3, "2-way or 3-way handshake")
	op := fs.Int("op", 0, "operation value, 0..63")
	enc := fs.Int("enc", 0, "encoding type, 0..3 (the reference tools use 2 for text)")
	data := fs.String("data", "", "argument as text")
	hexData := fs.String("hex", "", "argument as hex octets")
	file := fs.String("file", "", "argument read from a file")
	local := fs.String("local", ":0", "local UDP address to invoke from")
	count := fs.Int("count", 0, "invoke this many times and print a summary")
	conc := fs.Int("concurrency", 1, "invocations in flight with --count")
	var tf timerFlags
	tf.register(fs)
	var df dtlsFlags
	df.register(fs, true)
	noLinger := fs.Bool("no-linger", false, noLingerUsage)
	if _, done, code := parseFlags(fs, env, args, 0); done {
		return code
	}
	key, dcfg, err := df.config()
	if err != nil {
		return fail(env, err)
	}
	if key != nil && df.identity == "" {
		return fail(env, usagef("--dtls needs --psk-identity: the identity to present"))
	}
	req, err := invokeRequest(fs, *to, *sap, *hsv, *op, *enc, *data, *hexData, *file)
	if err != nil {
		return fail(env, err)
	}
	if *count < 0 || *conc < 1 || *conc > 65536 {
		return fail(env, usagef("--count must be >= 0 and --concurrency in 1..65536"))
	}
	cfg, err := tf.config(env, stderrLogger(env))
	if err != nil {
		return fail(env, err)
	}
	// An argument no PDU can carry is the command line's mistake (2), not
	// an outcome of the invocation.
	if pdu := cmp.Or(cfg.PDUSize, esroDefaultPDU); len(req.Data) > pdu {
		return fail(env, usagef("the argument is %d octets; an ESRO PDU carries at most %d", len(req.Data), pdu))
	}
	cfg.NoLinger = *noLinger
	ep, _, err := env.esroEndpoint(key, dcfg, df.identity, false, *local, cfg)
	if err != nil {
		return fail(env, err)
	}
	defer ep.Close()
	return invokeOn(ctx, env, ep, req, *count, *conc)
}

// noLingerUsage is the -h text of --no-linger for every command that
// invokes 3-way operations and exits.
const noLingerUsage = "exit as soon as the outcome is printed. By default the command stays " +
	"until the performer has been quiet for one retransmission interval (T_retx = R + RT, plus 2 × RT " +
	"or the measured round-trip timeout) since the last reply it retransmitted, and acknowledges every " +
	"retransmission meanwhile; more intervals when the link has lost datagrams, never beyond the " +
	"performer's retry budget N × T_retx. With the default timers: about 5 s on a clean link, up " +
	"to 26 s on a lossy one. Without it a lost ACK is never repeated, and a performer that acts " +
	"only on confirmation (the reference MTS with submissions) fails the operation although its " +
	"result was printed"

// invokeOn runs one invocation (count 0) or count of them on ep, prints
// the outcome, then shuts ep down: with the endpoint's linger, so that a
// lost ACK is repeated when the performer retransmits its reply. ctx
// (the signals) cuts the linger short.
func invokeOn(ctx context.Context, env *cmdEnv, ep *esro.Endpoint, req *esro.Request, count, conc int) int {
	var code int
	if count == 0 {
		res, err := ep.Invoke(ctx, req)
		code = printOutcome(env.stdout, res, err)
	} else {
		code = invokeMany(ctx, env, ep, req, count, conc)
	}
	ep.Shutdown(ctx)
	return code
}

func invokeRequest(fs *flag.FlagSet, to string, sap, hsv, op, enc int, data, hexData, file string) (*esro.Request, error) {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if to == "" {
		return nil, usagef("--to HOST:PORT is required")
	}
	if !set["sap"] {
		return nil, usagef("--sap is required")
	}
	n := 0
	for _, k := range []string{"data", "hex", "file"} {
		if set[k] {
			n++
		}
	}
	if n > 1 {
		return nil, usagef("give only one of --data, --hex and --file")
	}
	addr, err := resolveUDP(to)
	if err != nil {
		return nil, err
	}
	r := &esro.Request{To: addr}
	if r.SAP, err = uint8Flag("sap", sap, 0, esro.MaxSAP); err != nil {
		return nil, err
	}
	if r.Operation, err = uint8Flag("op", op, 0, esro.MaxOperation); err != nil {
		return nil, err
	}
	e, err := uint8Flag("enc", enc, 0, esro.MaxEncoding)
	if err != nil {
		return nil, err
	}
	r.Encoding = esro.Encoding(e)
	if r.Handshake, err = handshakeFlag(hsv); err != nil {
		return nil, err
	}
	switch {
	case set["hex"]:
		if r.Data, err = hex.DecodeString(strings.Join(strings.Fields(hexData), "")); err != nil {
			return nil, usagef("--hex: %v", err)
		}
	case set["file"]:
		if r.Data, err = os.ReadFile(file); err != nil {
			return nil, err
		}
	default:
		r.Data = []byte(data)
	}
	return r, nil
}

// resolveUDP turns HOST:PORT into an address, resolving names.
func resolveUDP(s string) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap, nil
	}
	ua, err := net.ResolveUDPAddr("udp", s)
	if err != nil {
		return netip.AddrPort{}, usagef("bad address %q: %v", s, err)
	}
	return ua.AddrPort(), nil
}

func printOutcome(w io.Writer, res *esro.Result, err error) int {
	var er *esro.ErrorReply
	var f *esro.Failure
	switch {
	case err == nil:
		fmt.Fprintf(w, "result enc=%d data=%q\n", res.Encoding, res.Data)
		return exitOK
	case errors.As(err, &er):
		fmt.Fprintf(w, "error value=%d data=%q\n", er.Value, er.Data)
		return exitError
	case errors.As(err, &f):
		fmt.Fprintf(w, "failure reason=%d %s\n", f.Reason, f.Reason)
		return exitFailure
	}
	fmt.Fprintf(w, "failure reason=%d %v\n", esro.LocalResource, err)
	return exitFailure
}

// invokeMany runs count invocations with conc in flight and prints one
// summary line.
func invokeMany(ctx context.Context, env *cmdEnv, ep *esro.Endpoint, req *esro.Request, count, conc int) int {
	var mu sync.Mutex
	var results, errs, failures int
	reasons := map[string]int{}
	lat := make([]time.Duration, 0, count)
	next := make(chan struct{}, count)
	for range count {
		next <- struct{}{}
	}
	close(next)
	start := time.Now()
	var wg sync.WaitGroup
	for range min(conc, count) {
		wg.Go(func() {
			for range next {
				if ctx.Err() != nil {
					return
				}
				t0 := time.Now()
				_, err := ep.Invoke(ctx, req)
				d := time.Since(t0)
				var er *esro.ErrorReply
				var f *esro.Failure
				mu.Lock()
				switch {
				case err == nil:
					results++
				case errors.As(err, &er):
					errs++
				case errors.As(err, &f):
					failures++
					reasons[strconv.Itoa(int(f.Reason))]++
				default:
					failures++
					reasons["local"]++
				}
				lat = append(lat, d)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	slices.Sort(lat)
	done := len(lat)
	rate := float64(done) / elapsed.Seconds()
	var why string
	for _, k := range slices.Sorted(maps.Keys(reasons)) {
		why += fmt.Sprintf(" failure-reason-%s=%d", k, reasons[k])
	}
	fmt.Fprintf(env.stdout, "summary completed=%d results=%d errors=%d failures=%d invocations/s=%.1f p50=%s p99=%s%s\n",
		done, results, errs, failures, rate, percentile(lat, 50), percentile(lat, 99), why)
	switch {
	case failures > 0 || done < count:
		return exitFailure
	case errs > 0:
		return exitError
	}
	return exitOK
}

func percentile(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := (len(sorted)*p + 99) / 100
	return sorted[min(max(i-1, 0), len(sorted)-1)].Round(time.Microsecond)
}
