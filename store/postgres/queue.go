package postgres

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/esro-emsdp/emsdp/store"
)

// querier is a pool or a transaction.
type querier interface {
	Query(context.Context, string, ...any) (pgx.Rows, error)
}

// ---- submissions ----

const submissionCols = `id, device, instance_id, content_hash, content_type, content, received, local_time,
	local_number, state, verify`

func scanSubmission(row pgx.CollectableRow) (*store.Submission, error) {
	var sub store.Submission
	var received int64
	var state string
	var verify []byte
	if err := row.Scan(&sub.ID, &sub.Device, &sub.InstanceID, &sub.ContentHash, &sub.ContentType, &sub.Content,
		&received, &sub.LocalTime, &sub.Number, &state, &verify); err != nil {
		return nil, err
	}
	sub.Received, sub.State, sub.Verify = fromMS(received), store.SubmissionState(state), string(verify)
	return &sub, nil
}

// AddSubmission commits a submission, or finds its earlier copy.
//
// The daily counter is one row every submission of every server updates;
// holding its lock until the submission's commit is flushed would allow
// one submission per disk flush in the whole system. So the number is
// drawn in a transaction of its own that commits asynchronously (its lock
// is held for microseconds), and the submission's synchronous commit, which
// comes later in the WAL, flushes the counter with it: no number is
// returned before the counter that issued it is durable. A number drawn
// for a submission that then turns out a duplicate (two copies racing) or
// fails is skipped, never repeated.
//
// An advisory lock on the device makes the duplicate look-up and the
// insert one step for all processes.
func (s *DB) AddSubmission(ctx context.Context, sub *store.Submission, dedupeSince time.Time) (*store.Submission, bool, error) {
	if sub.Received.IsZero() {
		return nil, false, fmt.Errorf("%w: submission without receipt time", store.ErrInvalid)
	}
	findDup := func(q querier) (*store.Submission, error) {
		rows, err := q.Query(ctx, `SELECT `+submissionCols+` FROM submissions
			WHERE device = $1 AND instance_id = $2 AND content_hash = $3 AND received >= $4 ORDER BY id LIMIT 1`,
			int64(sub.Device), int16(sub.InstanceID), nonNil(sub.ContentHash), ms(dedupeSince))
		if err != nil {
			return nil, errorf("dedupe", err)
		}
		r, err := pgx.CollectExactlyOneRow(rows, scanSubmission)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil, nil
		}
		if err != nil {
			return nil, errorf("dedupe", err)
		}
		return r, nil
	}
	// Re-invocations are found without drawing a number.
	if s.closed.Load() {
		return nil, false, ErrClosed
	}
	if r, err := findDup(s.pool); err != nil || r != nil {
		return r, r != nil, err
	}
	n, err := s.drawNumber(ctx, sub.Received, true)
	if err != nil {
		return nil, false, err
	}
	var rec *store.Submission
	var dup bool
	err = s.tx(ctx, func(tx pgx.Tx) error {
		rec, dup = nil, false
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1, $2)`, s.keys.submit, int32(sub.Device)); err != nil {
			return errorf("submission lock", err)
		}
		r, err := findDup(tx)
		if err != nil {
			return err
		}
		if r != nil {
			rec, dup = r, true
			return nil
		}
		c := *sub
		c.LocalTime, c.Number, c.State, c.Verify = uint32(sub.Received.Unix()), n, store.SubmissionPending, ""
		err = tx.QueryRow(ctx, `INSERT INTO submissions (device, instance_id, content_hash, content_type,
			content, received, local_time, local_number, state, owner, updated)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', $9, $10) RETURNING id`,
			int64(c.Device), int16(c.InstanceID), nonNil(c.ContentHash), int64(c.ContentType), nonNil(c.Content),
			ms(c.Received), int64(c.LocalTime), int64(c.Number), s.nodeID(), ms(time.Now())).Scan(&c.ID)
		if err != nil {
			return errorf("add submission", err)
		}
		rec = &c
		return nil
	})
	if err != nil {
		return nil, false, err
	}
	return rec, dup, nil
}

