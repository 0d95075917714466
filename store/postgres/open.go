// Package postgres is the multi-node Store: several `emsdp serve`
// processes (and the device commands) share one PostgreSQL database
// through pgx connection pools. It passes the same conformance suite as
// store/sqlite and keeps the same semantics; this comment explains how the
// promises of the store interface hold when several processes work on the
// same rows at once.
//
// # Connection
//
// Open takes a DSN in URL form ("postgres://user@host/db?sslmode=disable")
// or key=value form ("host=/run/postgresql dbname=emsdp"); the pool is
// tuned with pgxpool's parameters in the DSN (pool_max_conns, default 16
// here: calls mostly wait for commit flushes, not for CPU). Tables
// are created in the first schema of the search_path (set it with
// search_path=... in the DSN to share a database with other software).
// Every session runs with synchronous_commit=on whatever the server
// default, and idle_in_transaction_session_timeout=1min unless the DSN
// says otherwise, so that a stopped (SIGSTOP'ed, swapped-out) process
// cannot hold row locks for ever. PostgreSQL 12 or newer; connection
// poolers must keep sessions (PgBouncer session mode), because of the
// node lock below.
//
// # Durability
//
// Every method that writes runs one READ COMMITTED transaction and returns
// after COMMIT, which with synchronous_commit=on means the commit record
// is flushed (docs/protocol.md EMSD §9.5: commit before RESULT). PostgreSQL flushes
// the commits of concurrent sessions together, so there is no group
// commit of our own as in store/sqlite. Once COMMIT is sent it is awaited
// (up to a minute) even if ctx ends, so that a nil or non-nil answer is
// definite in every case but a broken connection. A transaction that fails with a
// serialization failure or deadlock, or whose connection broke before
// anything was sent, is retried whole.
//
// # Exclusivity across processes
//
// Row-level state changes are conditional updates (UPDATE ... WHERE state
// = 'queued' ...): PostgreSQL re-checks the condition on the newest row
// version after waiting for a concurrent writer, so of two processes
// finishing, releasing or dropping the same row exactly one succeeds and
// the other gets ErrConflict or false. Beyond that:
//
//   - ClaimDelivery holds a transaction-scoped advisory lock on the device
//     while it checks for an in-flight delivery and takes the oldest due
//     one (FOR UPDATE, so a row changed meanwhile is re-checked). Claims
//     for one device are thereby serialised across all processes, which
//     keeps FIFO order exact; a partial unique index (one 'inflight' row
//     per device) makes two deliveries in flight impossible even for a
//     buggy writer.
//   - ClaimRelays locks its rows with FOR UPDATE SKIP LOCKED: concurrent
//     claimers take disjoint sets without waiting for each other.
//   - AddSubmission holds an advisory lock on the device while it looks for
//     a duplicate and inserts, so that one re-invocation arriving at two
//     servers at once is still one submission.
//   - The message counter, the registry version and the per-device
//     instance counter are single rows changed by one UPDATE ... RETURNING:
//     the row lock orders concurrent increments, so values never repeat.
//     A unique constraint on (local_time, local_number) backs the counter.
//     AddSubmission draws its number in a transaction of its own that
//     commits without waiting for the flush, so that the one counter of
//     the whole system is not locked for a disk flush per submission; the
//     submission's own synchronous commit, later in the WAL, flushes the
//     counter with it, so no number is handed out before it is durable.
//     A number drawn for a copy that lost a duplicate race is skipped
//     (numbers may have gaps; they never repeat).
//
// Advisory lock keys are derived from the schema name, so two deployments
// in separate schemas of one database do not collide. Serializable
// transactions were not chosen: a queue's hot rows would make them fail
// and retry constantly, while the locks above make the contended cases
// wait briefly instead.
//
// # Nodes: whose work is in flight
//
// Each handle draws a node id from a sequence and holds a session-level
// advisory lock on it over a connection of its own for its whole life.
// Claims record the node in the row (owner). PostgreSQL drops the lock
// when the session ends, so "the process that claimed this is gone" is
// "its node lock is not held" (pg_locks). This gives the methods that
// concern work left behind by a stopped process a meaning that is safe
// with several live servers:
//
//   - Recover re-queues the in-flight work of this handle (the caller has
//     nothing in flight: it runs at start) and of nodes that are gone,
//     never that of a live server.
//   - PendingSubmissions lists the pending submissions received by this
//     handle or by nodes that are gone, not those a live server is still
//     confirming.
//   - In the background, each handle re-queues the in-flight work of nodes
//     seen gone for 5 s (checked every second; a live node re-locks
//     within a second after a reconnect or a database restart), so the
//     devices of a crashed server are served by the others 5 to 6 s after
//     its session ended, without waiting for a restart; Requeued tells
//     the handle's owner.
//   - FinishDelivery from in-flight and FinishRelays from sending succeed
//     only for the node that claimed the row (ErrConflict otherwise), so a
//     server that lost its database session and had its work taken over
//     cannot overwrite the new claimer's outcome.
//
// With a single server this is the behaviour of store/sqlite, except that
// SetDeliveryControl also changes RegistryVersion (the other servers must
// reload the new limits) and message numbers may skip as said above. The
// lock connection asks the server for TCP keepalives (tcp_keepalives_*,
// tcp_user_timeout), so a node whose host vanished is declared gone in
// about half a minute; the node is re-locked after a lost connection.
//
// # Schema
//
// Migrations (schema.go) are numbered and recorded in schema_version; they
// run in one transaction under an advisory lock, so that servers starting
// together migrate once. Times are Unix milliseconds, as in store/sqlite;
// strings the caller supplies are stored as BYTEA, so every octet sequence
// round-trips (PostgreSQL text refuses NUL and invalid UTF-8) and sorts
// bytewise like SQLite.
package postgres

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/esro-emsdp/emsdp/store"
)

