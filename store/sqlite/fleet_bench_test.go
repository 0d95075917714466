//go:build unix

package sqlite

import (
	"context"
	"database/sql/driver"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"modernc.org/sqlite"

	"github.com/esro-emsdp/emsdp/store"
)

// BenchmarkFleetPages runs the store's share of the bench's fleet section
// (go run ./bench -sections fleet): 1000 devices with 10 messages each,
// queued in rounds (message 1 for every device, then message 2, ...), and
// the deliveries to the answering devices (every device, every second or
// every tenth) made by 64 workers at once, as the scheduler makes them:
// one device's messages one at a time, the device back in line after each
// (claim with its instance ids, then the outcome with its status). The
// silent devices' first attempts write nothing within that time, so they
// are not made here. It reports the WAL pages written per delivery
// (wal-pages/op: every page a commit changed is one WAL frame), the
// deliveries per second and the process's CPU time per delivery.
//
//	go test ./store/sqlite -run '^$' -bench FleetPages -benchtime 5x
func BenchmarkFleetPages(b *testing.B) {
	noCheckpointHook.Do(func() {
		// Connections of a database whose path says so never checkpoint:
		// the WAL then holds every frame written, and its size counts them.
		sqlite.RegisterConnectionHook(func(c sqlite.ExecQuerierContext, dsn string) error {
			if !strings.Contains(dsn, "nocheckpoint") {
				return nil
			}
			_, err := c.ExecContext(context.Background(), `PRAGMA wal_autocheckpoint = 0`, []driver.NamedValue{})
			return err
		})
	})
	for _, every := range []int{1, 2, 10} {
		b.Run(fmt.Sprintf("live=%d%%", 100/every), func(b *testing.B) {
			var frames, delivered int64
			var cpu time.Duration
			for b.Loop() {
				b.StopTimer()
				dir := b.TempDir()
				path := filepath.Join(dir, "nocheckpoint.db")
				db, err := Open(context.Background(), path, nil)
				if err != nil {
					b.Fatal(err)
				}
				live := fleetSetup(b, db, 1000, 10, every)
				if _, err := db.sql.ExecContext(context.Background(), `PRAGMA wal_checkpoint(TRUNCATE)`); err != nil {
					b.Fatal(err)
				}
				before := walFrames(b, path)
				c0 := cpuTime(b)
				b.StartTimer()
				n := fleetDeliver(b, db, live, 10, 64)
				b.StopTimer()
				cpu += cpuTime(b) - c0
				frames += walFrames(b, path) - before
				delivered += int64(n)
				db.Close()
				b.StartTimer()
			}
			b.ReportMetric(float64(frames)/float64(delivered), "wal-pages/op")
			b.ReportMetric(float64(cpu.Nanoseconds())/float64(delivered), "cpu-ns/op")
			b.ReportMetric(float64(delivered)/b.Elapsed().Seconds(), "deliveries/s")
		})
	}
}

var noCheckpointHook sync.Once

// walFrames is the number of frames in the WAL of the database at path.
func walFrames(b *testing.B, path string) int64 {
	fi, err := os.Stat(path + "-wal")
	if err != nil {
		b.Fatal(err)
	}
	if fi.Size() < 32 {
		return 0
	}
	return (fi.Size() - 32) / (4096 + 24)
}

// fleetSetup registers n devices (1..n) and queues per messages for each
// in rounds; it returns the answering devices, every every-th.
func fleetSetup(b *testing.B, db *DB, n, per, every int) []uint32 {
	ctx := context.Background()
	var live []uint32
	for i := range n {
		if err := db.AddDevice(ctx, testDevice(uint32(i+1))); err != nil {
			b.Fatal(err)
		}
		if i%every == 0 {
			live = append(live, uint32(i+1))
		}
	}
	now := time.Now()
	content := make([]byte, 330) // an IPM with a 200-character body
	for r := range per {
		var w store.Work
		for i := range n {
			w.Deliveries = append(w.Deliveries, store.NewDelivery{Device: uint32(i + 1),
				MessageID: fmt.Sprintf("R:<fleet.%d.%d@example.net>", i+1, r), ContentType: 32, Content: content,
				Priority: 1, NextAttempt: now, Expires: now.Add(time.Hour)})
		}
		if err := db.Enqueue(ctx, w); err != nil {
			b.Fatal(err)
		}
	}
	return live
}

// fleetDeliver delivers the per queued messages of each device of live
// with workers at once; it returns how many it delivered.
func fleetDeliver(b *testing.B, db *DB, live []uint32, per, workers int) int {
	ctx := context.Background()
	line := make(chan uint32, len(live))
	for _, a := range live {
		line <- a
	}
	var mu sync.Mutex
	left := make(map[uint32]int, len(live))
	for _, a := range live {
		left[a] = per
	}
	devices, delivered := len(live), 0
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for a := range line {
				d, err := db.ClaimDelivery(ctx, a, time.Now(), store.Limits{InstanceIDs: func(*store.Delivery) int { return 1 }})
				if err == nil {
					err = db.FinishDelivery(ctx, d.ID, store.DeliveryInFlight, store.DeliveryResult{
						State: store.DeliveryDelivered, Status: 2})
				}
				mu.Lock()
				if err != nil {
					b.Error(err)
					left[a] = 1
				} else {
					delivered++
				}
				if left[a]--; left[a] > 0 {
					line <- a
				} else if devices--; devices == 0 {
					close(line)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return delivered
}
