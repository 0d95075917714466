package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/esro-emsdp/emsdp/store"
)

// The operator's view of the queues (emsdp queue). These calls are rare,
// so they run their text (no prepared statements, see stmt.go), built for
// the filter given. Every change is conditional on state = 'queued' inside
// one write transaction, so an entry the server claimed meanwhile (moved
// to in flight) is never touched.

// queueTable is the table of a kind's entries.
func queueTable(k store.QueueKind) string {
	if k == store.QueueRelay {
		return "relays"
	}
	return "deliveries"
}

// stateCond is "AND col IN (...)" for the states of f, or "".
func stateCond(col string, states []string) (string, []any) {
	if len(states) == 0 {
		return "", nil
	}
	args := make([]any, len(states))
	for i, st := range states {
		args[i] = st
	}
	return ` AND ` + col + ` IN (?` + strings.Repeat(`, ?`, len(states)-1) + `)`, args
}

// queueConds are the WHERE conditions of f for deliveries and relays
// (col prefixes the column names); ok is false for a queue f excludes.
type queueCond struct {
	where string
	args  []any
	ok    bool
}

func queueConds(f store.QueueFilter, dcol, rcol string) (d, r queueCond) {
	d.where, d.args = stateCond(dcol+"state", f.States)
	d.where = `1 = 1` + d.where
	if f.Device != 0 {
		d.where += ` AND ` + dcol + `device = ?`
		d.args = append(d.args, int64(f.Device))
	}
	d.ok = f.Kind != store.QueueRelay
	r.where, r.args = stateCond(rcol+"state", f.States)
	r.where = `1 = 1` + r.where
	r.ok = f.Kind != store.QueueDelivery && f.Device == 0
	return d, r
}

// ListQueue lists queue entries matching f and counts all matches, in one
// read transaction.
func (s *DB) ListQueue(ctx context.Context, f store.QueueFilter) (store.QueueList, error) {
	out := store.QueueList{Counts: map[store.QueueKind]map[string]int{}}
	if err := store.CheckQueueFilter(f); err != nil {
		return out, err
	}
	d, r := queueConds(f, "", "r.")
	var parts []string
	var args []any
	if d.ok {
		parts = append(parts, `SELECT 'delivery' AS kind, id, state, device, '' AS rcpt, '' AS sender, 0 AS message,
			message_id, content_type, priority, submission_time, size, attempts, next_attempt,
			expires, created, updated, last_error FROM deliveries WHERE `+d.where)
		args = append(args, d.args...)
	}
	if r.ok {
		// (Named as in the first part: this part may be alone.)
		parts = append(parts, `SELECT 'relay' AS kind, r.id AS id, r.state, 0, r.rcpt, m.envelope_from, r.message,
			r.report_message_id, 0, 0, NULL, length(m.data), r.attempts, r.next_attempt, r.expires, r.created AS created,
			r.updated, r.last_error FROM relays r JOIN relay_messages m ON m.id = r.message WHERE `+r.where)
		args = append(args, r.args...)
	}
	if len(parts) == 0 {
		return out, nil
	}
	tx, err := s.sql.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return out, fmt.Errorf("sqlite: list queue: %w", err)
	}
	defer tx.Rollback()
	rows, err := tx.QueryContext(ctx, `SELECT * FROM (`+strings.Join(parts, ` UNION ALL `)+`)
		ORDER BY created, kind, id LIMIT ?`, append(args, store.QueueLimit(f))...)
	if err != nil {
		return out, fmt.Errorf("sqlite: list queue: %w", err)
	}
	for rows.Next() {
		var e store.QueueEntry
		var kind, state string
		var st sql.NullInt64
		var next, exp, created, updated int64
		if err := rows.Scan(&kind, &e.Ref.ID, &state, &e.Device, &e.Recipient, &e.From, &e.MessageRef, &e.MessageID,
			&e.ContentType, &e.Priority, &st, &e.Size, &e.Attempts, &next, &exp, &created, &updated, &e.LastError); err != nil {
			rows.Close()
			return out, fmt.Errorf("sqlite: list queue: %w", err)
		}
		e.Ref.Kind, e.State = store.QueueKind(kind), state
		if st.Valid {
			v := uint32(st.Int64)
			e.SubmissionTime = &v
		}
		e.NextAttempt, e.Expires, e.Created, e.Updated = store.FromMillis(next), store.FromMillis(exp), store.FromMillis(created), store.FromMillis(updated)
		out.Entries = append(out.Entries, e)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return out, fmt.Errorf("sqlite: list queue: %w", err)
	}

	// The counts, over the same snapshot, limit or not.
	d, r = queueConds(f, "", "")
	parts, args = nil, nil
	if d.ok {
		parts = append(parts, `SELECT 'delivery', state, COUNT(*) FROM deliveries WHERE `+d.where+` GROUP BY state`)
		args = append(args, d.args...)
	}
	if r.ok {
		parts = append(parts, `SELECT 'relay', state, COUNT(*) FROM relays WHERE `+r.where+` GROUP BY state`)
		args = append(args, r.args...)
	}
	rows, err = tx.QueryContext(ctx, strings.Join(parts, ` UNION ALL `), args...)
	if err != nil {
		return out, fmt.Errorf("sqlite: count queue: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var kind, state string
		var n int
		if err := rows.Scan(&kind, &state, &n); err != nil {
			return out, fmt.Errorf("sqlite: count queue: %w", err)
		}
		k := store.QueueKind(kind)
		if out.Counts[k] == nil {
			out.Counts[k] = map[string]int{}
		}
		out.Counts[k][state] = n
	}
	if err := rows.Err(); err != nil {
		return out, fmt.Errorf("sqlite: count queue: %w", err)
	}
	return out, nil
}

