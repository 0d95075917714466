// Package decode turns ESRO/EMSD datagrams into readable records: the ESRO
// header, the EMSD operation with its fields, segmented messages made
// whole, and retransmissions and duplicates marked. It serves `emsdp
// decode` (captures) and the PDU tracing of the server and the tools.
//
// A Decoder follows a conversation: it remembers each INVOKE so that the
// RESULT, ERROR, ACK or FAILURE answering it is decoded as that operation,
// and it buffers segments until their message is complete. That state is
// bounded (maxInvocations, the reassembler's limits), so a Decoder can run
// for the life of a server. Passwords are never shown: they are replaced
// by Mask.
package decode

import (
	"errors"
	"fmt"
	"hash/maphash"
	"net/netip"
	"strconv"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
)

// maxInvocations bounds the invocations a Decoder remembers; beyond it
// those older than invocationAge go first, then all of them.
const (
	maxInvocations = 8192
	invocationAge  = 10 * time.Minute
)

type invKey struct {
	invoker, performer netip.AddrPort
	ref                uint8
}

type invocation struct {
	frame    int
	at       time.Time
	op       uint8
	sap      uint8
	arg      uint64 // hash of the INVOKE's user data
	reply    uint64 // hash of the RESULT/ERROR octets, 0 = none yet
	replied  bool
	acked    bool
	failures int
	emsd     bool // BER: may be EMSD
}

type argKey struct {
	invoker, performer netip.AddrPort
	arg                uint64
}

// Decoder decodes the datagrams of a capture or a live endpoint in order.
// It is not safe for concurrent use.
type Decoder struct {
	seed  maphash.Seed
	invs  map[invKey]*invocation
	args  map[argKey]int // EMSD INVOKE user data → frame that first carried it
	reasm *emsd.Reassembler[string]
	frame int
}

// New returns a Decoder with no history.
func New() *Decoder {
	return &Decoder{
		seed: maphash.MakeSeed(),
		invs: make(map[invKey]*invocation),
		args: make(map[argKey]int),
		// The capture's own clock drives the timeout; a capture spanning
		// more than the MTS's two minutes per message is unusual.
		reasm: emsd.NewReassembler[string](emsd.ReassemblerConfig{Timeout: emsd.MTSReassemblyTimeout}),
	}
}

func (d *Decoder) hash(b []byte) uint64 {
	h := maphash.Bytes(d.seed, b)
	if h == 0 {
		h = 1 // 0 means "none"
	}
	return h
}

// Datagram decodes one UDP payload sent from src to dst at ts. Invalid
// addresses (a lone datagram given in hex) are allowed; the conversation
// state then matches only other datagrams without addresses. payload is
// not retained.
func (d *Decoder) Datagram(ts time.Time, src, dst netip.AddrPort, payload []byte) *Record {
	d.frame++
	// A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
	src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	r := &Record{Frame: d.frame, Length: len(payload)}
	if !ts.IsZero() {
		t := ts
		r.Time = &t
	}
	if src.IsValid() {
		r.Src = src.String()
	}
	if dst.IsValid() {
		r.Dst = dst.String()
	}
	p, err := esro.ParsePDU(payload)
	if err != nil {
		r.Malformed = malformed(err, payload)
		return r
	}
	info := &ESROInfo{Type: p.Type.String(), Ref: p.Ref, HeaderLength: p.Type.HeaderLen(), DataLength: len(p.Data)}
	r.ESRO = info
	switch p.Type {
	case esro.TypeInvoke:
		info.SAP, info.Operation = ptr(p.SAP), ptr(p.Operation)
		info.Encoding = encodingName(p.Encoding)
		d.invoke(ts, src, dst, &p, r)
	case esro.TypeResult, esro.TypeError:
		info.Encoding = encodingName(p.Encoding)
		if p.Type == esro.TypeError {
			info.ErrorValue = ptr(p.Value)
		}
		d.reply(ts, src, dst, &p, r)
	case esro.TypeAck:
		if inv := d.invs[invKey{src, dst, p.Ref}]; inv != nil {
			info.InvokeFrame = inv.frame
			if inv.acked {
				r.Marks = append(r.Marks, "duplicate")
			}
			inv.acked = true
		}
		if extra := len(payload) - 2; extra > 0 {
			info.DataLength = extra // ignored octets after the header
		} else {
			info.DataLength = 0
		}
	case esro.TypeFailure:
		info.FailureReason, info.FailureName = ptr(p.Value), failureName(p.Value)
		// A FAILURE PDU does not say which side it is for: it usually
		// answers an INVOKE of the receiver, else a reply of the sender.
		inv := d.invs[invKey{dst, src, p.Ref}]
		if inv == nil {
			inv = d.invs[invKey{src, dst, p.Ref}]
		}
		if inv != nil {
			info.InvokeFrame = inv.frame
			if inv.failures > 0 {
				r.Marks = append(r.Marks, "duplicate")
			}
			inv.failures++
		}
		info.DataLength = max(0, len(payload)-3)
	}
	return r
}

