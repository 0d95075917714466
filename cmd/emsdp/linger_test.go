package main

import (
	"context"
	"net"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/internal/lossynet"
)

// confirmingPerformer starts, on n, a 3-way performer on SAP 13 with the
// reference's fixed shipped timers and, as the reference, no limit on what
// it sends an invoker that has not proven itself; like the reference MTS
// with submissions, it commits an operation only when its RESULT is
// acknowledged.
// The first acksLost ACKs sent to it are lost.
func confirmingPerformer(t *testing.T, n *lossynet.Network, acksLost int) (addr string, committed, failed *atomic.Int64) {
	t.Helper()
	c, err := n.Listen("127.0.0.1:2002")
	if err != nil {
		t.Fatal(err)
	}
	c.DropNextReceivedIf(acksLost, func(b []byte) bool { return len(b) >= 2 && esro.PDUType(b[0]&7) == esro.TypeAck })
	ep, err := esro.NewEndpoint(c, &esro.Config{FixedTimers: true, AmplificationFactor: -1, Logger: stderrLogger(&cmdEnv{stderr: t.Output()})})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ep.Close() })
	committed, failed = new(atomic.Int64), new(atomic.Int64)
	ep.HandleFunc(13, esro.ThreeWay, func(ctx context.Context, w esro.ResponseWriter, inv *esro.Invocation) {
		w.Result(inv.Encoding, inv.Data)
		if w.Confirmed(context.Background()) == nil {
			committed.Add(1)
		} else {
			failed.Add(1)
		}
	})
	return c.AddrPort().String(), committed, failed
}

// 'emsdp esro invoke', one-shot and --count, with the default timers
// against a performer that loses the first ACKs: the command stays until
// the performer is quiet, so every operation it printed is committed; with
// --no-linger it leaves at once and the performer fails. Fake clock.
func TestInvokeLingers(t *testing.T) {
	for _, tc := range []struct {
		name       string
		args       string
		acksLost   int
		out        string        // regexp
		stay, upTo time.Duration // how long the command runs: exactly stay, or in stay..upTo
		committed  int64
	}{
		// 5 s = T_retx + 2·RT after the RESULT, which came after 10 ms.
		{"one-shot", "", 0, `^result enc=0 data="msg"\n$`, 5010 * time.Millisecond, 0, 1},
		// A lost ACK: the performer's whole budget, N·T_retx + 2·RT.
		{"one-shot, first ACK lost", "", 1, `^result `, 26010 * time.Millisecond, 0, 1},
		{"one-shot, first two ACKs lost", "", 2, `^result `, 26010 * time.Millisecond, 0, 1},
		{"count, first ACK lost", "--count 5", 1, `^summary completed=5 results=5 `, 5 * time.Second, 26010 * time.Millisecond, 5},
		{"count, first two ACKs lost", "--count 5 --concurrency 2", 2, `^summary completed=5 results=5 `, 5 * time.Second, 26010 * time.Millisecond, 5},
		{"no linger", "--no-linger", 0, `^result `, 10 * time.Millisecond, 0, 1},
		{"no linger, first ACK lost", "--no-linger", 1, `^result `, 10 * time.Millisecond, 0, 0},
		{"count, no linger, first two ACKs lost", "--count 5 --no-linger", 2, `^summary completed=5 results=5 `, 50 * time.Millisecond, 0, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				n := lossynet.New(lossynet.Config{Delay: 5 * time.Millisecond})
				addr, committed, failed := confirmingPerformer(t, n, tc.acksLost)
				env, out, errb := testEnv()
				env.listenPacket = func(_, address string) (net.PacketConn, error) { return n.Listen(address) }
				args := append([]string{"esro", "invoke", "--to", addr, "--sap", "13", "--data", "msg", "--local", "127.0.0.1:0"}, strings.Fields(tc.args)...)
				start := time.Now()
				code := run(t.Context(), env, args)
				took := time.Since(start)
				t.Logf("the command took %v", took)
				if code != exitOK || !regexp.MustCompile(tc.out).MatchString(out.String()) {
					t.Fatalf("exit %d, stdout %q, stderr %q", code, out.String(), errb.String())
				}
				if tc.upTo == 0 && took != tc.stay || tc.upTo != 0 && (took < tc.stay || took > tc.upTo) {
					t.Fatalf("the command took %v, want %v (up to %v)", took, tc.stay, tc.upTo)
				}
				time.Sleep(time.Minute) // past the performer's last retransmission and T_last
				synctest.Wait()
				if committed.Load() != tc.committed || committed.Load()+failed.Load() == 0 {
					t.Fatalf("performer committed %d, failed %d; want %d committed", committed.Load(), failed.Load(), tc.committed)
				}
			})
		})
	}
}

// -h names the linger and what --no-linger risks.
func TestNoLingerHelp(t *testing.T) {
	for _, cmd := range [][]string{{"esro", "invoke"}, {"ua", "send"}, {"ua", "verify"}} {
		env, out, errb := testEnv()
		if code := run(t.Context(), env, append(cmd, "-h")); code != exitOK {
			t.Fatalf("%v -h: exit %d", cmd, code)
		}
		h := strings.Join(strings.Fields(out.String()+errb.String()), " ")
		for _, want := range []string{"-no-linger", "retransmission interval", "retry budget", "fails the operation"} {
			if !strings.Contains(h, want) {
				t.Errorf("%v -h lacks %q: %s", cmd, want, h)
			}
		}
	}
}
