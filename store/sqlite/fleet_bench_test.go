//go:build unix

package sqlite

import (
	"context"
	"database/sql/driver"
	"encoding/binary"
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
// (wal-pages/op: every page a commit changed is one WAL frame), and of
// them those of each table or index with 0.05 or more (NAME-pages/op),
// the deliveries per second and the process's CPU time per delivery.
//
//	go test ./store/sqlite -run '^$' -bench FleetPages -benchtime 5x
func BenchmarkFleetPages(b *testing.B) {
	noCheckpointHook.Do(registerNoCheckpoint)
	for _, every := range []int{1, 2, 10} {
		b.Run(fmt.Sprintf("live=%d%%", 100/every), func(b *testing.B) {
			var delivered int64
			var cpu time.Duration
			frames := map[string]int{}
			for b.Loop() {
				b.StopTimer()
				path := filepath.Join(b.TempDir(), "nocheckpoint.db")
				db, err := Open(context.Background(), path, nil)
				if err != nil {
					b.Fatal(err)
				}
				live := fleetSetup(b, db, 1000, 10, every)
				if _, err := db.sql.ExecContext(context.Background(), `PRAGMA wal_checkpoint(TRUNCATE)`); err != nil {
					b.Fatal(err)
				}
				c0 := cpuTime(b)
				b.StartTimer()
				n := fleetDeliver(b, db, live, 10, 64)
				b.StopTimer()
				cpu += cpuTime(b) - c0
				delivered += int64(n)
				walFrames(b, db, path, frames)
				db.Close()
				b.StartTimer()
			}
			total := 0
			for name, n := range frames {
				total += n
				if float64(n)/float64(delivered) >= 0.05 {
					b.ReportMetric(float64(n)/float64(delivered), name+"-pages/op")
				}
			}
			b.ReportMetric(float64(total)/float64(delivered), "wal-pages/op")
			b.ReportMetric(float64(cpu.Nanoseconds())/float64(delivered), "cpu-ns/op")
			b.ReportMetric(float64(delivered)/b.Elapsed().Seconds(), "deliveries/s")
		})
	}
}

var noCheckpointHook sync.Once

// registerNoCheckpoint makes the connections of a database whose path
// says so never checkpoint: the WAL then holds every frame written, and
// its size counts them.
func registerNoCheckpoint() {
	sqlite.RegisterConnectionHook(func(c sqlite.ExecQuerierContext, dsn string) error {
		if !strings.Contains(dsn, "nocheckpoint") {
			return nil
		}
		_, err := c.ExecContext(context.Background(), `PRAGMA wal_autocheckpoint = 0`, []driver.NamedValue{})
		return err
	})
}

// walFrames adds the frames in the WAL of db (at path) to frames, by the
// table or index of their page (dbstat).
func walFrames(b testing.TB, db *DB, path string, frames map[string]int) {
	wal, err := os.ReadFile(path + "-wal")
	if err != nil {
		b.Fatal(err)
	}
	names := map[uint32]string{}
	rows, err := db.sql.QueryContext(context.Background(), `SELECT name, pageno FROM dbstat`)
	if err != nil {
		b.Fatal(err)
	}
	for rows.Next() {
		var name string
		var page uint32
		if err := rows.Scan(&name, &page); err != nil {
			b.Fatal(err)
		}
		names[page] = name
	}
	rows.Close()
	// A 32-byte header, then frames of a 24-byte header (the page number
	// first) and the page.
	const pageSize = 4096
	for off := 32; off+24+pageSize <= len(wal); off += 24 + pageSize {
		name := names[binary.BigEndian.Uint32(wal[off:])]
		if name == "" {
			name = "free"
		}
		frames[name]++
	}
}

// fleetSetup registers n devices (1..n) and queues per messages for each
// in rounds; it returns the answering devices, every every-th.
func fleetSetup(b testing.TB, db *DB, n, per, every int) []uint32 {
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
func fleetDeliver(b testing.TB, db *DB, live []uint32, per, workers int) int {
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
