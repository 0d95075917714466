package ports

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ProbeOptions tune Probe. The zero value probes DefaultPorts on UDP and TCP,
// passively on TCP, waiting 2 s per reply.
type ProbeOptions struct {
	Ports    []int         // default DefaultPorts()
	UDP, TCP bool          // neither set means both
	Timeout  time.Duration // wait for each reply or connection; default 2s
	// Attempts is how many times a UDP probe is sent when no answer comes
	// (datagrams get lost); default 2.
	Attempts int
	// Aggressive allows active TCP payloads (an ONC-RPC NULL call and an HTTP
	// HEAD) after the passive banner read. They are never sent where a raw
	// print service could be listening, because such a service prints
	// whatever arrives and never speaks first:
	//   1. never to a print port (TCP 9100-9107, which nmap also excludes,
	//      515 LPD, 631 IPP, 35, 92, 170);
	//   2. never after a banner that looks like a printer (PJL, JetDirect,
	//      LPD, IPP, CUPS, "printer");
	//   3. to a port that stayed silent only if the host shows no print
	//      service: a connect-only check (nothing is sent) of PrintPorts
	//      finds none accepting. Print servers listen on 641 too, and a
	//      silent 641 on a host with a print service is left alone.
	Aggressive bool
	// PrintPorts are the TCP ports whose accepting a connection marks a host
	// as having a print service (rule 3 above); default 9100, 515, 631.
	PrintPorts []int
}

func (o *ProbeOptions) withDefaults() ProbeOptions {
	var c ProbeOptions
	if o != nil {
		c = *o
	}
	if len(c.Ports) == 0 {
		c.Ports = DefaultPorts()
	}
	if !c.UDP && !c.TCP {
		c.UDP, c.TCP = true, true
	}
	if c.Timeout <= 0 {
		c.Timeout = 2 * time.Second
	}
	if c.Attempts <= 0 {
		c.Attempts = 2
	}
	if len(c.PrintPorts) == 0 {
		c.PrintPorts = []int{9100, 515, 631}
	}
	return c
}

// ProbeReport is the outcome of Probe.
type ProbeReport struct {
	Host    string       `json:"host"`
	Addr    string       `json:"addr"`
	Results []PortResult `json:"results"`
}

// Port states, as nmap names them.
const (
	StateOpen         = "open"
	StateClosed       = "closed"
	StateOpenFiltered = "open|filtered" // UDP silence: open and mute, or dropped
	StateFiltered     = "filtered"      // TCP connect timed out
	StateError        = "error"
)

// Services Probe can identify (PortResult.Service).
const (
	ServiceEMSDServer = "emsd-mts"   // EMSD message transfer system (server)
	ServiceEMSDDevice = "emsd-ua"    // EMSD user agent (device)
	ServiceESRO       = "esro"       // an ESRO engine, EMSD not recognised
	ServiceONCRPC     = "oncrpc"     // an ONC-RPC server
	ServiceEcho       = "echo"       // sends back what it gets
	ServiceBanner     = "banner"     // a TCP service that spoke first
	ServicePrinter    = "printer"    // a banner that looks like a print service
	ServiceHTTP       = "http"       // answered an HTTP HEAD
	ServiceUnknown    = "unknown"    // answered, but nothing we recognise
	ServiceWrapped    = "tcpwrapped" // accepted, then closed without a word
)

// PortResult is what one port and protocol answered.
type PortResult struct {
	Port  int    `json:"port"`
	Proto string `json:"proto"`
	State string `json:"state"`
	// Service is one of the Service* keys, or "" when nothing was identified.
	Service string `json:"service,omitempty"`
	// Identification is the human verdict; Evidence is why.
	Identification string   `json:"identification,omitempty"`
	Evidence       string   `json:"evidence,omitempty"`
	Steps          []Step   `json:"steps"`
	Notes          []string `json:"notes,omitempty"`
}

// Step is one rung of the ladder: what was sent and what came back.
type Step struct {
	Name     string   `json:"name"`
	Sent     []Packet `json:"sent,omitempty"`
	Received []Packet `json:"received,omitempty"`
	Outcome  string   `json:"outcome"`
}

// Packet is one datagram or one TCP read/write.
type Packet struct {
	Data Hex `json:"hex"`
	// Decoded is the packet read as ESRO, ONC-RPC or text, when it parses.
	Decoded string `json:"decoded,omitempty"`
	// Matched is false for a received packet that was not the answer to
	// this step (wrong reference number, transaction id, …).
	Matched bool `json:"matched"`
}

// Hex is bytes that print and marshal as hexadecimal.
type Hex []byte

// MarshalText gives plain hex digits ("04a702") for JSON.
func (h Hex) MarshalText() ([]byte, error) { return []byte(hex.EncodeToString(h)), nil }

// UnmarshalText reads what MarshalText wrote.
func (h *Hex) UnmarshalText(b []byte) error {
	d, err := hex.DecodeString(string(b))
	*h = d
	return err
}

// String gives spaced octets ("04 a7 02").
func (h Hex) String() string {
	var sb strings.Builder
	for i, c := range h {
		if i > 0 {
			sb.WriteByte(' ')
		}
		fmt.Fprintf(&sb, "%02x", c)
	}
	return sb.String()
}

// Probe runs the probe ladder against host on every requested port. Ports
// are probed concurrently; each port's ladder is sequential. An error is
// returned only when nothing could be probed (bad options, unresolvable
// host, cancelled context); per-port trouble is in the results.
func Probe(ctx context.Context, host string, opts *ProbeOptions) (*ProbeReport, error) {
	o := opts.withDefaults()
	if err := checkPorts(o.Ports); err != nil {
		return nil, err
	}
	addr, err := resolve(ctx, host)
	if err != nil {
		return nil, err
	}
	rep := &ProbeReport{Host: host, Addr: addr.String()}
	p := &prober{addr: addr, o: o}
	type job struct {
		port  int
		proto string
	}
	var jobs []job
	for _, port := range o.Ports {
		if o.UDP {
			jobs = append(jobs, job{port, "udp"})
		}
		if o.TCP {
			jobs = append(jobs, job{port, "tcp"})
		}
	}
	rep.Results = make([]PortResult, len(jobs))
	var wg sync.WaitGroup
	for i, j := range jobs {
		wg.Go(func() {
			if j.proto == "udp" {
				rep.Results[i] = p.udp(ctx, j.port)
			} else {
				rep.Results[i] = p.tcp(ctx, j.port)
			}
		})
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return rep, fmt.Errorf("ports: probe of %s: %w", host, err)
	}
	return rep, nil
}

func resolve(ctx context.Context, host string) (netip.Addr, error) {
	if a, err := netip.ParseAddr(host); err == nil {
		return a.Unmap(), nil
	}
	addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("ports: resolving %s: %w", host, err)
	}
	for _, a := range addrs {
		if a.Unmap().Is4() {
			return a.Unmap(), nil
		}
	}
	if len(addrs) == 0 {
		return netip.Addr{}, fmt.Errorf("ports: %s has no address", host)
	}
	return addrs[0], nil
}

// prober is one Probe call's shared state.
type prober struct {
	addr netip.Addr
	o    ProbeOptions

	printOnce sync.Once
	printSeen []int // PrintPorts that accepted a connection
}

// deadlineOnCancel makes blocking I/O on c return when ctx ends; call the
// returned stop when done.
func deadlineOnCancel(ctx context.Context, c net.Conn) (stop func() bool) {
	return context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
}

// isRefused reports an ICMP port unreachable (UDP) or a RST (TCP).
func isRefused(err error) bool { return errors.Is(err, syscall.ECONNREFUSED) }
