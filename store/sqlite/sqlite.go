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
	"math"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"

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
}

// ErrNoDatabase: Options.MustExist and there is no database at the path.
var ErrNoDatabase = errors.New("sqlite: no database")

// DB is a Store on one SQLite file.
type DB struct {
	sql    *sql.DB
	stmts  map[string]*sql.Stmt // hotStatements, prepared at open
	writes chan *writeReq
	quit   chan struct{}
	done   chan struct{}
}

var _ store.Store = (*DB)(nil)

// OpenDir opens (creating it and the directory if needed) the store of a
// data directory. A directory it creates is 0700: the store holds mail and
// password hashes.
func OpenDir(ctx context.Context, dir string, o *Options) (*DB, error) {
	if o != nil && (o.MustExist || o.ReadOnly) {
		return Open(ctx, filepath.Join(dir, FileName), o)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("sqlite: data directory: %w", err)
	}
	return Open(ctx, filepath.Join(dir, FileName), o)
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
	return s.sql.Close()
}

const qPing = `SELECT 1`

// Ping checks the database answers a query.
func (s *DB) Ping(ctx context.Context) error {
	var one int
	return s.queryRow(ctx, nil, qPing).Scan(&one)
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

// nonNil keeps nil slices out of NOT NULL BLOB columns.
func nonNil(b []byte) []byte {
	if b == nil {
		return []byte{}
	}
	return b
}

func ms(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixMilli()
}

func fromMS(v int64) time.Time {
	if v == 0 {
		return time.Time{}
	}
	return time.UnixMilli(v)
}

// ---- registry ----

const (
	qBumpRegistry = `UPDATE meta SET value = value + 1 WHERE key = 'registry_version' RETURNING value`
	qLogChange    = `INSERT OR IGNORE INTO registry_changes (version, address) VALUES (?, ?)`
	qPruneChanges = `DELETE FROM registry_changes WHERE version <= ?`
	qSetLogFrom   = `UPDATE meta SET value = ? WHERE key = 'registry_log_from'`
	qChangesSince = `SELECT DISTINCT address FROM registry_changes WHERE version > ? AND version <= ? ORDER BY address`
	qLogFrom      = `SELECT value FROM meta WHERE key = 'registry_log_from'`
	qInsertAlias  = `INSERT INTO aliases (alias, device) VALUES (?, ?)`
	qAddDevice    = `INSERT INTO devices (address, password_hash, ip, port, version, mode,
		ctl_operations, ctl_max_length, ctl_lowest_priority, created, updated, psk, require_dtls)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`
	qUpdateDevice = `UPDATE devices SET password_hash = ?, ip = ?, port = ?, version = ?, mode = ?, updated = ?,
		psk = ?, require_dtls = ? WHERE address = ?`
	qDeleteAliases = `DELETE FROM aliases WHERE device = ?`
	qDeleteDevice  = `DELETE FROM devices WHERE address = ?`
)

// bumpRegistry ends every registry edit: a new version, the devices it
// changed logged under it, and the versions beyond the log's reach
// dropped.
func (s *DB) bumpRegistry(ctx context.Context, tx *sql.Tx, addrs ...uint32) error {
	var v int64
	if err := s.queryRow(ctx, tx, qBumpRegistry).Scan(&v); err != nil {
		return fmt.Errorf("sqlite: registry version: %w", err)
	}
	for _, a := range addrs {
		if _, err := s.exec(ctx, tx, qLogChange, v, a); err != nil {
			return fmt.Errorf("sqlite: registry change: %w", err)
		}
	}
	if from := v - store.RegistryLogVersions; from > 0 {
		if _, err := s.exec(ctx, tx, qPruneChanges, from); err != nil {
			return fmt.Errorf("sqlite: registry change: %w", err)
		}
		if _, err := s.exec(ctx, tx, qSetLogFrom, from); err != nil {
			return fmt.Errorf("sqlite: registry change: %w", err)
		}
	}
	return nil
}

// RegistryChanges lists the devices changed after version since.
func (s *DB) RegistryChanges(ctx context.Context, since int64) (int64, []uint32, bool, error) {
	// The version first, the log's reach last: rows of versions up to v
	// committed with v, and pruning only moves the reach forward, so a
	// reach read after the rows covers them.
	v, err := s.RegistryVersion(ctx)
	if err != nil {
		return 0, nil, false, err
	}
	if v == since {
		return v, nil, true, nil
	}
	rows, err := s.query(ctx, nil, qChangesSince, since, v)
	if err != nil {
		return 0, nil, false, fmt.Errorf("sqlite: registry changes: %w", err)
	}
	defer rows.Close()
	var addrs []uint32
	for rows.Next() {
		var a uint32
		if err := rows.Scan(&a); err != nil {
			return 0, nil, false, fmt.Errorf("sqlite: registry changes: %w", err)
		}
		addrs = append(addrs, a)
	}
	if err := rows.Err(); err != nil {
		return 0, nil, false, fmt.Errorf("sqlite: registry changes: %w", err)
	}
	var from int64
	if err := s.queryRow(ctx, nil, qLogFrom).Scan(&from); err != nil {
		return 0, nil, false, fmt.Errorf("sqlite: registry changes: %w", err)
	}
	if since < from || since > v {
		return v, nil, false, nil
	}
	return v, addrs, true, nil
}

func (s *DB) insertAliases(ctx context.Context, tx *sql.Tx, addr uint32, aliases []string) error {
	for _, a := range aliases {
		if _, err := s.exec(ctx, tx, qInsertAlias, a, addr); err != nil {
			if isConstraint(err) {
				return fmt.Errorf("%w: alias %s", store.ErrExists, a)
			}
			return fmt.Errorf("sqlite: alias: %w", err)
		}
	}
	return nil
}

// AddDevice adds a registry entry.
func (s *DB) AddDevice(ctx context.Context, d *store.Device) error {
	if err := d.Validate(); err != nil {
		return err
	}
	now := time.Now()
	return s.tx(ctx, func(tx *sql.Tx) error {
		_, err := s.exec(ctx, tx, qAddDevice,
			d.Address, d.PasswordHash, ipText(d.IP), d.Port, d.Version, string(d.Mode),
			ctlOps(d.Control), ctlLen(d.Control), ctlPrio(d.Control), ms(now), ms(now), pskValue(d.PSK), d.RequireDTLS)
		if err != nil {
			if isConstraint(err) {
				return fmt.Errorf("%w: device %d", store.ErrExists, d.Address)
			}
			return fmt.Errorf("sqlite: add device: %w", err)
		}
		if err := s.insertAliases(ctx, tx, d.Address, store.NormalizeAliases(d.Aliases)); err != nil {
			return err
		}
		return s.bumpRegistry(ctx, tx, d.Address)
	})
}

// UpdateDevice replaces a device's registry fields.
func (s *DB) UpdateDevice(ctx context.Context, d *store.Device) error {
	if err := d.Validate(); err != nil {
		return err
	}
	return s.tx(ctx, func(tx *sql.Tx) error {
		r, err := s.exec(ctx, tx, qUpdateDevice, d.PasswordHash, ipText(d.IP), d.Port, d.Version, string(d.Mode), ms(time.Now()),
			pskValue(d.PSK), d.RequireDTLS, d.Address)
		if err != nil {
			return fmt.Errorf("sqlite: update device: %w", err)
		}
		if n, _ := r.RowsAffected(); n == 0 {
			return fmt.Errorf("%w: device %d", store.ErrNotFound, d.Address)
		}
		if _, err := s.exec(ctx, tx, qDeleteAliases, d.Address); err != nil {
			return fmt.Errorf("sqlite: update device: %w", err)
		}
		if err := s.insertAliases(ctx, tx, d.Address, store.NormalizeAliases(d.Aliases)); err != nil {
			return err
		}
		return s.bumpRegistry(ctx, tx, d.Address)
	})
}

// ImportDevices writes a batch of devices in one transaction, each in a
// savepoint of its own.
func (s *DB) ImportDevices(ctx context.Context, devs []*store.Device, update bool) ([]store.ImportResult, error) {
	out := make([]store.ImportResult, len(devs))
	err := s.tx(ctx, func(tx *sql.Tx) error {
		now := ms(time.Now())
		for i, d := range devs {
			out[i] = store.ImportResult{}
			if err := d.Validate(); err != nil {
				out[i].Err = err
				continue
			}
			err := s.savepoint(tx, func(tx *sql.Tx) error {
				updated, err := s.importDevice(ctx, tx, d, update, now)
				out[i].Updated = updated
				return err
			})
			if errors.Is(err, store.ErrExists) {
				out[i] = store.ImportResult{Err: err}
				continue
			}
			if err != nil {
				return err
			}
		}
		addrs := make([]uint32, len(devs))
		for i, d := range devs {
			addrs[i] = d.Address
		}
		return s.bumpRegistry(ctx, tx, addrs...)
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// importDevice adds d, or replaces it (update) if it exists.
func (s *DB) importDevice(ctx context.Context, tx *sql.Tx, d *store.Device, update bool, now int64) (bool, error) {
	_, err := s.exec(ctx, tx, qAddDevice,
		d.Address, d.PasswordHash, ipText(d.IP), d.Port, d.Version, string(d.Mode),
		ctlOps(d.Control), ctlLen(d.Control), ctlPrio(d.Control), now, now, pskValue(d.PSK), d.RequireDTLS)
	updated := err != nil && isConstraint(err)
	switch {
	case err != nil && !updated:
		return false, fmt.Errorf("sqlite: import device: %w", err)
	case updated && !update:
		return false, fmt.Errorf("%w: device %d", store.ErrExists, d.Address)
	case updated:
		if _, err := s.exec(ctx, tx, qUpdateDevice, d.PasswordHash, ipText(d.IP), d.Port, d.Version, string(d.Mode),
			now, pskValue(d.PSK), d.RequireDTLS, d.Address); err != nil {
			return false, fmt.Errorf("sqlite: import device: %w", err)
		}
		if _, err := s.exec(ctx, tx, qDeleteAliases, d.Address); err != nil {
			return false, fmt.Errorf("sqlite: import device: %w", err)
		}
	}
	return updated, s.insertAliases(ctx, tx, d.Address, store.NormalizeAliases(d.Aliases))
}

// RemoveDevice deletes a device and its aliases.
func (s *DB) RemoveDevice(ctx context.Context, addr uint32) error {
	return s.tx(ctx, func(tx *sql.Tx) error {
		if _, err := s.exec(ctx, tx, qDeleteAliases, addr); err != nil {
			return fmt.Errorf("sqlite: remove device: %w", err)
		}
		r, err := s.exec(ctx, tx, qDeleteDevice, addr)
		if err != nil {
			return fmt.Errorf("sqlite: remove device: %w", err)
		}
		if n, _ := r.RowsAffected(); n == 0 {
			return fmt.Errorf("%w: device %d", store.ErrNotFound, addr)
		}
		return s.bumpRegistry(ctx, tx, addr)
	})
}

const (
	deviceCols = `address, password_hash, ip, port, version, mode, ctl_operations, ctl_max_length,
	ctl_lowest_priority, created, updated, contact_addr, contact_via, contact_at, contact_polled,
	psk, require_dtls`
	qDevice        = `SELECT ` + deviceCols + ` FROM devices WHERE address = ?`
	qDeviceAliases = `SELECT alias FROM aliases WHERE device = ? ORDER BY alias`
	qDevices       = `SELECT ` + deviceCols + ` FROM devices ORDER BY address`
	qAliases       = `SELECT alias, device FROM aliases ORDER BY alias`
)

// pskValue stores no key as NULL.
func pskValue(k []byte) any {
	if len(k) == 0 {
		return nil
	}
	return k
}

func scanDevice(sc interface{ Scan(...any) error }) (*store.Device, error) {
	var d store.Device
	var ip, mode string
	var ops, maxLen, prio sql.NullInt64
	var created, updated, contactAt int64
	var contactAddr string
	var polled bool
	if err := sc.Scan(&d.Address, &d.PasswordHash, &ip, &d.Port, &d.Version, &mode, &ops, &maxLen, &prio,
		&created, &updated, &contactAddr, &d.Contact.Via, &contactAt, &polled,
		&d.PSK, &d.RequireDTLS); err != nil {
		return nil, err
	}
	if len(d.PSK) == 0 {
		d.PSK = nil
	}
	var err error
	if d.IP, err = store.ParseIP(ip); err != nil {
		return nil, fmt.Errorf("sqlite: device %d: %w", d.Address, err)
	}
	if d.Contact, err = store.ParseContact(contactAddr, d.Contact.Via, fromMS(contactAt), polled); err != nil {
		return nil, fmt.Errorf("sqlite: device %d: %w", d.Address, err)
	}
	d.Mode = store.Mode(mode)
	if ops.Valid {
		v := uint64(ops.Int64)
		d.Control.Operations = &v
	}
	if maxLen.Valid {
		v := uint32(maxLen.Int64)
		d.Control.MaxContentLength = &v
	}
	if prio.Valid {
		v := uint8(prio.Int64)
		d.Control.LowestPriority = &v
	}
	d.Created, d.Updated = fromMS(created), fromMS(updated)
	return &d, nil
}

// Device returns one registry entry.
func (s *DB) Device(ctx context.Context, addr uint32) (*store.Device, error) {
	d, err := scanDevice(s.queryRow(ctx, nil, qDevice, addr))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("%w: device %d", store.ErrNotFound, addr)
	}
	if err != nil {
		return nil, fmt.Errorf("sqlite: device: %w", err)
	}
	rows, err := s.query(ctx, nil, qDeviceAliases, addr)
	if err != nil {
		return nil, fmt.Errorf("sqlite: aliases: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var a string
		if err := rows.Scan(&a); err != nil {
			return nil, fmt.Errorf("sqlite: aliases: %w", err)
		}
		d.Aliases = append(d.Aliases, a)
	}
	return d, rows.Err()
}

// Devices lists the registry in address order.
func (s *DB) Devices(ctx context.Context) ([]*store.Device, error) {
	// One read transaction, so that devices and aliases are one snapshot.
	tx, err := s.sql.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return nil, fmt.Errorf("sqlite: devices: %w", err)
	}
	defer tx.Rollback()
	rows, err := s.query(ctx, tx, qDevices)
	if err != nil {
		return nil, fmt.Errorf("sqlite: devices: %w", err)
	}
	var out []*store.Device
	byAddr := map[uint32]*store.Device{}
	for rows.Next() {
		d, err := scanDevice(rows)
		if err != nil {
			rows.Close()
			return nil, fmt.Errorf("sqlite: devices: %w", err)
		}
		out = append(out, d)
		byAddr[d.Address] = d
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("sqlite: devices: %w", err)
	}
	rows.Close()
	arows, err := s.query(ctx, tx, qAliases)
	if err != nil {
		return nil, fmt.Errorf("sqlite: aliases: %w", err)
	}
	defer arows.Close()
	for arows.Next() {
		var a string
		var dev uint32
		if err := arows.Scan(&a, &dev); err != nil {
			return nil, fmt.Errorf("sqlite: aliases: %w", err)
		}
		if d := byAddr[dev]; d != nil {
			d.Aliases = append(d.Aliases, a)
		}
	}
	return out, arows.Err()
}

func ctlOps(c store.DeliveryControl) any {
	if c.Operations == nil {
		return nil
	}
	return int64(*c.Operations) // bit pattern; SQL integers are signed
}

func ctlLen(c store.DeliveryControl) any {
	if c.MaxContentLength == nil {
		return nil
	}
	return int64(*c.MaxContentLength)
}

func ctlPrio(c store.DeliveryControl) any {
	if c.LowestPriority == nil {
		return nil
	}
	return int64(*c.LowestPriority)
}

// ipText is a registered IP address as stored: "" for none.
func ipText(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

const (
	qContact    = `SELECT contact_addr, contact_via, contact_at, contact_polled FROM devices WHERE address = ?`
	qSetContact = `UPDATE devices SET contact_addr = ?, contact_via = ?, contact_at = ?, contact_polled = ? WHERE address = ?`
)

// SetContact records where a device was heard from, unless a newer
// contact is stored.
func (s *DB) SetContact(ctx context.Context, addr uint32, c store.Contact) (prev store.Contact, written bool, err error) {
	if !c.Addr.IsValid() {
		return prev, false, fmt.Errorf("%w: contact address %v", store.ErrInvalid, c.Addr)
	}
	err = s.tx(ctx, func(tx *sql.Tx) error {
		written = false
		var oldAddr, oldVia string
		var oldAt int64
		var oldPolled bool
		err := s.queryRow(ctx, tx, qContact, addr).Scan(&oldAddr, &oldVia, &oldAt, &oldPolled)
		if errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("%w: device %d", store.ErrNotFound, addr)
		}
		if err != nil {
			return fmt.Errorf("sqlite: contact: %w", err)
		}
		if prev, err = store.ParseContact(oldAddr, oldVia, fromMS(oldAt), oldPolled); err != nil {
			prev = store.Contact{} // a bad stored value is replaced
		}
		if ms(c.At) < oldAt {
			return nil
		}
		if _, err := s.exec(ctx, tx, qSetContact, c.Addr.String(), c.Via, ms(c.At), c.Polled, addr); err != nil {
			return fmt.Errorf("sqlite: contact: %w", err)
		}
		written = true
		return nil
	})
	return prev, written, err
}

const qTouchContact = `UPDATE devices SET contact_at = ? WHERE address = ? AND contact_addr = ? AND contact_via = ?
	AND contact_at < ?`

// TouchContact moves a contact's time forward if the contact is still c.
func (s *DB) TouchContact(ctx context.Context, addr uint32, c store.Contact, at time.Time) (bool, error) {
	var n int64
	err := s.tx(ctx, func(tx *sql.Tx) error {
		r, err := s.exec(ctx, tx, qTouchContact, ms(at), addr, c.Addr.String(), c.Via, ms(at))
		if err != nil {
			return fmt.Errorf("sqlite: contact: %w", err)
		}
		n, _ = r.RowsAffected()
		return nil
	})
	return n > 0, err
}

// DeviceContact returns where a device was last heard from.
func (s *DB) DeviceContact(ctx context.Context, addr uint32) (store.Contact, error) {
	var a, via string
	var at int64
	var polled bool
	err := s.queryRow(ctx, nil, qContact, addr).Scan(&a, &via, &at, &polled)
	if errors.Is(err, sql.ErrNoRows) {
		return store.Contact{}, fmt.Errorf("%w: device %d", store.ErrNotFound, addr)
	}
	if err != nil {
		return store.Contact{}, fmt.Errorf("sqlite: contact: %w", err)
	}
	c, err := store.ParseContact(a, via, fromMS(at), polled)
	if err != nil {
		return store.Contact{}, fmt.Errorf("sqlite: device %d: %w", addr, err)
	}
	return c, nil
}

const (
	qSetControl = `UPDATE devices SET ctl_operations = ?, ctl_max_length = ?, ctl_lowest_priority = ?
		WHERE address = ?`
	qRegistryVersion = `SELECT value FROM meta WHERE key = 'registry_version'`
	qInstanceNext    = `SELECT next_instance FROM devices WHERE address = ?`
	qInstanceSet     = `UPDATE devices SET next_instance = ? WHERE address = ?`
	qCounter         = `SELECT (SELECT value FROM meta WHERE key = 'msg_day'), (SELECT value FROM meta WHERE key = 'msg_number')`
	qCounterSet      = `UPDATE meta SET value = CASE key WHEN 'msg_day' THEN ?1 ELSE ?2 END
		WHERE key IN ('msg_day', 'msg_number')`
)

// SetDeliveryControl replaces a device's delivery-control limits and, like
// every registry edit, changes RegistryVersion.
func (s *DB) SetDeliveryControl(ctx context.Context, addr uint32, c store.DeliveryControl) error {
	return s.tx(ctx, func(tx *sql.Tx) error {
		r, err := s.exec(ctx, tx, qSetControl, ctlOps(c), ctlLen(c), ctlPrio(c), addr)
		if err != nil {
			return fmt.Errorf("sqlite: delivery control: %w", err)
		}
		if n, _ := r.RowsAffected(); n == 0 {
			return fmt.Errorf("%w: device %d", store.ErrNotFound, addr)
		}
		return s.bumpRegistry(ctx, tx, addr)
	})
}

// RegistryVersion changes with every registry edit.
func (s *DB) RegistryVersion(ctx context.Context) (int64, error) {
	var v int64
	err := s.queryRow(ctx, nil, qRegistryVersion).Scan(&v)
	if err != nil {
		return 0, fmt.Errorf("sqlite: registry version: %w", err)
	}
	return v, nil
}

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

// ---- submissions ----

const (
	submissionCols = `id, device, instance_id, content_hash, content_type, content, received, local_time,
	local_number, state, verify`
	qDedupe = `SELECT ` + submissionCols + ` FROM submissions
		WHERE device = ? AND instance_id = ? AND content_hash = ? AND received >= ? ORDER BY id LIMIT 1`
	qAddSubmission = `INSERT INTO submissions (device, instance_id, content_hash, content_type,
		content, received, local_time, local_number, state, verify, updated)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, '', ?) RETURNING id`
	qResolveSubmission  = `UPDATE submissions SET state = ?, verify = ?, updated = ? WHERE id = ? AND state = ?`
	qSubmissionExists   = `SELECT 1 FROM submissions WHERE id = ?`
	qPendingSubmissions = `SELECT ` + submissionCols + ` FROM submissions WHERE state = ? AND received < ?
		ORDER BY received, id`
)

func scanSubmission(sc interface{ Scan(...any) error }) (*store.Submission, error) {
	var sub store.Submission
	var received int64
	var state string
	if err := sc.Scan(&sub.ID, &sub.Device, &sub.InstanceID, &sub.ContentHash, &sub.ContentType, &sub.Content,
		&received, &sub.LocalTime, &sub.Number, &state, &sub.Verify); err != nil {
		return nil, err
	}
	sub.Received, sub.State = fromMS(received), store.SubmissionState(state)
	return &sub, nil
}

// AddSubmission commits a submission, or finds its earlier copy.
func (s *DB) AddSubmission(ctx context.Context, sub *store.Submission, dedupeSince time.Time) (*store.Submission, bool, error) {
	if sub.Received.IsZero() {
		return nil, false, fmt.Errorf("%w: submission without receipt time", store.ErrInvalid)
	}
	var rec *store.Submission
	dup := false
	err := s.tx(ctx, func(tx *sql.Tx) error {
		r, err := scanSubmission(s.queryRow(ctx, tx, qDedupe,
			sub.Device, sub.InstanceID, sub.ContentHash, ms(dedupeSince)))
		if err == nil {
			rec, dup = r, true
			return nil
		}
		if !errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("sqlite: dedupe: %w", err)
		}
		n, err := s.nextNumber(ctx, tx, sub.Received)
		if err != nil {
			return err
		}
		c := *sub
		c.LocalTime, c.Number, c.State, c.Verify = uint32(sub.Received.Unix()), n, store.SubmissionPending, ""
		err = s.queryRow(ctx, tx, qAddSubmission,
			c.Device, c.InstanceID, nonNil(c.ContentHash), c.ContentType, nonNil(c.Content), ms(c.Received), c.LocalTime, c.Number,
			string(c.State), ms(time.Now())).Scan(&c.ID)
		if err != nil {
			return fmt.Errorf("sqlite: add submission: %w", err)
		}
		rec = &c
		return nil
	})
	if err != nil {
		return nil, false, err
	}
	return rec, dup, nil
}

func (s *DB) resolveSubmission(ctx context.Context, id int64, to store.SubmissionState, verify string, w store.Work) (bool, error) {
	done := false
	err := s.tx(ctx, func(tx *sql.Tx) error {
		now := time.Now()
		r, err := s.exec(ctx, tx, qResolveSubmission,
			string(to), verify, ms(now), id, string(store.SubmissionPending))
		if err != nil {
			return fmt.Errorf("sqlite: submission %d: %w", id, err)
		}
		if n, _ := r.RowsAffected(); n == 0 {
			var one int
			if err := s.queryRow(ctx, tx, qSubmissionExists, id).Scan(&one); errors.Is(err, sql.ErrNoRows) {
				return fmt.Errorf("%w: submission %d", store.ErrNotFound, id)
			}
			return nil
		}
		done = true
		return s.insertWork(ctx, tx, w, now)
	})
	return done, err
}

// ReleaseSubmission releases a pending submission and queues its work.
func (s *DB) ReleaseSubmission(ctx context.Context, id int64, verify string, w store.Work) (bool, error) {
	return s.resolveSubmission(ctx, id, store.SubmissionReleased, verify, w)
}

// DropSubmission drops a pending submission.
func (s *DB) DropSubmission(ctx context.Context, id int64, verify string) (bool, error) {
	return s.resolveSubmission(ctx, id, store.SubmissionDropped, verify, store.Work{})
}

// PendingSubmissions lists pending submissions received before 'before'.
func (s *DB) PendingSubmissions(ctx context.Context, before time.Time) ([]*store.Submission, error) {
	rows, err := s.query(ctx, nil, qPendingSubmissions, string(store.SubmissionPending), ms(before))
	if err != nil {
		return nil, fmt.Errorf("sqlite: pending submissions: %w", err)
	}
	defer rows.Close()
	var out []*store.Submission
	for rows.Next() {
		sub, err := scanSubmission(rows)
		if err != nil {
			return nil, fmt.Errorf("sqlite: pending submissions: %w", err)
		}
		out = append(out, sub)
	}
	return out, rows.Err()
}

// ---- queues ----

func validWork(w store.Work) error {
	for _, d := range w.Deliveries {
		if d.Device == 0 || d.Expires.IsZero() || d.MessageID == "" {
			return fmt.Errorf("%w: delivery needs a device, a message id and an expiry", store.ErrInvalid)
		}
	}
	for _, r := range w.Relays {
		if r.Expires.IsZero() || len(r.Recipients) == 0 {
			return fmt.Errorf("%w: relay needs recipients and an expiry", store.ErrInvalid)
		}
	}
	return nil
}

const (
	qInsertDelivery = `INSERT INTO deliveries (device, message_id, submission_time, content_type, content,
		priority, state, attempts, next_attempt, expires, created, updated, last_error,
		report_device, report_mail, report_flags, report_recipient, report_message_id, report_headers, report_dsn)
		VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, '', ?, ?, ?, ?, ?, ?, ?)`
	qInsertRelayMessage = `INSERT INTO relay_messages (envelope_from, data, created) VALUES (?, ?, ?) RETURNING id`
	qInsertRelay        = `INSERT INTO relays (message, rcpt, state, attempts, next_attempt, expires, created,
		updated, last_error, report_device, report_mail, report_flags, report_recipient, report_message_id,
		report_headers, report_dsn) VALUES (?, ?, ?, 0, ?, ?, ?, ?, '', ?, ?, ?, ?, ?, ?, ?)`
)

func (s *DB) insertWork(ctx context.Context, tx *sql.Tx, w store.Work, now time.Time) error {
	if err := validWork(w); err != nil {
		return err
	}
	for _, d := range w.Deliveries {
		var st any
		if d.SubmissionTime != nil {
			st = int64(*d.SubmissionTime)
		}
		_, err := s.exec(ctx, tx, qInsertDelivery,
			d.Device, d.MessageID, st, d.ContentType, nonNil(d.Content), d.Priority, string(store.DeliveryQueued),
			ms(d.NextAttempt), ms(d.Expires), ms(now), ms(now),
			d.Report.Device, d.Report.Mail, d.Report.Flags, d.Report.Recipient, d.Report.MessageID, d.Report.Headers,
			d.Report.DSN)
		if err != nil {
			return fmt.Errorf("sqlite: queue delivery: %w", err)
		}
	}
	for _, r := range w.Relays {
		var ref int64
		err := s.queryRow(ctx, tx, qInsertRelayMessage,
			r.From, nonNil(r.Message), ms(now)).Scan(&ref)
		if err != nil {
			return fmt.Errorf("sqlite: queue relay: %w", err)
		}
		for _, rc := range r.Recipients {
			_, err := s.exec(ctx, tx, qInsertRelay,
				ref, rc.Addr, string(store.RelayQueued), ms(r.NextAttempt), ms(r.Expires), ms(now), ms(now),
				rc.Report.Device, rc.Report.Mail, rc.Report.Flags, rc.Report.Recipient, rc.Report.MessageID, rc.Report.Headers,
				rc.Report.DSN)
			if err != nil {
				return fmt.Errorf("sqlite: queue relay: %w", err)
			}
		}
	}
	return nil
}

// Enqueue writes w atomically.
func (s *DB) Enqueue(ctx context.Context, w store.Work) error {
	if w.Empty() {
		return nil
	}
	if err := validWork(w); err != nil {
		return err
	}
	return s.tx(ctx, func(tx *sql.Tx) error { return s.insertWork(ctx, tx, w, time.Now()) })
}

const (
	qWakeWaiting = `SELECT COUNT(*) FROM (SELECT 1 FROM deliveries
		WHERE device = ? AND state = ? AND next_attempt > ? LIMIT 1) AS w`
	qWake = `UPDATE deliveries SET next_attempt = ?, updated = ?
		WHERE device = ? AND state = ? AND next_attempt > ?`
	qQueuedDevices = `SELECT device, MIN(next_attempt) FROM deliveries WHERE state = 'queued'
		GROUP BY device ORDER BY device`
	// The index on (state, updated), named: without statistics the
	// planner may prefer the (state, device) order of the GROUP BY and
	// read the whole queue.
	qChangedDevices = `SELECT device, MIN(next_attempt) FROM deliveries INDEXED BY deliveries_changed
		WHERE state = 'queued' AND updated >= ? GROUP BY device ORDER BY device`
	qDeviceNextDue = `SELECT MIN(next_attempt) FROM deliveries WHERE state = 'queued' AND device = ?`
	qNextDue       = `SELECT MIN(t) FROM (
		SELECT MIN(next_attempt) AS t FROM deliveries WHERE state = 'queued' AND next_attempt > ?1
		UNION ALL SELECT MIN(expires) FROM deliveries WHERE state = 'queued' AND expires > ?1
		UNION ALL SELECT MIN(next_attempt) FROM relays WHERE state = 'queued' AND next_attempt > ?1
		UNION ALL SELECT MIN(expires) FROM relays WHERE state = 'queued' AND expires > ?1) AS due`
)

// WakeDevice makes a device's queued deliveries due now.
func (s *DB) WakeDevice(ctx context.Context, addr uint32, now time.Time) (int, error) {
	// Every INVOKE wakes its device; usually nothing waits. Look first
	// without the write lock, which submissions need.
	var waiting int
	err := s.queryRow(ctx, nil, qWakeWaiting,
		addr, string(store.DeliveryQueued), ms(now)).Scan(&waiting)
	if err != nil {
		return 0, fmt.Errorf("sqlite: wake device: %w", err)
	}
	if waiting == 0 {
		return 0, nil
	}
	var n int64
	err = s.tx(ctx, func(tx *sql.Tx) error {
		r, err := s.exec(ctx, tx, qWake,
			ms(now), ms(now), addr, string(store.DeliveryQueued), ms(now))
		if err != nil {
			return fmt.Errorf("sqlite: wake device: %w", err)
		}
		n, _ = r.RowsAffected()
		return nil
	})
	return int(n), err
}

// QueuedDevices lists devices with queued deliveries changed since
// 'since' (all with the zero time) and their earliest next attempt.
func (s *DB) QueuedDevices(ctx context.Context, since time.Time) ([]store.DeviceDue, error) {
	var rows *sql.Rows
	var err error
	if since.IsZero() {
		rows, err = s.query(ctx, nil, qQueuedDevices)
	} else {
		rows, err = s.query(ctx, nil, qChangedDevices, ms(since))
	}
	if err != nil {
		return nil, fmt.Errorf("sqlite: queued devices: %w", err)
	}
	defer rows.Close()
	var out []store.DeviceDue
	for rows.Next() {
		var d store.DeviceDue
		var next int64
		if err := rows.Scan(&d.Device, &next); err != nil {
			return nil, fmt.Errorf("sqlite: queued devices: %w", err)
		}
		d.Next = fromMS(next)
		out = append(out, d)
	}
	return out, rows.Err()
}

// DeviceNextDue returns the earliest next attempt of a device's queued
// deliveries.
func (s *DB) DeviceNextDue(ctx context.Context, addr uint32) (time.Time, bool, error) {
	var v sql.NullInt64
	if err := s.queryRow(ctx, nil, qDeviceNextDue, addr).Scan(&v); err != nil {
		return time.Time{}, false, fmt.Errorf("sqlite: device next due: %w", err)
	}
	if !v.Valid {
		return time.Time{}, false, nil
	}
	return fromMS(v.Int64), true, nil
}

// NextDue returns the earliest next attempt or expiry after 'after' of
// queued deliveries and relays.
func (s *DB) NextDue(ctx context.Context, after time.Time) (time.Time, bool, error) {
	var v sql.NullInt64
	err := s.queryRow(ctx, nil, qNextDue, ms(after)).Scan(&v)
	if err != nil {
		return time.Time{}, false, fmt.Errorf("sqlite: next due: %w", err)
	}
	if !v.Valid {
		return time.Time{}, false, nil
	}
	return fromMS(v.Int64), true, nil
}

const (
	deliveryCols = `id, device, message_id, submission_time, content_type, content, priority, state, attempts,
	next_attempt, expires, created, updated, last_error, report_device, report_mail, report_flags,
	report_recipient, report_message_id, report_headers, report_dsn`
	qInFlight = `SELECT COUNT(*) FROM deliveries WHERE device = ? AND state = ?`
	// A limit left NULL does not restrict.
	qClaimable = `SELECT ` + deliveryCols + ` FROM deliveries WHERE device = ?1 AND state = ?2 AND next_attempt <= ?3
		AND (?4 IS NULL OR length(content) <= ?4) AND (?5 IS NULL OR priority >= ?5) ORDER BY id LIMIT 1`
	// qPeek is qClaimable, with the device's next instance id, unless the
	// device has a delivery in flight (?6).
	qPeek = `SELECT ` + deliveryCols + `, (SELECT next_instance FROM devices WHERE address = ?1) FROM deliveries
		WHERE device = ?1 AND state = ?2 AND next_attempt <= ?3
		AND (?4 IS NULL OR length(content) <= ?4) AND (?5 IS NULL OR priority >= ?5)
		AND NOT EXISTS (SELECT 1 FROM deliveries AS f WHERE f.device = ?1 AND f.state = ?6) ORDER BY id LIMIT 1`
	qClaim          = `UPDATE deliveries SET state = ?, attempts = attempts + 1, updated = ? WHERE id = ?`
	qDeliveryState  = `SELECT device, message_id, state FROM deliveries WHERE id = ?`
	qFinishDelivery = `UPDATE deliveries SET state = ?, next_attempt = ?, last_error = ?,
		attempts = MAX(attempts - ? + ?, 0), updated = ? WHERE id = ?`
	qRecordStatus = `INSERT INTO delivery_status (device, message_id, status, updated) VALUES (?, ?, ?, ?)
		ON CONFLICT (device, message_id) DO UPDATE SET status = excluded.status, updated = excluded.updated`
	qExpiredDeliveries = `SELECT ` + deliveryCols + ` FROM deliveries WHERE state = ? AND expires <= ?
		ORDER BY id LIMIT ?`
	qQueuedDeliveries = `SELECT content_type, length(content), priority FROM deliveries
		WHERE device = ? AND state = ? ORDER BY id`
	qDeliveryStatus = `SELECT status FROM delivery_status WHERE device = ? AND message_id = ?`
)

// scanDelivery scans the deliveryCols of a row, then extra columns into
// extra.
func scanDelivery(sc interface{ Scan(...any) error }, extra ...any) (*store.Delivery, error) {
	var d store.Delivery
	var st sql.NullInt64
	var state string
	var next, exp, created, updated int64
	if err := sc.Scan(append([]any{&d.ID, &d.Device, &d.MessageID, &st, &d.ContentType, &d.Content, &d.Priority, &state,
		&d.Attempts, &next, &exp, &created, &updated, &d.LastError, &d.Report.Device, &d.Report.Mail,
		&d.Report.Flags, &d.Report.Recipient, &d.Report.MessageID, &d.Report.Headers, &d.Report.DSN}, extra...)...); err != nil {
		return nil, err
	}
	if st.Valid {
		v := uint32(st.Int64)
		d.SubmissionTime = &v
	}
	d.State = store.DeliveryState(state)
	d.NextAttempt, d.Expires, d.Created, d.Updated = fromMS(next), fromMS(exp), fromMS(created), fromMS(updated)
	return &d, nil
}

// PeekDelivery returns the delivery ClaimDelivery would take, unclaimed.
// A read, one query when there is one: it waits for no write.
func (s *DB) PeekDelivery(ctx context.Context, addr uint32, now time.Time, lim store.Limits) (*store.Delivery, error) {
	var maxLen, lowest any // NULL: no limit
	if lim.MaxContentLength != nil {
		maxLen = int64(*lim.MaxContentLength)
	}
	if lim.LowestPriority != nil {
		lowest = int64(*lim.LowestPriority)
	}
	var next sql.NullInt64
	d, err := scanDelivery(s.queryRow(ctx, nil, qPeek, addr, string(store.DeliveryQueued), ms(now), maxLen, lowest,
		string(store.DeliveryInFlight)), &next)
	if errors.Is(err, sql.ErrNoRows) {
		var busy int
		if err := s.queryRow(ctx, nil, qInFlight, addr, string(store.DeliveryInFlight)).Scan(&busy); err != nil {
			return nil, fmt.Errorf("sqlite: peek: %w", err)
		}
		if busy > 0 {
			return nil, fmt.Errorf("%w: device %d", store.ErrBusy, addr)
		}
		return nil, fmt.Errorf("%w: no due delivery for device %d", store.ErrNotFound, addr)
	}
	if err != nil {
		return nil, fmt.Errorf("sqlite: peek: %w", err)
	}
	if lim.InstanceIDs != nil {
		switch n := lim.InstanceIDs(d); {
		case n < 0 || n > 256:
			return nil, fmt.Errorf("%w: %d instance ids", store.ErrInvalid, n)
		case n > 0 && !next.Valid:
			return nil, fmt.Errorf("%w: device %d", store.ErrNotFound, addr)
		case n > 0:
			d.InstanceBase = uint8(next.Int64)
		}
	}
	return d, nil
}

// ClaimDelivery takes a device's oldest due delivery within lim.
func (s *DB) ClaimDelivery(ctx context.Context, addr uint32, now time.Time, lim store.Limits) (*store.Delivery, error) {
	var out *store.Delivery
	err := s.tx(ctx, func(tx *sql.Tx) error {
		var busy int
		err := s.queryRow(ctx, tx, qInFlight, addr, string(store.DeliveryInFlight)).Scan(&busy)
		if err != nil {
			return fmt.Errorf("sqlite: claim: %w", err)
		}
		if busy > 0 {
			return fmt.Errorf("%w: device %d", store.ErrBusy, addr)
		}
		var maxLen, lowest any // NULL: no limit
		if lim.MaxContentLength != nil {
			maxLen = int64(*lim.MaxContentLength)
		}
		if lim.LowestPriority != nil {
			lowest = int64(*lim.LowestPriority)
		}
		d, err := scanDelivery(s.queryRow(ctx, tx, qClaimable, addr, string(store.DeliveryQueued), ms(now), maxLen, lowest))
		if errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("%w: no due delivery for device %d", store.ErrNotFound, addr)
		}
		if err != nil {
			return fmt.Errorf("sqlite: claim: %w", err)
		}
		if _, err := s.exec(ctx, tx, qClaim, string(store.DeliveryInFlight), ms(now), d.ID); err != nil {
			return fmt.Errorf("sqlite: claim: %w", err)
		}
		if lim.InstanceIDs != nil {
			switch n := lim.InstanceIDs(d); {
			case n < 0 || n > 256:
				return fmt.Errorf("%w: %d instance ids", store.ErrInvalid, n)
			case n > 0:
				if d.InstanceBase, err = s.reserveIDs(ctx, tx, addr, n); err != nil {
					return err
				}
			}
		}
		d.State, d.Attempts, d.Updated = store.DeliveryInFlight, d.Attempts+1, now
		out = d
		return nil
	})
	return out, err
}

// FinishDelivery applies r to a delivery in state from.
func (s *DB) FinishDelivery(ctx context.Context, id int64, from store.DeliveryState, r store.DeliveryResult) error {
	switch r.State {
	case store.DeliveryQueued, store.DeliveryDelivered, store.DeliveryFailed:
	default:
		return fmt.Errorf("%w: delivery result state %q", store.ErrInvalid, r.State)
	}
	return s.tx(ctx, func(tx *sql.Tx) error {
		now := time.Now()
		var dev uint32
		var msgID, state string
		err := s.queryRow(ctx, tx, qDeliveryState, id).Scan(&dev, &msgID, &state)
		if errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("%w: delivery %d", store.ErrNotFound, id)
		}
		if err != nil {
			return fmt.Errorf("sqlite: finish delivery: %w", err)
		}
		if store.DeliveryState(state) != from {
			return fmt.Errorf("%w: delivery %d is %s, not %s", store.ErrConflict, id, state, from)
		}
		undo, attempted := 0, 0
		if r.State == store.DeliveryQueued && r.Requeue {
			undo = 1
		}
		if r.Attempted && from == store.DeliveryQueued {
			if r.InstanceIDs < 0 || r.InstanceIDs > 256 {
				return fmt.Errorf("%w: %d instance ids", store.ErrInvalid, r.InstanceIDs)
			}
			attempted = 1
		}
		next := r.NextAttempt
		if r.State != store.DeliveryQueued {
			next = time.Time{}
		}
		_, err = s.exec(ctx, tx, qFinishDelivery,
			string(r.State), ms(next), r.Error, undo, attempted, ms(now), id)
		if err != nil {
			return fmt.Errorf("sqlite: finish delivery: %w", err)
		}
		if attempted > 0 && r.InstanceIDs > 0 {
			if _, err := s.reserveIDs(ctx, tx, dev, r.InstanceIDs); err != nil && !errors.Is(err, store.ErrNotFound) {
				return err // (a device removed meanwhile has no counter left)
			}
		}
		if r.Status != 0 {
			_, err = s.exec(ctx, tx, qRecordStatus, dev, msgID, r.Status, ms(now))
			if err != nil {
				return fmt.Errorf("sqlite: delivery status: %w", err)
			}
		}
		return s.insertWork(ctx, tx, r.Work, now)
	})
}

