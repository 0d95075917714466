package postgres

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/esro-emsdp/emsdp/store"
)

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
	if err := w.Validate(); err != nil {
		return err
	}
	var b pgx.Batch
	for _, d := range w.Deliveries {
		var st *int64
		if d.SubmissionTime != nil {
			v := int64(*d.SubmissionTime)
			st = &v
		}
		b.Queue(insertDelivery, int64(d.Device), octets(d.MessageID), st, int64(d.ContentType), store.NonNil(d.Content),
			int16(d.Priority), store.Millis(d.NextAttempt), store.Millis(d.Expires), store.Millis(now), int64(d.Report.Device), octets(d.Report.Mail),
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
		b.Queue(insertRelay, octets(r.From), store.NonNil(r.Message), store.Millis(now), store.Millis(r.NextAttempt), store.Millis(r.Expires),
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
	if err := w.Validate(); err != nil {
		return err
	}
	return s.tx(ctx, func(tx pgx.Tx) error { return insertWork(ctx, tx, w, time.Now()) })
}
