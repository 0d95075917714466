package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/esro-emsdp/emsdp/store"
)

const (
	// The states are literals in every query: SQLite uses a partial
	// index (schema.go) only for a query whose own terms imply its
	// condition.
	qWakeWaiting = `SELECT COUNT(*) FROM (SELECT 1 FROM deliveries
		WHERE device = ? AND state = 'queued' AND next_attempt > ? LIMIT 1) AS w`
	qWake = `UPDATE deliveries SET next_attempt = ?, updated = ?
		WHERE device = ? AND state = 'queued' AND next_attempt > ?`
	// Each device with the time it was last heard from (its contact).
	qQueuedDevices = `SELECT q.device, q.next, COALESCE(dv.contact_at, 0) FROM (SELECT device, MIN(next_attempt) AS next
		FROM deliveries WHERE state = 'queued' GROUP BY device) AS q
		LEFT JOIN devices AS dv ON dv.address = q.device ORDER BY q.device`
	// The index on (state, updated), named: without statistics the
	// planner may prefer the (state, device) order of the GROUP BY and
	// read the whole queue.
	qChangedDevices = `SELECT q.device, q.next, COALESCE(dv.contact_at, 0) FROM (SELECT device, MIN(next_attempt) AS next
		FROM deliveries INDEXED BY deliveries_changed WHERE state = 'queued' AND updated >= ? GROUP BY device) AS q
		LEFT JOIN devices AS dv ON dv.address = q.device ORDER BY q.device`
	qDeviceNextDue = `SELECT MIN(next_attempt) FROM deliveries WHERE state = 'queued' AND device = ?`
	qNextDue       = `SELECT MIN(t) FROM (
		SELECT MIN(next_attempt) AS t FROM deliveries WHERE state = 'queued' AND next_attempt > ?1
		UNION ALL SELECT MIN(expires) FROM deliveries WHERE state = 'queued' AND expires > ?1
		UNION ALL SELECT MIN(next_attempt) FROM relays WHERE state = 'queued' AND next_attempt > ?1
		UNION ALL SELECT MIN(expires) FROM relays WHERE state = 'queued' AND expires > ?1) AS due`
)

// WakeDevice makes a device's queued deliveries due now.
func (s *DB) WakeDevice(ctx context.Context, addr uint32, now time.Time) (int, error) {
	// Every INVOKE wakes its device; usually nothing waits. Look first
	// without the write lock, which submissions need.
	var waiting int
	err := s.queryRow(ctx, nil, qWakeWaiting, addr, store.Millis(now)).Scan(&waiting)
	if err != nil {
		return 0, fmt.Errorf("sqlite: wake device: %w", err)
	}
	if waiting == 0 {
		return 0, nil
	}
	var n int64
	err = s.tx(ctx, func(tx *sql.Tx) error {
		r, err := s.exec(ctx, tx, qWake, store.Millis(now), store.Millis(now), addr, store.Millis(now))
		if err != nil {
			return fmt.Errorf("sqlite: wake device: %w", err)
		}
		n, _ = r.RowsAffected()
		return nil
	})
	return int(n), err
}

// QueuedDevices lists devices with queued deliveries changed since
// 'since' (all with the zero time) and their earliest next attempt.
func (s *DB) QueuedDevices(ctx context.Context, since time.Time) ([]store.DeviceDue, error) {
	var rows *sql.Rows
	var err error
	if since.IsZero() {
		rows, err = s.query(ctx, nil, qQueuedDevices)
	} else {
		rows, err = s.query(ctx, nil, qChangedDevices, store.Millis(since))
	}
	if err != nil {
		return nil, fmt.Errorf("sqlite: queued devices: %w", err)
	}
	out, err := collectRows(rows, func(r *sql.Rows) (store.DeviceDue, error) {
		var d store.DeviceDue
		var next, heard int64
		err := r.Scan(&d.Device, &next, &heard)
		d.Next, d.Heard = store.FromMillis(next), store.FromMillis(heard)
		return d, err
	})
	if err != nil {
		return nil, fmt.Errorf("sqlite: queued devices: %w", err)
	}
	return out, nil
}

// DeviceNextDue returns the earliest next attempt of a device's queued
// deliveries.
func (s *DB) DeviceNextDue(ctx context.Context, addr uint32) (time.Time, bool, error) {
	var v sql.NullInt64
	if err := s.queryRow(ctx, nil, qDeviceNextDue, addr).Scan(&v); err != nil {
		return time.Time{}, false, fmt.Errorf("sqlite: device next due: %w", err)
	}
	if !v.Valid {
		return time.Time{}, false, nil
	}
	return store.FromMillis(v.Int64), true, nil
}

