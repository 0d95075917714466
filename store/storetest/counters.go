package storetest

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/store"
)

func testInstanceIDs(t *testing.T, s store.Store) {
	ctx := context.Background()
	must(t, s.AddDevice(ctx, dev(1, "127.0.0.1")))
	want := 0
	for _, n := range []int{1, 3, 100, 200, 1} {
		got, err := s.ReserveInstanceIDs(ctx, 1, n)
		must(t, err)
		if int(got) != want%256 {
			t.Fatalf("reserve %d: first %d, want %d", n, got, want%256)
		}
		want += n
	}
	_, err := s.ReserveInstanceIDs(ctx, 2, 1)
	wantErr(t, err, store.ErrNotFound)
	_, err = s.ReserveInstanceIDs(ctx, 1, 0)
	wantErr(t, err, store.ErrInvalid)

	// A claim reserves what Limits.InstanceIDs asks for, from the same
	// counter, in its own write; a count out of range undoes the claim.
	must(t, s.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{
		delivery(1, "L:a", t0), delivery(1, "L:b", t0), delivery(1, "L:c", t0)}}))
	var asked []string
	ids := func(n int) store.Limits {
		return store.Limits{InstanceIDs: func(d *store.Delivery) int {
			asked = append(asked, d.MessageID)
			return n
		}}
	}
	_, err = s.ClaimDelivery(ctx, 1, t0, ids(257))
	wantErr(t, err, store.ErrInvalid)
	c, err := s.ClaimDelivery(ctx, 1, t0, ids(3))
	must(t, err)
	if c.MessageID != "L:a" || c.Attempts != 1 || int(c.InstanceBase) != want%256 {
		t.Fatalf("claimed %s (attempt %d) with instance ids from %d, want L:a (1) from %d", c.MessageID, c.Attempts, c.InstanceBase, want%256)
	}
	want += 3
	must(t, s.FinishDelivery(ctx, c.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered}))
	c, err = s.ClaimDelivery(ctx, 1, t0, ids(0)) // none needed: the counter stays
	must(t, err)
	must(t, s.FinishDelivery(ctx, c.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered}))
	if got, err := s.ReserveInstanceIDs(ctx, 1, 1); err != nil || int(got) != want%256 {
		t.Fatalf("reserve after claims: first %d (%v), want %d", got, err, want%256)
	}
	if !slices.Equal(asked[len(asked)-2:], []string{"L:a", "L:b"}) || asked[0] != "L:a" {
		t.Errorf("asked for the instance ids of %v", asked)
	}
	want++

	// A peek takes nothing: the same delivery and ids twice; its outcome,
	// finished from queued, counts the attempt and reserves the ids.
	for range 2 {
		p, err := s.PeekDelivery(ctx, 1, t0, ids(2))
		must(t, err)
		if p.MessageID != "L:c" || p.State != store.DeliveryQueued || p.Attempts != 0 || int(p.InstanceBase) != want%256 {
			t.Fatalf("peeked %s (%s, attempt %d) with instance ids from %d, want L:c (queued, 0) from %d",
				p.MessageID, p.State, p.Attempts, p.InstanceBase, want%256)
		}
	}
	p, err := s.PeekDelivery(ctx, 1, t0, store.Limits{})
	must(t, err)
	must(t, s.FinishDelivery(ctx, p.ID, store.DeliveryQueued, store.DeliveryResult{State: store.DeliveryQueued,
		NextAttempt: t0, Attempted: true, InstanceIDs: 2}))
	want += 2
	c, err = s.ClaimDelivery(ctx, 1, t0, ids(1))
	must(t, err)
	if c.MessageID != "L:c" || c.Attempts != 2 || int(c.InstanceBase) != want%256 {
		t.Errorf("claimed %s (attempt %d) with instance ids from %d after a peeked attempt, want L:c (2) from %d",
			c.MessageID, c.Attempts, c.InstanceBase, want%256)
	}
	_, err = s.PeekDelivery(ctx, 1, t0, store.Limits{})
	wantErr(t, err, store.ErrBusy)
	must(t, s.FinishDelivery(ctx, c.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered}))
	_, err = s.PeekDelivery(ctx, 1, t0, store.Limits{})
	wantErr(t, err, store.ErrNotFound)
}

func testMessageNumbers(t *testing.T, s store.Store) {
	ctx := context.Background()
	next := func(tm time.Time) uint32 {
		n, err := s.NextMessageNumber(ctx, tm)
		must(t, err)
		return n
	}
	for i := uint32(1); i <= 3; i++ {
		if n := next(t0); n != i {
			t.Fatalf("number %d, want %d", n, i)
		}
	}
	// A new day restarts at 1; a clock stepping back keeps counting.
	if n := next(t0.Add(24 * time.Hour)); n != 1 {
		t.Errorf("next day: %d, want 1", n)
	}
	if n := next(t0); n != 2 {
		t.Errorf("clock back: %d, want 2", n)
	}
	// Submissions share the counter.
	sub, _, err := s.AddSubmission(ctx, &store.Submission{Device: 1, ContentHash: []byte{1}, ContentType: 32,
		Content: []byte{0x30, 0}, Received: t0.Add(24 * time.Hour)}, t0)
	must(t, err)
	if sub.Number != 3 || sub.LocalTime != uint32(t0.Add(24*time.Hour).Unix()) {
		t.Errorf("submission id (%d, %d)", sub.LocalTime, sub.Number)
	}
}