// ExpiredDeliveries lists queued deliveries past their expiry.
func (s *DB) ExpiredDeliveries(ctx context.Context, now time.Time, limit int) ([]*store.Delivery, error) {
	rows, err := s.query(ctx, nil, qExpiredDeliveries, string(store.DeliveryQueued), ms(now), limit)
	if err != nil {
		return nil, fmt.Errorf("sqlite: expired deliveries: %w", err)
	}
	defer rows.Close()
	var out []*store.Delivery
	for rows.Next() {
		d, err := scanDelivery(rows)
		if err != nil {
			return nil, fmt.Errorf("sqlite: expired deliveries: %w", err)
		}
		out = append(out, d)
	}
	return out, rows.Err()
}

// QueuedDeliveries summarises a device's queued deliveries.
func (s *DB) QueuedDeliveries(ctx context.Context, addr uint32) ([]store.DeliveryInfo, error) {
	rows, err := s.query(ctx, nil, qQueuedDeliveries, addr, string(store.DeliveryQueued))
	if err != nil {
		return nil, fmt.Errorf("sqlite: queued deliveries: %w", err)
	}
	defer rows.Close()
	var out []store.DeliveryInfo
	for rows.Next() {
		var i store.DeliveryInfo
		if err := rows.Scan(&i.ContentType, &i.Length, &i.Priority); err != nil {
			return nil, fmt.Errorf("sqlite: queued deliveries: %w", err)
		}
		out = append(out, i)
	}
	return out, rows.Err()
}

