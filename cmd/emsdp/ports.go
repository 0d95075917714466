package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/esro-emsdp/emsdp/ports"
)

// cmdPorts: "emsdp ports" (local listing), "emsdp ports probe HOST" and
// "emsdp ports nmap-probe". The logic is in package ports.
func cmdPorts(ctx context.Context, env *cmdEnv, args []string) int {
	if len(args) > 0 {
		switch args[0] {
		case "probe":
			return portsProbe(ctx, env, args[1:])
		case "nmap-probe":
			return portsNmap(env, args[1:])
		}
	}
	return portsLocal(ctx, env, args)
}

func portsLocal(ctx context.Context, env *cmdEnv, args []string) int {
	fs := flag.NewFlagSet("emsdp ports", flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	var list portList
	fs.Var(&list, "port", "port to look at (repeatable or comma-separated; default 641,642,259,2002)")
	asJSON := fs.Bool("json", false, "print JSON")
	fs.Usage = func() {
		fmt.Fprintln(env.stderr, "usage: emsdp ports [--port N ...] [--json]\n"+
			"       emsdp ports probe HOST [--port N ...] [--udp] [--tcp] [--timeout D] [--aggressive] [--json]\n"+
			"       emsdp ports nmap-probe\n\n"+
			"Without a subcommand: every local TCP and UDP socket on the ports, with\n"+
			"process, executable and command line, registered names and a verdict.\n\nflags:")
		fs.PrintDefaults()
	}
	if _, done, code := parseFlags(fs, env, args, 0); done {
		return code
	}
	rep, err := ports.Local(ctx, list.or(ports.DefaultPorts()))
	if err != nil {
		fmt.Fprintf(env.stderr, "emsdp ports: %v\n", err)
		return exitFailed
	}
	return output(env, "ports", rep, *asJSON, rep.WriteText)
}

func portsProbe(ctx context.Context, env *cmdEnv, args []string) int {
	fs := flag.NewFlagSet("emsdp ports probe", flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	var list portList
	fs.Var(&list, "port", "port to probe (repeatable or comma-separated; default 641,642,259,2002)")
	udp := fs.Bool("udp", false, "probe UDP (default: both UDP and TCP)")
	tcp := fs.Bool("tcp", false, "probe TCP (default: both UDP and TCP)")
	timeout := fs.Duration("timeout", 2*time.Second, "wait for each reply or connection")
	attempts := fs.Int("attempts", 2, "sends of each UDP probe before giving up on it")
	aggressive := fs.Bool("aggressive", false, "after the passive banner read, send an ONC-RPC NULL call and an HTTP HEAD over TCP\n"+
		"(never to print ports, printer banners, or silent ports of hosts with a print service)")
	asJSON := fs.Bool("json", false, "print JSON")
	fs.Usage = func() {
		fmt.Fprintln(env.stderr, "usage: emsdp ports probe HOST [--port N ...] [--udp] [--tcp] [--timeout D] [--aggressive] [--json]\n\n"+
			"Probes least intrusive first: on UDP an ESRO INVOKE to SAP 0, then an EMSD\n"+
			"check for ESRO speakers or ONC-RPC NULL calls for the rest; on TCP a connect\n"+
			"and a passive banner read. Everything sent and received is shown in hex.\n\nflags:")
		fs.PrintDefaults()
	}
	pos, done, code := parseFlags(fs, env, args, -1)
	if done {
		return code
	}
	if len(pos) != 1 {
		fmt.Fprintf(env.stderr, "%s: want 1 argument, got %q\n", fs.Name(), pos)
		fs.Usage()
		return exitUsage
	}
	if *timeout <= 0 || *attempts <= 0 {
		fmt.Fprintln(env.stderr, "emsdp ports probe: --timeout and --attempts must be positive")
		return exitUsage
	}
	rep, err := ports.Probe(ctx, pos[0], &ports.ProbeOptions{
		Ports: list.or(ports.DefaultPorts()), UDP: *udp, TCP: *tcp,
		Timeout: *timeout, Attempts: *attempts, Aggressive: *aggressive,
	})
	if err != nil && rep == nil {
		fmt.Fprintf(env.stderr, "emsdp ports probe: %v\n", err)
		return exitFailed
	}
	if code := output(env, "ports probe", rep, *asJSON, rep.WriteText); code != exitOK {
		return code
	}
	if err != nil { // interrupted: the partial report was printed
		fmt.Fprintf(env.stderr, "emsdp ports probe: %v\n", err)
		return exitFailed
	}
	return exitOK
}

func portsNmap(env *cmdEnv, args []string) int {
	fs := flag.NewFlagSet("emsdp ports nmap-probe", flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	merge := fs.String("merge", "", "nmap's own probe file (/usr/share/nmap/nmap-service-probes): print it with ours placed first")
	fs.Usage = func() {
		fmt.Fprintln(env.stderr, "usage: emsdp ports nmap-probe [--merge /usr/share/nmap/nmap-service-probes]\n\n"+
			"Prints nmap-service-probes entries (probe and match lines) for ESRO and EMSD.")
		fs.PrintDefaults()
	}
	if _, done, code := parseFlags(fs, env, args, 0); done {
		return code
	}
	out := []byte(ports.NmapProbe())
	if *merge != "" {
		own, err := os.ReadFile(*merge)
		if err != nil {
			fmt.Fprintln(env.stderr, "emsdp ports nmap-probe:", err)
			return exitFailed
		}
		out = ports.MergeNmapProbes(own)
	}
	if _, err := env.stdout.Write(out); err != nil {
		return exitFailed
	}
	return exitOK
}

func output(env *cmdEnv, name string, v any, asJSON bool, text func(io.Writer) error) int {
	var err error
	if asJSON {
		enc := json.NewEncoder(env.stdout)
		enc.SetIndent("", "  ")
		err = enc.Encode(v)
	} else {
		err = text(env.stdout)
	}
	if err != nil {
		fmt.Fprintf(env.stderr, "emsdp %s: %v\n", name, err)
		return exitFailed
	}
	return exitOK
}

// portList is a repeatable --port flag that also takes "641,642".
type portList []int

func (l *portList) String() string {
	s := make([]string, len(*l))
	for i, p := range *l {
		s[i] = strconv.Itoa(p)
	}
	return strings.Join(s, ",")
}

func (l *portList) Set(v string) error {
	for f := range strings.SplitSeq(v, ",") {
		p, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || p < 1 || p > 65535 {
			return fmt.Errorf("bad port %q (want 1..65535)", f)
		}
		*l = append(*l, p)
	}
	return nil
}

func (l portList) or(def []int) []int {
	if len(l) == 0 {
		return def
	}
	return l
}
