package postgres

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/esro-emsdp/emsdp/store"
)

// The operator's view of the queues (emsdp queue), beside running servers.
// Retry and remove are conditional updates on state = 'queued': a row
// another server is claiming is locked (ClaimDelivery's FOR UPDATE), so
// the statement waits for that claim and then re-checks the state on the
// new row version, skipping what became in flight. ClaimRelays skips rows
// these statements hold (SKIP LOCKED) and takes them at its next round.
// In-flight work (and the owner column that fences it) is never written.

// queueArgs collects positional parameters.
type queueArgs []any

func (a *queueArgs) add(v any) string {
	*a = append(*a, v)
	return fmt.Sprintf("$%d", len(*a))
}

// queueConds are the WHERE conditions of f on deliveries and relays (col
// prefixes the column names); dOK and rOK say which queues f includes.
func queueConds(f store.QueueFilter, a *queueArgs, dcol, rcol string) (d, r string, dOK, rOK bool) {
	d, r = `TRUE`, `TRUE`
	if len(f.States) > 0 {
		p := a.add(f.States)
		d += ` AND ` + dcol + `state = ANY(` + p + `::text[])`
		r += ` AND ` + rcol + `state = ANY(` + p + `::text[])`
	}
	if f.Device != 0 {
		d += ` AND ` + dcol + `device = ` + a.add(int64(f.Device))
	}
	return d, r, f.Kind != store.QueueRelay, f.Kind != store.QueueDelivery && f.Device == 0
}

// ListQueue lists queue entries matching f and counts all matches, over
// one snapshot.
func (s *DB) ListQueue(ctx context.Context, f store.QueueFilter) (store.QueueList, error) {
	out := store.QueueList{Counts: map[store.QueueKind]map[string]int{}}
	if err := store.CheckQueueFilter(f); err != nil {
		return out, err
	}
	err := s.readTx(ctx, func(tx pgx.Tx) error {
		out.Entries, out.Counts = nil, map[store.QueueKind]map[string]int{}
		var a queueArgs
		d, r, dOK, rOK := queueConds(f, &a, "", "r.")
		var parts []string
		if dOK {
			parts = append(parts, `SELECT 'delivery' AS kind, id, state, device, ''::bytea AS rcpt, ''::bytea AS sender,
				0::bigint AS message, message_id, content_type, priority, submission_time, octet_length(content) AS size,
				attempts, next_attempt, expires, created, updated, last_error, owner FROM deliveries WHERE `+d)
		}
		if rOK {
			// (Named as in the first part: this part may be alone.)
			parts = append(parts, `SELECT 'relay' AS kind, r.id AS id, r.state, 0::bigint, r.rcpt, m.envelope_from, r.message,
				r.report_message_id, 0::bigint, 0::smallint, NULL::bigint, octet_length(m.data), r.attempts,
				r.next_attempt, r.expires, r.created AS created, r.updated, r.last_error, r.owner
				FROM relays r JOIN relay_messages m ON m.id = r.message WHERE `+r)
		}
		if len(parts) == 0 {
			return nil
		}
		rows, err := tx.Query(ctx, `SELECT * FROM (`+strings.Join(parts, ` UNION ALL `)+`) AS q
			ORDER BY created, kind, id LIMIT `+a.add(int64(store.QueueLimit(f))), a...)
		if err != nil {
			return err
		}
		out.Entries, err = pgx.CollectRows(rows, scanQueueRow)
		if err != nil {
			return err
		}

		a = nil
		d, r, dOK, rOK = queueConds(f, &a, "", "")
		parts = nil
		if dOK {
			parts = append(parts, `SELECT 'delivery', state, COUNT(*) FROM deliveries WHERE `+d+` GROUP BY state`)
		}
		if rOK {
			parts = append(parts, `SELECT 'relay', state, COUNT(*) FROM relays WHERE `+r+` GROUP BY state`)
		}
		rows, err = tx.Query(ctx, strings.Join(parts, ` UNION ALL `), a...)
		if err != nil {
			return err
		}
		var kind, state string
		var n int
		_, err = pgx.ForEachRow(rows, []any{&kind, &state, &n}, func() error {
			k := store.QueueKind(kind)
			if out.Counts[k] == nil {
				out.Counts[k] = map[string]int{}
			}
			out.Counts[k][state] = n
			return nil
		})
		return err
	})
	if err != nil {
		return store.QueueList{}, errorf("list queue", err)
	}
	return out, nil
}