// Errors of this backend; the store package's errors cover the rest.
var (
	// ErrSchemaTooNew: the database was written by a newer program.
	ErrSchemaTooNew = errors.New("postgres: database schema is newer than this program")
	// ErrClosed: the store was closed.
	ErrClosed = errors.New("postgres: store closed")
)

// DB is a Store on one PostgreSQL database.
type DB struct {
	pool *pgxpool.Pool
	keys lockKeys
	node *node
	// requeued is signalled when a sweep re-queued a gone node's work
	// (Requeued).
	requeued chan struct{}

	closed    atomic.Bool
	closeOnce sync.Once
}

var _ store.Store = (*DB)(nil)

// config holds what tests tune; Open uses the defaults.
type config struct {
	version   int           // schema version to migrate to
	keepEvery time.Duration // node lock check and dead-node sweep period
	Options
}

// Options tune OpenWith. The zero value is Open's behaviour.
type Options struct {
	// MustExist opens only a database that already holds a store (its
	// schema_version table): ErrNoStore otherwise, and nothing created.
	MustExist bool
	// ReadOnly opens for reading only (every transaction read-only, no
	// migration, no node registration): for listings. It implies
	// MustExist; the schema must be current.
	ReadOnly bool
}

// ErrNoStore: Options.MustExist and the database holds no store.
var ErrNoStore = errors.New("postgres: no store in this database")

// Open connects to the database named by dsn, brings its schema to the
// current version and registers this handle as a node.
func Open(ctx context.Context, dsn string) (*DB, error) {
	return OpenWith(ctx, dsn, Options{})
}

// OpenWith is Open with o.
func OpenWith(ctx context.Context, dsn string, o Options) (*DB, error) {
	return open(ctx, dsn, config{version: len(migrations), keepEvery: 5 * time.Second, Options: o})
}

