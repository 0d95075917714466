package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	"github.com/esro-emsdp/emsdp/store"
)

const (
	relayCols = `r.id, r.message, r.rcpt, r.state, r.attempts, r.expires, r.last_error, r.report_device,
	r.report_mail, r.report_flags, r.report_recipient, r.report_message_id, r.report_headers, r.report_dsn,
	m.envelope_from, m.data`
	qDueRelays = `SELECT ` + relayCols + ` FROM relays r JOIN relay_messages m ON m.id = r.message
		WHERE r.state = ? AND r.next_attempt <= ? AND r.expires > ? ORDER BY r.message, r.id LIMIT ?`
	qClaimRelay  = `UPDATE relays SET state = ?, attempts = attempts + 1, updated = ? WHERE id = ?`
	qFinishRelay = `UPDATE relays SET state = ?, next_attempt = ?, last_error = ?,
		attempts = MAX(attempts - ?, 0), updated = ? WHERE id = ? AND state = ?`
	qExpiredRelays = `SELECT ` + relayCols + ` FROM relays r JOIN relay_messages m ON m.id = r.message
		WHERE r.state = ? AND r.expires <= ? ORDER BY r.message, r.id LIMIT ?`
)

// relayBatches reads relay rows (joined with their message) into batches.
func relayBatches(rows *sql.Rows) ([]*store.RelayBatch, error) {
	defer rows.Close()
	var out []*store.RelayBatch
	byRef := map[int64]*store.RelayBatch{}
	for rows.Next() {
		var rc store.RelayRecipient
		var ref, exp int64
		var state, from string
		var data []byte
		if err := rows.Scan(&rc.ID, &ref, &rc.Addr, &state, &rc.Attempts, &exp, &rc.LastError, &rc.Report.Device,
			&rc.Report.Mail, &rc.Report.Flags, &rc.Report.Recipient, &rc.Report.MessageID, &rc.Report.Headers,
			&rc.Report.DSN, &from, &data); err != nil {
			return nil, err
		}
		rc.State, rc.Expires = store.RelayState(state), store.FromMillis(exp)
		b := byRef[ref]
		if b == nil {
			b = &store.RelayBatch{MessageRef: ref, From: from, Message: data}
			byRef[ref] = b
			out = append(out, b)
		}
		b.Recipients = append(b.Recipients, rc)
	}
	return out, rows.Err()
}

// ClaimRelays moves due relay recipients to sending.
func (s *DB) ClaimRelays(ctx context.Context, now time.Time, limit int) ([]*store.RelayBatch, error) {
	var out []*store.RelayBatch
	err := s.tx(ctx, func(tx *sql.Tx) error {
		rows, err := s.query(ctx, tx, qDueRelays,
			string(store.RelayQueued), store.Millis(now), store.Millis(now), limit)
		if err != nil {
			return fmt.Errorf("sqlite: claim relays: %w", err)
		}
		if out, err = relayBatches(rows); err != nil {
			return fmt.Errorf("sqlite: claim relays: %w", err)
		}
		for _, b := range out {
			for i := range b.Recipients {
				rc := &b.Recipients[i]
				if _, err := s.exec(ctx, tx, qClaimRelay, string(store.RelaySending), store.Millis(now), rc.ID); err != nil {
					return fmt.Errorf("sqlite: claim relays: %w", err)
				}
				rc.State, rc.Attempts = store.RelaySending, rc.Attempts+1
			}
		}
		return nil
	})
	return out, err
}

// FinishRelays applies rs and queues w atomically.
func (s *DB) FinishRelays(ctx context.Context, rs []store.RelayResult, w store.Work) error {
	for _, r := range rs {
		switch r.State {
		case store.RelayQueued, store.RelaySent, store.RelayFailed:
		default:
			return fmt.Errorf("%w: relay result state %q", store.ErrInvalid, r.State)
		}
	}
	return s.tx(ctx, func(tx *sql.Tx) error {
		now := time.Now()
		for _, r := range rs {
			undo := 0
			if r.State == store.RelayQueued && r.Requeue {
				undo = 1
			}
			next := r.NextAttempt
			if r.State != store.RelayQueued {
				next = time.Time{}
			}
			res, err := s.exec(ctx, tx, qFinishRelay,
				string(r.State), store.Millis(next), r.Error, undo, store.Millis(now), r.ID, string(r.From))
			if err != nil {
				return fmt.Errorf("sqlite: finish relay: %w", err)
			}
			if n, _ := res.RowsAffected(); n == 0 {
				return fmt.Errorf("%w: relay %d is not %s", store.ErrConflict, r.ID, r.From)
			}
		}
		return s.insertWork(ctx, tx, w, now)
	})
}

// ExpiredRelays lists queued relay recipients past their expiry.
func (s *DB) ExpiredRelays(ctx context.Context, now time.Time, limit int) ([]*store.RelayBatch, error) {
	rows, err := s.query(ctx, nil, qExpiredRelays, string(store.RelayQueued), store.Millis(now), limit)
	if err != nil {
		return nil, fmt.Errorf("sqlite: expired relays: %w", err)
	}
	out, err := relayBatches(rows)
	if err != nil {
		return nil, fmt.Errorf("sqlite: expired relays: %w", err)
	}
	return out, nil
}
