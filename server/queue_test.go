package server

import (
	"context"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/storedid"
)

// Entries another process makes due (emsdp queue retry) are taken up at
// once on Reload (SIGHUP). Without it the scheduler's rescan and the relay
// worker's idle wake-up find them after 30 s (defaultRescan, relayIdle),
// later than the device and the smarthost here wait (15 s).
func TestReloadTakesUpRetried(t *testing.T) {
	for _, sc := range storeConfigs {
		t.Run(sc.driver, func(t *testing.T) {
			host := startSmarthost(t, "")
			c := sc.config(t)
			c.Relay.Smarthost = host.addr
			s := startServer(t, c)
			dev := newDevice(t, s, 198036, deviceOpts{})
			ctx := context.Background()
			op, err := c.OpenStore(ctx) // the operator's handle
			must(t, err)
			defer op.Close()
			later := time.Now().Add(time.Hour)
			content, err := testIPM("198.036").Marshal(emsd.Options{})
			must(t, err)
			// Deferred for an hour, queued behind the server's back.
			must(t, op.Enqueue(ctx, store.Work{
				Deliveries: []store.NewDelivery{{Device: 198036, MessageID: storedid.MessageID(emsd.RFC822ID("<retried@example.com>")).String(),
					ContentType: uint32(emsd.ContentIPM), Content: content, Priority: 1, NextAttempt: later,
					Expires: later.Add(time.Hour)}},
				Relays: []store.NewRelay{{From: "198.036@emsd.test", Message: []byte("Subject: retried\r\n\r\nbody\r\n"),
					Recipients: []store.RelayRecipient{{Addr: "bob@example.com"}}, NextAttempt: later, Expires: later.Add(time.Hour)}},
			}))
			ch, err := op.RetryQueued(ctx, store.QueueSelect{All: true}, time.Now())
			must(t, err)
			if ch.Changed != 2 {
				t.Fatalf("retried %+v", ch)
			}
			must(t, s.Reload(ctx))
			if d := dev.next(t); d.MessageID.RFC822 != "<retried@example.com>" {
				t.Errorf("delivered %v", d.MessageID)
			}
			if m := host.next(t); len(m.to) != 1 || m.to[0] != "bob@example.com" {
				t.Errorf("relayed to %v", m.to)
			}
		})
	}
}