func (s *DB) resolveSubmission(ctx context.Context, id int64, to store.SubmissionState, verify string, w store.Work) (bool, error) {
	var done bool
	err := s.tx(ctx, func(tx pgx.Tx) error {
		done = false
		now := time.Now()
		t, err := tx.Exec(ctx, `UPDATE submissions SET state = $1, verify = $2, updated = $3 WHERE id = $4 AND state = 'pending'`,
			string(to), octets(verify), ms(now), id)
		if err != nil {
			return errorf(fmt.Sprintf("submission %d", id), err)
		}
		if t.RowsAffected() == 0 {
			var one int
			err := tx.QueryRow(ctx, `SELECT 1 FROM submissions WHERE id = $1`, id).Scan(&one)
			if errors.Is(err, pgx.ErrNoRows) {
				return fmt.Errorf("%w: submission %d", store.ErrNotFound, id)
			}
			if err != nil {
				return errorf(fmt.Sprintf("submission %d", id), err)
			}
			return nil
		}
		done = true
		return insertWork(ctx, tx, w, now)
	})
	return done, err
}

// ReleaseSubmission releases a pending submission and queues its work.
func (s *DB) ReleaseSubmission(ctx context.Context, id int64, verify string, w store.Work) (bool, error) {
	return s.resolveSubmission(ctx, id, store.SubmissionReleased, verify, w)
}

// DropSubmission drops a pending submission.
func (s *DB) DropSubmission(ctx context.Context, id int64, verify string) (bool, error) {
	return s.resolveSubmission(ctx, id, store.SubmissionDropped, verify, store.Work{})
}

// PendingSubmissions lists the pending submissions received before
// 'before' by this handle or by nodes that are gone, oldest first. Those
// another live server received stay out: it is still waiting for their
// confirmation, and resolving them would pre-empt it.
func (s *DB) PendingSubmissions(ctx context.Context, before time.Time) ([]*store.Submission, error) {
	rows, err := s.query(ctx, `SELECT `+submissionCols+` FROM submissions WHERE state = 'pending' AND received < $2
		AND (owner = $3 OR owner NOT IN (`+liveNodes+`)) ORDER BY received, id`, s.keys.node, ms(before), s.nodeID())
	if err != nil {
		return nil, errorf("pending submissions", err)
	}
	out, err := pgx.CollectRows(rows, scanSubmission)
	if err != nil {
		return nil, errorf("pending submissions", err)
	}
	return out, nil
}

// ---- queues ----

func validWork(w store.Work) error {
	for _, d := range w.Deliveries {
		if d.Device == 0 || d.Expires.IsZero() || d.MessageID == "" {
			return fmt.Errorf("%w: delivery needs a device, a message id and an expiry", store.ErrInvalid)
		}
	}
	for _, r := range w.Relays {
		if r.Expires.IsZero() || len(r.Recipients) == 0 {
			return fmt.Errorf("%w: relay needs recipients and an expiry", store.ErrInvalid)
		}
	}
	return nil
}

const insertDelivery = `INSERT INTO deliveries (device, message_id, submission_time, content_type, content, priority,
	state, next_attempt, expires, created, updated, report_device, report_mail, report_flags, report_recipient,
	report_message_id, report_headers, report_dsn)
	VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, $8, $9, $9, $10, $11, $12, $13, $14, $15, $16)`

