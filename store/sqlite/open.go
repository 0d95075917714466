// Package sqlite is the embedded Store: one SQLite database file (pure Go,
// modernc.org/sqlite) in WAL mode, so that the device commands can edit the
// registry while the server runs. Every write is one IMMEDIATE transaction
// with synchronous=FULL: when a method returns nil the change survives a
// crash or power loss.
package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/esro-emsdp/emsdp/store"
)

// FileName is the database file inside a data directory.
const FileName = "emsdp.db"

// Options tune Open. The zero value is usable.
type Options struct {
	// BusyTimeout is how long a statement waits for another connection's
	// lock. Zero: 10 s.
	BusyTimeout time.Duration
	// MaxConns caps open connections. Zero: 8.
	MaxConns int
	// MustExist opens only an existing database: a missing file (or data
	// directory) is ErrNoDatabase instead of a new, empty store. The
	// operator's commands use it so that a mistyped --data cannot create
	// a store no server reads.
	MustExist bool
	// ReadOnly opens the database for reading only (SQLite mode=ro): for
	// listings, which then work on a store the user may only read, and
	// never write. It implies MustExist; the schema must be current.
	ReadOnly bool
	// Lock, for OpenDir, holds an exclusive lock on the data directory
	// until Close: the handle of the one server that runs the directory's
	// queues (ErrDirLocked when another process holds it).
	Lock bool
}

// ErrDirLocked: Options.Lock, and another process (emsdp serve) holds the
// data directory.
var ErrDirLocked = errors.New("data directory in use by another emsdp serve")

// ErrNoDatabase: Options.MustExist and there is no database at the path.
var ErrNoDatabase = errors.New("sqlite: no database")

// DB is a Store on one SQLite file.
type DB struct {
	sql    *sql.DB
	stmts  map[string]*sql.Stmt // hotStatements, prepared at open
	writes chan *writeReq
	quit   chan struct{}
	done   chan struct{}
	unlock func() // releases Options.Lock's lock; nil = none
}

var _ store.Store = (*DB)(nil)

// OpenDir opens (creating it and the directory if needed) the store of a
// data directory. A directory it creates is 0700: the store holds mail and
// password hashes.
func OpenDir(ctx context.Context, dir string, o *Options) (*DB, error) {
	if o == nil || !(o.MustExist || o.ReadOnly) {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("sqlite: data directory: %w", err)
		}
	}
	if o == nil || !o.Lock {
		return Open(ctx, filepath.Join(dir, FileName), o)
	}
	unlock, err := lockDir(dir)
	if err != nil {
		return nil, err
	}
	db, err := Open(ctx, filepath.Join(dir, FileName), o)
	if err != nil {
		unlock()
		return nil, err
	}
	db.unlock = unlock
	return db, nil
}

// Open opens (creating if needed) the database file at path and brings its
// schema to the current version.
func Open(ctx context.Context, path string, o *Options) (*DB, error) {
	return open(ctx, path, o, len(migrations))
}

func open(ctx context.Context, path string, o *Options, version int) (*DB, error) {
	if o == nil {
		o = &Options{}
	}
	if strings.ContainsRune(path, '?') {
		return nil, fmt.Errorf("sqlite: database path %q must not contain '?'", path)
	}
	busy := o.BusyTimeout
	if busy <= 0 {
		busy = 10 * time.Second
	}
	conns := o.MaxConns
	if conns <= 0 {
		conns = 8
	}
	if o.MustExist || o.ReadOnly {
		if _, err := os.Stat(path); err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil, fmt.Errorf("%w at %s", ErrNoDatabase, path)
			}
			return nil, fmt.Errorf("sqlite: %w", err)
		}
	}
	// WAL lets readers (and the device commands) work beside the writer;
	// FULL syncs the WAL at every commit (durability before RESULT, see
	// docs/protocol.md EMSD §9.5); IMMEDIATE takes the write lock at BEGIN so that two
	// writers queue on the busy timeout instead of failing at upgrade.
	dsn := fmt.Sprintf("%s?_pragma=busy_timeout(%d)&_pragma=journal_mode(WAL)&_pragma=synchronous(FULL)&_pragma=foreign_keys(1)&_txlock=immediate",
		path, busy.Milliseconds())
	if o.ReadOnly {
		// A URI, so that SQLite itself sees mode=ro; the journal mode is
		// the database's (setting it would write).
		abs, err := filepath.Abs(path)
		if err != nil {
			return nil, fmt.Errorf("sqlite: %w", err)
		}
		dsn = fmt.Sprintf("%s?mode=ro&_pragma=busy_timeout(%d)&_pragma=foreign_keys(1)",
			(&url.URL{Scheme: "file", Path: abs}).String(), busy.Milliseconds())
	} else {
		// Created here rather than by SQLite, which would make it 0644 less
		// the umask: 0600 whatever the umask, and SQLite gives its -wal and
		// -shm files the database file's mode.
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return nil, fmt.Errorf("sqlite: open %s: %w", path, err)
		}
		f.Close()
	}
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("sqlite: open %s: %w", path, err)
	}
	db.SetMaxOpenConns(conns)
	db.SetMaxIdleConns(conns)
	s := &DB{sql: db, writes: make(chan *writeReq), quit: make(chan struct{}), done: make(chan struct{})}
	go s.committer()
	if o.ReadOnly {
		err = s.checkSchema(ctx)
	} else {
		err = s.migrate(ctx, version)
	}
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("%w (database %s)", err, path)
	}
	if version == len(migrations) { // (tests of old schemas prepare nothing)
		if err := s.prepare(ctx); err != nil {
			s.Close()
			return nil, err
		}
	}
	return s, nil
}

// Close closes the database.
func (s *DB) Close() error {
	select {
	case <-s.quit:
	default:
		close(s.quit)
	}
	<-s.done
	for _, st := range s.stmts {
		st.Close()
	}
	err := s.sql.Close()
	if s.unlock != nil {
		s.unlock()
		s.unlock = nil
	}
	return err
}

const qPing = `SELECT 1`

// Ping checks the database answers a query.
func (s *DB) Ping(ctx context.Context) error {
	var one int
	return s.queryRow(ctx, nil, qPing).Scan(&one)
}
