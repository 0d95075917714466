package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/esro-emsdp/emsdp/store"
)

// bumpRegistry comes first in every registry transaction: the row lock
// orders registry edits across processes (no lock-order deadlocks with
// the alias inserts) and the new version commits with the change, as do
// the devices it changes, logged under it (RegistryChanges); versions
// beyond the log's reach go.
func bumpRegistry(ctx context.Context, tx pgx.Tx, addrs ...uint32) error {
	var v int64
	if err := tx.QueryRow(ctx, `UPDATE registry_version SET version = version + 1 RETURNING version`).Scan(&v); err != nil {
		return errorf("registry version", err)
	}
	if len(addrs) > 0 {
		a := make([]int64, len(addrs))
		for i, x := range addrs {
			a[i] = int64(x)
		}
		if _, err := tx.Exec(ctx, `INSERT INTO registry_changes (version, address) SELECT $1, unnest($2::bigint[])
			ON CONFLICT DO NOTHING`, v, a); err != nil {
			return errorf("registry change", err)
		}
	}
	if from := v - store.RegistryLogVersions; from > 0 {
		if _, err := tx.Exec(ctx, `DELETE FROM registry_changes WHERE version <= $1`, from); err != nil {
			return errorf("registry change", err)
		}
		if _, err := tx.Exec(ctx, `UPDATE registry_version SET log_from = $1`, from); err != nil {
			return errorf("registry change", err)
		}
	}
	return nil
}

// RegistryChanges lists the devices changed after version since. The
// version first, the log's reach last: a version's rows commit with it,
// and pruning only moves the reach forward, so a reach read after the
// rows covers them.
func (s *DB) RegistryChanges(ctx context.Context, since int64) (int64, []uint32, bool, error) {
	v, err := s.RegistryVersion(ctx)
	if err != nil {
		return 0, nil, false, err
	}
	if v == since {
		return v, nil, true, nil
	}
	rows, err := s.pool.Query(ctx, `SELECT DISTINCT address FROM registry_changes WHERE version > $1 AND version <= $2
		ORDER BY address`, since, v)
	if err != nil {
		return 0, nil, false, errorf("registry changes", err)
	}
	addrs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (uint32, error) {
		var a int64
		err := r.Scan(&a)
		return uint32(a), err
	})
	if err != nil {
		return 0, nil, false, errorf("registry changes", err)
	}
	var from int64
	if err := s.queryRow(ctx, `SELECT log_from FROM registry_version`).Scan(&from); err != nil {
		return 0, nil, false, errorf("registry changes", err)
	}
	if since < from || since > v {
		return v, nil, false, nil
	}
	return v, addrs, true, nil
}

func insertAliases(ctx context.Context, tx pgx.Tx, addr uint32, aliases []string) error {
	if len(aliases) == 0 {
		return nil
	}
	b := make([][]byte, len(aliases))
	for i, a := range aliases {
		b[i] = []byte(a)
	}
	// DO NOTHING instead of an error: a concurrent insert of the same
	// alias is waited for, then counted as taken.
	t, err := tx.Exec(ctx, `INSERT INTO aliases (alias, device) SELECT a, $2 FROM unnest($1::bytea[]) AS a
		ON CONFLICT (alias) DO NOTHING`, b, int64(addr))
	if err != nil {
		return errorf("alias", err)
	}
	if int(t.RowsAffected()) == len(aliases) {
		return nil
	}
	var taken []byte
	err = tx.QueryRow(ctx, `SELECT alias FROM aliases WHERE alias = ANY($1::bytea[]) AND device <> $2 ORDER BY alias LIMIT 1`,
		b, int64(addr)).Scan(&taken)
	if err != nil {
		return fmt.Errorf("%w: alias", store.ErrExists)
	}
	return fmt.Errorf("%w: alias %s", store.ErrExists, taken)
}