// insertRelay writes a message and its recipients in one statement; the
// recipients get their ids in the given order.
const insertRelay = `WITH m AS (INSERT INTO relay_messages (envelope_from, data, created) VALUES ($1, $2, $3) RETURNING id)
	INSERT INTO relays (message, rcpt, state, next_attempt, expires, created, updated, report_device, report_mail,
		report_flags, report_recipient, report_message_id, report_headers, report_dsn)
	SELECT m.id, r.rcpt, 'queued', $4::bigint, $5::bigint, $3::bigint, $3::bigint, r.dev, r.mail, r.flags, r.rcptname, r.msgid,
		r.headers, r.dsn
	FROM m, unnest($6::bytea[], $7::bigint[], $8::bytea[], $9::smallint[], $10::bytea[], $11::bytea[], $12::bytea[], $13::bytea[])
		WITH ORDINALITY AS r (rcpt, dev, mail, flags, rcptname, msgid, headers, dsn, ord)
	ORDER BY r.ord`

// insertWork queues w within tx, all statements in one round trip.
func insertWork(ctx context.Context, tx pgx.Tx, w store.Work, now time.Time) error {
	if w.Empty() {
		return nil
	}
	if err := validWork(w); err != nil {
		return err
	}
	var b pgx.Batch
	for _, d := range w.Deliveries {
		var st *int64
		if d.SubmissionTime != nil {
			v := int64(*d.SubmissionTime)
			st = &v
		}
		b.Queue(insertDelivery, int64(d.Device), octets(d.MessageID), st, int64(d.ContentType), nonNil(d.Content),
			int16(d.Priority), ms(d.NextAttempt), ms(d.Expires), ms(now), int64(d.Report.Device), octets(d.Report.Mail),
			int16(d.Report.Flags), octets(d.Report.Recipient), octets(d.Report.MessageID), d.Report.Headers, octets(d.Report.DSN))
	}
	for _, r := range w.Relays {
		n := len(r.Recipients)
		rcpt, mail, name, msgid, headers, dsn := make([][]byte, n), make([][]byte, n), make([][]byte, n), make([][]byte, n),
			make([][]byte, n), make([][]byte, n)
		dev, flags := make([]int64, n), make([]int16, n)
		for i, rc := range r.Recipients {
			rcpt[i], dev[i], mail[i], flags[i] = octets(rc.Addr), int64(rc.Report.Device), octets(rc.Report.Mail), int16(rc.Report.Flags)
			name[i], msgid[i], headers[i] = octets(rc.Report.Recipient), octets(rc.Report.MessageID), rc.Report.Headers
			dsn[i] = octets(rc.Report.DSN)
		}
		b.Queue(insertRelay, octets(r.From), nonNil(r.Message), ms(now), ms(r.NextAttempt), ms(r.Expires),
			rcpt, dev, mail, flags, name, msgid, headers, dsn)
	}
	if err := tx.SendBatch(ctx, &b).Close(); err != nil {
		return errorf("queue", err)
	}
	return nil
}

// Enqueue writes w atomically.
func (s *DB) Enqueue(ctx context.Context, w store.Work) error {
	if w.Empty() {
		return nil
	}
	if err := validWork(w); err != nil {
		return err
	}
	return s.tx(ctx, func(tx pgx.Tx) error { return insertWork(ctx, tx, w, time.Now()) })
}

// WakeDevice makes a device's queued deliveries due now. An UPDATE that
// matches nothing (the usual case: every INVOKE wakes its device) writes
// no WAL and its commit costs no flush.
func (s *DB) WakeDevice(ctx context.Context, addr uint32, now time.Time) (int, error) {
	var n int64
	err := s.tx(ctx, func(tx pgx.Tx) error {
		t, err := tx.Exec(ctx, `UPDATE deliveries SET next_attempt = $1, updated = $1
			WHERE device = $2 AND state = 'queued' AND next_attempt > $1`, ms(now), int64(addr))
		if err != nil {
			return errorf("wake device", err)
		}
		n = t.RowsAffected()
		return nil
	})
	return int(n), err
}

