package ports

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/esro-emsdp/emsdp/esro"
)

// The ESRO/EMSD probes (docs/protocol.md ESRO §2.7, docs/protocol.md EMSD §1.4). Every datagram
// starts with a binary header octet (0x00, 0x90 or 0x70) and none carries
// printable text or a line end: nothing here can come out of a printer as a
// page of text.
const (
	// SAP 0 can never be bound (docs/protocol.md ESRO §1.3), so every ESRO engine,
	// EMSD or not, answers FAILURE(ref, 2) and no user sees the INVOKE.
	probeSAP = 0
	probeOp  = esro.MaxOperation

	// EMSD MTS: SAP 9 is its 2-way performer; get-configuration (op 7, no
	// instance id, argument 30 00) is answered ERROR 7 without parameter by
	// the reference (docs/protocol.md EMSD §1.4, TV16, §12 point 20).
	mtsSAP = 9
	mtsOp  = 7
	// EMSD UA: SAP 7 is its 2-way performer; submission control (op 4) is
	// rejected with ERROR 7 and ErrorParameter 7 (02 01 07).
	uaSAP = 7
	uaOp  = 4

	emsdProtocolViolation = 7
)

// emptySeq is the BER encoding of an empty SEQUENCE.
func emptySeq() []byte { return []byte{0x30, 0x00} }

func (p *prober) udp(ctx context.Context, port int) PortResult {
	res := PortResult{Port: port, Proto: "udp"}
	raddr := netip.AddrPortFrom(p.addr, uint16(port))
	var d net.Dialer
	// A connected socket: the kernel passes up only datagrams from the probed
	// address and port, and turns an ICMP port unreachable into
	// ECONNREFUSED on the next read.
	c, err := d.DialContext(ctx, "udp", raddr.String())
	if err != nil {
		res.State = StateError
		res.Notes = append(res.Notes, err.Error())
		return res
	}
	defer c.Close()
	stop := deadlineOnCancel(ctx, c)
	defer stop()
	u := &udpSession{c: c, o: &p.o, res: &res}

	heard := false
	ref := noLineEnd(uint8(rand.IntN(256)))
	st, reply, err := u.esro(ctx, "esro-unbound-sap", &esro.PDU{Type: esro.TypeInvoke, SAP: probeSAP, Ref: ref, Operation: probeOp})
	if done := u.finish(err); done {
		return res
	}
	heard = len(st.Received) > 0
	if reply != nil {
		res.State = StateOpen
		res.Service = ServiceESRO
		res.Identification = "ESRO speaker"
		res.Evidence = fmt.Sprintf("answered an INVOKE to SAP %d with %s echoing our random reference number %d", probeSAP, reply.Type, ref)
		u.emsd(ctx, ref)
		return res
	}

	for i, prog := range rpcPrograms() {
		xid := rpcXID(rand.Uint32())
		st, rm, err := u.rpc(ctx, prog, xid)
		if done := u.finish(err); done {
			return res
		}
		heard = heard || len(st.Received) > 0
		if rm == nil {
			if i == 0 {
				break // mute to RPC: the other programs would be too
			}
			continue
		}
		res.State = StateOpen
		res.Service = ServiceONCRPC
		res.Identification = "ONC-RPC service"
		ev := fmt.Sprintf("a NULL call to program %d v%d got %s with our transaction id %#08x", prog.Prog, prog.Vers, rm, xid)
		if !rm.Accepted || rm.AcceptStat != acceptProgUnavail {
			if rm.Accepted {
				res.Identification = fmt.Sprintf("ONC-RPC service: %s (program %d)", prog.Name, prog.Prog)
			}
			res.Evidence = ev
			return res
		}
		res.Evidence = ev + " (none of " + programList() + " is offered)"
	}
	if res.Service != "" {
		return res
	}
	if heard {
		res.State = StateOpen
		res.Service = ServiceUnknown
		res.Identification = "something answers, but not as ESRO or ONC-RPC"
		res.Evidence = "replies did not parse as an answer to our probes (see received octets)"
		if u.echoed {
			res.Service = ServiceEcho
			res.Identification = "echo service"
			res.Evidence = "it sent our probe datagrams back unchanged"
		}
		return res
	}
	res.State = StateOpenFiltered
	res.Evidence = "no reply to any probe and no ICMP port unreachable: a service that ignores these probes, or a firewall dropping them"
	return res
}

func programList() string {
	s := ""
	for i, p := range rpcPrograms() {
		if i > 0 {
			s += ", "
		}
		s += fmt.Sprint(p.Prog)
	}
	return s
}

