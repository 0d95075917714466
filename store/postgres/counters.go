package postgres

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/esro-emsdp/emsdp/store"
)

// ReserveInstanceIDs reserves n instance ids towards a device. One UPDATE
// ... RETURNING: the device row's lock orders concurrent reservations.
func (s *DB) ReserveInstanceIDs(ctx context.Context, addr uint32, n int) (uint8, error) {
	if n < 1 || n > 256 {
		return 0, fmt.Errorf("%w: %d instance ids", store.ErrInvalid, n)
	}
	var first uint8
	err := s.tx(ctx, func(tx pgx.Tx) error {
		var err error
		first, err = reserveIDs(ctx, tx, addr, n)
		return err
	})
	return first, err
}

// reserveIDs advances a device's instance id counter by n within tx and
// returns the first id reserved.
func reserveIDs(ctx context.Context, tx pgx.Tx, addr uint32, n int) (uint8, error) {
	var next int
	err := tx.QueryRow(ctx, `UPDATE devices SET next_instance = (next_instance + $2) % 256 WHERE address = $1
		RETURNING next_instance`, int64(addr), n).Scan(&next)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, fmt.Errorf("%w: device %d", store.ErrNotFound, addr)
	}
	if err != nil {
		return 0, errorf("instance ids", err)
	}
	return uint8(((next-n)%256 + 256) % 256), nil
}

// drawNumber advances the daily message counter in a transaction of its
// own. The counter restarts at 1 only when the day moves forward, so a
// clock stepping back can never repeat a (time, number) pair.
//
// With async set, the transaction commits without waiting for its flush,
// so that the one counter row of the whole system is locked for
// microseconds instead of a disk flush (see AddSubmission). The number is
// then durable only after a later synchronous commit of a transaction that
// writes (its flush covers the WAL up to it, the counter's commit
// included); the caller must make one before the number leaves the store.
func (s *DB) drawNumber(ctx context.Context, t time.Time, async bool) (uint32, error) {
	var n int64
	err := s.tx(ctx, func(tx pgx.Tx) error {
		if async {
			if _, err := tx.Exec(ctx, `SET LOCAL synchronous_commit = off`); err != nil {
				return errorf("message counter", err)
			}
		}
		err := tx.QueryRow(ctx, `UPDATE message_counter SET day = GREATEST(day, $1),
			number = CASE WHEN $1 > day THEN 1 ELSE number + 1 END RETURNING number`, t.Unix()/86400).Scan(&n)
		if err != nil {
			return errorf("message counter", err)
		}
		if n > math.MaxUint32 {
			return errors.New("postgres: daily message counter exhausted")
		}
		return nil
	})
	return uint32(n), err
}

// NextMessageNumber allocates a message number for a local id at time t.
// The number leaves at once, so its commit is synchronous: callers from
// all servers queue on the counter row for one flush each. (Only reports
// draw numbers this way; submissions, the bulk, do not.)
func (s *DB) NextMessageNumber(ctx context.Context, t time.Time) (uint32, error) {
	return s.drawNumber(ctx, t, false)
}
