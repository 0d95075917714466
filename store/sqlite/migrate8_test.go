package sqlite

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/store"
)

// TestMigration8: a store of schema 7 with deliveries in every state is
// upgraded to schema 8 (contents in a table of their own, partial
// indices): every delivery keeps its content and size, every look-up of
// the queue finds the rows it found before (the queued ones due or not,
// the one in flight, which holds its device, the finished ones: counts,
// purge), and a content goes when its delivery goes, not before.
func TestMigration8(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), FileName)
	db, err := open(ctx, path, nil, 7)
	mustT(t, err)
	mustT(t, db.AddDevice(ctx, testDevice(7)))
	mustT(t, db.AddDevice(ctx, testDevice(8)))
	// Rows as a schema 7 program wrote them (this program's queries
	// assume schema 8: the rows are written by hand).
	ins := func(dev uint32, id, state string, next, updated time.Time) {
		t.Helper()
		_, err := db.sql.ExecContext(ctx, `INSERT INTO deliveries (device, message_id, content_type, content, priority,
			state, next_attempt, expires, created, updated) VALUES (?, ?, 32, ?, 1, ?, ?, ?, ?, ?)`,
			dev, id, []byte("content of "+id), state, store.Millis(next), store.Millis(t0.Add(time.Hour)), store.Millis(t0), store.Millis(updated))
		mustT(t, err)
	}
	ins(7, "due", "queued", t0, t0)
	ins(7, "later", "queued", t0.Add(10*time.Minute), t0)
	ins(8, "flying", "inflight", t0, t0)
	ins(8, "waiting", "queued", t0, t0)
	ins(8, "done", "delivered", time.Time{}, t0.Add(-time.Hour))
	ins(8, "refused", "failed", time.Time{}, t0)
	mustT(t, db.Close())

	db, err = Open(ctx, path, nil)
	mustT(t, err)
	defer db.Close()
	var names []string
	rows, err := db.sql.QueryContext(ctx, `SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'deliveries' ORDER BY name`)
	mustT(t, err)
	for rows.Next() {
		var n string
		mustT(t, rows.Scan(&n))
		names = append(names, n)
	}
	rows.Close()
	contents := func() (n int) {
		t.Helper()
		mustT(t, db.sql.QueryRowContext(ctx, `SELECT COUNT(*) FROM delivery_content`).Scan(&n))
		return n
	}
	if n := contents(); n != 6 {
		t.Errorf("%d contents, want 6", n)
	}
	l, err := db.ListQueue(ctx, store.QueueFilter{})
	mustT(t, err)
	for _, e := range l.Entries {
		if e.Size != len("content of "+e.MessageID) {
			t.Errorf("%s: size %d after migration", e.MessageID, e.Size)
		}
	}
	if e, err := db.QueueEntry(ctx, store.QueueRef{Kind: store.QueueDelivery, ID: l.Entries[0].Ref.ID}); err != nil ||
		string(e.Content) != "content of "+e.MessageID || e.Size != len(e.Content) {
		t.Errorf("entry after migration: %+v %v", e, err)
	}
	want := []string{"deliveries_changed", "deliveries_done", "deliveries_due", "deliveries_expires", "deliveries_inflight", "deliveries_queue"}
	if !slices.Equal(names, want) {
		t.Errorf("indices %v, want %v", names, want)
	}

	st, err := db.Stats(ctx)
	mustT(t, err)
	wantStats := map[store.DeliveryState]int{store.DeliveryQueued: 3, store.DeliveryInFlight: 1,
		store.DeliveryDelivered: 1, store.DeliveryFailed: 1}
	for k, n := range wantStats {
		if st.Deliveries[k] != n {
			t.Errorf("stats %v, want %v", st.Deliveries, wantStats)
			break
		}
	}
	qd, err := db.QueuedDevices(ctx, time.Time{})
	mustT(t, err)
	if len(qd) != 2 || qd[0].Device != 7 || !qd[0].Next.Equal(t0) || qd[1].Device != 8 {
		t.Errorf("queued devices %+v", qd)
	}
	if next, ok, err := db.NextDue(ctx, t0); err != nil || !ok || !next.Equal(t0.Add(10*time.Minute)) {
		t.Errorf("next due %v %v %v, want %v", next, ok, err, t0.Add(10*time.Minute))
	}
	if _, err := db.ClaimDelivery(ctx, 8, t0, store.Limits{}); !errors.Is(err, store.ErrBusy) {
		t.Errorf("claim beside a delivery in flight: %v, want ErrBusy", err)
	}
	d, err := db.ClaimDelivery(ctx, 7, t0, store.Limits{})
	if err != nil || d.MessageID != "due" || string(d.Content) != "content of due" {
		t.Fatalf("claim: %+v %v", d, err)
	}
	if _, err := db.ClaimDelivery(ctx, 7, t0.Add(time.Hour), store.Limits{}); !errors.Is(err, store.ErrBusy) {
		t.Errorf("second claim: %v, want ErrBusy", err)
	}
	mustT(t, db.FinishDelivery(ctx, d.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered, Status: 2}))
	rec, err := db.Recover(ctx)
	if err != nil || rec.Deliveries != 1 {
		t.Errorf("recover: %+v %v, want the one in flight", rec, err)
	}
	if d, err := db.ClaimDelivery(ctx, 8, t0, store.Limits{}); err != nil || d.MessageID != "flying" {
		t.Errorf("claim after recovery: %+v %v, want the recovered one first", d, err)
	}
	// Purge (t0 is in the future): the finished rows updated before it,
	// "done" and the one delivered just now, and its status; not
	// "refused", finished at t0.
	n, err := db.Purge(ctx, t0.Add(-time.Minute), t0.Add(-24*time.Hour))
	if err != nil || n != 3 {
		t.Errorf("purge: %d %v, want 3 rows", n, err)
	}
	st, err = db.Stats(ctx)
	mustT(t, err)
	if st.Deliveries[store.DeliveryDelivered] != 0 || st.Deliveries[store.DeliveryFailed] != 1 ||
		st.Deliveries[store.DeliveryQueued] != 2 || st.Deliveries[store.DeliveryInFlight] != 1 {
		t.Errorf("stats after: %v", st.Deliveries)
	}
	if n := contents(); n != 4 {
		t.Errorf("%d contents after the purge, want 4 (the rows left)", n)
	}
	l, err = db.ListQueue(ctx, store.QueueFilter{States: []string{"queued"}})
	mustT(t, err)
	if len(l.Entries) != 2 {
		t.Fatalf("queued entries %+v", l.Entries)
	}
	ch, err := db.RemoveQueued(ctx, []store.QueueRef{l.Entries[0].Ref})
	if err != nil || ch.Changed != 1 {
		t.Errorf("remove: %+v %v", ch, err)
	}
	if n := contents(); n != 3 {
		t.Errorf("%d contents after a removal, want 3", n)
	}
}
