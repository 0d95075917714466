package ports

import (
	"fmt"
	"strings"
)

// Fixed reference numbers for the nmap probes: nmap sends constant payloads,
// so the evidence is the echo of these numbers rather than of random ones.
const (
	nmapRefESRO = 0x4e
	nmapRefEMSD = 0x4f
)

// NmapProbe returns nmap-service-probes entries for ESRO and EMSD, to append
// to (a copy of) nmap's probe file. Both are UDP, binary and
// harmless: an INVOKE to SAP 0, which no engine can bind, and EMSD's
// get-configuration on the server's 2-way SAP 9, which a server refuses with
// ERROR 7 and does not retransmit. The first probe only soft-matches, so
// that nmap goes on to the second, which tells EMSD from plain ESRO. Service
// names are nmap-services' own (esro-gen, esro-emsdp).
func NmapProbe() string {
	var b strings.Builder
	b.WriteString("# ESRO (RFC 2188) and EMSD (RFC 2524) probes from `emsdp ports nmap-probe`.\n")
	b.WriteString("# Append to a copy of nmap-service-probes (e.g. my.probes), then run\n")
	b.WriteString("#   nmap -sU -sV --versiondb my.probes -p U:259,641,642,2002 HOST\n\n")
	b.WriteString("##############################NEXT PROBE##############################\n")
	b.WriteString("# INVOKE to SAP 0 (never bindable), op 63, no argument: every ESRO engine\n")
	b.WriteString("# answers FAILURE(ref, 2) echoing the reference number 0x4e.\n")
	fmt.Fprintf(&b, "Probe UDP ESRO-SAP0 q|%s|\n", nmapEscape([]byte{probeSAP << 4, nmapRefESRO, probeOp}))
	b.WriteString("rarity 8\nports 259,641,642,2002\n")
	fmt.Fprintf(&b, "softmatch esro-gen m|^\\x04\\x%02x[\\x00-\\x03]$|\n", nmapRefESRO)
	fmt.Fprintf(&b, "softmatch esro-gen m|^[\\x01\\x41\\x81\\xc1\\x02\\x42\\x82\\xc2]\\x%02x|\n\n", nmapRefESRO)
	b.WriteString("##############################NEXT PROBE##############################\n")
	b.WriteString("# INVOKE to SAP 9 (EMSD server, 2-way), op 7 get-configuration, argument 30 00:\n")
	b.WriteString("# an EMSD server answers ERROR 7; a plain ESRO engine FAILURE.\n")
	fmt.Fprintf(&b, "Probe UDP EMSD-getconf q|%s|\n", nmapEscape(append([]byte{mtsSAP << 4, nmapRefEMSD, mtsOp}, emptySeq()...)))
	b.WriteString("rarity 8\nports 259,641,642,2002\n")
	fmt.Fprintf(&b, "match esro-emsdp m|^\\x02\\x%02x\\x07| p/EMSD message transfer system/ i/ERROR 7 for get-configuration on SAP 9/\n", nmapRefEMSD)
	fmt.Fprintf(&b, "match esro-gen m|^\\x04\\x%02x[\\x00-\\x03]$| p/ESRO engine/ i/no EMSD server at SAP 9/\n", nmapRefEMSD)
	return b.String()
}

func nmapEscape(p []byte) string {
	var b strings.Builder
	for _, c := range p {
		fmt.Fprintf(&b, "\\x%02x", c)
	}
	return b.String()
}