// AddDevice adds a registry entry.
func (s *DB) AddDevice(ctx context.Context, d *store.Device) error {
	ops, maxLen, prio := d.Control.Columns()
	if err := d.Validate(); err != nil {
		return err
	}
	now := store.Millis(time.Now())
	aliases := store.NormalizeAliases(d.Aliases)
	return s.tx(ctx, func(tx pgx.Tx) error {
		if err := bumpRegistry(ctx, tx, d.Address); err != nil {
			return err
		}
		t, err := tx.Exec(ctx, `INSERT INTO devices (address, password_hash, ip, port, version, mode,
			ctl_operations, ctl_max_length, ctl_lowest_priority, created, updated, psk, require_dtls)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11, $12) ON CONFLICT (address) DO NOTHING`,
			int64(d.Address), octets(d.PasswordHash), store.FormatIP(d.IP), int32(d.Port), octets(d.Version), string(d.Mode),
			ops, maxLen, prio, now, store.NullBytes(d.PSK), d.RequireDTLS)
		if err != nil {
			return errorf("add device", err)
		}
		if t.RowsAffected() == 0 {
			return fmt.Errorf("%w: device %d", store.ErrExists, d.Address)
		}
		return insertAliases(ctx, tx, d.Address, aliases)
	})
}

// UpdateDevice replaces a device's registry fields.
func (s *DB) UpdateDevice(ctx context.Context, d *store.Device) error {
	if err := d.Validate(); err != nil {
		return err
	}
	aliases := store.NormalizeAliases(d.Aliases)
	return s.tx(ctx, func(tx pgx.Tx) error {
		if err := bumpRegistry(ctx, tx, d.Address); err != nil {
			return err
		}
		t, err := tx.Exec(ctx, `UPDATE devices SET password_hash = $1, ip = $2, port = $3, version = $4, mode = $5,
			updated = $6, psk = $8, require_dtls = $9 WHERE address = $7`,
			octets(d.PasswordHash), store.FormatIP(d.IP), int32(d.Port), octets(d.Version), string(d.Mode), store.Millis(time.Now()),
			int64(d.Address), store.NullBytes(d.PSK), d.RequireDTLS)
		if err != nil {
			return errorf("update device", err)
		}
		if t.RowsAffected() == 0 {
			return fmt.Errorf("%w: device %d", store.ErrNotFound, d.Address)
		}
		if _, err := tx.Exec(ctx, `DELETE FROM aliases WHERE device = $1`, int64(d.Address)); err != nil {
			return errorf("update device", err)
		}
		return insertAliases(ctx, tx, d.Address, aliases)
	})
}

