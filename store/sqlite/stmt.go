package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
)

// The statements of the hot paths (every submission, delivery, relay and
// INVOKE) are prepared once, at open: SQLite parsing their text was a
// quarter of the submission path's CPU when every call did it. database/sql
// keeps a prepared statement per connection, preparing it on a connection
// the first time it runs there; inside a transaction tx.StmtContext reuses
// the transaction connection's copy. Migrations, Recover, Purge and Stats
// run rarely and keep their text.

// hotStatements are the statements prepared at open.
func hotStatements() []string {
	return []string{
		qPing, qSavepoint, qReleaseSavepoint, qRollbackSavepoint,
		qBumpRegistry, qLogChange, qPruneChanges, qSetLogFrom, qChangesSince, qLogFrom, qInsertAlias, qAddDevice, qUpdateDevice, qDeleteAliases, qDeleteDevice,
		qDevice, qDeviceAliases, qDevices, qAliases, qSetControl, qRegistryVersion, qContact, qSetContact, qTouchContact,
		qInstanceNext, qInstanceSet, qCounter, qCounterSet,
		qDedupe, qAddSubmission, qResolveSubmission, qSubmissionExists, qPendingSubmissions,
		qInsertDelivery, qInsertDeliveryContent, qInsertRelayMessage, qInsertRelay,
		qWakeWaiting, qWake, qNextDue, qQueuedDevices, qChangedDevices, qDeviceNextDue,
		qInFlight, qClaimable, qPeek, qPeekMany, qClaim, qDeliveryState, qFinishDelivery, qRecordStatus,
		qExpiredDeliveries, qQueuedDeliveries, qDeliveryStatus,
		qDueRelays, qClaimRelay, qFinishRelay, qExpiredRelays,
	}
}

func (s *DB) prepare(ctx context.Context) error {
	s.stmts = make(map[string]*sql.Stmt)
	for _, q := range hotStatements() {
		st, err := s.sql.PrepareContext(ctx, q)
		if err != nil {
			return fmt.Errorf("sqlite: prepare %s: %w", strings.Join(strings.Fields(q), " "), err)
		}
		s.stmts[q] = st
	}
	return nil
}

// stmt returns the prepared statement of q, for tx if tx is not nil; nil
// (run the text) on a handle opened at an old schema version (tests of
// migrations), which prepares nothing.
func (s *DB) stmt(ctx context.Context, tx *sql.Tx, q string) (*sql.Stmt, error) {
	if s.stmts == nil {
		return nil, nil
	}
	st := s.stmts[q]
	if st == nil { // not in hotStatements: a defect every test finds
		return nil, fmt.Errorf("sqlite: statement not prepared: %s", strings.Join(strings.Fields(q), " "))
	}
	if tx != nil {
		st = tx.StmtContext(ctx, st)
	}
	return st, nil
}

func (s *DB) exec(ctx context.Context, tx *sql.Tx, q string, args ...any) (sql.Result, error) {
	st, err := s.stmt(ctx, tx, q)
	switch {
	case err != nil:
		return nil, err
	case st != nil:
		return st.ExecContext(ctx, args...)
	case tx != nil:
		return tx.ExecContext(ctx, q, args...)
	}
	return s.sql.ExecContext(ctx, q, args...)
}

func (s *DB) query(ctx context.Context, tx *sql.Tx, q string, args ...any) (*sql.Rows, error) {
	st, err := s.stmt(ctx, tx, q)
	switch {
	case err != nil:
		return nil, err
	case st != nil:
		return st.QueryContext(ctx, args...)
	case tx != nil:
		return tx.QueryContext(ctx, q, args...)
	}
	return s.sql.QueryContext(ctx, q, args...)
}

// row is what queryRow returns: a *sql.Row, or errRow.
type row interface{ Scan(dest ...any) error }

type errRow struct{ err error }

func (r errRow) Scan(...any) error { return r.err }

func (s *DB) queryRow(ctx context.Context, tx *sql.Tx, q string, args ...any) row {
	st, err := s.stmt(ctx, tx, q)
	switch {
	case err != nil:
		return errRow{err}
	case st != nil:
		return st.QueryRowContext(ctx, args...)
	case tx != nil:
		return tx.QueryRowContext(ctx, q, args...)
	}
	return s.sql.QueryRowContext(ctx, q, args...)
}

// collectRows reads every row with scan and closes rows, as pgx.CollectRows
// does for the PostgreSQL backend.
func collectRows[T any](rows *sql.Rows, scan func(*sql.Rows) (T, error)) ([]T, error) {
	defer rows.Close()
	var out []T
	for rows.Next() {
		v, err := scan(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}
