package storetest

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/store"
)

func testRelays(t *testing.T, s store.Store) {
	ctx := context.Background()
	rep := store.Report{Device: 198036, Flags: 0x20, Recipient: "a@x", MessageID: "L:1"}
	must(t, s.Enqueue(ctx, store.Work{Relays: []store.NewRelay{
		{From: "198.036@e", Message: []byte("m1"), NextAttempt: t0, Expires: t0.Add(time.Hour),
			Recipients: []store.RelayRecipient{{Addr: "a@x", Report: rep}, {Addr: "b@x"}}},
		{From: "", Message: []byte("dsn"), NextAttempt: t0.Add(time.Minute), Expires: t0.Add(time.Hour),
			Recipients: []store.RelayRecipient{{Addr: "c@x"}}},
	}}))
	wantErr(t, s.Enqueue(ctx, store.Work{Relays: []store.NewRelay{{Expires: t0}}}), store.ErrInvalid)
	bs, err := s.ClaimRelays(ctx, t0, 10)
	must(t, err)
	if len(bs) != 1 || bs[0].From != "198.036@e" || string(bs[0].Message) != "m1" || len(bs[0].Recipients) != 2 {
		t.Fatalf("claimed %+v", bs)
	}
	a, b := bs[0].Recipients[0], bs[0].Recipients[1]
	if a.Addr != "a@x" || a.Report.Device != rep.Device || a.Report.Flags != rep.Flags || a.Report.Recipient != rep.Recipient || a.Report.MessageID != rep.MessageID || a.Attempts != 1 || a.State != store.RelaySending {
		t.Errorf("recipient %+v", a)
	}
	if again, _ := s.ClaimRelays(ctx, t0, 10); len(again) != 0 {
		t.Error("sending recipients claimed twice")
	}
	// A conflict rolls back the whole batch.
	err = s.FinishRelays(ctx, []store.RelayResult{
		{ID: a.ID, From: store.RelaySending, State: store.RelaySent},
		{ID: b.ID, From: store.RelayQueued, State: store.RelaySent},
	}, store.Work{})
	wantErr(t, err, store.ErrConflict)
	report := delivery(198036, "L:ndr", t0)
	must(t, s.FinishRelays(ctx, []store.RelayResult{
		{ID: a.ID, From: store.RelaySending, State: store.RelayFailed, Error: "550"},
		{ID: b.ID, From: store.RelaySending, State: store.RelayQueued, NextAttempt: t0.Add(30 * time.Minute), Error: "451"},
	}, store.Work{Deliveries: []store.NewDelivery{report}}))
	st, err := s.Stats(ctx)
	must(t, err)
	if st.Relays[store.RelayFailed] != 1 || st.Relays[store.RelayQueued] != 2 || st.Deliveries[store.DeliveryQueued] != 1 {
		t.Errorf("stats after finish %+v", st)
	}
	bs, err = s.ClaimRelays(ctx, t0.Add(time.Minute), 10)
	must(t, err)
	if len(bs) != 1 || string(bs[0].Message) != "dsn" || bs[0].From != "" {
		t.Fatalf("second claim %+v", bs)
	}
	must(t, s.FinishRelays(ctx, []store.RelayResult{{ID: bs[0].Recipients[0].ID, From: store.RelaySending,
		State: store.RelaySent}}, store.Work{}))
	// Expired recipients are not claimed but listed.
	if bs, _ := s.ClaimRelays(ctx, t0.Add(2*time.Hour), 10); len(bs) != 0 {
		t.Errorf("claimed expired relays %+v", bs)
	}
	exp, err := s.ExpiredRelays(ctx, t0.Add(2*time.Hour), 10)
	must(t, err)
	if len(exp) != 1 || len(exp[0].Recipients) != 1 || exp[0].Recipients[0].Addr != "b@x" ||
		exp[0].Recipients[0].LastError != "451" || string(exp[0].Message) != "m1" {
		t.Fatalf("expired %+v", exp)
	}
	must(t, s.FinishRelays(ctx, []store.RelayResult{{ID: b.ID, From: store.RelayQueued, State: store.RelayFailed}}, store.Work{}))
}

func testRecoverPurgeStats(t *testing.T, s store.Store) {
	ctx := context.Background()
	must(t, s.AddDevice(ctx, dev(10, "127.0.0.1")))
	must(t, s.Enqueue(ctx, store.Work{
		Deliveries: []store.NewDelivery{delivery(10, "a", t0), delivery(10, "b", t0)},
		Relays: []store.NewRelay{{Message: []byte("m"), NextAttempt: t0, Expires: t0.Add(time.Hour),
			Recipients: []store.RelayRecipient{{Addr: "a@x"}}}},
	}))
	c, err := s.ClaimDelivery(ctx, 10, t0, store.Limits{})
	must(t, err)
	_, err = s.ClaimRelays(ctx, t0, 10)
	must(t, err)
	st, err := s.Stats(ctx)
	must(t, err)
	if st.Devices != 1 || st.Deliveries[store.DeliveryInFlight] != 1 || st.Relays[store.RelaySending] != 1 {
		t.Errorf("stats %+v", st)
	}
	rec, err := s.Recover(ctx)
	must(t, err)
	if rec.Deliveries != 1 || rec.Relays != 1 {
		t.Errorf("recovered %+v", rec)
	}
	c2, err := s.ClaimDelivery(ctx, 10, t0, store.Limits{})
	must(t, err)
	if c2.ID != c.ID || c2.Attempts != 2 {
		t.Errorf("after recover claimed %+v", c2)
	}
	must(t, s.FinishDelivery(ctx, c2.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered, Status: 2}))
	sub, _, err := s.AddSubmission(ctx, &store.Submission{Device: 10, ContentHash: []byte{1}, ContentType: 32,
		Content: []byte{1}, Received: t0}, t0)
	must(t, err)
	_, err = s.DropSubmission(ctx, sub.ID, "drop")
	must(t, err)

	// Nothing finished before 'before' yet (rows were changed just now).
	n, err := s.Purge(ctx, time.Now().Add(-time.Hour), time.Now().Add(-time.Hour))
	must(t, err)
	if n != 0 {
		t.Errorf("purged %d recent rows", n)
	}
	n, err = s.Purge(ctx, time.Now().Add(time.Hour), time.Now().Add(time.Hour))
	must(t, err)
	if n != 3 { // delivered delivery, dropped submission, status
		t.Errorf("purged %d rows, want 3", n)
	}
	if _, err := s.DeliveryStatus(ctx, 10, "a"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("status after purge: %v", err)
	}
	st, _ = s.Stats(ctx)
	if st.Deliveries[store.DeliveryQueued] != 1 || st.Relays[store.RelayQueued] != 1 || st.Deliveries[store.DeliveryDelivered] != 0 {
		t.Errorf("stats after purge %+v", st)
	}
	must(t, s.Ping(ctx))
}