func open(ctx context.Context, dsn string, c config) (*DB, error) {
	pc, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("postgres: DSN: %w", err)
	}
	if !strings.Contains(dsn, "pool_max_conns") {
		// pgxpool sizes for CPU-bound work (4 on a small machine); store
		// calls mostly wait for commit flushes, and PostgreSQL flushes the
		// commits of concurrent sessions together.
		pc.MaxConns = max(pc.MaxConns, 16)
	}
	rp := pc.ConnConfig.RuntimeParams
	rp["synchronous_commit"] = "on" // durability before RESULT, whatever the server default
	if rp["application_name"] == "" {
		rp["application_name"] = "emsdp"
	}
	if rp["idle_in_transaction_session_timeout"] == "" {
		rp["idle_in_transaction_session_timeout"] = "60000"
	}
	if c.ReadOnly {
		rp["default_transaction_read_only"] = "on"
	}
	pool, err := pgxpool.NewWithConfig(ctx, pc)
	if err != nil {
		return nil, fmt.Errorf("postgres: %w", err)
	}
	s := &DB{pool: pool, requeued: make(chan struct{}, 1)}
	var schema *string
	if err := pool.QueryRow(ctx, `SELECT current_schema()`).Scan(&schema); err != nil {
		pool.Close()
		return nil, fmt.Errorf("postgres: connect: %w", err)
	}
	if schema == nil {
		pool.Close()
		return nil, errors.New("postgres: no schema of the search_path exists")
	}
	s.keys = keysFor(*schema)
	if c.MustExist || c.ReadOnly {
		var exists bool
		if err := pool.QueryRow(ctx, `SELECT to_regclass('schema_version') IS NOT NULL`).Scan(&exists); err != nil {
			pool.Close()
			return nil, fmt.Errorf("postgres: connect: %w", err)
		}
		if !exists {
			pool.Close()
			return nil, fmt.Errorf("%w (schema %s)", ErrNoStore, *schema)
		}
	}
	if c.ReadOnly {
		v, err := s.SchemaVersion(ctx)
		switch {
		case err != nil:
			pool.Close()
			return nil, err
		case v != len(migrations):
			pool.Close()
			return nil, fmt.Errorf("postgres: store schema %d, this program's %d: open it read-write once (emsdp serve) first", v, len(migrations))
		}
		return s, nil // reads need no node
	}
	if err := s.migrate(ctx, c.version); err != nil {
		pool.Close()
		return nil, err
	}
	if c.version < 2 { // no node ids before migration 2 (tests of migrations only)
		return s, nil
	}
	if s.node, err = newNode(ctx, s, pc.ConnConfig, c.keepEvery); err != nil {
		pool.Close()
		return nil, err
	}
	s.node.start()
	return s, nil
}

// lockKeys are the first keys of the advisory locks this schema uses.
type lockKeys struct {
	migrate, node, device, submit int32
}

func keysFor(schema string) lockKeys {
	k := func(purpose string) int32 {
		h := fnv.New32a()
		h.Write([]byte("emsdp/" + purpose + "/" + schema))
		return int32(h.Sum32() & 0x7fffffff) // positive: pg_locks shows them as oids
	}
	return lockKeys{migrate: k("migrate"), node: k("node"), device: k("device"), submit: k("submit")}
}

// Close releases the node and closes the pool. It waits for calls in
// progress.
func (s *DB) Close() error {
	s.closeOnce.Do(func() {
		s.closed.Store(true)
		if s.node != nil {
			s.node.stop()
		}
		s.pool.Close()
	})
	return nil
}

// Ping checks the database answers a query.
func (s *DB) Ping(ctx context.Context) error {
	var one int
	if err := s.queryRow(ctx, `SELECT 1`).Scan(&one); err != nil {
		return fmt.Errorf("postgres: ping: %w", err)
	}
	return nil
}

// nodeID is this handle's node, 0 before migration 2.
// NodeID is the node id of this handle: the owner its claims carry
// (store.QueueEntry.Owner); 0 for a read-only handle.
func (s *DB) NodeID() int32 { return s.nodeID() }

// Requeued is signalled (at most one signal pending) when the in-flight
// work of a server that is gone was re-queued, by this handle's sweep or
// by another handle's (seen within a second), so that the scheduler takes
// the work over at once instead of at its next rescan.
func (s *DB) Requeued() <-chan struct{} { return s.requeued }

func (s *DB) nodeID() int32 {
	if s.node == nil {
		return 0
	}
	return s.node.id
}
