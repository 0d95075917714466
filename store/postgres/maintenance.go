package postgres

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/esro-emsdp/emsdp/store"
)

// Purge deletes finished rows.
func (s *DB) Purge(ctx context.Context, before, statusBefore time.Time) (int, error) {
	total := 0
	err := s.tx(ctx, func(tx pgx.Tx) error {
		total = 0
		for _, q := range []struct {
			sql  string
			args []any
		}{
			{`DELETE FROM deliveries WHERE state IN ('delivered', 'failed') AND updated < $1`, []any{store.Millis(before)}},
			{`DELETE FROM relays WHERE state IN ('sent', 'failed') AND updated < $1`, []any{store.Millis(before)}},
			{`DELETE FROM relay_messages m WHERE NOT EXISTS (SELECT 1 FROM relays r WHERE r.message = m.id)`, nil},
			{`DELETE FROM submissions WHERE state IN ('released', 'dropped') AND updated < $1`, []any{store.Millis(before)}},
			{`DELETE FROM delivery_status WHERE updated < $1`, []any{store.Millis(statusBefore)}},
		} {
			t, err := tx.Exec(ctx, q.sql, q.args...)
			if err != nil {
				return errorf("purge", err)
			}
			total += int(t.RowsAffected())
		}
		return nil
	})
	return total, err
}

// Stats counts rows by state, in one statement (one snapshot).
func (s *DB) Stats(ctx context.Context) (store.Stats, error) {
	st := store.Stats{Deliveries: map[store.DeliveryState]int{}, Relays: map[store.RelayState]int{}}
	rows, err := s.query(ctx, `SELECT 'devices', '', COUNT(*) FROM devices
		UNION ALL SELECT 'pending', '', COUNT(*) FROM submissions WHERE state = 'pending'
		UNION ALL SELECT 'delivery', state, COUNT(*) FROM deliveries GROUP BY state
		UNION ALL SELECT 'relay', state, COUNT(*) FROM relays GROUP BY state`)
	if err != nil {
		return st, errorf("stats", err)
	}
	var kind, state string
	var n int
	_, err = pgx.ForEachRow(rows, []any{&kind, &state, &n}, func() error {
		switch kind {
		case "devices":
			st.Devices = n
		case "pending":
			st.SubmissionsPending = n
		case "delivery":
			st.Deliveries[store.DeliveryState(state)] = n
		case "relay":
			st.Relays[store.RelayState(state)] = n
		}
		return nil
	})
	if err != nil {
		return st, errorf("stats", err)
	}
	return st, nil
}

// Recover re-queues the deliveries and relays left in flight by this
// handle and by nodes that are gone (their process stopped or lost its
// database session); the work of other live servers stays theirs.
func (s *DB) Recover(ctx context.Context) (store.Recovered, error) {
	return s.requeue(ctx, nil)
}