// DeliveryStatus returns the recorded status of a delivered message id.
func (s *DB) DeliveryStatus(ctx context.Context, addr uint32, messageID string) (uint8, error) {
	var st uint8
	err := s.queryRow(ctx, nil, qDeliveryStatus, addr, messageID).Scan(&st)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, fmt.Errorf("%w: status of %s", store.ErrNotFound, messageID)
	}
	if err != nil {
		return 0, fmt.Errorf("sqlite: delivery status: %w", err)
	}
	return st, nil
}

// ---- relays ----

const (
	relayCols = `r.id, r.message, r.rcpt, r.state, r.attempts, r.expires, r.last_error, r.report_device,
	r.report_mail, r.report_flags, r.report_recipient, r.report_message_id, r.report_headers, r.report_dsn,
	m.envelope_from, m.data`
	qDueRelays = `SELECT ` + relayCols + ` FROM relays r JOIN relay_messages m ON m.id = r.message
		WHERE r.state = ? AND r.next_attempt <= ? AND r.expires > ? ORDER BY r.message, r.id LIMIT ?`
	qClaimRelay  = `UPDATE relays SET state = ?, attempts = attempts + 1, updated = ? WHERE id = ?`
	qFinishRelay = `UPDATE relays SET state = ?, next_attempt = ?, last_error = ?,
		attempts = MAX(attempts - ?, 0), updated = ? WHERE id = ? AND state = ?`
	qExpiredRelays = `SELECT ` + relayCols + ` FROM relays r JOIN relay_messages m ON m.id = r.message
		WHERE r.state = ? AND r.expires <= ? ORDER BY r.message, r.id LIMIT ?`
)

