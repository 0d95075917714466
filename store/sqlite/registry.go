package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/esro-emsdp/emsdp/store"
)

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
	addrs, err := collectRows(rows, func(r *sql.Rows) (a uint32, err error) {
		err = r.Scan(&a)
		return a, err
	})
	if err != nil {
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
	ops, maxLen, prio := d.Control.Columns()
	if err := d.Validate(); err != nil {
		return err
	}
	now := time.Now()
	return s.tx(ctx, func(tx *sql.Tx) error {
		_, err := s.exec(ctx, tx, qAddDevice,
			d.Address, d.PasswordHash, store.FormatIP(d.IP), d.Port, d.Version, string(d.Mode),
			ops, maxLen, prio, store.Millis(now), store.Millis(now), store.NullBytes(d.PSK), d.RequireDTLS)
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
		r, err := s.exec(ctx, tx, qUpdateDevice, d.PasswordHash, store.FormatIP(d.IP), d.Port, d.Version, string(d.Mode), store.Millis(time.Now()),
			store.NullBytes(d.PSK), d.RequireDTLS, d.Address)
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
		now := store.Millis(time.Now())
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
	ops, maxLen, prio := d.Control.Columns()
	_, err := s.exec(ctx, tx, qAddDevice,
		d.Address, d.PasswordHash, store.FormatIP(d.IP), d.Port, d.Version, string(d.Mode),
		ops, maxLen, prio, now, now, store.NullBytes(d.PSK), d.RequireDTLS)
	updated := err != nil && isConstraint(err)
	switch {
	case err != nil && !updated:
		return false, fmt.Errorf("sqlite: import device: %w", err)
	case updated && !update:
		return false, fmt.Errorf("%w: device %d", store.ErrExists, d.Address)
	case updated:
		if _, err := s.exec(ctx, tx, qUpdateDevice, d.PasswordHash, store.FormatIP(d.IP), d.Port, d.Version, string(d.Mode),
			now, store.NullBytes(d.PSK), d.RequireDTLS, d.Address); err != nil {
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

func scanDevice(sc interface{ Scan(...any) error }) (*store.Device, error) {
	var d store.Device
	var ip, mode string
	var ops, maxLen *int64
	var prio *int16
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
	if d.Contact, err = store.ParseContact(contactAddr, d.Contact.Via, store.FromMillis(contactAt), polled); err != nil {
		return nil, fmt.Errorf("sqlite: device %d: %w", d.Address, err)
	}
	d.Mode = store.Mode(mode)
	d.Control = store.ControlFromColumns(ops, maxLen, prio)
	d.Created, d.Updated = store.FromMillis(created), store.FromMillis(updated)
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
		if prev, err = store.ParseContact(oldAddr, oldVia, store.FromMillis(oldAt), oldPolled); err != nil {
			prev = store.Contact{} // a bad stored value is replaced
		}
		if store.Millis(c.At) < oldAt {
			return nil
		}
		if _, err := s.exec(ctx, tx, qSetContact, c.Addr.String(), c.Via, store.Millis(c.At), c.Polled, addr); err != nil {
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
		r, err := s.exec(ctx, tx, qTouchContact, store.Millis(at), addr, c.Addr.String(), c.Via, store.Millis(at))
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
	c, err := store.ParseContact(a, via, store.FromMillis(at), polled)
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
	ops, maxLen, prio := c.Columns()
	return s.tx(ctx, func(tx *sql.Tx) error {
		r, err := s.exec(ctx, tx, qSetControl, ops, maxLen, prio, addr)
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
