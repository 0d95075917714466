package postgres

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// SchemaVersion returns the schema version recorded in the database.
func (s *DB) SchemaVersion(ctx context.Context) (int, error) {
	var v int
	err := s.queryRow(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_version`).Scan(&v)
	if err != nil {
		return 0, fmt.Errorf("postgres: schema version: %w", err)
	}
	return v, nil
}

func (s *DB) migrate(ctx context.Context, target int) error {
	return s.tx(ctx, func(tx pgx.Tx) error {
		// Servers starting together: the first migrates, the others wait
		// and then find nothing to do.
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1, 0)`, s.keys.migrate); err != nil {
			return fmt.Errorf("postgres: migration lock: %w", err)
		}
		if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS schema_version (
			version INTEGER PRIMARY KEY, applied BIGINT NOT NULL)`); err != nil {
			return fmt.Errorf("postgres: schema table: %w", err)
		}
		var cur int
		if err := tx.QueryRow(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_version`).Scan(&cur); err != nil {
			return fmt.Errorf("postgres: schema version: %w", err)
		}
		if cur > len(migrations) {
			return fmt.Errorf("%w (version %d, known %d)", ErrSchemaTooNew, cur, len(migrations))
		}
		for v := cur + 1; v <= target; v++ {
			if _, err := tx.Exec(ctx, migrations[v-1]); err != nil {
				return fmt.Errorf("postgres: migration %d: %w", v, err)
			}
			if _, err := tx.Exec(ctx, `INSERT INTO schema_version (version, applied) VALUES ($1, $2)`,
				v, time.Now().UnixMilli()); err != nil {
				return fmt.Errorf("postgres: migration %d: %w", v, err)
			}
		}
		return nil
	})
}