// ImportDevices writes a batch of devices in one transaction, each in a
// savepoint of its own.
func (s *DB) ImportDevices(ctx context.Context, devs []*store.Device, update bool) ([]store.ImportResult, error) {
	out := make([]store.ImportResult, len(devs))
	addrs := make([]uint32, len(devs))
	for i, d := range devs {
		addrs[i] = d.Address
	}
	err := s.tx(ctx, func(tx pgx.Tx) error {
		if err := bumpRegistry(ctx, tx, addrs...); err != nil {
			return err
		}
		now := store.Millis(time.Now())
		for i, d := range devs {
			out[i] = store.ImportResult{}
			if err := d.Validate(); err != nil {
				out[i].Err = err
				continue
			}
			if _, err := tx.Exec(ctx, `SAVEPOINT device`); err != nil {
				return errorf("import", err)
			}
			updated, err := importDevice(ctx, tx, d, update, now)
			if err != nil {
				if !errors.Is(err, store.ErrExists) {
					return err
				}
				if _, rerr := tx.Exec(ctx, `ROLLBACK TO SAVEPOINT device`); rerr != nil {
					return errorf("import", rerr)
				}
				out[i].Err = err
				continue
			}
			if _, err := tx.Exec(ctx, `RELEASE SAVEPOINT device`); err != nil {
				return errorf("import", err)
			}
			out[i].Updated = updated
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// importDevice adds d, or replaces it (update) if it exists.
func importDevice(ctx context.Context, tx pgx.Tx, d *store.Device, update bool, now int64) (bool, error) {
	ops, maxLen, prio := d.Control.Columns()
	t, err := tx.Exec(ctx, `INSERT INTO devices (address, password_hash, ip, port, version, mode,
		ctl_operations, ctl_max_length, ctl_lowest_priority, created, updated, psk, require_dtls)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11, $12) ON CONFLICT (address) DO NOTHING`,
		int64(d.Address), octets(d.PasswordHash), store.FormatIP(d.IP), int32(d.Port), octets(d.Version), string(d.Mode),
		ops, maxLen, prio, now, store.NullBytes(d.PSK), d.RequireDTLS)
	if err != nil {
		return false, errorf("import device", err)
	}
	updated := t.RowsAffected() == 0
	if updated {
		if !update {
			return false, fmt.Errorf("%w: device %d", store.ErrExists, d.Address)
		}
		if _, err := tx.Exec(ctx, `UPDATE devices SET password_hash = $1, ip = $2, port = $3, version = $4, mode = $5,
			updated = $6, psk = $8, require_dtls = $9 WHERE address = $7`, octets(d.PasswordHash), store.FormatIP(d.IP), int32(d.Port),
			octets(d.Version), string(d.Mode), now, int64(d.Address), store.NullBytes(d.PSK), d.RequireDTLS); err != nil {
			return false, errorf("import device", err)
		}
		if _, err := tx.Exec(ctx, `DELETE FROM aliases WHERE device = $1`, int64(d.Address)); err != nil {
			return false, errorf("import device", err)
		}
	}
	return updated, insertAliases(ctx, tx, d.Address, store.NormalizeAliases(d.Aliases))
}

// RemoveDevice deletes a device and its aliases.
func (s *DB) RemoveDevice(ctx context.Context, addr uint32) error {
	return s.tx(ctx, func(tx pgx.Tx) error {
		if err := bumpRegistry(ctx, tx, addr); err != nil {
			return err
		}
		// Aliases go by ON DELETE CASCADE.
		t, err := tx.Exec(ctx, `DELETE FROM devices WHERE address = $1`, int64(addr))
		if err != nil {
			return errorf("remove device", err)
		}
		if t.RowsAffected() == 0 {
			return fmt.Errorf("%w: device %d", store.ErrNotFound, addr)
		}
		return nil
	})
}

// deviceQuery reads devices with their aliases in one statement, hence
// one snapshot.
const deviceQuery = `SELECT d.address, d.password_hash, d.ip, d.port, d.version, d.mode, d.ctl_operations,
	d.ctl_max_length, d.ctl_lowest_priority, d.created, d.updated, d.contact_addr, d.contact_via, d.contact_at, d.contact_polled,
	d.psk, d.require_dtls,
	COALESCE(array_agg(a.alias ORDER BY a.alias) FILTER (WHERE a.alias IS NOT NULL), '{}')
	FROM devices d LEFT JOIN aliases a ON a.device = d.address`

func scanDevice(row pgx.CollectableRow) (*store.Device, error) {
	var d store.Device
	var pw, version []byte
	var ip, mode string
	var ops, maxLen *int64
	var prio *int16
	var created, updated, contactAt int64
	var contactAddr string
	var via []byte
	var polled bool
	var aliases [][]byte
	if err := row.Scan(&d.Address, &pw, &ip, &d.Port, &version, &mode, &ops, &maxLen, &prio,
		&created, &updated, &contactAddr, &via, &contactAt, &polled, &d.PSK, &d.RequireDTLS, &aliases); err != nil {
		return nil, err
	}
	var err error
	if d.IP, err = store.ParseIP(ip); err != nil {
		return nil, fmt.Errorf("device %d: %w", d.Address, err)
	}
	if d.Contact, err = store.ParseContact(contactAddr, string(via), store.FromMillis(contactAt), polled); err != nil {
		return nil, fmt.Errorf("device %d: %w", d.Address, err)
	}
	d.PasswordHash, d.Version, d.Mode = string(pw), string(version), store.Mode(mode)
	d.Control = store.ControlFromColumns(ops, maxLen, prio)
	for _, a := range aliases {
		d.Aliases = append(d.Aliases, string(a))
	}
	d.Created, d.Updated = store.FromMillis(created), store.FromMillis(updated)
	if len(d.PSK) == 0 {
		d.PSK = nil
	}
	return &d, nil
}

// Device returns one registry entry.
func (s *DB) Device(ctx context.Context, addr uint32) (*store.Device, error) {
	rows, err := s.query(ctx, deviceQuery+` WHERE d.address = $1 GROUP BY d.address`, int64(addr))
	if err != nil {
		return nil, errorf("device", err)
	}
	d, err := pgx.CollectExactlyOneRow(rows, scanDevice)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("%w: device %d", store.ErrNotFound, addr)
	}
	if err != nil {
		return nil, errorf("device", err)
	}
	return d, nil
}

// Devices lists the registry in address order.
func (s *DB) Devices(ctx context.Context) ([]*store.Device, error) {
	rows, err := s.query(ctx, deviceQuery+` GROUP BY d.address ORDER BY d.address`)
	if err != nil {
		return nil, errorf("devices", err)
	}
	out, err := pgx.CollectRows(rows, scanDevice)
	if err != nil {
		return nil, errorf("devices", err)
	}
	return out, nil
}

// SetContact records where a device was heard from, unless a newer
// contact is stored. The row lock (FOR UPDATE) orders two servers
// recording contacts of one device at once; the older loses.
func (s *DB) SetContact(ctx context.Context, addr uint32, c store.Contact) (prev store.Contact, written bool, err error) {
	if !c.Addr.IsValid() {
		return prev, false, fmt.Errorf("%w: contact address %v", store.ErrInvalid, c.Addr)
	}
	err = s.tx(ctx, func(tx pgx.Tx) error {
		written = false
		var oldAddr string
		var oldVia []byte
		var oldAt int64
		var oldPolled bool
		err := tx.QueryRow(ctx, `SELECT contact_addr, contact_via, contact_at, contact_polled FROM devices WHERE address = $1 FOR UPDATE`,
			int64(addr)).Scan(&oldAddr, &oldVia, &oldAt, &oldPolled)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("%w: device %d", store.ErrNotFound, addr)
		}
		if err != nil {
			return errorf("contact", err)
		}
		if prev, err = store.ParseContact(oldAddr, string(oldVia), store.FromMillis(oldAt), oldPolled); err != nil {
			prev = store.Contact{} // a bad stored value is replaced
		}
		if store.Millis(c.At) < oldAt {
			return nil
		}
		if _, err := tx.Exec(ctx, `UPDATE devices SET contact_addr = $1, contact_via = $2, contact_at = $3, contact_polled = $4
			WHERE address = $5`, c.Addr.String(), octets(c.Via), store.Millis(c.At), c.Polled, int64(addr)); err != nil {
			return errorf("contact", err)
		}
		written = true
		return nil
	})
	return prev, written, err
}

// TouchContact moves a contact's time forward if the contact is still c.
func (s *DB) TouchContact(ctx context.Context, addr uint32, c store.Contact, at time.Time) (bool, error) {
	var n int64
	err := s.tx(ctx, func(tx pgx.Tx) error {
		t, err := tx.Exec(ctx, `UPDATE devices SET contact_at = $1 WHERE address = $2 AND contact_addr = $3
			AND contact_via = $4 AND contact_at < $1`, store.Millis(at), int64(addr), c.Addr.String(), octets(c.Via))
		if err != nil {
			return errorf("contact", err)
		}
		n = t.RowsAffected()
		return nil
	})
	return n > 0, err
}

// DeviceContact returns where a device was last heard from.
func (s *DB) DeviceContact(ctx context.Context, addr uint32) (store.Contact, error) {
	var a string
	var via []byte
	var at int64
	var polled bool
	err := s.queryRow(ctx, `SELECT contact_addr, contact_via, contact_at, contact_polled FROM devices WHERE address = $1`,
		int64(addr)).Scan(&a, &via, &at, &polled)
	if errors.Is(err, pgx.ErrNoRows) {
		return store.Contact{}, fmt.Errorf("%w: device %d", store.ErrNotFound, addr)
	}
	if err != nil {
		return store.Contact{}, errorf("contact", err)
	}
	c, err := store.ParseContact(a, string(via), store.FromMillis(at), polled)
	if err != nil {
		return store.Contact{}, fmt.Errorf("postgres: device %d: %w", addr, err)
	}
	return c, nil
}

// SetDeliveryControl replaces a device's delivery-control limits. Unlike
// store/sqlite it changes RegistryVersion: with several servers, the one
// that took the delivery-control operation is not the only one delivering
// to the device, and the others learn of the new limits by reloading.
func (s *DB) SetDeliveryControl(ctx context.Context, addr uint32, c store.DeliveryControl) error {
	ops, maxLen, prio := c.Columns()
	return s.tx(ctx, func(tx pgx.Tx) error {
		if err := bumpRegistry(ctx, tx, addr); err != nil {
			return err
		}
		t, err := tx.Exec(ctx, `UPDATE devices SET ctl_operations = $1, ctl_max_length = $2, ctl_lowest_priority = $3
			WHERE address = $4`, ops, maxLen, prio, int64(addr))
		if err != nil {
			return errorf("delivery control", err)
		}
		if t.RowsAffected() == 0 {
			return fmt.Errorf("%w: device %d", store.ErrNotFound, addr)
		}
		return nil
	})
}

// RegistryVersion changes with every registry edit.
func (s *DB) RegistryVersion(ctx context.Context) (int64, error) {
	var v int64
	if err := s.queryRow(ctx, `SELECT version FROM registry_version`).Scan(&v); err != nil {
		return 0, errorf("registry version", err)
	}
	return v, nil
}
