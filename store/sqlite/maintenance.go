package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	"github.com/esro-emsdp/emsdp/store"
)

// The deliveries' statements of the calls below, which keep their text
// (stmt.go). Each names the states it wants, so that it reads their
// partial indices (schema.go), not the table.
const (
	qRecoverDeliveries = `UPDATE deliveries SET state = 'queued', updated = ? WHERE state = 'inflight'`
	qPurgeDeliveries   = `DELETE FROM deliveries WHERE state IN ('delivered', 'failed') AND updated < ?`
	qCountDeliveries   = `SELECT 'queued', COUNT(*) FROM deliveries WHERE state = 'queued' HAVING COUNT(*) > 0
		UNION ALL SELECT 'inflight', COUNT(*) FROM deliveries WHERE state = 'inflight' HAVING COUNT(*) > 0
		UNION ALL SELECT state, COUNT(*) FROM deliveries WHERE state IN ('delivered', 'failed') GROUP BY state`
)

// Recover re-queues in-flight work of a stopped process.
func (s *DB) Recover(ctx context.Context) (store.Recovered, error) {
	var rec store.Recovered
	err := s.tx(ctx, func(tx *sql.Tx) error {
		now := store.Millis(time.Now())
		r, err := tx.ExecContext(ctx, qRecoverDeliveries, now)
		if err != nil {
			return fmt.Errorf("sqlite: recover: %w", err)
		}
		n, _ := r.RowsAffected()
		rec.Deliveries = int(n)
		r, err = tx.ExecContext(ctx, `UPDATE relays SET state = ?, updated = ? WHERE state = ?`,
			string(store.RelayQueued), now, string(store.RelaySending))
		if err != nil {
			return fmt.Errorf("sqlite: recover: %w", err)
		}
		n, _ = r.RowsAffected()
		rec.Relays = int(n)
		return nil
	})
	return rec, err
}

// Purge deletes finished rows.
func (s *DB) Purge(ctx context.Context, before, statusBefore time.Time) (int, error) {
	total := 0
	err := s.tx(ctx, func(tx *sql.Tx) error {
		total = 0
		for _, q := range []struct {
			sql  string
			args []any
		}{
			{qPurgeDeliveries, []any{store.Millis(before)}},
			{`DELETE FROM relays WHERE state IN ('sent', 'failed') AND updated < ?`, []any{store.Millis(before)}},
			{`DELETE FROM relay_messages WHERE NOT EXISTS (SELECT 1 FROM relays WHERE relays.message = relay_messages.id)`, nil},
			{`DELETE FROM submissions WHERE state IN ('released', 'dropped') AND updated < ?`, []any{store.Millis(before)}},
			{`DELETE FROM delivery_status WHERE updated < ?`, []any{store.Millis(statusBefore)}},
		} {
			r, err := tx.ExecContext(ctx, q.sql, q.args...)
			if err != nil {
				return fmt.Errorf("sqlite: purge: %w", err)
			}
			n, _ := r.RowsAffected()
			total += int(n)
		}
		return nil
	})
	return total, err
}

// Stats counts rows by state.
func (s *DB) Stats(ctx context.Context) (store.Stats, error) {
	st := store.Stats{Deliveries: map[store.DeliveryState]int{}, Relays: map[store.RelayState]int{}}
	tx, err := s.sql.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return st, fmt.Errorf("sqlite: stats: %w", err)
	}
	defer tx.Rollback()
	if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM devices`).Scan(&st.Devices); err != nil {
		return st, fmt.Errorf("sqlite: stats: %w", err)
	}
	if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM submissions WHERE state = 'pending'`).Scan(&st.SubmissionsPending); err != nil {
		return st, fmt.Errorf("sqlite: stats: %w", err)
	}
	for _, q := range []struct {
		sql string
		put func(string, int)
	}{
		{qCountDeliveries, func(k string, n int) { st.Deliveries[store.DeliveryState(k)] = n }},
		{`SELECT state, COUNT(*) FROM relays GROUP BY state`, func(k string, n int) { st.Relays[store.RelayState(k)] = n }},
	} {
		rows, err := tx.QueryContext(ctx, q.sql)
		if err != nil {
			return st, fmt.Errorf("sqlite: stats: %w", err)
		}
		for rows.Next() {
			var k string
			var n int
			if err := rows.Scan(&k, &n); err != nil {
				rows.Close()
				return st, fmt.Errorf("sqlite: stats: %w", err)
			}
			q.put(k, n)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return st, fmt.Errorf("sqlite: stats: %w", err)
		}
	}
	return st, nil
}
