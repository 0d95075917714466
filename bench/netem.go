package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/esro-emsdp/emsdp/esro"
)

// The loss runs over a real kernel path: two network namespaces joined by a
// veth pair whose ends delay and drop datagrams with netem, and the two
// ESRO ends in separate processes (this program, re-executed in each
// namespace with netemChildArg). Needs root, ip(8), tc(8) and the kernel's
// netem qdisc; without them the section says why and carries on.

// netemChildArg, as the first argument, makes the program a child of a
// netem run instead of the benchmark (not in the usage: internal).
const netemChildArg = "-netem-child"

const (
	vethPrefix = "10.200.41."
	vethInvoke = vethPrefix + "1"
	vethPerf   = vethPrefix + "2"
	vethPort   = 641
)

// vethPair is the two namespaces, each with one end of the veth pair.
type vethPair struct {
	ns, dev [2]string // [0]: invoker side, [1]: performer side
	netem   bool      // a netem qdisc is installed on both ends
}

// toolError is a system tool that failed, with what it said.
type toolError struct {
	cmd, out string
	err      error
}

func (e *toolError) Error() string {
	if e.out == "" {
		return fmt.Sprintf("%s: %v", e.cmd, e.err)
	}
	return fmt.Sprintf("%s: %s (%v)", e.cmd, e.out, e.err)
}

func (e *toolError) Unwrap() error { return e.err }

// command runs a system tool; its error is a *toolError.
func command(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return &toolError{cmd: name + " " + strings.Join(args, " "), out: strings.TrimSpace(string(out)), err: err}
	}
	return nil
}

// setupVeth creates the namespaces and the veth pair, and with netem a
// netem qdisc (delay only) on both ends. An error means the system cannot
// do it; whatever was created is removed again.
func setupVeth(ctx context.Context, netem bool) (_ *vethPair, err error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("needs root (network namespaces)")
	}
	for _, tool := range []string{"ip", "tc"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("no %s: %w", tool, err)
		}
	}
	id := os.Getpid()
	p := &vethPair{ns: [2]string{fmt.Sprintf("esrobench%d-i", id), fmt.Sprintf("esrobench%d-p", id)},
		dev: [2]string{fmt.Sprintf("ebv%di", id), fmt.Sprintf("ebv%dp", id)}}
	var made []string
	defer func() {
		if err != nil {
			p.closeNS(made)
		}
	}()
	for _, ns := range p.ns {
		if err := command(ctx, "ip", "netns", "add", ns); err != nil {
			return nil, err
		}
		made = append(made, ns)
	}
	steps := [][]string{
		{"ip", "link", "add", p.dev[0], "netns", p.ns[0], "type", "veth", "peer", "name", p.dev[1], "netns", p.ns[1]},
		{"ip", "-n", p.ns[0], "addr", "add", vethInvoke + "/24", "dev", p.dev[0]},
		{"ip", "-n", p.ns[1], "addr", "add", vethPerf + "/24", "dev", p.dev[1]},
		{"ip", "-n", p.ns[0], "link", "set", p.dev[0], "up"},
		{"ip", "-n", p.ns[1], "link", "set", p.dev[1], "up"},
	}
	for _, s := range steps {
		if err := command(ctx, s[0], s[1:]...); err != nil {
			return nil, err
		}
	}
	if netem {
		for i := range 2 {
			if err := command(ctx, "tc", "-n", p.ns[i], "qdisc", "add", "dev", p.dev[i], "root", "netem",
				"delay", fmt.Sprintf("%dms", lossDelay.Milliseconds())); err != nil {
				// The usual reason: a kernel without sch_netem. Say it
				// without the run's namespace names, which change.
				var te *toolError
				if errors.As(err, &te) && te.out != "" {
					return nil, fmt.Errorf("tc qdisc add ... netem: %s", te.out)
				}
				return nil, err
			}
		}
		p.netem = true
	}
	return p, nil
}

// setLoss makes both ends drop datagrams with probability loss.
func (p *vethPair) setLoss(ctx context.Context, loss float64) error {
	for i := range 2 {
		if err := command(ctx, "tc", "-n", p.ns[i], "qdisc", "change", "dev", p.dev[i], "root", "netem",
			"delay", fmt.Sprintf("%dms", lossDelay.Milliseconds()), "loss", fmt.Sprintf("%g%%", loss*100)); err != nil {
			return err
		}
	}
	return nil
}

// Close deletes the namespaces, and with them the veth pair.
func (p *vethPair) Close() error { return p.closeNS(p.ns[:]) }

func (p *vethPair) closeNS(names []string) error {
	// Cleanup must happen even when the run was interrupted.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var errs []error
	for _, ns := range names {
		if ns != "" {
			errs = append(errs, command(ctx, "ip", "netns", "del", ns))
		}
	}
	return errors.Join(errs...)
}

