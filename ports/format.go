package ports

import (
	"bufio"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// WriteText writes the report for people: per port and protocol the
// registrations, the sockets with their processes, and a verdict; then the
// verdicts again together and what could not be known.
func (r *LocalReport) WriteText(w io.Writer) error {
	bw := bufio.NewWriter(w)
	for _, lp := range r.Ports {
		fmt.Fprintf(bw, "%d/%s\n", lp.Port, lp.Proto)
		for i, reg := range lp.Registered {
			label := ""
			if i == 0 {
				label = "registered"
			}
			fmt.Fprintf(bw, "  %-11s %-14s %-14s %s\n", label, reg.Name, reg.Source, reg.Description)
		}
		if len(lp.Registered) == 0 {
			fmt.Fprintf(bw, "  %-11s %s\n", "registered", "(no registration known)")
		}
		if len(lp.Sockets) == 0 {
			fmt.Fprintf(bw, "  %-11s %s\n", "sockets", "none")
		}
		for i, s := range lp.Sockets {
			label := ""
			if i == 0 {
				label = "sockets"
			}
			who := "uid " + strconv.Itoa(s.UID)
			if s.User != "" {
				who += " (" + s.User + ")"
			}
			if s.UID < 0 {
				who = ""
			}
			addr := s.Local
			if s.Remote != "" {
				addr += " <-> " + s.Remote
			}
			fmt.Fprintf(bw, "  %-11s %-5s %s  %s  %s\n", label, s.Family, addr, s.State, who)
			for _, p := range s.Processes {
				fmt.Fprintf(bw, "  %-11s       pid %d  %s", "", p.PID, orDash(p.Exe))
				if len(p.Cmdline) > 0 {
					fmt.Fprintf(bw, "  %s", quoteArgs(p.Cmdline))
				}
				if p.Err != "" {
					fmt.Fprintf(bw, "  (%s)", p.Err)
				}
				bw.WriteString("\n")
			}
			if s.Owner != "" {
				fmt.Fprintf(bw, "  %-11s       owner %s\n", "", s.Owner)
			}
		}
		fmt.Fprintf(bw, "  %-11s %s\n\n", "verdict", lp.Verdict)
	}
	bw.WriteString("verdicts:\n")
	for _, lp := range r.Ports {
		fmt.Fprintf(bw, "  %s\n", lp.Verdict)
	}
	for _, l := range r.Limitations {
		fmt.Fprintf(bw, "note: %s\n", l)
	}
	return bw.Flush()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// quoteArgs shows a command line so that arguments with spaces or control
// characters stay recognisable.
func quoteArgs(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		if a == "" || strings.ContainsFunc(a, func(r rune) bool { return r <= ' ' || r == '"' || r == '\'' || r > '~' }) {
			a = strconv.Quote(a)
		}
		q[i] = a
	}
	return strings.Join(q, " ")
}

// WriteText writes the probe report for people: per port the state and
// identification, every step with the octets sent and received (hex), and
// the evidence.
func (r *ProbeReport) WriteText(w io.Writer) error {
	bw := bufio.NewWriter(w)
	host := r.Host
	if r.Addr != r.Host {
		host += " (" + r.Addr + ")"
	}
	fmt.Fprintf(bw, "probe of %s\n\n", host)
	for _, res := range r.Results {
		fmt.Fprintf(bw, "%d/%s  %s  %s\n", res.Port, res.Proto, res.State, identText(res))
		for _, st := range res.Steps {
			fmt.Fprintf(bw, "  %s: %s\n", st.Name, st.Outcome)
			for _, p := range st.Sent {
				writePacket(bw, "sent", p)
			}
			for _, p := range st.Received {
				dir := "got"
				if !p.Matched {
					dir = "got (ignored)"
				}
				writePacket(bw, dir, p)
			}
		}
		if res.Evidence != "" {
			fmt.Fprintf(bw, "  evidence: %s\n", res.Evidence)
		}
		for _, n := range res.Notes {
			fmt.Fprintf(bw, "  note: %s\n", n)
		}
		bw.WriteString("\n")
	}
	bw.WriteString("verdicts:\n")
	for _, res := range r.Results {
		fmt.Fprintf(bw, "  %d/%s: %s, %s\n", res.Port, res.Proto, res.State, identText(res))
	}
	return bw.Flush()
}

func writePacket(w io.Writer, dir string, p Packet) {
	h := p.Data.String()
	if len(p.Data) > 48 {
		h = Hex(p.Data[:48]).String() + fmt.Sprintf(" … (%d octets)", len(p.Data))
	}
	fmt.Fprintf(w, "    %-13s %s\n", dir, h)
	if p.Decoded != "" {
		fmt.Fprintf(w, "    %-13s = %s\n", "", p.Decoded)
	}
}

func identText(res PortResult) string {
	switch {
	case res.Identification != "":
		return res.Identification
	case res.State == StateClosed:
		return "nothing listening"
	case res.State == StateOpenFiltered:
		return "no answer to any probe"
	case res.State == StateFiltered:
		return "no answer to the connection attempt"
	}
	return "not identified"
}
