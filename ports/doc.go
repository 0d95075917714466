// Package ports answers "what is on this port": which local process holds a
// TCP or UDP port (Local), and what a remote host answers on it (Probe).
//
// It exists because port 641, EMSD's port in this project, is registered at
// IANA to repcmd, while esro-emsdp is registered at 642, ESRO's general port
// 259 is on UDP commonly Check Point FireWall-1's RDP, and the C reference
// used 2002. Knowing the registration is not knowing the listener.
//
// Probes are a ladder, least intrusive first. On UDP: an ESRO INVOKE to SAP 0
// (never bindable) that every ESRO engine answers with FAILURE echoing our
// random reference number; then, only for ESRO speakers, an EMSD check; then,
// only for non-ESRO ports, ONC-RPC NULL calls (NetInfo, portmapper). On TCP:
// connect and read a banner without sending anything; active payloads only
// when asked (ProbeOptions.Aggressive) and only where no printer can be
// behind the port (see ProbeOptions.Aggressive for the rule).
package ports

// DefaultPorts returns the ports looked at when none are given: the project's
// EMSD port, IANA's esro-emsdp, IANA's esro-gen and the C reference's port.
func DefaultPorts() []int { return []int{641, 642, 259, 2002} }
