package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/internal/pgtest"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/postgres"
	"github.com/esro-emsdp/emsdp/store/sqlite"
)

// registryWriters and registryBatch are `emsdp device import`'s defaults
// (--writers, --batch): batches of devices, each one transaction, written
// by that many writers at once.
const (
	registryWriters = 4
	registryBatch   = 500
)

// runRegistry measures a large registry: writing it as `emsdp device
// import` does, and a server starting and serving with it.
func runRegistry(ctx context.Context, o *benchOptions) (*report, error) {
	sizes := []int{10000, 100000}
	if o.quick {
		sizes = []int{1000, 10000}
	}
	big := sizes[len(sizes)-1]
	var writes []Result
	r, err := registryWriteSQLite(ctx, big)
	if err != nil {
		return nil, err
	}
	writes = append(writes, r)
	if r, err := registryWritePostgres(ctx, big); err != nil {
		o.log.Warn("registry: PostgreSQL row skipped", "err", err)
	} else {
		writes = append(writes, r)
	}
	var starts []Result
	for _, n := range sizes {
		r, err := registryStart(ctx, o, n)
		if err != nil {
			return nil, err
		}
		starts = append(starts, r)
	}
	return &report{tables: []table{
		{caption: "Writing the registry as `emsdp device import` does (password hashes given, as an export writes them).", results: writes},
		{caption: "A server starting with a large registry (SQLite), then serving submissions.", results: starts},
	}, notes: []string{
		fmt.Sprintf("Writes: batches of %d devices, each one transaction (`ImportDevices`, a savepoint per device), "+
			"%d writers at once, as `emsdp device import` does by default; PostgreSQL is a throwaway local cluster "+
			"(fsync on, Unix socket).", registryBatch, registryWriters),
		"Start: `server.Start` on a store holding the registry (the 8 submitting devices among them), from the call to its return; " +
			"RSS = resident set growth of the process from before the call to after it (after a GC returning freed memory), and per device. " +
			"Submissions/s: 8 devices in a closed loop as in the server section, " +
			"with the timers of that section.",
	}}, nil
}

// fakeDevices makes n registry entries (address 1000000+i, a 10.x address)
// with the hash of one password.
func fakeDevices(n int) ([]*store.Device, error) {
	h, err := bcrypt.GenerateFromPassword([]byte("pw"), bcrypt.MinCost)
	if err != nil {
		return nil, err
	}
	out := make([]*store.Device, n)
	for i := range n {
		out[i] = &store.Device{Address: uint32(1000000 + i), PasswordHash: string(h),
			IP: netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), Port: 641, Version: "1.1",
			Mode: store.ModeComplete}
	}
	return out, nil
}

// writeDevices writes devs as `emsdp device import` does: batches by
// concurrent writers.
func writeDevices(ctx context.Context, db store.Registry, devs []*store.Device) (time.Duration, error) {
	var next atomic.Int64
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	fail := func(err error) {
		mu.Lock()
		first = err
		mu.Unlock()
	}
	start := time.Now()
	for range registryWriters {
		wg.Go(func() {
			for {
				i := int(next.Add(registryBatch) - registryBatch)
				if i >= len(devs) || ctx.Err() != nil {
					return
				}
				res, err := db.ImportDevices(ctx, devs[i:min(i+registryBatch, len(devs))], false)
				if err != nil {
					fail(err)
					return
				}
				for _, r := range res {
					if r.Err != nil {
						fail(r.Err)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	return time.Since(start), first
}

func registryWriteSQLite(ctx context.Context, n int) (Result, error) {
	r := newResult("registry", "device import", "store", "SQLite", "devices", strconv.Itoa(n))
	dir, err := os.MkdirTemp("", "emsdp-registry-")
	if err != nil {
		return r, err
	}
	defer os.RemoveAll(dir)
	db, err := sqlite.OpenDir(ctx, dir, nil)
	if err != nil {
		return r, err
	}
	defer db.Close()
	return importRate(ctx, r, db, n)
}

// importRate writes n devices into db as emsdp device import does and
// records the rate in r.
func importRate(ctx context.Context, r Result, db store.Registry, n int) (Result, error) {
	devs, err := fakeDevices(n)
	if err != nil {
		return r, err
	}
	took, err := writeDevices(ctx, db, devs)
	if err != nil {
		return r, err
	}
	r.set("devices/s", float64(n)/took.Seconds(), "1/s")
	r.set("time", took.Seconds(), "s")
	return r, nil
}

func registryWritePostgres(ctx context.Context, n int) (Result, error) {
	r := newResult("registry", "device import", "store", "PostgreSQL", "devices", strconv.Itoa(n))
	pg, err := pgtest.Start(ctx, pgtest.Options{})
	if err != nil {
		return r, err
	}
	defer pg.Stop()
	name, err := pg.CreateDatabase(ctx)
	if err != nil {
		return r, err
	}
	db, err := postgres.Open(ctx, pg.Conninfo(name))
	if err != nil {
		return r, err
	}
	defer db.Close()
	return importRate(ctx, r, db, n)
}

func registryStart(ctx context.Context, o *benchOptions, n int) (Result, error) {
	r := newResult("registry", "server start", "devices", strconv.Itoa(n))
	specs := make([]deviceSpec, 8)
	for i := range specs {
		specs[i] = deviceSpec{addr: emsd.Address(200000 + i), password: devPassword}
	}
	extra, err := fakeDevices(n - len(specs))
	if err != nil {
		return r, err
	}
	h, err := startEMSD(ctx, specs, harnessOptions{timers: serverTimers, log: o.srvLog, extra: extra})
	if err != nil {
		return r, err
	}
	defer h.Close(ctx)
	r.set("start", h.started.Seconds()*1000, "ms")
	r.set("RSS growth", float64(h.startRSS)/(1<<20), "MiB")
	r.set("RSS per device", float64(h.startRSS)/float64(n), "B")
	msg := submitMessage()
	st := closedLoop(ctx, len(specs), o.duration/4, o.duration, func(ctx context.Context, w int, _ int64) error {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		_, err := h.devs[w].ua.Submit(ctx, msg)
		return err
	})
	if err := ctx.Err(); err != nil {
		return r, err
	}
	r.set("submissions/s", st.rate(), "1/s")
	r.set("failed", float64(st.failed), "")
	return r, nil
}
