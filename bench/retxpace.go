package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/esro-emsdp/emsdp/esro"
)

// retxPaceRun starts invocations to silent peers all at once, so that
// their retransmissions fall due together, and measures what leaves: with
// esro.Config.RetransmitRate the aggregate must hold the rate.
func retxPaceRun(ctx context.Context, invocations, peers int, rate float64, burst int) (_ Result, err error) {
	pacing := "off"
	if rate > 0 {
		pacing = fmt.Sprintf("%g/s", rate)
	}
	r := newResult("fleet", "retransmissions to silent peers", "invocations", strconv.Itoa(invocations),
		"esro retransmit_rate", pacing)
	var mu sync.Mutex
	var at []time.Time // datagrams sent, when the endpoint wrote them
	received := make([]int, peers)
	var wg sync.WaitGroup
	var conns []net.PacketConn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
		wg.Wait()
	}()
	for k := range peers {
		c, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			return r, err
		}
		conns = append(conns, c)
		wg.Go(func() {
			buf := make([]byte, 2048)
			for {
				if _, _, err := c.ReadFrom(buf); err != nil {
					return
				}
				mu.Lock()
				received[k]++
				mu.Unlock()
			}
		})
	}
	conn, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		return r, err
	}
	timers := esro.ShippedTimers()
	timers.RetransmitCount = 2 // a short run: two rounds of retransmissions
	ep, err := esro.NewEndpoint(conn, &esro.Config{Timers: timers, RetransmitRate: rate, RetransmitBurst: burst,
		Trace: func(out bool, _ netip.AddrPort, _ []byte) {
			if out {
				now := time.Now()
				mu.Lock()
				at = append(at, now)
				mu.Unlock()
			}
		}})
	if err != nil {
		conn.Close()
		return r, err
	}
	defer ep.Close()
	start := time.Now()
	var iwg sync.WaitGroup
	failed := make(chan error, invocations)
	for i := range invocations {
		to := conns[i%peers].LocalAddr().(*net.UDPAddr).AddrPort()
		iwg.Go(func() {
			_, err := ep.Invoke(ctx, &esro.Request{To: to, SAP: 3, Operation: 35, Encoding: esro.EncodingBER,
				Handshake: esro.ThreeWay, Data: []byte("a delivery to a device switched off")})
			if err == nil {
				err = fmt.Errorf("a silent peer answered")
			}
			failed <- err
		})
	}
	iwg.Wait()
	close(failed)
	for err := range failed {
		if !isFailure(err) {
			return r, fmt.Errorf("invocation: %w", err)
		}
	}
	took := time.Since(start)
	st := ep.Stats()
	// Every datagram sent arrives (loopback), a moment later.
	deadline := time.Now().Add(time.Second)
	for {
		mu.Lock()
		got := 0
		for _, n := range received {
			got += n
		}
		sent := len(at)
		mu.Unlock()
		if got >= sent {
			break
		}
		if time.Now().After(deadline) {
			return r, fmt.Errorf("%d datagrams sent, %d received", sent, got)
		}
		time.Sleep(10 * time.Millisecond)
	}
	mu.Lock()
	var retx []time.Time
	for _, t := range at {
		// The INVOKEs leave at once; the first retransmission comes a
		// retransmission interval (less jitter) later.
		if t.Sub(start) > timers.RetransmitInterval()/2 {
			retx = append(retx, t)
		}
	}
	mu.Unlock()
	slices.SortFunc(retx, func(a, b time.Time) int { return a.Compare(b) })
	if want := invocations * timers.RetransmitCount; len(retx) != want {
		return r, fmt.Errorf("%d retransmissions sent, want %d", len(retx), want)
	}
	most := 0 // in any one second
	for i, j := 0, 0; j < len(retx); j++ {
		for retx[j].Sub(retx[i]) >= time.Second {
			i++
		}
		most = max(most, j-i+1)
	}
	span := retx[len(retx)-1].Sub(retx[0])
	r.set("retransmissions", float64(len(retx)), "")
	r.set("over", span.Seconds(), "s")
	r.set("mean rate", float64(len(retx)-1)/span.Seconds(), "1/s")
	r.set("most in any 1 s", float64(most), "")
	r.set("deferred", float64(st.RetransmissionsDeferred), "")
	r.set("all failed after", took.Seconds(), "s")
	return r, nil
}

func isFailure(err error) bool {
	var f *esro.Failure
	return errors.As(err, &f)
}