func scanQueueRow(row pgx.CollectableRow) (store.QueueEntry, error) {
	var e store.QueueEntry
	var kind string
	var rcpt, sender, msgID, lastErr []byte
	var st *int64
	var next, exp, created, updated int64
	if err := row.Scan(&kind, &e.Ref.ID, &e.State, &e.Device, &rcpt, &sender, &e.MessageRef, &msgID, &e.ContentType,
		&e.Priority, &st, &e.Size, &e.Attempts, &next, &exp, &created, &updated, &lastErr, &e.Owner); err != nil {
		return e, err
	}
	e.Ref.Kind = store.QueueKind(kind)
	e.Recipient, e.From, e.MessageID, e.LastError = string(rcpt), string(sender), string(msgID), string(lastErr)
	if st != nil {
		v := uint32(*st)
		e.SubmissionTime = &v
	}
	e.NextAttempt, e.Expires, e.Created, e.Updated = store.FromMillis(next), store.FromMillis(exp), store.FromMillis(created), store.FromMillis(updated)
	return e, nil
}

// QueueEntry returns one entry with its report and contents.
func (s *DB) QueueEntry(ctx context.Context, ref store.QueueRef) (*store.QueueEntry, error) {
	if _, err := store.CheckQueueRefs([]store.QueueRef{ref}); err != nil {
		return nil, err
	}
	if ref.Kind == store.QueueDelivery {
		rows, err := s.query(ctx, `SELECT `+deliveryCols+`, owner FROM deliveries WHERE id = $1`, ref.ID)
		if err != nil {
			return nil, errorf("queue entry", err)
		}
		var owner int32
		d, err := pgx.CollectExactlyOneRow(rows, func(row pgx.CollectableRow) (*store.Delivery, error) {
			// scanDelivery's columns, then the owner.
			return scanDelivery(ownerRow{row, &owner})
		})
		if errors.Is(err, pgx.ErrNoRows) {
			return nil, fmt.Errorf("%w: delivery %d", store.ErrNotFound, ref.ID)
		}
		if err != nil {
			return nil, errorf("queue entry", err)
		}
		return &store.QueueEntry{Ref: ref, State: string(d.State), Device: d.Device, MessageID: d.MessageID,
			ContentType: d.ContentType, Priority: d.Priority, SubmissionTime: d.SubmissionTime, Size: len(d.Content),
			Attempts: d.Attempts, NextAttempt: d.NextAttempt, Expires: d.Expires, Created: d.Created, Updated: d.Updated,
			LastError: d.LastError, Owner: owner, Report: d.Report, Content: d.Content}, nil
	}
	e := store.QueueEntry{Ref: ref}
	var rcpt, lastErr, mail, name, msgID, from, dsn []byte
	var next, exp, created, updated int64
	err := s.queryRow(ctx, `SELECT r.message, r.rcpt, r.state, r.attempts, r.next_attempt, r.expires, r.created,
		r.updated, r.last_error, r.owner, r.report_device, r.report_mail, r.report_flags, r.report_recipient,
		r.report_message_id, r.report_headers, r.report_dsn, m.envelope_from, m.data
		FROM relays r JOIN relay_messages m ON m.id = r.message WHERE r.id = $1`, ref.ID).Scan(&e.MessageRef, &rcpt,
		&e.State, &e.Attempts, &next, &exp, &created, &updated, &lastErr, &e.Owner, &e.Report.Device, &mail,
		&e.Report.Flags, &name, &msgID, &e.Report.Headers, &dsn, &from, &e.Content)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("%w: relay %d", store.ErrNotFound, ref.ID)
	}
	if err != nil {
		return nil, errorf("queue entry", err)
	}
	e.Recipient, e.LastError, e.From = string(rcpt), string(lastErr), string(from)
	e.Report.DSN = string(dsn)
	e.Report.Mail, e.Report.Recipient, e.Report.MessageID = string(mail), string(name), string(msgID)
	e.MessageID, e.Size, e.Content = e.Report.MessageID, len(e.Content), store.NonNil(e.Content)
	e.NextAttempt, e.Expires, e.Created, e.Updated = store.FromMillis(next), store.FromMillis(exp), store.FromMillis(created), store.FromMillis(updated)
	return &e, nil
}