// NextDue returns the earliest next attempt or expiry after 'after' of
// queued deliveries and relays.
func (s *DB) NextDue(ctx context.Context, after time.Time) (time.Time, bool, error) {
	var v sql.NullInt64
	err := s.queryRow(ctx, nil, qNextDue, store.Millis(after)).Scan(&v)
	if err != nil {
		return time.Time{}, false, fmt.Errorf("sqlite: next due: %w", err)
	}
	if !v.Valid {
		return time.Time{}, false, nil
	}
	return store.FromMillis(v.Int64), true, nil
}

// A delivery as scanDelivery reads it: the row q with its content c.
var (
	deliveryCols = qualified("q", `id, device, message_id, submission_time, content_type`) + `, c.content, ` +
		qualified("q", `priority, state, attempts, next_attempt, expires, created, updated, last_error, report_device,
		report_mail, report_flags, report_recipient, report_message_id, report_headers, report_dsn`)
	deliveryFrom = `deliveries AS q JOIN delivery_content AS c ON c.id = q.id`
)

const (
	qInFlight       = `SELECT COUNT(*) FROM deliveries WHERE device = ? AND state = 'inflight'`
	qClaim          = `UPDATE deliveries SET state = ?, attempts = attempts + 1, updated = ? WHERE id = ?`
	qDeliveryState  = `SELECT device, message_id, state FROM deliveries WHERE id = ?`
	qFinishDelivery = `UPDATE deliveries SET state = ?, next_attempt = ?, last_error = ?,
		attempts = MAX(attempts - ? + ?, 0), updated = ? WHERE id = ?`
	qRecordStatus = `INSERT INTO delivery_status (device, message_id, status, updated) VALUES (?, ?, ?, ?)
		ON CONFLICT (device, message_id) DO UPDATE SET status = excluded.status, updated = excluded.updated`
	qQueuedDeliveries = `SELECT content_type, size, priority FROM deliveries
		WHERE device = ? AND state = 'queued' ORDER BY id`
	qDeliveryStatus = `SELECT status FROM delivery_status WHERE device = ? AND message_id = ?`
)

// The index named: without statistics the planner may prefer reading the
// whole table in id order to sorting the expired rows.
var qExpiredDeliveries = `SELECT ` + deliveryCols + ` FROM deliveries AS q INDEXED BY deliveries_expires
	JOIN delivery_content AS c ON c.id = q.id WHERE q.state = 'queued' AND q.expires <= ? ORDER BY q.id LIMIT ?`

// scanDelivery scans the deliveryCols of a row, then extra columns into
// extra.
func scanDelivery(sc interface{ Scan(...any) error }, extra ...any) (*store.Delivery, error) {
	var d store.Delivery
	var st sql.NullInt64
	var state string
	var next, exp, created, updated int64
	if err := sc.Scan(append([]any{&d.ID, &d.Device, &d.MessageID, &st, &d.ContentType, &d.Content, &d.Priority, &state,
		&d.Attempts, &next, &exp, &created, &updated, &d.LastError, &d.Report.Device, &d.Report.Mail,
		&d.Report.Flags, &d.Report.Recipient, &d.Report.MessageID, &d.Report.Headers, &d.Report.DSN}, extra...)...); err != nil {
		return nil, err
	}
	if st.Valid {
		v := uint32(st.Int64)
		d.SubmissionTime = &v
	}
	d.State = store.DeliveryState(state)
	d.NextAttempt, d.Expires, d.Created, d.Updated = store.FromMillis(next), store.FromMillis(exp), store.FromMillis(created), store.FromMillis(updated)
	return &d, nil
}

// The device's contact, read with its delivery (store.Delivery.Contact).
const contactCols = `COALESCE(dv.contact_addr, ''), COALESCE(dv.contact_via, ''), COALESCE(dv.contact_at, 0),
	COALESCE(dv.contact_polled, 0)`

var (
	// The device's oldest due delivery within the limits (a limit left
	// NULL does not restrict), found first: the content of that one only
	// is read. MIN, not ORDER BY id LIMIT 1: the index range gives it
	// without sorting the due rows.
	qClaimableID = `SELECT MIN(id) FROM deliveries WHERE device = ?1 AND state = 'queued' AND next_attempt <= ?2
		AND (?3 IS NULL OR size <= ?3) AND (?4 IS NULL OR priority >= ?4)`
	qClaimable = `SELECT ` + deliveryCols + `, ` + contactCols + `
		FROM ` + deliveryFrom + ` LEFT JOIN devices AS dv ON dv.address = q.device
		WHERE q.id = (` + qClaimableID + `)`
	// qPeek is qClaimable, with the device's next instance id, unless the
	// device has a delivery in flight.
	qPeek = `SELECT ` + deliveryCols + `, dv.next_instance, ` + contactCols + `
		FROM ` + deliveryFrom + ` LEFT JOIN devices AS dv ON dv.address = q.device
		WHERE q.id = (` + qClaimableID + `)
		AND NOT EXISTS (SELECT 1 FROM deliveries AS f WHERE f.device = ?1 AND f.state = 'inflight')`
)

