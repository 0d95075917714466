package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// ErrSchemaTooNew: the database was written by a newer program.
var ErrSchemaTooNew = errors.New("sqlite: database schema is newer than this program")

// SchemaVersion returns the schema version recorded in the database.
func (s *DB) SchemaVersion(ctx context.Context) (int, error) {
	var v int
	err := s.sql.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_version`).Scan(&v)
	return v, err
}

// checkSchema, for a read-only handle, requires the current schema:
// migrating would write.
func (s *DB) checkSchema(ctx context.Context) error {
	v, err := s.SchemaVersion(ctx)
	switch {
	case err != nil:
		return fmt.Errorf("sqlite: schema version: %w", err)
	case v > len(migrations):
		return fmt.Errorf("%w (version %d, known %d)", ErrSchemaTooNew, v, len(migrations))
	case v < len(migrations):
		return fmt.Errorf("sqlite: database schema %d is older than this program's %d: open it read-write once (emsdp serve) to upgrade it", v, len(migrations))
	}
	return nil
}

func (s *DB) migrate(ctx context.Context, target int) error {
	return s.tx(ctx, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_version (
			version INTEGER PRIMARY KEY, applied INTEGER NOT NULL)`); err != nil {
			return fmt.Errorf("sqlite: schema table: %w", err)
		}
		var cur int
		if err := tx.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_version`).Scan(&cur); err != nil {
			return fmt.Errorf("sqlite: schema version: %w", err)
		}
		if cur > len(migrations) {
			return fmt.Errorf("%w (version %d, known %d)", ErrSchemaTooNew, cur, len(migrations))
		}
		for v := cur + 1; v <= target; v++ {
			if _, err := tx.ExecContext(ctx, migrations[v-1]); err != nil {
				return fmt.Errorf("sqlite: migration %d: %w", v, err)
			}
			if _, err := tx.ExecContext(ctx, `INSERT INTO schema_version (version, applied) VALUES (?, ?)`,
				v, time.Now().UnixMilli()); err != nil {
				return fmt.Errorf("sqlite: migration %d: %w", v, err)
			}
		}
		return nil
	})
}
