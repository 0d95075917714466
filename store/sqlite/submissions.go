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
	submissionCols = `id, device, instance_id, content_hash, content_type, content, received, local_time,
	local_number, state, verify`
	qDedupe = `SELECT ` + submissionCols + ` FROM submissions
		WHERE device = ? AND instance_id = ? AND content_hash = ? AND received >= ? ORDER BY id LIMIT 1`
	qAddSubmission = `INSERT INTO submissions (device, instance_id, content_hash, content_type,
		content, received, local_time, local_number, state, verify, updated)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, '', ?) RETURNING id`
	qResolveSubmission  = `UPDATE submissions SET state = ?, verify = ?, updated = ? WHERE id = ? AND state = ?`
	qSubmissionExists   = `SELECT 1 FROM submissions WHERE id = ?`
	qPendingSubmissions = `SELECT ` + submissionCols + ` FROM submissions WHERE state = ? AND received < ?
		ORDER BY received, id`
)

func scanSubmission(sc interface{ Scan(...any) error }) (*store.Submission, error) {
	var sub store.Submission
	var received int64
	var state string
	if err := sc.Scan(&sub.ID, &sub.Device, &sub.InstanceID, &sub.ContentHash, &sub.ContentType, &sub.Content,
		&received, &sub.LocalTime, &sub.Number, &state, &sub.Verify); err != nil {
		return nil, err
	}
	sub.Received, sub.State = store.FromMillis(received), store.SubmissionState(state)
	return &sub, nil
}

// AddSubmission commits a submission, or finds its earlier copy.
func (s *DB) AddSubmission(ctx context.Context, sub *store.Submission, dedupeSince time.Time) (*store.Submission, bool, error) {
	if sub.Received.IsZero() {
		return nil, false, fmt.Errorf("%w: submission without receipt time", store.ErrInvalid)
	}
	var rec *store.Submission
	dup := false
	err := s.tx(ctx, func(tx *sql.Tx) error {
		r, err := scanSubmission(s.queryRow(ctx, tx, qDedupe,
			sub.Device, sub.InstanceID, sub.ContentHash, store.Millis(dedupeSince)))
		if err == nil {
			rec, dup = r, true
			return nil
		}
		if !errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("sqlite: dedupe: %w", err)
		}
		n, err := s.nextNumber(ctx, tx, sub.Received)
		if err != nil {
			return err
		}
		c := *sub
		c.LocalTime, c.Number, c.State, c.Verify = uint32(sub.Received.Unix()), n, store.SubmissionPending, ""
		err = s.queryRow(ctx, tx, qAddSubmission,
			c.Device, c.InstanceID, store.NonNil(c.ContentHash), c.ContentType, store.NonNil(c.Content), store.Millis(c.Received), c.LocalTime, c.Number,
			string(c.State), store.Millis(time.Now())).Scan(&c.ID)
		if err != nil {
			return fmt.Errorf("sqlite: add submission: %w", err)
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
	done := false
	err := s.tx(ctx, func(tx *sql.Tx) error {
		now := time.Now()
		r, err := s.exec(ctx, tx, qResolveSubmission,
			string(to), verify, store.Millis(now), id, string(store.SubmissionPending))
		if err != nil {
			return fmt.Errorf("sqlite: submission %d: %w", id, err)
		}
		if n, _ := r.RowsAffected(); n == 0 {
			var one int
			if err := s.queryRow(ctx, tx, qSubmissionExists, id).Scan(&one); errors.Is(err, sql.ErrNoRows) {
				return fmt.Errorf("%w: submission %d", store.ErrNotFound, id)
			}
			return nil
		}
		done = true
		return s.insertWork(ctx, tx, w, now)
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

// PendingSubmissions lists pending submissions received before 'before'.
func (s *DB) PendingSubmissions(ctx context.Context, before time.Time) ([]*store.Submission, error) {
	rows, err := s.query(ctx, nil, qPendingSubmissions, string(store.SubmissionPending), store.Millis(before))
	if err != nil {
		return nil, fmt.Errorf("sqlite: pending submissions: %w", err)
	}
	out, err := collectRows(rows, func(r *sql.Rows) (*store.Submission, error) { return scanSubmission(r) })
	if err != nil {
		return nil, fmt.Errorf("sqlite: pending submissions: %w", err)
	}
	return out, nil
}
