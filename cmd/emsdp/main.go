// Command emsdp is the single entry point of esro-emsdp: the EMSD server, the
// device user agent, the ESRO tools and the port checker, as subcommands.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/esro-emsdp/emsdp/internal/buildinfo"
)

// Exit codes shared by every subcommand.
const (
	exitOK      = 0
	exitFailed  = 1 // runtime failure
	exitUsage   = 2 // bad flags or arguments
	exitError   = 3 // the peer answered with an ERROR (ESRO or EMSD)
	exitFailure = 4 // ESRO FAILURE (transmission, resources, no answer)
)

// cmdEnv is what a subcommand may touch of the process: its streams and
// environment and sockets. Tests build one over buffers.
type cmdEnv struct {
	stdin          io.Reader
	stdout, stderr io.Writer
	getenv         func(string) string
	store          string // the store a command opened, named in its errors
	// listenPacket opens the datagram sockets of the ESRO clients (esro
	// invoke, ua). Nil: net.ListenPacket; tests give an in-memory network.
	listenPacket func(network, address string) (net.PacketConn, error)
}

type command struct {
	name    string
	summary string
	run     func(ctx context.Context, env *cmdEnv, args []string) int
}

func commands() []command {
	return []command{
		{"esro", "ESRO tools: perform (answer invocations) and invoke", cmdESRO},
		{"ports", "what is listening on 641 (and 642, 259, 2002), locally and remotely", cmdPorts},
		{"ua", "device user agent: send, receive (into a Maildir) and verify mail", cmdUA},
		{"serve", "the EMSD server: devices over ESRO/UDP, Internet mail over SMTP", cmdServe},
		{"device", "the server's device registry: add, list, show, remove, passwd, psk (DTLS keys), import, export", cmdDevice},
		{"queue", "the server's delivery and relay queues: list, show, retry, remove", cmdQueue},
		{"decode", "decode ESRO and EMSD in a pcap/pcapng capture or one datagram", cmdDecode},
		{"version", "which build this is: version, VCS revision and date, Go version", cmdVersion},
	}
}

func main() {
	ctx, stop := signalContext()
	env := &cmdEnv{stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr, getenv: os.Getenv}
	code := run(ctx, env, os.Args[1:])
	stop()
	os.Exit(code)
}

// signalContext is canceled by the first SIGINT or SIGTERM: the command
// then finishes what is in flight (serve drains for up to
// delivery.drain_timeout). A second one ends the process at once, as a
// user pressing Ctrl-C again expects; what serve accepted is on disk, and
// what it was attempting is attempted again after a restart.
func signalContext() (context.Context, context.CancelFunc) {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		<-ctx.Done()
		stop() // the signals' default action again: termination
	}()
	return ctx, stop
}

func run(ctx context.Context, env *cmdEnv, args []string) int {
	if len(args) == 0 {
		usage(env.stderr)
		return exitUsage
	}
	if args[0] == "-h" || args[0] == "-help" || args[0] == "--help" || args[0] == "help" {
		usage(env.stdout)
		return exitOK
	}
	if args[0] == "--version" || args[0] == "-version" {
		fmt.Fprintln(env.stdout, buildinfo.Read().Short())
		return exitOK
	}
	for _, c := range commands() {
		if c.name == args[0] {
			return c.run(ctx, env, args[1:])
		}
	}
	fmt.Fprintf(env.stderr, "emsdp: unknown command %q\n", args[0])
	usage(env.stderr)
	return exitUsage
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: emsdp <command> [flags]\n\ncommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-8s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nRun 'emsdp <command> -h' for a command's flags, 'emsdp --version' for the build.")
}

// subcommand is one verb of a command group ("emsdp device add").
type subcommand struct {
	name string
	run  func(context.Context, *cmdEnv, []string) int
}

// dispatch runs the verb args[0] names among subs, or prints the group's
// usage and returns exitUsage.
func dispatch(ctx context.Context, env *cmdEnv, group string, args []string, subs ...subcommand) int {
	names := make([]string, len(subs))
	for i, s := range subs {
		if len(args) > 0 && args[0] == s.name {
			return s.run(ctx, env, args[1:])
		}
		names[i] = s.name
	}
	// Asked for help: the usage on stdout, success.
	w, code := env.stderr, exitUsage
	if len(args) > 0 && (args[0] == "-h" || args[0] == "-help" || args[0] == "--help" || args[0] == "help") {
		w, code = env.stdout, exitOK
	}
	fmt.Fprintf(w, "usage: emsdp %s %s [flags]   (emsdp %s %s -h for flags)\n",
		group, strings.Join(names, "|"), group, names[0])
	return code
}

func cmdVersion(_ context.Context, env *cmdEnv, args []string) int {
	fs := flag.NewFlagSet("emsdp version", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "as a JSON object")
	if _, done, code := parseFlags(fs, env, args, 0); done {
		return code
	}
	i := buildinfo.Read()
	if *asJSON {
		b, err := json.Marshal(i)
		if err != nil {
			return fail(env, err)
		}
		fmt.Fprintf(env.stdout, "%s\n", b)
		return exitOK
	}
	fmt.Fprint(env.stdout, i.Long())
	return exitOK
}