// ownerRow scans a row of scanDelivery's columns followed by the owner.
type ownerRow struct {
	pgx.CollectableRow
	owner *int32
}

func (r ownerRow) Scan(dest ...any) error { return r.CollectableRow.Scan(append(dest, r.owner)...) }

// refIDs splits refs by kind.
func refIDs(refs []store.QueueRef) (deliveries, relays []int64) {
	for _, r := range refs {
		if r.Kind == store.QueueRelay {
			relays = append(relays, r.ID)
		} else {
			deliveries = append(deliveries, r.ID)
		}
	}
	return deliveries, relays
}

// refOutcome records, in the order of refs, the entries done (changed)
// and why the others were left alone (their current state, "" = gone).
func refOutcome(ctx context.Context, tx pgx.Tx, ch *store.QueueChange, refs []store.QueueRef, done map[store.QueueRef]bool) error {
	d, r := refIDs(refs)
	rows, err := tx.Query(ctx, `SELECT 'delivery', id, state FROM deliveries WHERE id = ANY($1)
		UNION ALL SELECT 'relay', id, state FROM relays WHERE id = ANY($2)`, d, r)
	if err != nil {
		return err
	}
	states := map[store.QueueRef]string{}
	var kind, state string
	var id int64
	if _, err := pgx.ForEachRow(rows, []any{&kind, &id, &state}, func() error {
		states[store.QueueRef{Kind: store.QueueKind(kind), ID: id}] = state
		return nil
	}); err != nil {
		return err
	}
	for _, ref := range refs {
		if done[ref] {
			ch.Changed++
			continue
		}
		st := states[ref]
		if st == store.InFlightState(ref.Kind) {
			ch.InFlight++
		}
		ch.Skipped = append(ch.Skipped, store.QueueSkip{Ref: ref, State: st})
	}
	return nil
}

// collectDone reads the ids a RETURNING id statement changed.
func collectDone(rows pgx.Rows, kind store.QueueKind, done map[store.QueueRef]bool) error {
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	for _, id := range ids {
		done[store.QueueRef{Kind: kind, ID: id}] = true
	}
	return err
}

// RetryQueued makes the selected queued entries due at now.
func (s *DB) RetryQueued(ctx context.Context, sel store.QueueSelect, now time.Time) (store.QueueChange, error) {
	var ch store.QueueChange
	sel, err := store.CheckQueueSelect(sel)
	if err != nil {
		return ch, err
	}
	const set = retrySet
	err = s.tx(ctx, func(tx pgx.Tx) error {
		ch = store.QueueChange{}
		if sel.Force {
			if err := s.force(ctx, tx, sel, now, &ch); err != nil {
				return err
			}
		}
		if len(sel.Refs) > 0 {
			d, r := refIDs(sel.Refs)
			done := map[store.QueueRef]bool{}
			for _, q := range []struct {
				kind store.QueueKind
				ids  []int64
			}{{store.QueueDelivery, d}, {store.QueueRelay, r}} {
				if len(q.ids) == 0 {
					continue
				}
				rows, err := tx.Query(ctx, `UPDATE `+queueTable(q.kind)+set+` AND id = ANY($2) RETURNING id`, store.Millis(now), q.ids)
				if err != nil {
					return err
				}
				if err := collectDone(rows, q.kind, done); err != nil {
					return err
				}
			}
			return refOutcome(ctx, tx, &ch, sel.Refs, done)
		}
		if sel.Kind == store.QueueRelay {
			return s.retryRelays(ctx, tx, &ch, now)
		}
		upd, cnt := `UPDATE deliveries`+set, `SELECT COUNT(*) FROM deliveries WHERE state = 'inflight'`
		uargs, cargs := []any{store.Millis(now)}, []any(nil)
		if sel.Device != 0 {
			upd, cnt = upd+` AND device = $2`, cnt+` AND device = $1`
			uargs, cargs = append(uargs, int64(sel.Device)), []any{int64(sel.Device)}
		}
		t, err := tx.Exec(ctx, upd, uargs...)
		if err != nil {
			return err
		}
		ch.Changed += int(t.RowsAffected())
		var busy int
		if err := tx.QueryRow(ctx, cnt, cargs...).Scan(&busy); err != nil {
			return err
		}
		ch.InFlight += busy
		if !sel.All || sel.Kind == store.QueueDelivery {
			return nil
		}
		return s.retryRelays(ctx, tx, &ch, now)
	})
	if err != nil {
		return store.QueueChange{}, errorf("retry queued", err)
	}
	return ch, nil
}

