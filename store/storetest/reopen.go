package storetest

import (
	"context"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/store"
)

// OpenAgain returns a fresh, empty store and a function that opens the
// same durable store again after the first handle is closed.
type OpenAgain func(t *testing.T) (first store.Store, reopen func(t *testing.T) store.Store)

// Reopen checks durability across handles: everything written is there
// after closing and reopening, a re-invoked submission is still the same
// one, and the counters continue instead of restarting.
func Reopen(t *testing.T, open OpenAgain) {
	ctx := context.Background()
	db, reopen := open(t)
	must(t, db.AddDevice(ctx, dev(198036, "192.0.2.1")))
	sub, _, err := db.AddSubmission(ctx, &store.Submission{Device: 198036, InstanceID: 3, ContentHash: []byte("h"),
		ContentType: 32, Content: []byte("ipm"), Received: t0}, t0)
	must(t, err)
	must(t, db.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{delivery(198036, "m", t0)}}))
	first, err := db.ReserveInstanceIDs(ctx, 198036, 5)
	must(t, err)
	must(t, db.Close())

	db = reopen(t)
	defer db.Close()
	if _, err := db.Device(ctx, 198036); err != nil {
		t.Fatal(err)
	}
	// The submission the closed handle left pending (as a crashed server
	// would) is listed for relaying.
	pend, err := db.PendingSubmissions(ctx, t0.Add(time.Second))
	must(t, err)
	if len(pend) != 1 || pend[0].ID != sub.ID || string(pend[0].Content) != "ipm" {
		t.Errorf("pending after reopen: %+v", pend)
	}
	again, dup, err := db.AddSubmission(ctx, &store.Submission{Device: 198036, InstanceID: 3, ContentHash: []byte("h"),
		ContentType: 32, Content: []byte("ipm"), Received: t0.Add(time.Second)}, t0)
	must(t, err)
	if !dup || again.Number != sub.Number {
		t.Errorf("dedupe after reopen: dup=%v %+v", dup, again)
	}
	n, err := db.NextMessageNumber(ctx, t0)
	must(t, err)
	if n != sub.Number+1 {
		t.Errorf("counter after reopen %d, want %d", n, sub.Number+1)
	}
	next, err := db.ReserveInstanceIDs(ctx, 198036, 1)
	must(t, err)
	if next != first+5 {
		t.Errorf("instance id after reopen %d, want %d", next, first+5)
	}
	if d, err := db.ClaimDelivery(ctx, 198036, t0, store.Limits{}); err != nil || d.MessageID != "m" {
		t.Errorf("delivery after reopen: %v %v", d, err)
	}
}