func malformed(err error, b []byte) string {
	switch {
	case errors.Is(err, esro.ErrEmptyPDU):
		return "empty datagram"
	case errors.Is(err, esro.ErrBadPDUType):
		return "invalid PDU type " + strconv.Itoa(int(b[0]&7))
	case errors.Is(err, esro.ErrShortPDU):
		t := esro.PDUType(b[0] & 7)
		return fmt.Sprintf("%s shorter than its %d-octet header", t, t.HeaderLen())
	}
	return err.Error()
}

func ptr[T any](v T) *T { return &v }

func encodingName(e esro.Encoding) string {
	switch e {
	case esro.EncodingBER:
		return "BER"
	case esro.EncodingPER:
		return "PER"
	}
	return "reserved-" + strconv.Itoa(int(e)-1)
}

func failureName(v uint8) string {
	switch v {
	case 0:
		return "transmission failure"
	case 1:
		return "local resource"
	case 2:
		return "user not responding"
	case 3:
		return "remote resource"
	}
	return "unknown"
}

func (d *Decoder) invoke(ts time.Time, src, dst netip.AddrPort, p *esro.PDU, r *Record) {
	k := invKey{src, dst, p.Ref}
	h := d.hash(p.Data)
	if inv := d.invs[k]; inv != nil && inv.arg == h && inv.op == p.Operation && inv.sap == p.SAP {
		r.Marks = append(r.Marks, "retransmission")
		r.ESRO.InvokeFrame = inv.frame
		// A retransmitted segment is not fed to the reassembler again,
		// but its fields are still shown.
		r.EMSD = d.emsdInvoke(ts, src, dst, p, r, false)
		return
	}
	d.prune(ts)
	d.invs[k] = &invocation{frame: r.Frame, at: ts, op: p.Operation, sap: p.SAP, arg: h, emsd: p.Encoding == esro.EncodingBER}
	ak := argKey{src, dst, h ^ uint64(p.Operation)<<56}
	fresh := true
	if first, ok := d.args[ak]; ok && emsdOperation(p.Operation) {
		// The same EMSD argument, instance id included, under a new
		// reference number: the invoker re-invoked after a failure.
		r.Marks = append(r.Marks, "duplicate of #"+strconv.Itoa(first))
		fresh = false
	} else {
		d.args[ak] = r.Frame
	}
	r.EMSD = d.emsdInvoke(ts, src, dst, p, r, fresh)
}

func (d *Decoder) reply(ts time.Time, src, dst netip.AddrPort, p *esro.PDU, r *Record) {
	inv := d.invs[invKey{dst, src, p.Ref}]
	h := d.hash(append([]byte{byte(p.Type), p.Value}, p.Data...))
	if inv != nil {
		r.ESRO.InvokeFrame = inv.frame
		if inv.replied && inv.reply == h {
			r.Marks = append(r.Marks, "retransmission")
		}
		inv.replied, inv.reply = true, h
	}
	r.EMSD = d.emsdReply(p, inv)
}

// prune keeps the conversation state bounded.
func (d *Decoder) prune(now time.Time) {
	if len(d.invs) < maxInvocations {
		return
	}
	for k, inv := range d.invs {
		if now.Sub(inv.at) > invocationAge || now.Before(inv.at) {
			delete(d.invs, k)
		}
	}
	if len(d.invs) >= maxInvocations {
		clear(d.invs)
	}
	if len(d.args) >= maxInvocations {
		clear(d.args)
	}
}

// Plausible reports whether a datagram on a port outside the selection
// looks like ESRO carrying EMSD: an INVOKE of an EMSD operation on an EMSD
// SAP whose argument decodes, or the answer to an INVOKE this Decoder has
// seen. It does not change the Decoder's state.
func (d *Decoder) Plausible(src, dst netip.AddrPort, payload []byte) bool {
	p, err := esro.ParsePDU(payload)
	if err != nil {
		return false
	}
	switch p.Type {
	case esro.TypeInvoke:
		if p.Encoding != esro.EncodingBER || p.SAP < 3 || p.SAP > 13 || p.SAP%2 == 0 || !emsdOperation(p.Operation) {
			return false
		}
		for _, v := range versions(p.Operation) {
			op, _ := emsd.ParseOperation(emsd.Operation(p.Operation), v)
			data := p.Data
			if emsd.CarriesInstanceID(emsd.Operation(p.Operation)) {
				if len(data) == 0 {
					return false
				}
				data = data[1:]
			}
			var e EMSDInfo
			scratch := &Decoder{reasm: emsd.NewReassembler[string](emsd.ReassemblerConfig{})}
			if len(data) > 0 && scratch.argument(time.Time{}, src, dst, op, data, emsd.Options{Version: v}, &e, false) {
				return true
			}
		}
		return false
	case esro.TypeResult, esro.TypeError:
		return d.invs[invKey{dst, src, p.Ref}] != nil
	case esro.TypeAck:
		return d.invs[invKey{src, dst, p.Ref}] != nil
	case esro.TypeFailure:
		return d.invs[invKey{dst, src, p.Ref}] != nil || d.invs[invKey{src, dst, p.Ref}] != nil
	}
	return false
}
