package main

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/ua"
)

func reflectCount(o *benchOptions) int {
	if o.quick {
		return 32
	}
	return 256
}

func reflectWait(o *benchOptions) time.Duration {
	if o.quick {
		return time.Second
	}
	return 2 * time.Second
}

// ---- reflection ----

type reflectTarget struct {
	name         string
	addr         netip.AddrPort
	sap3, sap2   uint8
	forgedInvoke func(ref uint8) []byte // a credential-bearing INVOKE, or nil
}

func reflection(ctx context.Context, o *benchOptions) ([]Result, error) {
	var out []Result
	// serve
	h, err := startEMSD(ctx, []deviceSpec{{addr: 200000, password: devPassword}}, harnessOptions{timers: serverTimers, plain: true, log: o.srvLog})
	if err != nil {
		return nil, err
	}
	defer h.Close(ctx)
	forged := forgedSubmission(200000)
	targets := []reflectTarget{{"serve", h.addr, 5, 9, func(ref uint8) []byte {
		b, _ := esro.AppendPDU(nil, &esro.PDU{Type: esro.TypeInvoke, SAP: 5, Ref: ref, Operation: uint8(emsd.OpSubmission), Encoding: esro.EncodingBER, Data: forged})
		return b
	}}}
	// esro perform --reply date
	perf, err := esro.Listen("udp", "127.0.0.1:0", &esro.Config{Timers: serverTimers, Logger: o.log})
	if err != nil {
		return nil, err
	}
	defer perf.Close()
	date := func(_ context.Context, w esro.ResponseWriter, _ *esro.Invocation) {
		w.Result(2, []byte(time.Now().Format(time.UnixDate)+"\n"))
	}
	perf.HandleFunc(13, esro.ThreeWay, date)
	perf.HandleFunc(12, esro.TwoWay, date)
	targets = append(targets, reflectTarget{name: "esro perform", addr: perf.LocalAddr().(*net.UDPAddr).AddrPort(), sap3: 13, sap2: 12})
	// ua receive
	uep, err := esro.Listen("udp", "127.0.0.1:0", &esro.Config{Timers: serverTimers, Logger: o.log})
	if err != nil {
		return nil, err
	}
	defer uep.Close()
	uc, err := ua.New(uep, ua.Config{Server: netip.MustParseAddrPort("127.0.0.250:2002"), Address: 198036, Logger: o.log,
		Handler: ua.HandlerFunc(func(context.Context, *ua.Delivery) error { return nil })})
	if err != nil {
		return nil, err
	}
	defer uc.Close()
	targets = append(targets, reflectTarget{name: "ua receive", addr: uep.LocalAddr().(*net.UDPAddr).AddrPort(), sap3: 3, sap2: 7})

	for _, tg := range targets {
		kinds := []struct {
			name string
			pdu  func(ref uint8) []byte
			n    int // copies of each
		}{
			{"INVOKE 3-way, no argument", func(r uint8) []byte { return invokePDU(tg.sap3, r, nil) }, 1},
			{"INVOKE 2-way, no argument", func(r uint8) []byte { return invokePDU(tg.sap2, r, nil) }, 1},
			{"INVOKE 3-way, 60 octets of garbage", func(r uint8) []byte { return invokePDU(tg.sap3, r, make([]byte, 60)) }, 1},
			{"INVOKE 3-way, sent 3 times", func(r uint8) []byte { return invokePDU(tg.sap3, r, nil) }, 3},
			{"INVOKE to an unbound SAP", func(r uint8) []byte { return invokePDU(15, r, nil) }, 1},
			{"RESULT, no invocation", func(r uint8) []byte { return []byte{byte(esro.TypeResult), r} }, 1},
			{"RESULT with 8 octets, no invocation", func(r uint8) []byte { return append([]byte{byte(esro.TypeResult), r}, make([]byte, 8)...) }, 1},
			{"ERROR, no invocation", func(r uint8) []byte { return []byte{byte(esro.TypeError), r, 1} }, 1},
			{"ACK, no invocation", func(r uint8) []byte { return []byte{byte(esro.TypeAck), r} }, 1},
			{"FAILURE, no invocation", func(r uint8) []byte { return []byte{byte(esro.TypeFailure), r, 1} }, 1},
			{"type 7 (invalid)", func(r uint8) []byte { return []byte{7, r, 0} }, 1},
		}
		if tg.forgedInvoke != nil {
			kinds = append(kinds, struct {
				name string
				pdu  func(ref uint8) []byte
				n    int
			}{"submission, registered device, wrong password", tg.forgedInvoke, 1})
		}
		for _, k := range kinds {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			r, err := reflectOne(ctx, o, tg.addr, k.pdu, k.n)
			if err != nil {
				return nil, fmt.Errorf("%s, %s: %w", tg.name, k.name, err)
			}
			res := newResult("hostile", k.name, "target", tg.name)
			res.set("datagrams in", float64(r.inD), "")
			res.set("out", float64(r.outD), "")
			res.set("factor", ratio(r.outD, r.inD), "×")
			res.set("octets in", float64(r.inB), "")
			res.set("octets out", float64(r.outB), "")
			res.set("octet factor", ratio(r.outB, r.inB), "×")
			out = append(out, res)
		}
	}
	return out, nil
}

func ratio(a, b int) float64 {
	if b == 0 {
		return 0
	}
	return float64(a) / float64(b)
}

func invokePDU(sap, ref uint8, data []byte) []byte {
	b, _ := esro.AppendPDU(nil, &esro.PDU{Type: esro.TypeInvoke, SAP: sap, Ref: ref, Operation: uint8(emsd.OpSubmission), Encoding: esro.EncodingBER, Data: data})
	return b
}

// forgedSubmission is a submission argument naming device dev with a
// wrong password: it gets as far as the password check.
func forgedSubmission(dev emsd.Address) []byte {
	arg, _ := (&emsd.SubmitArgument{Security: &emsd.SecurityElement{Address: &emsd.EMSDAddress{Address: dev}, Password: "guess"},
		ContentType: emsd.ContentIPM, Contents: []byte{0x30, 0x00}}).Marshal(emsd.Options{})
	return emsd.PrependInstanceID(1, arg)
}

type flowCount struct{ inD, inB, outD, outB int }

// reflectOne sends the probes from a fresh socket and counts what comes
// back within the wait.
func reflectOne(ctx context.Context, o *benchOptions, to netip.AddrPort, pdu func(uint8) []byte, copies int) (flowCount, error) {
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return flowCount{}, err
	}
	defer c.Close()
	var fc flowCount
	var mu sync.Mutex
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65536)
		for {
			n, _, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			mu.Lock()
			fc.outD++
			fc.outB += n
			mu.Unlock()
		}
	}()
	for copy := range copies {
		for i := range reflectCount(o) {
			b := pdu(uint8(i))
			if _, err := c.WriteToUDPAddrPort(b, to); err != nil {
				return fc, err
			}
			mu.Lock()
			fc.inD++
			fc.inB += len(b)
			mu.Unlock()
			if i%32 == 31 {
				time.Sleep(time.Millisecond) // within every receive buffer
			}
		}
		if copy < copies-1 {
			time.Sleep(150 * time.Millisecond) // a retransmission interval
		}
	}
	select {
	case <-time.After(reflectWait(o)):
	case <-ctx.Done():
	}
	c.Close()
	<-done
	mu.Lock()
	defer mu.Unlock()
	return fc, ctx.Err()
}
