package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/esro-emsdp/emsdp/decode"
)

// defaultDecodePorts are the ports decode selects without --port: the
// project's EMSD port, IANA's esro-emsdp and esro-gen, and the reference's.
var defaultDecodePorts = []int{641, 642, 259, 2002}

func cmdDecode(ctx context.Context, env *cmdEnv, args []string) int {
	fs := flag.NewFlagSet("emsdp decode", flag.ContinueOnError)
	var ports portList
	fs.Var(&ports, "port", "UDP port carrying ESRO (repeatable, or 641,642); default 641, 642, 259, 2002")
	hexArg := fs.String("hex", "", "decode one datagram given in hexadecimal (blanks and colons allowed)")
	asJSON := fs.Bool("json", false, "one JSON object per datagram")
	noHeur := fs.Bool("no-heuristic", false, "only the selected ports: no guessing on other ports")
	fs.Usage = func() {
		fmt.Fprintln(env.stderr, "usage: emsdp decode [flags] CAPTURE.pcap|CAPTURE.pcapng|-\n       emsdp decode [flags] --hex HEX\n\n"+
			"Decodes ESRO and EMSD in a capture (tcpdump -w, tshark -w, Wireshark) or one datagram.")
		fs.PrintDefaults()
	}
	// Flags may follow the file name, as with most capture tools.
	files, done, code := parseFlags(fs, env, args, -1)
	if done {
		return code
	}
	out := &recordWriter{w: env.stdout, json: *asJSON}
	if *hexArg != "" {
		if len(files) > 0 {
			fmt.Fprintln(env.stderr, "emsdp decode: --hex and a capture file are exclusive")
			return exitUsage
		}
		b, err := parseHex(*hexArg)
		if err != nil {
			return fail(env, usagef("--hex: %v", err))
		}
		d := decode.New()
		if err := out.write(d.Datagram(time.Time{}, netip.AddrPort{}, netip.AddrPort{}, b)); err != nil {
			return fail(env, err)
		}
		return exitOK
	}
	if len(files) != 1 {
		fs.Usage()
		return exitUsage
	}
	sel := make(map[uint16]bool)
	for _, p := range ports.or(defaultDecodePorts) {
		sel[uint16(p)] = true // portList checked the range
	}
	var in io.Reader = env.stdin
	if files[0] != "-" {
		f, err := os.Open(files[0])
		if err != nil {
			return fail(env, err)
		}
		defer f.Close()
		in = f
	}
	d := decode.New()
	n := 0
	err := decode.ReadCapture(in, func(p *decode.Packet) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		if !sel[p.Src.Port()] && !sel[p.Dst.Port()] && (*noHeur || !d.Plausible(p.Src, p.Dst, p.Payload)) {
			return nil
		}
		r := d.Datagram(p.Time, p.Src, p.Dst, p.Payload)
		if p.Truncated {
			r.Marks = append(r.Marks, "truncated by the capture")
		}
		n++
		return out.write(r)
	})
	if err != nil {
		return fail(env, fmt.Errorf("%s: %w", files[0], err))
	}
	if n == 0 && !*asJSON {
		fmt.Fprintln(env.stderr, "emsdp decode: no ESRO datagrams on the selected ports (try --port)")
	}
	return exitOK
}

type recordWriter struct {
	w    io.Writer
	json bool
}

func (o *recordWriter) write(r *decode.Record) error {
	if o.json {
		b, err := json.Marshal(r)
		if err != nil {
			return err
		}
		_, err = o.w.Write(append(b, '\n'))
		return err
	}
	return r.Write(o.w)
}

// parseHex accepts "d0 05 02", "d0:05:02" and "d00502".
func parseHex(s string) ([]byte, error) {
	s = strings.Map(func(r rune) rune {
		switch r {
		case ' ', '\t', '\n', '\r', ':', '-':
			return -1
		}
		return r
	}, strings.TrimPrefix(strings.TrimPrefix(s, "0x"), "0X"))
	return hex.DecodeString(s)
}