// QueuedDevices lists devices with queued deliveries changed since
// 'since' (all with the zero time) and their earliest next attempt.
func (s *DB) QueuedDevices(ctx context.Context, since time.Time) ([]store.DeviceDue, error) {
	q := `SELECT device, MIN(next_attempt) FROM deliveries WHERE state = 'queued' GROUP BY device ORDER BY device`
	var args []any
	if !since.IsZero() {
		q = `SELECT device, MIN(next_attempt) FROM deliveries WHERE state = 'queued' AND updated >= $1
			GROUP BY device ORDER BY device`
		args = append(args, ms(since))
	}
	rows, err := s.query(ctx, q, args...)
	if err != nil {
		return nil, errorf("queued devices", err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (store.DeviceDue, error) {
		var d store.DeviceDue
		var next int64
		err := row.Scan(&d.Device, &next)
		d.Next = fromMS(next)
		return d, err
	})
	if err != nil {
		return nil, errorf("queued devices", err)
	}
	return out, nil
}

// DeviceNextDue returns the earliest next attempt of a device's queued
// deliveries.
func (s *DB) DeviceNextDue(ctx context.Context, addr uint32) (time.Time, bool, error) {
	var v *int64
	err := s.queryRow(ctx, `SELECT MIN(next_attempt) FROM deliveries WHERE state = 'queued' AND device = $1`,
		int64(addr)).Scan(&v)
	if err != nil {
		return time.Time{}, false, errorf("device next due", err)
	}
	if v == nil {
		return time.Time{}, false, nil
	}
	return fromMS(*v), true, nil
}

// NextDue returns the earliest next attempt or expiry after 'after' of
// queued deliveries and relays.
func (s *DB) NextDue(ctx context.Context, after time.Time) (time.Time, bool, error) {
	var v *int64
	err := s.queryRow(ctx, `SELECT LEAST(
		(SELECT MIN(next_attempt) FROM deliveries WHERE state = 'queued' AND next_attempt > $1),
		(SELECT MIN(expires) FROM deliveries WHERE state = 'queued' AND expires > $1),
		(SELECT MIN(next_attempt) FROM relays WHERE state = 'queued' AND next_attempt > $1),
		(SELECT MIN(expires) FROM relays WHERE state = 'queued' AND expires > $1))`, ms(after)).Scan(&v)
	if err != nil {
		return time.Time{}, false, errorf("next due", err)
	}
	if v == nil {
		return time.Time{}, false, nil
	}
	return fromMS(*v), true, nil
}

const deliveryCols = `id, device, message_id, submission_time, content_type, content, priority, state, attempts,
	next_attempt, expires, created, updated, last_error, report_device, report_mail, report_flags,
	report_recipient, report_message_id, report_headers, report_dsn`

func scanDelivery(row pgx.CollectableRow) (*store.Delivery, error) {
	var d store.Delivery
	var st *int64
	var state string
	var msgID, lastErr, mail, rcpt, rmsg, dsn []byte
	var next, exp, created, updated int64
	if err := row.Scan(&d.ID, &d.Device, &msgID, &st, &d.ContentType, &d.Content, &d.Priority, &state,
		&d.Attempts, &next, &exp, &created, &updated, &lastErr, &d.Report.Device, &mail,
		&d.Report.Flags, &rcpt, &rmsg, &d.Report.Headers, &dsn); err != nil {
		return nil, err
	}
	if st != nil {
		v := uint32(*st)
		d.SubmissionTime = &v
	}
	d.MessageID, d.LastError, d.Report.Mail = string(msgID), string(lastErr), string(mail)
	d.Report.Recipient, d.Report.MessageID, d.Report.DSN = string(rcpt), string(rmsg), string(dsn)
	d.State = store.DeliveryState(state)
	d.NextAttempt, d.Expires, d.Created, d.Updated = fromMS(next), fromMS(exp), fromMS(created), fromMS(updated)
	return &d, nil
}

// PeekDelivery returns the delivery ClaimDelivery would take, unclaimed.
// With several servers sharing the store, use ClaimDelivery.
func (s *DB) PeekDelivery(ctx context.Context, addr uint32, now time.Time, lim store.Limits) (*store.Delivery, error) {
	var busy bool
	err := s.queryRow(ctx, `SELECT EXISTS (SELECT 1 FROM deliveries WHERE device = $1 AND state = 'inflight')`,
		int64(addr)).Scan(&busy)
	if err != nil {
		return nil, errorf("peek", err)
	}
	if busy {
		return nil, fmt.Errorf("%w: device %d", store.ErrBusy, addr)
	}
	q := `SELECT ` + deliveryCols + ` FROM deliveries WHERE device = $1 AND state = 'queued' AND next_attempt <= $2`
	args := []any{int64(addr), ms(now)}
	if lim.MaxContentLength != nil {
		args = append(args, int64(*lim.MaxContentLength))
		q += fmt.Sprintf(` AND octet_length(content) <= $%d`, len(args))
	}
	if lim.LowestPriority != nil {
		args = append(args, int16(*lim.LowestPriority))
		q += fmt.Sprintf(` AND priority >= $%d`, len(args))
	}
	rows, err := s.pool.Query(ctx, q+` ORDER BY id LIMIT 1`, args...)
	if err != nil {
		return nil, errorf("peek", err)
	}
	d, err := pgx.CollectExactlyOneRow(rows, scanDelivery)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("%w: no due delivery for device %d", store.ErrNotFound, addr)
	}
	if err != nil {
		return nil, errorf("peek", err)
	}
	if lim.InstanceIDs != nil {
		switch n := lim.InstanceIDs(d); {
		case n < 0 || n > 256:
			return nil, fmt.Errorf("%w: %d instance ids", store.ErrInvalid, n)
		case n > 0:
			var next int
			err := s.queryRow(ctx, `SELECT next_instance FROM devices WHERE address = $1`, int64(addr)).Scan(&next)
			if errors.Is(err, pgx.ErrNoRows) {
				return nil, fmt.Errorf("%w: device %d", store.ErrNotFound, addr)
			}
			if err != nil {
				return nil, errorf("peek", err)
			}
			d.InstanceBase = uint8(next)
		}
	}
	return d, nil
}

