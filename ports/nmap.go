package ports

import (
	"fmt"
	"strings"
)

// Fixed reference numbers for the nmap probes: nmap sends constant payloads,
// so the evidence is the echo of these numbers rather than of random ones.
const (
	nmapRefESRO   = 0x4e
	nmapRefEMSD   = 0x4f
	nmapRefDevice = 0x50
)

// nmapRarity lets nmap send the probes to every UDP port at its default
// version intensity (7): "nmap -sU -sV" then names ESRO on any port, not
// only on the four listed ones.
const nmapRarity = 7

// devicePadArg is the device probe's argument: a SEQUENCE holding two zero
// octets, so that the 9-octet INVOKE outweighs the 6-octet ERROR it draws.
var devicePadArg = []byte{0x30, 0x04, 0x04, 0x02, 0x00, 0x00}

// NmapProbe returns nmap-service-probes entries for ESRO and EMSD, to append
// to (a copy of) nmap's probe file. They are the ladder of Probe: an INVOKE
// to SAP 0 (any ESRO engine answers FAILURE: a softmatch, so nmap goes on),
// get-configuration to the server's SAP 9 (an EMSD server answers ERROR
// 7), then submission control to the device's SAP 7 (an EMSD device
// answers ERROR 7; a bare engine FAILURE again).
//
// They are safe to send to any UDP port, which is why their rarity lets
// nmap do so at its default intensity:
//   - they are tiny (3, 5 and 9 octets) and every reply is shorter than
//     the probe that drew it, so nothing is amplified;
//   - to an ESRO engine each is a 2-way operation that no EMSD
//     implementation performs (SAP 0 cannot be bound; get-configuration
//     and submission control are answered ERROR 7 by the reference and by
//     this project): nothing is stored, queued, delivered or
//     retransmitted, and the engine forgets the invocation after its
//     inactivity timer;
//   - to anything else they are malformed at once: too short for a DNS,
//     NTP or NetBIOS header, not a BER message (SNMP, LDAP, Kerberos start
//     0x30), not a TFTP opcode (0x004e, 0x904f and 0x7050 are none), not
//     text (SIP, syslog see a few non-printable octets, as with nmap's own
//     binary probes), and not a print job: UDP has no raw print service.
func NmapProbe() string {
	var b strings.Builder
	b.WriteString("# ESRO (RFC 2188) and EMSD (RFC 2524) probes from `emsdp ports nmap-probe`.\n")
	b.WriteString("# Append to a copy of nmap-service-probes (e.g. my.probes), then run\n")
	b.WriteString("#   nmap -sU -sV --versiondb my.probes HOST\n")
	b.WriteString("# They are sent to every UDP port at nmap's default intensity (rarity 7)\n")
	b.WriteString("# and are harmless to any service: a few octets that no ESRO user performs\n")
	b.WriteString("# and that no other UDP protocol parses (see `go doc ports.NmapProbe`).\n\n")

	b.WriteString("##############################NEXT PROBE##############################\n")
	b.WriteString("# INVOKE to SAP 0 (never bindable), op 63, no argument: every ESRO engine\n")
	b.WriteString("# answers FAILURE(ref, 2) echoing the reference number 0x4e.\n")
	fmt.Fprintf(&b, "Probe UDP ESRO-SAP0 q|%s|\n", nmapEscape([]byte{probeSAP << 4, nmapRefESRO, probeOp}))
	fmt.Fprintf(&b, "rarity %d\nports 259,641,642,2002\n", nmapRarity)
	fmt.Fprintf(&b, "softmatch esro-gen m|^\\x04\\x%02x[\\x00-\\x03]$|\n", nmapRefESRO)
	fmt.Fprintf(&b, "softmatch esro-gen m|^[\\x01\\x41\\x81\\xc1\\x02\\x42\\x82\\xc2]\\x%02x|\n\n", nmapRefESRO)

	b.WriteString("##############################NEXT PROBE##############################\n")
	b.WriteString("# INVOKE to SAP 9 (EMSD server, 2-way), op 7 get-configuration, argument 30 00:\n")
	b.WriteString("# an EMSD server answers ERROR 7; a device or a plain engine FAILURE.\n")
	fmt.Fprintf(&b, "Probe UDP EMSD-getconf q|%s|\n", nmapEscape(append([]byte{mtsSAP << 4, nmapRefEMSD, mtsOp}, emptySeq()...)))
	fmt.Fprintf(&b, "rarity %d\nports 259,641,642,2002\n", nmapRarity)
	fmt.Fprintf(&b, "match esro-emsdp m|^\\x02\\x%02x\\x07| p/EMSD server (message transfer system)/ i/ERROR 7 for get-configuration on SAP 9/\n", nmapRefEMSD)
	fmt.Fprintf(&b, "softmatch esro-gen m|^\\x04\\x%02x[\\x00-\\x03]$|\n\n", nmapRefEMSD)

	b.WriteString("##############################NEXT PROBE##############################\n")
	b.WriteString("# INVOKE to SAP 7 (EMSD device, 2-way), op 4 submission control, argument\n")
	b.WriteString("# 30 04 04 02 00 00: an EMSD device (user agent) answers ERROR 7 (with its\n")
	b.WriteString("# 3-octet error parameter); a bare engine FAILURE. The padding makes the probe\n")
	b.WriteString("# longer than that answer, which a device that limits what it sends to\n")
	b.WriteString("# unproven sources (no amplification) would otherwise hold back.\n")
	fmt.Fprintf(&b, "Probe UDP EMSD-device q|%s|\n", nmapEscape(append([]byte{uaSAP << 4, nmapRefDevice, uaOp}, devicePadArg...)))
	fmt.Fprintf(&b, "rarity %d\nports 259,641,642,2002\n", nmapRarity)
	fmt.Fprintf(&b, "match esro-emsdp m|^\\x02\\x%02x\\x07| p/EMSD device (user agent)/ i/ERROR 7 for submission control on SAP 7/\n", nmapRefDevice)
	fmt.Fprintf(&b, "match esro-gen m|^\\x04\\x%02x[\\x00-\\x03]$| p/ESRO engine/ i/no EMSD server or device at SAPs 9 and 7/\n", nmapRefDevice)
	return b.String()
}

func nmapEscape(p []byte) string {
	var b strings.Builder
	for _, c := range p {
		fmt.Fprintf(&b, "\\x%02x", c)
	}
	return b.String()
}

// MergeNmapProbes returns nmap's probe file own with the ESRO/EMSD probes
// inserted before its first probe (after its Exclude line, which must come
// first). nmap tries probes in file order; after the first softmatch only
// probes with esro-gen matches run, so an ESRO port is named in seconds
// rather than after nmap's own UDP probes each time out.
func MergeNmapProbes(own []byte) []byte {
	text := string(own)
	at := 0
	for off := 0; off < len(text); {
		end := strings.IndexByte(text[off:], '\n')
		line := text[off:]
		next := len(text)
		if end >= 0 {
			line, next = text[off:off+end], off+end+1
		}
		if strings.HasPrefix(line, "Probe ") {
			break
		}
		if strings.HasPrefix(line, "Exclude ") {
			at = next
		}
		off = next
	}
	return []byte(text[:at] + "\n" + NmapProbe() + "\n" + text[at:])
}