// relayBatches reads relay rows (joined with their message) into batches.
func relayBatches(rows *sql.Rows) ([]*store.RelayBatch, error) {
	defer rows.Close()
	var out []*store.RelayBatch
	byRef := map[int64]*store.RelayBatch{}
	for rows.Next() {
		var rc store.RelayRecipient
		var ref, exp int64
		var state, from string
		var data []byte
		if err := rows.Scan(&rc.ID, &ref, &rc.Addr, &state, &rc.Attempts, &exp, &rc.LastError, &rc.Report.Device,
			&rc.Report.Mail, &rc.Report.Flags, &rc.Report.Recipient, &rc.Report.MessageID, &rc.Report.Headers,
			&rc.Report.DSN, &from, &data); err != nil {
			return nil, err
		}
		rc.State, rc.Expires = store.RelayState(state), fromMS(exp)
		b := byRef[ref]
		if b == nil {
			b = &store.RelayBatch{MessageRef: ref, From: from, Message: data}
			byRef[ref] = b
			out = append(out, b)
		}
		b.Recipients = append(b.Recipients, rc)
	}
	return out, rows.Err()
}

// ClaimRelays moves due relay recipients to sending.
func (s *DB) ClaimRelays(ctx context.Context, now time.Time, limit int) ([]*store.RelayBatch, error) {
	var out []*store.RelayBatch
	err := s.tx(ctx, func(tx *sql.Tx) error {
		rows, err := s.query(ctx, tx, qDueRelays,
			string(store.RelayQueued), ms(now), ms(now), limit)
		if err != nil {
			return fmt.Errorf("sqlite: claim relays: %w", err)
		}
		if out, err = relayBatches(rows); err != nil {
			return fmt.Errorf("sqlite: claim relays: %w", err)
		}
		for _, b := range out {
			for i := range b.Recipients {
				rc := &b.Recipients[i]
				if _, err := s.exec(ctx, tx, qClaimRelay, string(store.RelaySending), ms(now), rc.ID); err != nil {
					return fmt.Errorf("sqlite: claim relays: %w", err)
				}
				rc.State, rc.Attempts = store.RelaySending, rc.Attempts+1
			}
		}
		return nil
	})
	return out, err
}

