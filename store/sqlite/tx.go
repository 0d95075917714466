package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

// ErrClosed: the store was closed.
var ErrClosed = errors.New("sqlite: store closed")

// writeReq is one write transaction waiting for the committer.
type writeReq struct {
	ctx  context.Context
	fn   func(*sql.Tx) error
	done chan error
}

// maxBatch bounds the writes committed together.
const maxBatch = 64

// tx runs fn as one atomic write and returns when it is durable (or
// failed). Writes are group-committed: the committer runs every write
// waiting at the time in one transaction, each inside its own savepoint
// so that one failing write leaves the others intact, and pays for one
// synchronous commit. Concurrent submissions therefore share fsyncs
// instead of queueing for one each.
func (s *DB) tx(ctx context.Context, fn func(*sql.Tx) error) error {
	r := &writeReq{ctx: ctx, fn: fn, done: make(chan error, 1)}
	select {
	case s.writes <- r:
	case <-ctx.Done():
		return ctx.Err()
	case <-s.quit:
		return ErrClosed
	}
	// Once handed over the write may commit: wait for the verdict even if
	// ctx ends (the committer skips writes whose ctx ended before they ran).
	return <-r.done
}

func (s *DB) committer() {
	defer close(s.done)
	for {
		var first *writeReq
		select {
		case first = <-s.writes:
		case <-s.quit:
			return
		}
		batch := []*writeReq{first}
	more:
		for len(batch) < maxBatch {
			select {
			case r := <-s.writes:
				batch = append(batch, r)
			default:
				break more
			}
		}
		s.commit(batch)
	}
}

// commit runs a batch, retrying it whole while SQLite reports the
// database busy beyond the busy timeout (another process writing).
func (s *DB) commit(batch []*writeReq) {
	var errs []error
	var err error
	for attempt := 0; ; attempt++ {
		errs, err = s.commitOnce(batch)
		if err == nil || !isBusy(err) || attempt >= 5 {
			break
		}
		select {
		case <-s.quit:
		case <-time.After(time.Duration(attempt+1) * 20 * time.Millisecond):
			continue
		}
		break
	}
	for i, r := range batch {
		if err != nil {
			r.done <- err
		} else {
			r.done <- errs[i]
		}
	}
}

func (s *DB) commitOnce(batch []*writeReq) ([]error, error) {
	tx, err := s.sql.BeginTx(context.Background(), nil)
	if err != nil {
		return nil, fmt.Errorf("sqlite: begin: %w", err)
	}
	errs := make([]error, len(batch))
	ok := 0
	for i, r := range batch {
		if err := r.ctx.Err(); err != nil {
			errs[i] = err
			continue
		}
		if len(batch) == 1 {
			errs[i] = r.fn(tx)
		} else {
			errs[i] = s.savepoint(tx, r.fn)
		}
		if errs[i] != nil && isBusy(errs[i]) {
			tx.Rollback()
			return nil, errs[i]
		}
		if errs[i] == nil {
			ok++
		}
	}
	if ok == 0 {
		tx.Rollback()
		return errs, nil
	}
	if err := tx.Commit(); err != nil {
		return nil, fmt.Errorf("sqlite: commit: %w", err)
	}
	return errs, nil
}

const (
	qSavepoint         = `SAVEPOINT w`
	qReleaseSavepoint  = `RELEASE w`
	qRollbackSavepoint = `ROLLBACK TO w`
)

// savepoint runs fn so that its failure undoes only its own changes.
func (s *DB) savepoint(tx *sql.Tx, fn func(*sql.Tx) error) error {
	ctx := context.Background() // as the transaction's: the batch's requests have their own
	if _, err := s.exec(ctx, tx, qSavepoint); err != nil {
		return fmt.Errorf("sqlite: savepoint: %w", err)
	}
	if err := fn(tx); err != nil {
		if _, rerr := s.exec(ctx, tx, qRollbackSavepoint); rerr != nil {
			return errors.Join(err, rerr)
		}
		s.exec(ctx, tx, qReleaseSavepoint)
		return err
	}
	if _, err := s.exec(ctx, tx, qReleaseSavepoint); err != nil {
		return fmt.Errorf("sqlite: release savepoint: %w", err)
	}
	return nil
}

func sqliteCode(err error) int {
	var e *sqlite.Error
	if errors.As(err, &e) {
		return e.Code()
	}
	return 0
}

func isBusy(err error) bool {
	c := sqliteCode(err) & 0xff
	return c == sqlite3.SQLITE_BUSY || c == sqlite3.SQLITE_LOCKED
}

func isConstraint(err error) bool { return sqliteCode(err)&0xff == sqlite3.SQLITE_CONSTRAINT }