const qRelayEntry = `SELECT r.id, r.message, r.rcpt, r.state, r.attempts, r.next_attempt, r.expires, r.created, r.updated,
	r.last_error, r.report_device, r.report_mail, r.report_flags, r.report_recipient, r.report_message_id,
	r.report_headers, r.report_dsn, m.envelope_from, m.data FROM relays r JOIN relay_messages m ON m.id = r.message
	WHERE r.id = ?`

// QueueEntry returns one entry with its report and contents.
func (s *DB) QueueEntry(ctx context.Context, ref store.QueueRef) (*store.QueueEntry, error) {
	if _, err := store.CheckQueueRefs([]store.QueueRef{ref}); err != nil {
		return nil, err
	}
	if ref.Kind == store.QueueDelivery {
		d, err := scanDelivery(s.sql.QueryRowContext(ctx, `SELECT `+deliveryCols+` FROM `+deliveryFrom+` WHERE q.id = ?`, ref.ID))
		if errors.Is(err, sql.ErrNoRows) {
			return nil, fmt.Errorf("%w: delivery %d", store.ErrNotFound, ref.ID)
		}
		if err != nil {
			return nil, fmt.Errorf("sqlite: queue entry: %w", err)
		}
		return &store.QueueEntry{Ref: ref, State: string(d.State), Device: d.Device, MessageID: d.MessageID,
			ContentType: d.ContentType, Priority: d.Priority, SubmissionTime: d.SubmissionTime, Size: len(d.Content),
			Attempts: d.Attempts, NextAttempt: d.NextAttempt, Expires: d.Expires, Created: d.Created, Updated: d.Updated,
			LastError: d.LastError, Report: d.Report, Content: d.Content}, nil
	}
	e := store.QueueEntry{Ref: ref}
	var next, exp, created, updated int64
	err := s.sql.QueryRowContext(ctx, qRelayEntry, ref.ID).Scan(&e.Ref.ID, &e.MessageRef, &e.Recipient, &e.State,
		&e.Attempts, &next, &exp, &created, &updated, &e.LastError, &e.Report.Device, &e.Report.Mail, &e.Report.Flags,
		&e.Report.Recipient, &e.Report.MessageID, &e.Report.Headers, &e.Report.DSN, &e.From, &e.Content)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("%w: relay %d", store.ErrNotFound, ref.ID)
	}
	if err != nil {
		return nil, fmt.Errorf("sqlite: queue entry: %w", err)
	}
	e.MessageID, e.Size = e.Report.MessageID, len(e.Content)
	e.NextAttempt, e.Expires, e.Created, e.Updated = store.FromMillis(next), store.FromMillis(exp), store.FromMillis(created), store.FromMillis(updated)
	return &e, nil
}

// skipRef records why ref was left alone: its state, or "" when it does
// not exist.
func skipRef(ctx context.Context, tx *sql.Tx, ch *store.QueueChange, ref store.QueueRef) error {
	var state string
	err := tx.QueryRowContext(ctx, `SELECT state FROM `+queueTable(ref.Kind)+` WHERE id = ?`, ref.ID).Scan(&state)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return err
	}
	if state == store.InFlightState(ref.Kind) {
		ch.InFlight++
	}
	ch.Skipped = append(ch.Skipped, store.QueueSkip{Ref: ref, State: state})
	return nil
}