// ClaimDelivery takes a device's oldest due delivery within lim. The
// advisory lock on the device serialises claims for it across processes,
// so the in-flight check and the claim are one step and FIFO order holds;
// FOR UPDATE re-checks a row another writer (wake, expiry) changed.
func (s *DB) ClaimDelivery(ctx context.Context, addr uint32, now time.Time, lim store.Limits) (*store.Delivery, error) {
	q := `SELECT id FROM deliveries WHERE device = $1 AND state = 'queued' AND next_attempt <= $2`
	args := []any{int64(addr), ms(now), s.nodeID()}
	if lim.MaxContentLength != nil {
		args = append(args, int64(*lim.MaxContentLength))
		q += fmt.Sprintf(` AND octet_length(content) <= $%d`, len(args))
	}
	if lim.LowestPriority != nil {
		args = append(args, int16(*lim.LowestPriority))
		q += fmt.Sprintf(` AND priority >= $%d`, len(args))
	}
	q = `UPDATE deliveries SET state = 'inflight', owner = $3, attempts = attempts + 1, updated = $2
		WHERE state = 'queued' AND id = (` + q + ` ORDER BY id LIMIT 1 FOR UPDATE) RETURNING ` + deliveryCols
	var out *store.Delivery
	err := s.tx(ctx, func(tx pgx.Tx) error {
		out = nil
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1, $2)`, s.keys.device, int32(addr)); err != nil {
			return errorf("claim lock", err)
		}
		var busy bool
		err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM deliveries WHERE device = $1 AND state = 'inflight')`,
			int64(addr)).Scan(&busy)
		if err != nil {
			return errorf("claim", err)
		}
		if busy {
			return fmt.Errorf("%w: device %d", store.ErrBusy, addr)
		}
		rows, err := tx.Query(ctx, q, args...)
		if err != nil {
			return errorf("claim", err)
		}
		d, err := pgx.CollectExactlyOneRow(rows, scanDelivery)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("%w: no due delivery for device %d", store.ErrNotFound, addr)
		}
		if err != nil {
			return errorf("claim", err)
		}
		if lim.InstanceIDs != nil {
			switch n := lim.InstanceIDs(d); {
			case n < 0 || n > 256:
				return fmt.Errorf("%w: %d instance ids", store.ErrInvalid, n)
			case n > 0:
				if d.InstanceBase, err = reserveIDs(ctx, tx, addr, n); err != nil {
					return err
				}
			}
		}
		out = d
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// FinishDelivery applies r to a delivery in state from. From in-flight,
// only the node that claimed it may finish it.
func (s *DB) FinishDelivery(ctx context.Context, id int64, from store.DeliveryState, r store.DeliveryResult) error {
	switch r.State {
	case store.DeliveryQueued, store.DeliveryDelivered, store.DeliveryFailed:
	default:
		return fmt.Errorf("%w: delivery result state %q", store.ErrInvalid, r.State)
	}
	undo := 0
	if r.State == store.DeliveryQueued && r.Requeue {
		undo = 1
	}
	if r.Attempted && from == store.DeliveryQueued {
		if r.InstanceIDs < 0 || r.InstanceIDs > 256 {
			return fmt.Errorf("%w: %d instance ids", store.ErrInvalid, r.InstanceIDs)
		}
		undo-- // counts the attempt made without a claim
	}
	next := r.NextAttempt
	if r.State != store.DeliveryQueued {
		next = time.Time{}
	}
	return s.tx(ctx, func(tx pgx.Tx) error {
		now := time.Now()
		var dev uint32
		var msgID []byte
		err := tx.QueryRow(ctx, `UPDATE deliveries SET state = $1, next_attempt = $2, last_error = $3,
			attempts = GREATEST(attempts - $4, 0), owner = 0, updated = $5
			WHERE id = $6 AND state = $7 AND (state <> 'inflight' OR owner = $8) RETURNING device, message_id`,
			string(r.State), ms(next), octets(r.Error), undo, ms(now), id, string(from), s.nodeID()).Scan(&dev, &msgID)
		if errors.Is(err, pgx.ErrNoRows) {
			return finishConflict(ctx, tx, id, from)
		}
		if err != nil {
			return errorf("finish delivery", err)
		}
		if r.Attempted && from == store.DeliveryQueued && r.InstanceIDs > 0 {
			if _, err := reserveIDs(ctx, tx, dev, r.InstanceIDs); err != nil && !errors.Is(err, store.ErrNotFound) {
				return err // (a device removed meanwhile has no counter left)
			}
		}
		if r.Status != 0 {
			_, err = tx.Exec(ctx, `INSERT INTO delivery_status (device, message_id, status, updated) VALUES ($1, $2, $3, $4)
				ON CONFLICT (device, message_id) DO UPDATE SET status = excluded.status, updated = excluded.updated`,
				int64(dev), msgID, int16(r.Status), ms(now))
			if err != nil {
				return errorf("delivery status", err)
			}
		}
		return insertWork(ctx, tx, r.Work, now)
	})
}