// force moves the in-flight entries of sel back to queued, due at now,
// whoever owns them (QueueSelect.Force); attempts stay counted.
func (s *DB) force(ctx context.Context, tx pgx.Tx, sel store.QueueSelect, now time.Time, ch *store.QueueChange) error {
	d, r := refIDs(sel.Refs)
	for _, q := range []struct {
		table, state string
		all          bool
		ids          []int64
	}{
		{"deliveries", "inflight", sel.All && sel.Kind != store.QueueRelay, d},
		{"relays", "sending", sel.All && sel.Kind != store.QueueDelivery, r},
	} {
		cond, args := "", []any{store.Millis(now)}
		switch {
		case q.all:
			cond = "TRUE"
		case len(q.ids) > 0:
			cond, args = "id = ANY($2)", append(args, q.ids)
		case sel.Device != 0 && q.table == "deliveries":
			cond, args = "device = $2", append(args, int64(sel.Device))
		default:
			continue
		}
		t, err := tx.Exec(ctx, `UPDATE `+q.table+` SET state = 'queued', owner = 0, next_attempt = $1, updated = $1
			WHERE state = '`+q.state+`' AND `+cond, args...)
		if err != nil {
			return err
		}
		ch.Forced += int(t.RowsAffected())
	}
	return nil
}

// retrySet makes queued entries due; LEAST: an entry already due keeps
// its place.
const retrySet = ` SET next_attempt = LEAST(next_attempt, $1), updated = $1 WHERE state = 'queued'`

// retryRelays makes every queued relay recipient due at now.
func (s *DB) retryRelays(ctx context.Context, tx pgx.Tx, ch *store.QueueChange, now time.Time) error {
	t, err := tx.Exec(ctx, `UPDATE relays`+retrySet, store.Millis(now))
	if err != nil {
		return err
	}
	ch.Changed += int(t.RowsAffected())
	var busy int
	if err := tx.QueryRow(ctx, `SELECT COUNT(*) FROM relays WHERE state = 'sending'`).Scan(&busy); err != nil {
		return err
	}
	ch.InFlight += busy
	return nil
}

// RemoveQueued deletes the queued entries of refs, and the messages of
// relays whose last recipient goes.
func (s *DB) RemoveQueued(ctx context.Context, refs []store.QueueRef) (store.QueueChange, error) {
	var ch store.QueueChange
	refs, err := store.CheckQueueRefs(refs)
	if err != nil || len(refs) == 0 {
		return ch, err
	}
	d, r := refIDs(refs)
	err = s.tx(ctx, func(tx pgx.Tx) error {
		ch = store.QueueChange{}
		done := map[store.QueueRef]bool{}
		if len(d) > 0 {
			rows, err := tx.Query(ctx, `DELETE FROM deliveries WHERE id = ANY($1) AND state = 'queued' RETURNING id`, d)
			if err != nil {
				return err
			}
			if err := collectDone(rows, store.QueueDelivery, done); err != nil {
				return err
			}
		}
		if len(r) > 0 {
			rows, err := tx.Query(ctx, `DELETE FROM relays WHERE id = ANY($1) AND state = 'queued' RETURNING id, message`, r)
			if err != nil {
				return err
			}
			var id, msg int64
			var msgs []int64
			if _, err := pgx.ForEachRow(rows, []any{&id, &msg}, func() error {
				done[store.QueueRef{Kind: store.QueueRelay, ID: id}] = true
				msgs = append(msgs, msg)
				return nil
			}); err != nil {
				return err
			}
			// A message left without recipients goes too (else Purge
			// takes it, as it does when two removals race).
			if _, err := tx.Exec(ctx, `DELETE FROM relay_messages m WHERE m.id = ANY($1)
				AND NOT EXISTS (SELECT 1 FROM relays x WHERE x.message = m.id)`, msgs); err != nil {
				return err
			}
		}
		return refOutcome(ctx, tx, &ch, refs, done)
	})
	if err != nil {
		return store.QueueChange{}, errorf("remove queued", err)
	}
	return ch, nil
}

// queueTable is the table of a kind's entries.
func queueTable(k store.QueueKind) string {
	if k == store.QueueRelay {
		return "relays"
	}
	return "deliveries"
}