// RetryQueued makes the selected queued entries due at now.
func (s *DB) RetryQueued(ctx context.Context, sel store.QueueSelect, now time.Time) (store.QueueChange, error) {
	var ch store.QueueChange
	sel, err := store.CheckQueueSelect(sel)
	if err != nil {
		return ch, err
	}
	const set = retrySet
	err = s.tx(ctx, func(tx *sql.Tx) error {
		ch = store.QueueChange{}
		if sel.Force {
			if err := s.force(ctx, tx, sel, now, &ch); err != nil {
				return err
			}
		}
		for _, ref := range sel.Refs {
			res, err := tx.ExecContext(ctx, `UPDATE `+queueTable(ref.Kind)+set+` AND id = ?`, store.Millis(now), store.Millis(now), ref.ID)
			if err != nil {
				return err
			}
			if n, _ := res.RowsAffected(); n > 0 {
				ch.Changed++
				continue
			}
			if err := skipRef(ctx, tx, &ch, ref); err != nil {
				return err
			}
		}
		if len(sel.Refs) > 0 {
			return nil
		}
		if sel.Kind == store.QueueRelay {
			return s.retryRelays(ctx, tx, &ch, now)
		}
		upd, cnt := `UPDATE deliveries`+set, `SELECT COUNT(*) FROM deliveries WHERE state = 'inflight'`
		uargs, cargs := []any{store.Millis(now), store.Millis(now)}, []any(nil)
		if sel.Device != 0 {
			upd, cnt = upd+` AND device = ?`, cnt+` AND device = ?`
			uargs, cargs = append(uargs, int64(sel.Device)), []any{int64(sel.Device)}
		}
		res, err := tx.ExecContext(ctx, upd, uargs...)
		if err != nil {
			return err
		}
		n, _ := res.RowsAffected()
		ch.Changed += int(n)
		var busy int
		if err := tx.QueryRowContext(ctx, cnt, cargs...).Scan(&busy); err != nil {
			return err
		}
		ch.InFlight += busy
		if !sel.All || sel.Kind == store.QueueDelivery {
			return nil
		}
		return s.retryRelays(ctx, tx, &ch, now)
	})
	if err != nil {
		return store.QueueChange{}, fmt.Errorf("sqlite: retry queued: %w", err)
	}
	return ch, nil
}

// force moves the in-flight entries of sel back to queued, due at now
// (QueueSelect.Force); attempts stay counted.
func (s *DB) force(ctx context.Context, tx *sql.Tx, sel store.QueueSelect, now time.Time, ch *store.QueueChange) error {
	const set = ` SET state = 'queued', next_attempt = ?, updated = ? WHERE state = `
	run := func(q string, args ...any) error {
		res, err := tx.ExecContext(ctx, q, append([]any{store.Millis(now), store.Millis(now)}, args...)...)
		if err != nil {
			return err
		}
		n, _ := res.RowsAffected()
		ch.Forced += int(n)
		return nil
	}
	for _, ref := range sel.Refs {
		if err := run(`UPDATE `+queueTable(ref.Kind)+set+`'`+store.InFlightState(ref.Kind)+`' AND id = ?`, ref.ID); err != nil {
			return err
		}
	}
	if sel.All && sel.Kind != store.QueueRelay {
		if err := run(`UPDATE deliveries` + set + `'inflight'`); err != nil {
			return err
		}
	}
	if sel.All && sel.Kind != store.QueueDelivery {
		if err := run(`UPDATE relays` + set + `'sending'`); err != nil {
			return err
		}
	}
	if sel.Device != 0 {
		return run(`UPDATE deliveries`+set+`'inflight' AND device = ?`, int64(sel.Device))
	}
	return nil
}

// retrySet makes queued entries due; MIN: an entry already due keeps its
// place.
const retrySet = ` SET next_attempt = MIN(next_attempt, ?), updated = ? WHERE state = 'queued'`

// retryRelays makes every queued relay recipient due at now.
func (s *DB) retryRelays(ctx context.Context, tx *sql.Tx, ch *store.QueueChange, now time.Time) error {
	res, err := tx.ExecContext(ctx, `UPDATE relays`+retrySet, store.Millis(now), store.Millis(now))
	if err != nil {
		return err
	}
	n, _ := res.RowsAffected()
	ch.Changed += int(n)
	var busy int
	if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM relays WHERE state = 'sending'`).Scan(&busy); err != nil {
		return err
	}
	ch.InFlight += busy
	return nil
}

// RemoveQueued deletes the queued entries of refs, and the message of a
// relay whose last recipient goes.
func (s *DB) RemoveQueued(ctx context.Context, refs []store.QueueRef) (store.QueueChange, error) {
	var ch store.QueueChange
	refs, err := store.CheckQueueRefs(refs)
	if err != nil || len(refs) == 0 {
		return ch, err
	}
	err = s.tx(ctx, func(tx *sql.Tx) error {
		ch = store.QueueChange{}
		for _, ref := range refs {
			removed := false
			if ref.Kind == store.QueueDelivery {
				res, err := tx.ExecContext(ctx, `DELETE FROM deliveries WHERE id = ? AND state = 'queued'`, ref.ID)
				if err != nil {
					return err
				}
				n, _ := res.RowsAffected()
				removed = n > 0
			} else {
				var msg int64
				err := tx.QueryRowContext(ctx, `DELETE FROM relays WHERE id = ? AND state = 'queued' RETURNING message`,
					ref.ID).Scan(&msg)
				switch {
				case err == nil:
					removed = true
					if _, err := tx.ExecContext(ctx, `DELETE FROM relay_messages WHERE id = ?1
						AND NOT EXISTS (SELECT 1 FROM relays WHERE message = ?1)`, msg); err != nil {
						return err
					}
				case !errors.Is(err, sql.ErrNoRows):
					return err
				}
			}
			if removed {
				ch.Changed++
				continue
			}
			if err := skipRef(ctx, tx, &ch, ref); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return store.QueueChange{}, fmt.Errorf("sqlite: remove queued: %w", err)
	}
	return ch, nil
}
