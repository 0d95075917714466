package ports

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// Sources of a Registration: who says the port means this.
const (
	SourceIANA      = "IANA"          // the IANA service name registry
	SourceCommon    = "common use"    // widely deployed without (or against) the registry
	SourceProject   = "this project"  // esro-emsdp's own default
	SourceReference = "C reference"   // the Neda ESRO/EMSD reference implementation
	SourceServices  = "/etc/services" // the local services database
)

// Registration is one claim on a port.
type Registration struct {
	Port        int    `json:"port"`
	Proto       string `json:"proto"` // "tcp" or "udp"
	Name        string `json:"name"`
	Description string `json:"description,omitempty"`
	Source      string `json:"source"`
}

func (r Registration) String() string {
	s := r.Name + " (" + r.Source
	if r.Description != "" {
		s += ": " + r.Description
	}
	return s + ")"
}

// builtin is the table shipped with the tool. IANA entries were checked against
// copies of the registry (641 repcmd, 642 esro-emsdp "ESRO-EMSDP V1.3", 259
// esro-gen, 2002 globe); common-use entries follow nmap-services and vendor
// documentation and are marked as such.
func builtin() []Registration {
	both := func(port int, name, desc, src string) []Registration {
		return []Registration{
			{port, "tcp", name, desc, src},
			{port, "udp", name, desc, src},
		}
	}
	var t []Registration
	t = append(t, both(641, "repcmd", "SupportSoft Nexus Remote Command (control/listening), first registered by Replicase", SourceIANA)...)
	t = append(t, Registration{641, "udp", "esro-emsdp", "EMSD over ESRO, this project's default port (docs/protocol.md ESRO §7)", SourceProject})
	t = append(t, both(641, "print server", "some network print servers listen on 641", SourceCommon)...)
	t = append(t, both(642, "esro-emsdp", "ESRO-EMSDP V1.3 (RFC 2524 over RFC 2188)", SourceIANA)...)
	t = append(t, both(259, "esro-gen", "Efficient Short Remote Operations (RFC 2188)", SourceIANA)...)
	t = append(t, Registration{259, "udp", "firewall1-rdp", "Check Point FireWall-1 RDP (nmap-services)", SourceCommon})
	t = append(t, both(2002, "globe", "Globe", SourceIANA)...)
	t = append(t, Registration{2002, "udp", "esros", "ESRO engine default port of the C reference (ESROS, EMSD MTS and UA)", SourceReference})
	t = append(t, Registration{2002, "udp", "roughtime", "Roughtime time servers", SourceCommon})
	t = append(t, both(111, "sunrpc", "ONC-RPC portmapper/rpcbind", SourceIANA)...)
	t = append(t, Registration{515, "tcp", "printer", "LPD line printer spooler", SourceIANA})
	t = append(t, Registration{631, "tcp", "ipp", "Internet Printing Protocol (CUPS)", SourceIANA})
	t = append(t, Registration{9100, "tcp", "jetdirect", "raw printing (HP JetDirect, AppSocket): prints what it receives", SourceCommon})
	return t
}

// netinfoRange is where Mac OS X NetInfo (netinfod, nibindd) picked its
// ports: reserved ports below 1024 chosen at start-up, registered only with
// the local portmapper.
func netinfoRange(port int) []Registration {
	if port < 600 || port > 1023 {
		return nil
	}
	desc := "Mac OS X NetInfo (netinfod/nibindd, ONC-RPC) picked ports in 600-1023 at start-up"
	return []Registration{
		{port, "tcp", "netinfo", desc, SourceCommon},
		{port, "udp", "netinfo", desc, SourceCommon},
	}
}

// Registered returns what the built-in table says about port (both protocols),
// IANA first.
func Registered(port int) []Registration {
	var out []Registration
	for _, r := range builtin() {
		if r.Port == port {
			out = append(out, r)
		}
	}
	return append(out, netinfoRange(port)...)
}

// lookupRegistrations combines the built-in table with a services database
// (may be nil), keeping the database's names that the table lacks.
func lookupRegistrations(port int, proto string, services []Registration) []Registration {
	var out []Registration
	for _, r := range Registered(port) {
		if r.Proto == proto {
			out = append(out, r)
		}
	}
	for _, s := range services {
		if s.Port != port || s.Proto != proto {
			continue
		}
		dup := false
		for _, r := range out {
			dup = dup || r.Name == s.Name
		}
		if !dup {
			out = append(out, s)
		}
	}
	return out
}

// readServices parses a services file; a missing file is not an error.
func readServices(path string) ([]Registration, error) {
	if path == "" {
		return nil, nil
	}
	f, err := os.Open(path)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("ports: services database: %w", err)
	}
	defer f.Close()
	return parseServices(f)
}

// parseServices reads the services(5) format: "name port/proto [aliases] [#
// comment]". Malformed lines are skipped, as libc does.
func parseServices(r io.Reader) ([]Registration, error) {
	var out []Registration
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for sc.Scan() {
		line, comment, _ := strings.Cut(sc.Text(), "#")
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		ps, proto, ok := strings.Cut(f[1], "/")
		if !ok || (proto != "tcp" && proto != "udp") {
			continue
		}
		port, err := strconv.Atoi(ps)
		if err != nil || port <= 0 || port > 65535 {
			continue
		}
		out = append(out, Registration{Port: port, Proto: proto, Name: f[0], Description: strings.TrimSpace(comment), Source: SourceServices})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("ports: services database: %w", err)
	}
	return out, nil
}