// scanContact ends a delivery's row: the device's contact (contactCols).
type scanContact struct {
	addr, via string
	at        int64
	polled    bool
}

func (c *scanContact) dest() []any { return []any{&c.addr, &c.via, &c.at, &c.polled} }

// contact is the scanned contact; an unreadable one is left zero (an
// attempt then uses the registered address, as with DeviceContact's error).
func (c *scanContact) contact() store.Contact {
	v, err := store.ParseContact(c.addr, c.via, store.FromMillis(c.at), c.polled)
	if err != nil {
		return store.Contact{}
	}
	return v
}

// PeekDelivery returns the delivery ClaimDelivery would take, unclaimed.
// A read, one query when there is one: it waits for no write.
func (s *DB) PeekDelivery(ctx context.Context, addr uint32, now time.Time, lim store.Limits) (*store.Delivery, error) {
	var maxLen, lowest any // NULL: no limit
	if lim.MaxContentLength != nil {
		maxLen = int64(*lim.MaxContentLength)
	}
	if lim.LowestPriority != nil {
		lowest = int64(*lim.LowestPriority)
	}
	var next sql.NullInt64
	var sc scanContact
	d, err := scanDelivery(s.queryRow(ctx, nil, qPeek, addr, store.Millis(now), maxLen, lowest),
		append([]any{&next}, sc.dest()...)...)
	if errors.Is(err, sql.ErrNoRows) {
		var busy int
		if err := s.queryRow(ctx, nil, qInFlight, addr).Scan(&busy); err != nil {
			return nil, fmt.Errorf("sqlite: peek: %w", err)
		}
		if busy > 0 {
			return nil, fmt.Errorf("%w: device %d", store.ErrBusy, addr)
		}
		return nil, fmt.Errorf("%w: no due delivery for device %d", store.ErrNotFound, addr)
	}
	if err != nil {
		return nil, fmt.Errorf("sqlite: peek: %w", err)
	}
	d.Contact = sc.contact()
	if lim.InstanceIDs != nil {
		switch n := lim.InstanceIDs(d); {
		case n < 0 || n > 256:
			return nil, fmt.Errorf("%w: %d instance ids", store.ErrInvalid, n)
		case n > 0 && !next.Valid:
			return nil, fmt.Errorf("%w: device %d", store.ErrNotFound, addr)
		case n > 0:
			d.InstanceBase = uint8(next.Int64)
		}
	}
	return d, nil
}

// ClaimDelivery takes a device's oldest due delivery within lim.
func (s *DB) ClaimDelivery(ctx context.Context, addr uint32, now time.Time, lim store.Limits) (*store.Delivery, error) {
	var out *store.Delivery
	err := s.tx(ctx, func(tx *sql.Tx) error {
		var busy int
		err := s.queryRow(ctx, tx, qInFlight, addr).Scan(&busy)
		if err != nil {
			return fmt.Errorf("sqlite: claim: %w", err)
		}
		if busy > 0 {
			return fmt.Errorf("%w: device %d", store.ErrBusy, addr)
		}
		var maxLen, lowest any // NULL: no limit
		if lim.MaxContentLength != nil {
			maxLen = int64(*lim.MaxContentLength)
		}
		if lim.LowestPriority != nil {
			lowest = int64(*lim.LowestPriority)
		}
		var sc scanContact
		d, err := scanDelivery(s.queryRow(ctx, tx, qClaimable, addr, store.Millis(now), maxLen, lowest),
			sc.dest()...)
		if errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("%w: no due delivery for device %d", store.ErrNotFound, addr)
		}
		if err != nil {
			return fmt.Errorf("sqlite: claim: %w", err)
		}
		d.Contact = sc.contact()
		if _, err := s.exec(ctx, tx, qClaim, string(store.DeliveryInFlight), store.Millis(now), d.ID); err != nil {
			return fmt.Errorf("sqlite: claim: %w", err)
		}
		if lim.InstanceIDs != nil {
			switch n := lim.InstanceIDs(d); {
			case n < 0 || n > 256:
				return fmt.Errorf("%w: %d instance ids", store.ErrInvalid, n)
			case n > 0:
				if d.InstanceBase, err = s.reserveIDs(ctx, tx, addr, n); err != nil {
					return err
				}
			}
		}
		d.State, d.Attempts, d.Updated = store.DeliveryInFlight, d.Attempts+1, now
		out = d
		return nil
	})
	return out, err
}