// FinishRelays applies rs and queues w atomically.
func (s *DB) FinishRelays(ctx context.Context, rs []store.RelayResult, w store.Work) error {
	for _, r := range rs {
		switch r.State {
		case store.RelayQueued, store.RelaySent, store.RelayFailed:
		default:
			return fmt.Errorf("%w: relay result state %q", store.ErrInvalid, r.State)
		}
	}
	return s.tx(ctx, func(tx *sql.Tx) error {
		now := time.Now()
		for _, r := range rs {
			undo := 0
			if r.State == store.RelayQueued && r.Requeue {
				undo = 1
			}
			next := r.NextAttempt
			if r.State != store.RelayQueued {
				next = time.Time{}
			}
			res, err := s.exec(ctx, tx, qFinishRelay,
				string(r.State), ms(next), r.Error, undo, ms(now), r.ID, string(r.From))
			if err != nil {
				return fmt.Errorf("sqlite: finish relay: %w", err)
			}
			if n, _ := res.RowsAffected(); n == 0 {
				return fmt.Errorf("%w: relay %d is not %s", store.ErrConflict, r.ID, r.From)
			}
		}
		return s.insertWork(ctx, tx, w, now)
	})
}

// ExpiredRelays lists queued relay recipients past their expiry.
func (s *DB) ExpiredRelays(ctx context.Context, now time.Time, limit int) ([]*store.RelayBatch, error) {
	rows, err := s.query(ctx, nil, qExpiredRelays, string(store.RelayQueued), ms(now), limit)
	if err != nil {
		return nil, fmt.Errorf("sqlite: expired relays: %w", err)
	}
	out, err := relayBatches(rows)
	if err != nil {
		return nil, fmt.Errorf("sqlite: expired relays: %w", err)
	}
	return out, nil
}

