package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/esro-emsdp/emsdp/store"
)

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
	sub.Received, sub.State, sub.Verify = store.FromMillis(received), store.SubmissionState(state), string(verify)
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
			int64(sub.Device), int16(sub.InstanceID), store.NonNil(sub.ContentHash), store.Millis(dedupeSince))
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
			int64(c.Device), int16(c.InstanceID), store.NonNil(c.ContentHash), int64(c.ContentType), store.NonNil(c.Content),
			store.Millis(c.Received), int64(c.LocalTime), int64(c.Number), s.nodeID(), store.Millis(time.Now())).Scan(&c.ID)
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
			string(to), octets(verify), store.Millis(now), id)
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
		AND (owner = $3 OR owner NOT IN (`+liveNodes+`)) ORDER BY received, id`, s.keys.node, store.Millis(before), s.nodeID())
	if err != nil {
		return nil, errorf("pending submissions", err)
	}
	out, err := pgx.CollectRows(rows, scanSubmission)
	if err != nil {
		return nil, errorf("pending submissions", err)
	}
	return out, nil
}
