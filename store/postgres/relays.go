package postgres

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/esro-emsdp/emsdp/store"
)

const relayCols = `id, message, rcpt, state, attempts, expires, last_error, report_device, report_mail,
	report_flags, report_recipient, report_message_id, report_headers, report_dsn`

type relayRow struct {
	ref int64
	rc  store.RelayRecipient
}

func scanRelay(row pgx.CollectableRow) (relayRow, error) {
	var r relayRow
	var exp int64
	var state string
	var rcpt, lastErr, mail, name, msgID, dsn []byte
	if err := row.Scan(&r.rc.ID, &r.ref, &rcpt, &state, &r.rc.Attempts, &exp, &lastErr, &r.rc.Report.Device,
		&mail, &r.rc.Report.Flags, &name, &msgID, &r.rc.Report.Headers, &dsn); err != nil {
		return r, err
	}
	r.rc.Report.DSN = string(dsn)
	r.rc.Addr, r.rc.LastError, r.rc.Report.Mail = string(rcpt), string(lastErr), string(mail)
	r.rc.Report.Recipient, r.rc.Report.MessageID = string(name), string(msgID)
	r.rc.State, r.rc.Expires = store.RelayState(state), store.FromMillis(exp)
	return r, nil
}

// relayBatches groups recipient rows (in any order) into batches ordered
// by message and recipient id, and fills in the messages.
func relayBatches(ctx context.Context, q querier, rs []relayRow) ([]*store.RelayBatch, error) {
	if len(rs) == 0 {
		return nil, nil
	}
	slices.SortFunc(rs, func(a, b relayRow) int {
		return cmp.Or(cmp.Compare(a.ref, b.ref), cmp.Compare(a.rc.ID, b.rc.ID))
	})
	var out []*store.RelayBatch
	var refs []int64
	for _, r := range rs {
		if len(out) == 0 || out[len(out)-1].MessageRef != r.ref {
			out = append(out, &store.RelayBatch{MessageRef: r.ref})
			refs = append(refs, r.ref)
		}
		b := out[len(out)-1]
		b.Recipients = append(b.Recipients, r.rc)
	}
	rows, err := q.Query(ctx, `SELECT id, envelope_from, data FROM relay_messages WHERE id = ANY($1)`, refs)
	if err != nil {
		return nil, err
	}
	type msg struct {
		id         int64
		from, data []byte
	}
	msgs, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (msg, error) {
		var m msg
		err := row.Scan(&m.id, &m.from, &m.data)
		return m, err
	})
	if err != nil {
		return nil, err
	}
	for _, m := range msgs {
		i, _ := slices.BinarySearchFunc(out, m.id, func(b *store.RelayBatch, id int64) int { return cmp.Compare(b.MessageRef, id) })
		out[i].From, out[i].Message = string(m.from), store.NonNil(m.data)
	}
	return out, nil
}

// ClaimRelays moves due relay recipients to sending. SKIP LOCKED lets
// several processes claim at once, each taking rows no other has.
func (s *DB) ClaimRelays(ctx context.Context, now time.Time, limit int) ([]*store.RelayBatch, error) {
	var out []*store.RelayBatch
	err := s.tx(ctx, func(tx pgx.Tx) error {
		out = nil
		rows, err := tx.Query(ctx, `WITH c AS (SELECT id AS claimed FROM relays
				WHERE state = 'queued' AND next_attempt <= $1 AND expires > $1
				ORDER BY message, id LIMIT $2 FOR UPDATE SKIP LOCKED)
			UPDATE relays SET state = 'sending', owner = $3, attempts = attempts + 1, updated = $1
			FROM c WHERE id = claimed RETURNING `+relayCols, store.Millis(now), sqlLimit(limit), s.nodeID())
		if err != nil {
			return errorf("claim relays", err)
		}
		rs, err := pgx.CollectRows(rows, scanRelay)
		if err != nil {
			return errorf("claim relays", err)
		}
		if out, err = relayBatches(ctx, tx, rs); err != nil {
			return errorf("claim relays", err)
		}
		return nil
	})
	return out, err
}

// FinishRelays applies rs and queues w atomically. From sending, only the
// node that claimed a recipient may finish it.
func (s *DB) FinishRelays(ctx context.Context, rs []store.RelayResult, w store.Work) error {
	for _, r := range rs {
		switch r.State {
		case store.RelayQueued, store.RelaySent, store.RelayFailed:
		default:
			return fmt.Errorf("%w: relay result state %q", store.ErrInvalid, r.State)
		}
	}
	// Rows are locked in id order, so two overlapping finishes cannot
	// deadlock.
	sorted := slices.Clone(rs)
	slices.SortStableFunc(sorted, func(a, b store.RelayResult) int { return cmp.Compare(a.ID, b.ID) })
	return s.tx(ctx, func(tx pgx.Tx) error {
		now := time.Now()
		var b pgx.Batch
		for _, r := range sorted {
			undo := 0
			if r.State == store.RelayQueued && r.Requeue {
				undo = 1
			}
			next := r.NextAttempt
			if r.State != store.RelayQueued {
				next = time.Time{}
			}
			b.Queue(`UPDATE relays SET state = $1, next_attempt = $2, last_error = $3,
				attempts = GREATEST(attempts - $4, 0), owner = 0, updated = $5
				WHERE id = $6 AND state = $7 AND (state <> 'sending' OR owner = $8)`,
				string(r.State), store.Millis(next), octets(r.Error), undo, store.Millis(now), r.ID, string(r.From), s.nodeID())
		}
		br := tx.SendBatch(ctx, &b)
		for _, r := range sorted {
			t, err := br.Exec()
			if err != nil {
				br.Close()
				return errorf("finish relay", err)
			}
			if t.RowsAffected() == 0 {
				br.Close()
				return fmt.Errorf("%w: relay %d is not %s (or another server claimed it)", store.ErrConflict, r.ID, r.From)
			}
		}
		if err := br.Close(); err != nil {
			return errorf("finish relay", err)
		}
		return insertWork(ctx, tx, w, now)
	})
}

// ExpiredRelays lists queued relay recipients past their expiry.
func (s *DB) ExpiredRelays(ctx context.Context, now time.Time, limit int) ([]*store.RelayBatch, error) {
	var out []*store.RelayBatch
	// One read-only snapshot for the recipients and their messages.
	err := s.readTx(ctx, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, `SELECT `+relayCols+` FROM relays WHERE state = 'queued' AND expires <= $1
			ORDER BY message, id LIMIT $2`, store.Millis(now), sqlLimit(limit))
		if err != nil {
			return err
		}
		rs, err := pgx.CollectRows(rows, scanRelay)
		if err != nil {
			return err
		}
		out, err = relayBatches(ctx, tx, rs)
		return err
	})
	if err != nil {
		return nil, errorf("expired relays", err)
	}
	return out, nil
}
