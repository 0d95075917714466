package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/jackc/pgx/v5/pgconn"
)

// maxAttempts bounds the retries of a transaction that failed in a way
// that guarantees nothing was committed.
const maxAttempts = 5

// commitTimeout bounds the wait for COMMIT after ctx ended (an unreachable
// server must not hang the caller for ever).
const commitTimeout = time.Minute

// tx runs fn in one READ COMMITTED transaction and commits it. fn may run
// more than once (after a serialization failure, a deadlock, or a
// connection that broke before anything was sent), so it must set its
// results afresh on every run.
func (s *DB) tx(ctx context.Context, fn func(pgx.Tx) error) error {
	if s.closed.Load() {
		return ErrClosed
	}
	for attempt := 1; ; attempt++ {
		err := s.txOnce(ctx, fn)
		if err == nil || attempt == maxAttempts || !retryable(err) || ctx.Err() != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(time.Duration(attempt*attempt) * 5 * time.Millisecond):
		}
	}
}

func (s *DB) txOnce(ctx context.Context, fn func(pgx.Tx) error) error {
	tx, err := s.pool.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.ReadCommitted})
	if err != nil {
		return fmt.Errorf("postgres: begin: %w", err)
	}
	// Once COMMIT (or ROLLBACK) is due, ctx no longer decides: the outcome
	// must be known.
	done := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.WithoutCancel(ctx), commitTimeout)
	}
	if err := fn(tx); err != nil {
		c, cancel := done()
		tx.Rollback(c)
		cancel()
		return err
	}
	c, cancel := done()
	defer cancel()
	if err := tx.Commit(c); err != nil {
		return fmt.Errorf("postgres: commit: %w", err)
	}
	return nil
}

// retryable: PostgreSQL undid the whole transaction and says a retry can
// succeed, or nothing reached the server.
func retryable(err error) bool {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code == "40001" || pe.Code == "40P01" // serialization_failure, deadlock_detected
	}
	return pgconn.SafeToRetry(err)
}

// queryRow and query are the read paths; they refuse a closed store like
// the writes do.
func (s *DB) queryRow(ctx context.Context, sql string, args ...any) pgx.Row {
	if s.closed.Load() {
		return errRow{}
	}
	return s.pool.QueryRow(ctx, sql, args...)
}

func (s *DB) query(ctx context.Context, sql string, args ...any) (pgx.Rows, error) {
	if s.closed.Load() {
		return nil, ErrClosed
	}
	return s.pool.Query(ctx, sql, args...)
}

type errRow struct{}

func (errRow) Scan(...any) error { return ErrClosed }

// octets is a caller's string as BYTEA: never NULL.
func octets(s string) []byte {
	if s == "" {
		return []byte{}
	}
	return []byte(s)
}

// sqlLimit maps a list limit as SQLite reads it: negative = no limit.
func sqlLimit(n int) *int64 {
	if n < 0 {
		return nil // LIMIT NULL = LIMIT ALL
	}
	v := int64(n)
	return &v
}

// errorf wraps a database error with the operation.
func errorf(op string, err error) error {
	if errors.Is(err, ErrClosed) {
		return err
	}
	return fmt.Errorf("postgres: %s: %w", op, err)
}

// querier is a pool or a transaction.
type querier interface {
	Query(context.Context, string, ...any) (pgx.Rows, error)
}

// readTx runs fn in a read-only REPEATABLE READ transaction: one snapshot.
func (s *DB) readTx(ctx context.Context, fn func(pgx.Tx) error) error {
	if s.closed.Load() {
		return ErrClosed
	}
	return pgx.BeginTxFunc(ctx, s.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, fn)
}
