package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/esro-emsdp/emsdp/store"
)

// WakeDevice makes a device's queued deliveries due now. An UPDATE that
// matches nothing (the usual case: every INVOKE wakes its device) writes
// no WAL and its commit costs no flush.
func (s *DB) WakeDevice(ctx context.Context, addr uint32, now time.Time) (int, error) {
	var n int64
	err := s.tx(ctx, func(tx pgx.Tx) error {
		t, err := tx.Exec(ctx, `UPDATE deliveries SET next_attempt = $1, updated = $1
			WHERE device = $2 AND state = 'queued' AND next_attempt > $1`, store.Millis(now), int64(addr))
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
	where := ``
	var args []any
	if !since.IsZero() {
		where = ` AND updated >= $1`
		args = append(args, store.Millis(since))
	}
	// Each device with the time it was last heard from (its contact).
	q := `SELECT q.device, q.next, COALESCE(dv.contact_at, 0) FROM (SELECT device, MIN(next_attempt) AS next
		FROM deliveries WHERE state = 'queued'` + where + ` GROUP BY device) AS q
		LEFT JOIN devices AS dv ON dv.address = q.device ORDER BY q.device`
	rows, err := s.query(ctx, q, args...)
	if err != nil {
		return nil, errorf("queued devices", err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (store.DeviceDue, error) {
		var d store.DeviceDue
		var next, heard int64
		err := row.Scan(&d.Device, &next, &heard)
		d.Next, d.Heard = store.FromMillis(next), store.FromMillis(heard)
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
	return store.FromMillis(*v), true, nil
}

// NextDue returns the earliest next attempt or expiry after 'after' of
// queued deliveries and relays.
func (s *DB) NextDue(ctx context.Context, after time.Time) (time.Time, bool, error) {
	var v *int64
	err := s.queryRow(ctx, `SELECT LEAST(
		(SELECT MIN(next_attempt) FROM deliveries WHERE state = 'queued' AND next_attempt > $1),
		(SELECT MIN(expires) FROM deliveries WHERE state = 'queued' AND expires > $1),
		(SELECT MIN(next_attempt) FROM relays WHERE state = 'queued' AND next_attempt > $1),
		(SELECT MIN(expires) FROM relays WHERE state = 'queued' AND expires > $1))`, store.Millis(after)).Scan(&v)
	if err != nil {
		return time.Time{}, false, errorf("next due", err)
	}
	if v == nil {
		return time.Time{}, false, nil
	}
	return store.FromMillis(*v), true, nil
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
	d.NextAttempt, d.Expires, d.Created, d.Updated = store.FromMillis(next), store.FromMillis(exp), store.FromMillis(created), store.FromMillis(updated)
	return &d, nil
}

// qBusyContact says whether a device has a delivery in flight, and reads
// its contact (store.Delivery.Contact) in the same round trip; one row
// even for a device not registered.
const qBusyContact = `SELECT EXISTS (SELECT 1 FROM deliveries WHERE device = $1 AND state = 'inflight'),
	COALESCE(dv.contact_addr, ''), COALESCE(dv.contact_via, ''::bytea), COALESCE(dv.contact_at, 0),
	COALESCE(dv.contact_polled, FALSE)
	FROM (SELECT 1) AS one LEFT JOIN devices AS dv ON dv.address = $1`

// scanContact is a device's contact as qBusyContact reads it.
type scanContact struct {
	addr   string
	via    []byte
	at     int64
	polled bool
}

func (c *scanContact) dest() []any { return []any{&c.addr, &c.via, &c.at, &c.polled} }

// contact is the scanned contact; an unreadable one is left zero (an
// attempt then uses the registered address, as with DeviceContact's error).
func (c *scanContact) contact() store.Contact {
	v, err := store.ParseContact(c.addr, string(c.via), store.FromMillis(c.at), c.polled)
	if err != nil {
		return store.Contact{}
	}
	return v
}

// PeekDelivery returns the delivery ClaimDelivery would take, unclaimed.
// With several servers sharing the store, use ClaimDelivery.
func (s *DB) PeekDelivery(ctx context.Context, addr uint32, now time.Time, lim store.Limits) (*store.Delivery, error) {
	var busy bool
	var sc scanContact
	err := s.queryRow(ctx, qBusyContact, int64(addr)).Scan(append([]any{&busy}, sc.dest()...)...)
	if err != nil {
		return nil, errorf("peek", err)
	}
	if busy {
		return nil, fmt.Errorf("%w: device %d", store.ErrBusy, addr)
	}
	q := `SELECT ` + deliveryCols + ` FROM deliveries WHERE device = $1 AND state = 'queued' AND next_attempt <= $2`
	args := []any{int64(addr), store.Millis(now)}
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
	d.Contact = sc.contact()
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
	args := []any{int64(addr), store.Millis(now), s.nodeID()}
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
		var sc scanContact
		err := tx.QueryRow(ctx, qBusyContact, int64(addr)).Scan(append([]any{&busy}, sc.dest()...)...)
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
		d.Contact = sc.contact()
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
			string(r.State), store.Millis(next), octets(r.Error), undo, store.Millis(now), id, string(from), s.nodeID()).Scan(&dev, &msgID)
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
				int64(dev), msgID, int16(r.Status), store.Millis(now))
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
		ORDER BY id LIMIT $2`, store.Millis(now), sqlLimit(limit))
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
