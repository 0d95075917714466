package server

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"testing/synctest"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/internal/lossynet"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/ua"
)

// Over a network that loses, duplicates and reorders datagrams (virtual
// time, internal/lossynet), submissions and segmented deliveries between
// two devices arrive exactly once: ESRO retransmits, re-invoked segments
// get the same answer, and the delivery window drops repeats.
func TestLossyNetwork(t *testing.T) {
	for _, loss := range []float64{0.1, 0.25} {
		t.Run(fmt.Sprint("loss=", loss), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) { lossyRun(t, loss) })
		})
	}
}

func lossyRun(t *testing.T, loss float64) {
	timers := esro.Timers{Acknowledgement: 50 * time.Millisecond, Roundtrip: 500 * time.Millisecond,
		Retransmit: time.Second, NSDULifetime: time.Second, RetransmitCount: 8}
	n := lossynet.New(lossynet.Config{Loss: loss, Duplicate: 0.1, Reorder: 0.1, Delay: 5 * time.Millisecond, Seed: 7})
	mtsConn, err := n.Listen("10.0.0.1:641")
	must(t, err)
	c := testConfig(t)
	c.SMTP.Listen, c.Admin.Listen = "", ""
	setTimers(c, timers)
	c.Delivery.Retry = []Duration{Duration(5 * time.Second)}
	s, err := Start(context.Background(), c, Options{Logger: testLogger(t), PacketConn: mtsConn})
	must(t, err)
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		s.Shutdown(ctx)
	}()
	quiet := slog.New(slog.DiscardHandler)
	device := func(addr emsd.Address, ip string, mode store.Mode) (*ua.Client, chan *ua.Delivery) {
		conn, err := n.Listen(ip + ":641")
		must(t, err)
		ep, err := esro.NewEndpoint(conn, &esro.Config{Timers: timers, Logger: quiet})
		must(t, err)
		t.Cleanup(func() { ep.Close() })
		addDevice(t, s, addr, conn.AddrPort(), deviceOpts{mode: mode})
		got := make(chan *ua.Delivery, 50)
		cl, err := ua.New(ep, ua.Config{Server: mtsConn.AddrPort(), Address: addr, Logger: quiet,
			Handler: ua.HandlerFunc(func(_ context.Context, d *ua.Delivery) error { got <- d; return nil })})
		must(t, err)
		t.Cleanup(func() { cl.Close() })
		return cl, got
	}
	a, _ := device(198036, "10.0.0.2", store.ModeComplete)
	_, bGot := device(198037, "10.0.0.3", store.ModeEfficient)

	const msgs = 6
	sent := 0
	retried := map[string]bool{}
	for i := range msgs {
		body := fmt.Sprintf("message %d\n", i)
		if i%2 == 1 {
			for len(body) < 5000 {
				body += "more text to force several segments\n"
			}
		}
		// A submission whose outcome is unknown (ESRO failure) is
		// submitted again, as a user agent would: the server may then hold
		// it twice, which is what submission verify and dedupe limit.
		for try := 0; try < 5; try++ {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			_, err := a.Submit(ctx, &ua.Message{To: []string{"198.037"}, Subject: fmt.Sprint("m", i), Body: []byte(body)})
			cancel()
			if err == nil {
				sent++
				break
			}
			retried[fmt.Sprint("m", i)] = true
		}
	}
	if sent != msgs {
		t.Fatalf("%d of %d submissions succeeded", sent, msgs)
	}
	seen := map[string]int{}
	deadline := time.After(30 * time.Minute)
	for len(seen) < msgs {
		select {
		case d := <-bGot:
			seen[d.IPM.Heading.Subject]++
		case <-deadline:
			t.Fatalf("delivered %v", seen)
		}
	}
	time.Sleep(2 * time.Minute) // anything doubled would arrive meanwhile
	for len(bGot) > 0 {
		d := <-bGot
		seen[d.IPM.Heading.Subject]++
	}
	for subj, k := range seen {
		if k != 1 && !(retried[subj] && k == 2) {
			t.Errorf("%s delivered %d times", subj, k)
		}
	}
	if st := s.ep.Stats(); st.Retransmissions == 0 || st.DuplicatesIn == 0 {
		t.Errorf("the network did not lose or duplicate anything: %+v", st)
	}
}