// finishConflict explains why a finish matched no row.
func finishConflict(ctx context.Context, tx pgx.Tx, id int64, from store.DeliveryState) error {
	var state string
	var owner int32
	err := tx.QueryRow(ctx, `SELECT state, owner FROM deliveries WHERE id = $1`, id).Scan(&state, &owner)
	if errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("%w: delivery %d", store.ErrNotFound, id)
	}
	if err != nil {
		return errorf("finish delivery", err)
	}
	if store.DeliveryState(state) == from {
		return fmt.Errorf("%w: delivery %d is in flight for node %d", store.ErrConflict, id, owner)
	}
	return fmt.Errorf("%w: delivery %d is %s, not %s", store.ErrConflict, id, state, from)
}

// ExpiredDeliveries lists queued deliveries past their expiry.
func (s *DB) ExpiredDeliveries(ctx context.Context, now time.Time, limit int) ([]*store.Delivery, error) {
	rows, err := s.query(ctx, `SELECT `+deliveryCols+` FROM deliveries WHERE state = 'queued' AND expires <= $1
		ORDER BY id LIMIT $2`, ms(now), sqlLimit(limit))
	if err != nil {
		return nil, errorf("expired deliveries", err)
	}
	out, err := pgx.CollectRows(rows, scanDelivery)
	if err != nil {
		return nil, errorf("expired deliveries", err)
	}
	return out, nil
}

