// Package open opens the store a configuration names: the backend chosen
// by driver name, with that backend's details (the SQLite data
// directory's lock and file modes, the PostgreSQL conninfo and its
// masking) kept here and in the backends, out of the server. emsdp serve
// and the operator's commands (emsdp device, emsdp queue) open their
// stores through it, so that they find the same store the same way.
package open

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/postgres"
	"github.com/esro-emsdp/emsdp/store/sqlite"
)

// Drivers.
const (
	// SQLite is the embedded store: one database file in a data
	// directory, one server.
	SQLite = "sqlite"
	// Postgres is a PostgreSQL database several servers share.
	Postgres = "postgres"
)

// Access is how Open opens the store.
type Access uint8

// Accesses.
const (
	// Create opens the store, creating an empty one where there is none
	// (emsdp serve, emsdp device add).
	Create Access = iota
	// Existing opens only an existing store (ErrNoStore otherwise).
	Existing
	// ReadOnly opens only an existing store, for reading (listings):
	// SQLite in read-only mode, PostgreSQL with read-only transactions.
	ReadOnly
)

// ErrNoStore: Existing or ReadOnly, and there is no store where the
// configuration says.
var ErrNoStore = errors.New("no store")

// ErrDirLocked: Config.Serve, and another server runs on the SQLite data
// directory.
var ErrDirLocked = sqlite.ErrDirLocked

// Config names a store and how to open it.
type Config struct {
	Driver string // SQLite or Postgres
	// Dir is the data directory of a SQLite store (the database is
	// sqlite.FileName in it).
	Dir string
	// Conninfo is the PostgreSQL connection string, keyword/value or URL.
	Conninfo string
	// BusyTimeout is SQLite's wait for another process's lock; 0 = 10 s.
	BusyTimeout time.Duration
	Access      Access
	// Serve opens the store of a running server. With SQLite it holds an
	// exclusive lock on Dir until the store is closed (one server per
	// SQLite store: ErrDirLocked when another runs), and warns on Log
	// when Dir or its files are open to others. With PostgreSQL several
	// servers share the store by design, and nothing changes.
	Serve bool
	Log   *slog.Logger // for Serve's warnings; nil = none
}

// MaskConninfo is conninfo with its passwords masked, for logs and shown
// configurations.
func MaskConninfo(conninfo string) string { return postgres.MaskConninfo(conninfo) }

// CheckConninfo reports whether conninfo is a PostgreSQL connection string
// the store accepts, without connecting; the error masks the password.
func CheckConninfo(conninfo string) error { return postgres.CheckConninfo(conninfo) }

// Location names the store for people: the SQLite database file
// (absolute), or the PostgreSQL conninfo with its password masked.
func (c Config) Location() string {
	if c.Driver == Postgres {
		return postgres.MaskConninfo(c.Conninfo)
	}
	p := filepath.Join(c.Dir, sqlite.FileName)
	if abs, err := filepath.Abs(p); err == nil {
		p = abs
	}
	return p
}

// String is the driver and where, for logs: "sqlite DIR" or "postgres
// CONNINFO" with the password masked.
func (c Config) String() string {
	if c.Driver == Postgres {
		return Postgres + " " + postgres.MaskConninfo(c.Conninfo)
	}
	return c.Driver + " " + c.Dir
}

// Open opens the store c names.
func Open(ctx context.Context, c Config) (store.Store, error) {
	switch c.Driver {
	case SQLite:
		db, err := sqlite.OpenDir(ctx, c.Dir, &sqlite.Options{BusyTimeout: c.BusyTimeout,
			MustExist: c.Access == Existing, ReadOnly: c.Access == ReadOnly, Lock: c.Serve})
		if errors.Is(err, sqlite.ErrNoDatabase) {
			return nil, fmt.Errorf("%w: %w", ErrNoStore, err)
		}
		if errors.Is(err, sqlite.ErrDirLocked) {
			return nil, err // names the directory already
		}
		if err != nil {
			return nil, fmt.Errorf("store: %w", err)
		}
		if c.Serve && c.Log != nil {
			if loose := looseModes(c.Dir); len(loose) > 0 {
				c.Log.Warn("data directory readable by others: it holds the mail and the password hashes; chmod 0700 the directory, 0600 its files",
					"paths", loose)
			}
		}
		return db, nil
	case Postgres:
		db, err := postgres.OpenWith(ctx, c.Conninfo, postgres.Options{MustExist: c.Access == Existing, ReadOnly: c.Access == ReadOnly})
		if errors.Is(err, postgres.ErrNoStore) {
			return nil, fmt.Errorf("%w: %w", ErrNoStore, err)
		}
		if err != nil {
			return nil, fmt.Errorf("store: %w", err)
		}
		return db, nil
	}
	return nil, fmt.Errorf("store driver %q: want %q or %q", c.Driver, SQLite, Postgres)
}
