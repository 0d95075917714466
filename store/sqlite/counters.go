package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/esro-emsdp/emsdp/store"
)

// ReserveInstanceIDs reserves n instance ids towards a device.
func (s *DB) ReserveInstanceIDs(ctx context.Context, addr uint32, n int) (uint8, error) {
	if n < 1 || n > 256 {
		return 0, fmt.Errorf("%w: %d instance ids", store.ErrInvalid, n)
	}
	var first uint8
	err := s.tx(ctx, func(tx *sql.Tx) error {
		var err error
		first, err = s.reserveIDs(ctx, tx, addr, n)
		return err
	})
	return first, err
}

// reserveIDs advances a device's instance id counter by n within tx and
// returns the first id reserved.
func (s *DB) reserveIDs(ctx context.Context, tx *sql.Tx, addr uint32, n int) (uint8, error) {
	var first int64
	err := s.queryRow(ctx, tx, qInstanceNext, addr).Scan(&first)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, fmt.Errorf("%w: device %d", store.ErrNotFound, addr)
	}
	if err != nil {
		return 0, fmt.Errorf("sqlite: instance ids: %w", err)
	}
	if _, err = s.exec(ctx, tx, qInstanceSet, (first+int64(n))%256, addr); err != nil {
		return 0, fmt.Errorf("sqlite: instance ids: %w", err)
	}
	return uint8(first), nil
}

// nextNumber advances the daily message counter within tx. The counter
// restarts at 1 only when the day moves forward, so a clock stepping back
// can never repeat a (time, number) pair.
func (s *DB) nextNumber(ctx context.Context, tx *sql.Tx, t time.Time) (uint32, error) {
	var day, n int64
	if err := s.queryRow(ctx, tx, qCounter).Scan(&day, &n); err != nil {
		return 0, fmt.Errorf("sqlite: message counter: %w", err)
	}
	if today := t.Unix() / 86400; today > day {
		day, n = today, 1
	} else {
		n++
	}
	if n > math.MaxUint32 {
		return 0, errors.New("sqlite: daily message counter exhausted")
	}
	if _, err := s.exec(ctx, tx, qCounterSet, day, n); err != nil {
		return 0, fmt.Errorf("sqlite: message counter: %w", err)
	}
	return uint32(n), nil
}

// NextMessageNumber allocates a message number for a local id at time t.
func (s *DB) NextMessageNumber(ctx context.Context, t time.Time) (uint32, error) {
	var n uint32
	err := s.tx(ctx, func(tx *sql.Tx) error {
		var err error
		n, err = s.nextNumber(ctx, tx, t)
		return err
	})
	return n, err
}