// QueuedDeliveries summarises a device's queued deliveries.
func (s *DB) QueuedDeliveries(ctx context.Context, addr uint32) ([]store.DeliveryInfo, error) {
	rows, err := s.query(ctx, `SELECT content_type, octet_length(content), priority FROM deliveries
		WHERE device = $1 AND state = 'queued' ORDER BY id`, int64(addr))
	if err != nil {
		return nil, errorf("queued deliveries", err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (store.DeliveryInfo, error) {
		var i store.DeliveryInfo
		err := row.Scan(&i.ContentType, &i.Length, &i.Priority)
		return i, err
	})
	if err != nil {
		return nil, errorf("queued deliveries", err)
	}
	return out, nil
}

// DeliveryStatus returns the recorded status of a delivered message id.
func (s *DB) DeliveryStatus(ctx context.Context, addr uint32, messageID string) (uint8, error) {
	var st uint8
	err := s.queryRow(ctx, `SELECT status FROM delivery_status WHERE device = $1 AND message_id = $2`,
		int64(addr), octets(messageID)).Scan(&st)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, fmt.Errorf("%w: status of %s", store.ErrNotFound, messageID)
	}
	if err != nil {
		return 0, errorf("delivery status", err)
	}
	return st, nil
}

// ---- relays ----

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
	r.rc.State, r.rc.Expires = store.RelayState(state), fromMS(exp)
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
		out[i].From, out[i].Message = string(m.from), nonNil(m.data)
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
			FROM c WHERE id = claimed RETURNING `+relayCols, ms(now), sqlLimit(limit), s.nodeID())
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
				string(r.State), ms(next), octets(r.Error), undo, ms(now), r.ID, string(r.From), s.nodeID())
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
			ORDER BY message, id LIMIT $2`, ms(now), sqlLimit(limit))
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

// readTx runs fn in a read-only REPEATABLE READ transaction: one snapshot.
func (s *DB) readTx(ctx context.Context, fn func(pgx.Tx) error) error {
	if s.closed.Load() {
		return ErrClosed
	}
	return pgx.BeginTxFunc(ctx, s.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, fn)
}

// ---- maintenance ----

// Purge deletes finished rows.
func (s *DB) Purge(ctx context.Context, before, statusBefore time.Time) (int, error) {
	total := 0
	err := s.tx(ctx, func(tx pgx.Tx) error {
		total = 0
		for _, q := range []struct {
			sql  string
			args []any
		}{
			{`DELETE FROM deliveries WHERE state IN ('delivered', 'failed') AND updated < $1`, []any{ms(before)}},
			{`DELETE FROM relays WHERE state IN ('sent', 'failed') AND updated < $1`, []any{ms(before)}},
			{`DELETE FROM relay_messages m WHERE NOT EXISTS (SELECT 1 FROM relays r WHERE r.message = m.id)`, nil},
			{`DELETE FROM submissions WHERE state IN ('released', 'dropped') AND updated < $1`, []any{ms(before)}},
			{`DELETE FROM delivery_status WHERE updated < $1`, []any{ms(statusBefore)}},
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