// FinishDelivery applies r to a delivery in state from.
func (s *DB) FinishDelivery(ctx context.Context, id int64, from store.DeliveryState, r store.DeliveryResult) error {
	switch r.State {
	case store.DeliveryQueued, store.DeliveryDelivered, store.DeliveryFailed:
	default:
		return fmt.Errorf("%w: delivery result state %q", store.ErrInvalid, r.State)
	}
	return s.tx(ctx, func(tx *sql.Tx) error {
		now := time.Now()
		var dev uint32
		var msgID, state string
		err := s.queryRow(ctx, tx, qDeliveryState, id).Scan(&dev, &msgID, &state)
		if errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("%w: delivery %d", store.ErrNotFound, id)
		}
		if err != nil {
			return fmt.Errorf("sqlite: finish delivery: %w", err)
		}
		if store.DeliveryState(state) != from {
			return fmt.Errorf("%w: delivery %d is %s, not %s", store.ErrConflict, id, state, from)
		}
		undo, attempted := 0, 0
		if r.State == store.DeliveryQueued && r.Requeue {
			undo = 1
		}
		if r.Attempted && from == store.DeliveryQueued {
			if r.InstanceIDs < 0 || r.InstanceIDs > 256 {
				return fmt.Errorf("%w: %d instance ids", store.ErrInvalid, r.InstanceIDs)
			}
			attempted = 1
		}
		next := r.NextAttempt
		if r.State != store.DeliveryQueued {
			next = time.Time{}
		}
		_, err = s.exec(ctx, tx, qFinishDelivery,
			string(r.State), store.Millis(next), r.Error, undo, attempted, store.Millis(now), id)
		if err != nil {
			return fmt.Errorf("sqlite: finish delivery: %w", err)
		}
		if attempted > 0 && r.InstanceIDs > 0 {
			if _, err := s.reserveIDs(ctx, tx, dev, r.InstanceIDs); err != nil && !errors.Is(err, store.ErrNotFound) {
				return err // (a device removed meanwhile has no counter left)
			}
		}
		if r.Status != 0 {
			_, err = s.exec(ctx, tx, qRecordStatus, dev, msgID, r.Status, store.Millis(now))
			if err != nil {
				return fmt.Errorf("sqlite: delivery status: %w", err)
			}
		}
		return s.insertWork(ctx, tx, r.Work, now)
	})
}

// ExpiredDeliveries lists queued deliveries past their expiry.
func (s *DB) ExpiredDeliveries(ctx context.Context, now time.Time, limit int) ([]*store.Delivery, error) {
	rows, err := s.query(ctx, nil, qExpiredDeliveries, store.Millis(now), limit)
	if err != nil {
		return nil, fmt.Errorf("sqlite: expired deliveries: %w", err)
	}
	out, err := collectRows(rows, func(r *sql.Rows) (*store.Delivery, error) { return scanDelivery(r) })
	if err != nil {
		return nil, fmt.Errorf("sqlite: expired deliveries: %w", err)
	}
	return out, nil
}

// QueuedDeliveries summarises a device's queued deliveries.
func (s *DB) QueuedDeliveries(ctx context.Context, addr uint32) ([]store.DeliveryInfo, error) {
	rows, err := s.query(ctx, nil, qQueuedDeliveries, addr)
	if err != nil {
		return nil, fmt.Errorf("sqlite: queued deliveries: %w", err)
	}
	out, err := collectRows(rows, func(r *sql.Rows) (i store.DeliveryInfo, err error) {
		err = r.Scan(&i.ContentType, &i.Length, &i.Priority)
		return i, err
	})
	if err != nil {
		return nil, fmt.Errorf("sqlite: queued deliveries: %w", err)
	}
	return out, nil
}

// DeliveryStatus returns the recorded status of a delivered message id.
func (s *DB) DeliveryStatus(ctx context.Context, addr uint32, messageID string) (uint8, error) {
	var st uint8
	err := s.queryRow(ctx, nil, qDeliveryStatus, addr, messageID).Scan(&st)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, fmt.Errorf("%w: status of %s", store.ErrNotFound, messageID)
	}
	if err != nil {
		return 0, fmt.Errorf("sqlite: delivery status: %w", err)
	}
	return st, nil
}