// ---- maintenance ----

// Recover re-queues in-flight work of a stopped process.
func (s *DB) Recover(ctx context.Context) (store.Recovered, error) {
	var rec store.Recovered
	err := s.tx(ctx, func(tx *sql.Tx) error {
		now := ms(time.Now())
		r, err := tx.ExecContext(ctx, `UPDATE deliveries SET state = ?, updated = ? WHERE state = ?`,
			string(store.DeliveryQueued), now, string(store.DeliveryInFlight))
		if err != nil {
			return fmt.Errorf("sqlite: recover: %w", err)
		}
		n, _ := r.RowsAffected()
		rec.Deliveries = int(n)
		r, err = tx.ExecContext(ctx, `UPDATE relays SET state = ?, updated = ? WHERE state = ?`,
			string(store.RelayQueued), now, string(store.RelaySending))
		if err != nil {
			return fmt.Errorf("sqlite: recover: %w", err)
		}
		n, _ = r.RowsAffected()
		rec.Relays = int(n)
		return nil
	})
	return rec, err
}

// Purge deletes finished rows.
func (s *DB) Purge(ctx context.Context, before, statusBefore time.Time) (int, error) {
	total := 0
	err := s.tx(ctx, func(tx *sql.Tx) error {
		total = 0
		for _, q := range []struct {
			sql  string
			args []any
		}{
			{`DELETE FROM deliveries WHERE state IN ('delivered', 'failed') AND updated < ?`, []any{ms(before)}},
			{`DELETE FROM relays WHERE state IN ('sent', 'failed') AND updated < ?`, []any{ms(before)}},
			{`DELETE FROM relay_messages WHERE NOT EXISTS (SELECT 1 FROM relays WHERE relays.message = relay_messages.id)`, nil},
			{`DELETE FROM submissions WHERE state IN ('released', 'dropped') AND updated < ?`, []any{ms(before)}},
			{`DELETE FROM delivery_status WHERE updated < ?`, []any{ms(statusBefore)}},
		} {
			r, err := tx.ExecContext(ctx, q.sql, q.args...)
			if err != nil {
				return fmt.Errorf("sqlite: purge: %w", err)
			}
			n, _ := r.RowsAffected()
			total += int(n)
		}
		return nil
	})
	return total, err
}

