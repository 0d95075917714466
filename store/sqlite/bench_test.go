//go:build unix

package sqlite

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/store"
)

// The benchmarks run the store's share of the server's hot paths:
//
//	go test ./store/sqlite -run '^$' -bench . -count 6
//
// Every commit is synchronous (synchronous=FULL). On "disk" (the test's
// temporary directory) the flushes dominate and vary; on "tmpfs"
// (/dev/shm, where a flush costs nothing) what remains is the CPU work of
// the store and SQLite. cpu-ns/op is the user+system CPU time of the whole
// process per operation. "serial" is one caller; "parallel" is 4 callers
// per CPU, which the committer groups into shared transactions.

// cpuTime is the process's user+system CPU time so far.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// bench runs f serially and in parallel on a fresh store prepared by
// setup, on disk and on tmpfs; f gets a distinct worker number (1 when
// serial) and its own op counter.
func bench(b *testing.B, setup func(b *testing.B, db *DB), f func(b *testing.B, db *DB, worker, op int)) {
	for _, where := range []string{"disk", "tmpfs"} {
		for _, par := range []int{0, 4} {
			mode := "serial"
			if par > 0 {
				mode = "parallel"
			}
			b.Run(where+"/"+mode, func(b *testing.B) { benchOne(b, where, par, setup, f) })
		}
	}
}

func benchOne(b *testing.B, where string, par int, setup func(b *testing.B, db *DB), f func(b *testing.B, db *DB, worker, op int)) {
	dir := b.TempDir()
	if where == "tmpfs" {
		var err error
		if dir, err = os.MkdirTemp("/dev/shm", "emsdp-bench-"); err != nil {
			b.Skip("no tmpfs at /dev/shm:", err)
		}
		defer os.RemoveAll(dir)
	}
	db, err := Open(context.Background(), filepath.Join(dir, FileName), nil)
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	if setup != nil {
		setup(b, db)
	}
	b.ReportAllocs()
	b.ResetTimer()
	cpu := cpuTime(b)
	if par == 0 {
		op := 0
		for b.Loop() {
			f(b, db, 1, op)
			op++
		}
	} else {
		var workers atomic.Int64
		b.SetParallelism(par)
		b.RunParallel(func(pb *testing.PB) {
			w := int(workers.Add(1))
			for op := 0; pb.Next(); op++ {
				f(b, db, w, op)
			}
		})
	}
	b.ReportMetric(float64(cpuTime(b)-cpu)/float64(b.N), "cpu-ns/op")
}

// benchDevices registers devices 1..n.
func benchDevices(n int) func(b *testing.B, db *DB) {
	return func(b *testing.B, db *DB) {
		for d := range uint32(n) {
			if err := db.AddDevice(context.Background(), testDevice(d+1)); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// BenchmarkSubmission: what one submission costs the store in the server:
// the INVOKE wakes the device (nothing waits), the submission is committed
// before the RESULT (dedupe look-up, message counter, insert), and on
// confirmation released with a delivery to another device and a relay.
func BenchmarkSubmission(b *testing.B) {
	ctx := context.Background()
	content := make([]byte, 500)
	bench(b, benchDevices(64), func(b *testing.B, db *DB, w, op int) {
		dev := uint32(w)
		now := time.Now()
		if _, err := db.WakeDevice(ctx, dev, now); err != nil {
			b.Fatal(err)
		}
		sub, _, err := db.AddSubmission(ctx, &store.Submission{Device: dev, InstanceID: uint8(op),
			ContentHash: fmt.Appendf(nil, "%d/%d", w, op), ContentType: 32, Content: content, Received: now},
			now.Add(-time.Hour))
		if err != nil {
			b.Fatal(err)
		}
		work := store.Work{
			Deliveries: []store.NewDelivery{{Device: uint32(33 + w%32), MessageID: fmt.Sprint(sub.ID), ContentType: 32,
				Content: content, Priority: 1, NextAttempt: now.Add(time.Hour), Expires: now.Add(2 * time.Hour),
				Report: store.Report{Device: dev, Flags: 0x60, Recipient: "r", MessageID: "m"}}},
			Relays: []store.NewRelay{{From: "198.036@example.net", Message: content, NextAttempt: now.Add(time.Hour),
				Expires: now.Add(2 * time.Hour), Recipients: []store.RelayRecipient{{Addr: "bob@example.com"}}}},
		}
		if ok, err := db.ReleaseSubmission(ctx, sub.ID, "confirmed", work); err != nil || !ok {
			b.Fatal(ok, err)
		}
	})
}

// BenchmarkDelivery: one delivery to a device: queued, claimed, instance
// ids reserved, finished with a status for delivery verify.
func BenchmarkDelivery(b *testing.B) {
	ctx := context.Background()
	content := make([]byte, 500)
	bench(b, benchDevices(64), func(b *testing.B, db *DB, w, op int) {
		dev := uint32(w)
		now := time.Now()
		err := db.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{{Device: dev, MessageID: fmt.Sprint(op),
			ContentType: 32, Content: content, Priority: 1, NextAttempt: now, Expires: now.Add(time.Hour)}}})
		if err != nil {
			b.Fatal(err)
		}
		d, err := db.ClaimDelivery(ctx, dev, now, store.Limits{})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := db.ReserveInstanceIDs(ctx, dev, 1); err != nil {
			b.Fatal(err)
		}
		if err := db.FinishDelivery(ctx, d.ID, store.DeliveryInFlight, store.DeliveryResult{
			State: store.DeliveryDelivered, Status: 2}); err != nil {
			b.Fatal(err)
		}
	})
}

// BenchmarkReads: the reads of every INVOKE and scheduler pass, which take
// no write lock: the device's wake check, the registry version poll, due
// devices, the next due time and a delivery verify look-up.
func BenchmarkReads(b *testing.B) {
	ctx := context.Background()
	bench(b, benchDevices(100), func(b *testing.B, db *DB, w, op int) {
		dev := uint32(1 + (w+op)%100)
		now := time.Now()
		if _, err := db.WakeDevice(ctx, dev, now); err != nil {
			b.Fatal(err)
		}
		if _, err := db.RegistryVersion(ctx); err != nil {
			b.Fatal(err)
		}
		if _, _, err := db.DeviceNextDue(ctx, dev); err != nil {
			b.Fatal(err)
		}
		if _, _, err := db.NextDue(ctx, now); err != nil {
			b.Fatal(err)
		}
		if _, err := db.DeliveryStatus(ctx, dev, "m"); err == nil {
			b.Fatal("status of an unknown message")
		}
	})
}