// netemLoss runs the loss rows over veth with netem. When the system
// cannot, it returns no rows and a note saying why; err is for failures
// of a run that had started.
func netemLoss(ctx context.Context, o *benchOptions, n int) ([]Result, string, error) {
	p, err := setupVeth(ctx, true)
	if err != nil {
		if ctx.Err() != nil {
			return nil, "", ctx.Err()
		}
		return nil, "veth + netem: not measured here: " + err.Error(), nil
	}
	defer p.Close()
	const link = "veth + netem, 2 processes"
	var out []Result
	for _, loss := range lossRates {
		if err := p.setLoss(ctx, loss); err != nil {
			return nil, "", err
		}
		for _, fixed := range []bool{false, true} {
			x, err := p.run(ctx, o, n, fixed)
			if err != nil {
				return nil, "", err
			}
			out = append(out, lossResult(x, n, loss, fixed, link))
		}
	}
	return out, "veth + netem: the performer and the invokers in two processes in two network namespaces joined by a veth pair; " +
		"netem on both ends delays every datagram and drops with the given probability (the kernel's own random loss, unseeded).", nil
}

// run starts the performer in its namespace, runs n invocations from the
// other and stops the performer.
func (p *vethPair) run(ctx context.Context, o *benchOptions, n int, fixed bool) (lossOutcome, error) {
	self, err := os.Executable()
	if err != nil {
		return lossOutcome{}, fmt.Errorf("re-exec: %w", err)
	}
	child := func(ns, role string, extra ...string) *exec.Cmd {
		args := []string{"netns", "exec", ns, self, netemChildArg, "-role", role, fmt.Sprintf("-fixed=%v", fixed)}
		c := exec.CommandContext(ctx, "ip", append(args, extra...)...)
		c.Stderr = os.Stderr
		return c
	}
	perf := child(p.ns[1], "perform", "-listen", netip.AddrPortFrom(netip.MustParseAddr(vethPerf), vethPort).String())
	stdin, err := perf.StdinPipe()
	if err != nil {
		return lossOutcome{}, err
	}
	stdout, err := perf.StdoutPipe()
	if err != nil {
		return lossOutcome{}, err
	}
	if err := perf.Start(); err != nil {
		return lossOutcome{}, fmt.Errorf("performer: %w", err)
	}
	defer perf.Wait()
	defer stdin.Close()
	lines := bufio.NewScanner(stdout)
	if !lines.Scan() || lines.Text() != "ready" {
		return lossOutcome{}, fmt.Errorf("performer did not start: %q %v", lines.Text(), lines.Err())
	}
	inv := child(p.ns[0], "invoke", "-to", netip.AddrPortFrom(netip.MustParseAddr(vethPerf), vethPort).String(),
		"-from", vethInvoke, "-n", fmt.Sprint(n))
	b, err := inv.Output()
	if err != nil {
		return lossOutcome{}, fmt.Errorf("invokers: %w", err)
	}
	var x lossOutcome
	if err := json.Unmarshal(b, &x); err != nil {
		return lossOutcome{}, fmt.Errorf("invokers' result %q: %w", b, err)
	}
	// End of input tells the performer to report and exit.
	stdin.Close()
	if !lines.Scan() {
		return lossOutcome{}, fmt.Errorf("performer ended without a result: %v", lines.Err())
	}
	var px lossOutcome
	if err := json.Unmarshal(lines.Bytes(), &px); err != nil {
		return lossOutcome{}, fmt.Errorf("performer's result %q: %w", lines.Text(), err)
	}
	x.Retx += px.Retx
	return x, nil
}

// netemChild is the program as one end of a netem run, in its namespace:
// "perform" echoes on -listen, prints "ready", and after its standard input
// ends prints its outcome; "invoke" runs -n invocations towards -to and
// prints the outcome. Outcomes are JSON lines.
func netemChild(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet(netemChildArg, flag.ContinueOnError)
	fs.SetOutput(stderr)
	role := fs.String("role", "", "perform or invoke")
	fixed := fs.Bool("fixed", false, "fixed timers")
	listen := fs.String("listen", "", "performer address")
	to := fs.String("to", "", "performer address (invoke)")
	from := fs.String("from", "", "local IP address (invoke)")
	n := fs.Int("n", 0, "invocations (invoke)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	cfg := lossConfig(*fixed, log)
	var x lossOutcome
	switch *role {
	case "perform":
		ep, err := esro.Listen("udp", *listen, cfg)
		if err != nil {
			fmt.Fprintln(stderr, "netem child:", err)
			return 1
		}
		defer ep.Close()
		if err := echoPerformer(ep); err != nil {
			fmt.Fprintln(stderr, "netem child:", err)
			return 1
		}
		fmt.Fprintln(stdout, "ready")
		done := make(chan struct{})
		go func() { io.Copy(io.Discard, stdin); close(done) }()
		select {
		case <-done:
		case <-ctx.Done():
			return 1
		}
		x.Retx = ep.Stats().Retransmissions
	case "invoke":
		ap, err := netip.ParseAddrPort(*to)
		if err != nil {
			fmt.Fprintln(stderr, "netem child:", err)
			return 2
		}
		x, err = invokeAll(ctx, *n, ap, cfg, func(int) (net.PacketConn, error) {
			return net.ListenPacket("udp", net.JoinHostPort(*from, "0"))
		})
		if err != nil {
			fmt.Fprintln(stderr, "netem child:", err)
			return 1
		}
	default:
		fmt.Fprintf(stderr, "netem child: unknown role %q\n", *role)
		return 2
	}
	b, _ := json.Marshal(x)
	fmt.Fprintf(stdout, "%s\n", b)
	return 0
}
