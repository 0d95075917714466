package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	"github.com/esro-emsdp/emsdp/store"
)

const (
	qInsertDelivery = `INSERT INTO deliveries (device, message_id, submission_time, content_type, size,
		priority, state, attempts, next_attempt, expires, created, updated, last_error,
		report_device, report_mail, report_flags, report_recipient, report_message_id, report_headers, report_dsn)
		VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, '', ?, ?, ?, ?, ?, ?, ?)`
	// The content of the delivery just inserted, on the same connection.
	qInsertDeliveryContent = `INSERT INTO delivery_content (id, content) VALUES (last_insert_rowid(), ?)`
	qInsertRelayMessage    = `INSERT INTO relay_messages (envelope_from, data, created) VALUES (?, ?, ?) RETURNING id`
	qInsertRelay           = `INSERT INTO relays (message, rcpt, state, attempts, next_attempt, expires, created,
		updated, last_error, report_device, report_mail, report_flags, report_recipient, report_message_id,
		report_headers, report_dsn) VALUES (?, ?, ?, 0, ?, ?, ?, ?, '', ?, ?, ?, ?, ?, ?, ?)`
)

func (s *DB) insertWork(ctx context.Context, tx *sql.Tx, w store.Work, now time.Time) error {
	if err := w.Validate(); err != nil {
		return err
	}
	for _, d := range w.Deliveries {
		var st any
		if d.SubmissionTime != nil {
			st = int64(*d.SubmissionTime)
		}
		_, err := s.exec(ctx, tx, qInsertDelivery,
			d.Device, d.MessageID, st, d.ContentType, len(d.Content), d.Priority, string(store.DeliveryQueued),
			store.Millis(d.NextAttempt), store.Millis(d.Expires), store.Millis(now), store.Millis(now),
			d.Report.Device, d.Report.Mail, d.Report.Flags, d.Report.Recipient, d.Report.MessageID, d.Report.Headers,
			d.Report.DSN)
		if err == nil {
			_, err = s.exec(ctx, tx, qInsertDeliveryContent, store.NonNil(d.Content))
		}
		if err != nil {
			return fmt.Errorf("sqlite: queue delivery: %w", err)
		}
	}
	for _, r := range w.Relays {
		var ref int64
		err := s.queryRow(ctx, tx, qInsertRelayMessage,
			r.From, store.NonNil(r.Message), store.Millis(now)).Scan(&ref)
		if err != nil {
			return fmt.Errorf("sqlite: queue relay: %w", err)
		}
		for _, rc := range r.Recipients {
			_, err := s.exec(ctx, tx, qInsertRelay,
				ref, rc.Addr, string(store.RelayQueued), store.Millis(r.NextAttempt), store.Millis(r.Expires), store.Millis(now), store.Millis(now),
				rc.Report.Device, rc.Report.Mail, rc.Report.Flags, rc.Report.Recipient, rc.Report.MessageID, rc.Report.Headers,
				rc.Report.DSN)
			if err != nil {
				return fmt.Errorf("sqlite: queue relay: %w", err)
			}
		}
	}
	return nil
}

// Enqueue writes w atomically.
func (s *DB) Enqueue(ctx context.Context, w store.Work) error {
	if w.Empty() {
		return nil
	}
	if err := w.Validate(); err != nil {
		return err
	}
	return s.tx(ctx, func(tx *sql.Tx) error { return s.insertWork(ctx, tx, w, time.Now()) })
}