// emsd tells an EMSD server or device from a bare ESRO engine; run only
// after the port proved to speak ESRO.
func (u *udpSession) emsd(ctx context.Context, ref uint8) {
	res := u.res
	mref := noLineEnd(ref + 85)
	st, reply, err := u.esro(ctx, "emsd-mts-getconf", &esro.PDU{Type: esro.TypeInvoke, SAP: mtsSAP, Ref: mref, Operation: mtsOp, Data: emptySeq()})
	if err != nil || ctx.Err() != nil {
		res.Notes = append(res.Notes, "EMSD check interrupted: "+errString(err, ctx))
		return
	}
	switch {
	case reply == nil:
		st.Outcome += "; an EMSD server would have answered ERROR 7"
		res.Notes = append(res.Notes, "SAP 9 did not answer get-configuration: not a reference-like EMSD server")
		return
	case reply.Type == esro.TypeError && reply.Value == emsdProtocolViolation:
		res.Service = ServiceEMSDServer
		res.Identification = "EMSD server (message transfer system)"
		res.Evidence = fmt.Sprintf("SAP %d answered get-configuration (op %d) with ERROR 7, protocol violation, as an EMSD MTS does (docs/protocol.md EMSD §1.4)", mtsSAP, mtsOp)
		if len(reply.Data) > 0 {
			res.Evidence += fmt.Sprintf("; it added an error parameter (% x), as the reference does with MTA_FORCE_ERROR_PARM", reply.Data)
		}
		return
	case reply.Type != esro.TypeFailure:
		res.Identification = "ESRO speaker with a user at SAP 9 that is not a recognisable EMSD server"
		res.Evidence += fmt.Sprintf("; SAP %d answered op %d with %s", mtsSAP, mtsOp, reply)
		return
	}
	uref := noLineEnd(ref + 170)
	_, reply, err = u.esro(ctx, "emsd-ua-subctl", &esro.PDU{Type: esro.TypeInvoke, SAP: uaSAP, Ref: uref, Operation: uaOp, Data: emptySeq()})
	if err != nil || ctx.Err() != nil {
		res.Notes = append(res.Notes, "EMSD check interrupted: "+errString(err, ctx))
		return
	}
	switch {
	case reply == nil:
		res.Notes = append(res.Notes, "SAP 7 did not answer submission control")
	case reply.Type == esro.TypeError && reply.Value == emsdProtocolViolation:
		res.Service = ServiceEMSDDevice
		res.Identification = "EMSD device (user agent)"
		res.Evidence = fmt.Sprintf("no EMSD server at SAP %d (FAILURE), but SAP %d answered submission control (op %d) with ERROR 7 (parameter % x) as an EMSD user agent does (docs/protocol.md EMSD §1.4)", mtsSAP, uaSAP, uaOp, reply.Data)
	case reply.Type == esro.TypeFailure:
		res.Identification = "ESRO engine without EMSD (no user at SAPs 9 and 7)"
		res.Evidence += fmt.Sprintf("; SAPs %d and %d answered FAILURE: nothing bound there", mtsSAP, uaSAP)
	default:
		res.Identification = "ESRO speaker with a user at SAP 7 that is not a recognisable EMSD device"
		res.Evidence += fmt.Sprintf("; SAP %d answered op %d with %s", uaSAP, uaOp, reply)
	}
}

func errString(err error, ctx context.Context) string {
	if err != nil {
		return err.Error()
	}
	return context.Cause(ctx).Error()
}

// udpSession runs the steps of one UDP port over one connected socket.
type udpSession struct {
	c      net.Conn
	o      *ProbeOptions
	res    *PortResult
	echoed bool
}

// finish handles a step error: ICMP unreachable closes the port, anything
// else stops the ladder with an error note. It reports whether to stop.
func (u *udpSession) finish(err error) bool {
	switch {
	case err == nil:
		return false
	case isRefused(err):
		u.res.State = StateClosed
		u.res.Evidence = "ICMP port unreachable (read returned ECONNREFUSED)"
	default:
		u.res.State = StateError
		u.res.Notes = append(u.res.Notes, err.Error())
	}
	return true
}