// Stats counts rows by state.
func (s *DB) Stats(ctx context.Context) (store.Stats, error) {
	st := store.Stats{Deliveries: map[store.DeliveryState]int{}, Relays: map[store.RelayState]int{}}
	tx, err := s.sql.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return st, fmt.Errorf("sqlite: stats: %w", err)
	}
	defer tx.Rollback()
	if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM devices`).Scan(&st.Devices); err != nil {
		return st, fmt.Errorf("sqlite: stats: %w", err)
	}
	if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM submissions WHERE state = 'pending'`).Scan(&st.SubmissionsPending); err != nil {
		return st, fmt.Errorf("sqlite: stats: %w", err)
	}
	for _, q := range []struct {
		sql string
		put func(string, int)
	}{
		{`SELECT state, COUNT(*) FROM deliveries GROUP BY state`, func(k string, n int) { st.Deliveries[store.DeliveryState(k)] = n }},
		{`SELECT state, COUNT(*) FROM relays GROUP BY state`, func(k string, n int) { st.Relays[store.RelayState(k)] = n }},
	} {
		rows, err := tx.QueryContext(ctx, q.sql)
		if err != nil {
			return st, fmt.Errorf("sqlite: stats: %w", err)
		}
		for rows.Next() {
			var k string
			var n int
			if err := rows.Scan(&k, &n); err != nil {
				rows.Close()
				return st, fmt.Errorf("sqlite: stats: %w", err)
			}
			q.put(k, n)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return st, fmt.Errorf("sqlite: stats: %w", err)
		}
	}
	return st, nil
}