// esro sends an INVOKE and waits for a RESULT, ERROR or FAILURE that echoes
// its reference number. A RESULT or ERROR is acknowledged, since a 3-way
// performer would otherwise retransmit it; a 2-way performer ignores the ACK
// (docs/protocol.md ESRO §2.7, ACK matching no performer invocation).
func (u *udpSession) esro(ctx context.Context, name string, inv *esro.PDU) (*Step, *esro.PDU, error) {
	payload, err := esro.AppendPDU(nil, inv)
	if err != nil {
		return nil, nil, fmt.Errorf("ports: building %s: %w", name, err)
	}
	st := u.step(name)
	var answer *esro.PDU
	_, err = u.exchange(ctx, st, payload, inv.String(), func(b []byte) (string, bool) {
		pdu, err := esro.ParsePDU(b)
		if err != nil {
			return "", false
		}
		ok := pdu.Ref == inv.Ref && (pdu.Type == esro.TypeResult || pdu.Type == esro.TypeError || pdu.Type == esro.TypeFailure)
		if ok {
			answer = &pdu
			answer.Data = bytes.Clone(pdu.Data)
		}
		return pdu.String(), ok
	})
	if err != nil {
		return st, nil, err
	}
	if answer == nil {
		return st, nil, nil
	}
	st.Outcome = fmt.Sprintf("%s with our reference number %d", answer.Type, inv.Ref)
	if answer.Type != esro.TypeFailure {
		ack := &esro.PDU{Type: esro.TypeAck, Ref: inv.Ref}
		b, _ := esro.AppendPDU(nil, ack)
		if _, err := u.c.Write(b); err == nil {
			st.Sent = append(st.Sent, Packet{Data: b, Decoded: ack.String(), Matched: true})
			st.Outcome += "; acknowledged"
		}
	}
	return st, answer, nil
}

// rpc sends an ONC-RPC NULL call and waits for the reply with its xid.
func (u *udpSession) rpc(ctx context.Context, prog rpcProgram, xid uint32) (*Step, *rpcReplyMsg, error) {
	st := u.step(fmt.Sprintf("oncrpc-null-%d", prog.Prog))
	call := rpcNullCall(xid, prog.Prog, prog.Vers)
	var answer *rpcReplyMsg
	_, err := u.exchange(ctx, st, call, fmt.Sprintf("RPC CALL xid=%#08x prog=%d vers=%d proc=0 (NULL)", xid, prog.Prog, prog.Vers), func(b []byte) (string, bool) {
		m, err := parseRPCReply(b)
		if err != nil {
			return "", false
		}
		if m.XID != xid {
			return fmt.Sprintf("RPC REPLY xid=%#08x (not ours) %s", m.XID, m), false
		}
		answer = &m
		return fmt.Sprintf("RPC REPLY xid=%#08x %s", m.XID, m), true
	})
	if err != nil {
		return st, nil, err
	}
	if answer != nil {
		st.Outcome = answer.String()
	}
	return st, answer, nil
}

func (u *udpSession) step(name string) *Step {
	u.res.Steps = append(u.res.Steps, Step{Name: name})
	return &u.res.Steps[len(u.res.Steps)-1]
}

// exchange sends payload up to Attempts times, each time waiting Timeout for
// a datagram that match accepts; other datagrams are recorded and ignored.
// It returns the matching datagram, or nil after silence.
func (u *udpSession) exchange(ctx context.Context, st *Step, payload []byte, decoded string, match func([]byte) (string, bool)) ([]byte, error) {
	buf := make([]byte, 65535)
	st.Outcome = "no reply"
	for range u.o.Attempts {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("ports: %s: %w", st.Name, err)
		}
		if _, err := u.c.Write(payload); err != nil {
			return nil, fmt.Errorf("ports: sending %s: %w", st.Name, err)
		}
		st.Sent = append(st.Sent, Packet{Data: bytes.Clone(payload), Decoded: decoded, Matched: true})
		deadline := time.Now().Add(u.o.Timeout)
		for {
			if err := u.c.SetReadDeadline(deadline); err != nil {
				return nil, fmt.Errorf("ports: %w", err)
			}
			// deadlineOnCancel runs only after ctx is done, so checking here
			// closes the race with the deadline just set.
			if err := ctx.Err(); err != nil {
				return nil, fmt.Errorf("ports: %s: %w", st.Name, err)
			}
			n, err := u.c.Read(buf)
			if errors.Is(err, os.ErrDeadlineExceeded) {
				break
			}
			if err != nil {
				if isRefused(err) {
					st.Outcome = "ICMP port unreachable"
				}
				return nil, fmt.Errorf("ports: %s: %w", st.Name, err)
			}
			b := bytes.Clone(buf[:n])
			dec, ok := match(b)
			if dec == "" && bytes.Equal(b, payload) {
				dec = "our own datagram, sent back"
				u.echoed = true
			}
			st.Received = append(st.Received, Packet{Data: b, Decoded: dec, Matched: ok})
			if ok {
				return b, nil
			}
			st.Outcome = "replies, none answering this probe"
		}
	}
	return nil, nil
}
