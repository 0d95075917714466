package server

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/sqlite"
)

// BenchmarkRegistryAdd is one device added to the store (emsdp device
// add) and taken up by a running server with a large registry: "changes"
// applies the store's change log (what the server does), "reload" reads
// the whole registry (what it did before the log). Each iteration is one
// add and the server's look at the store after it.
func BenchmarkRegistryAdd(b *testing.B) {
	for _, n := range []int{10000, 100000} {
		db, err := sqlite.Open(context.Background(), filepath.Join(b.TempDir(), "reg.db"), nil)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { db.Close() })
		ctx := context.Background()
		devs := make([]*store.Device, 0, 500)
		for i := range n {
			devs = append(devs, &store.Device{Address: uint32(1000000 + i), PasswordHash: "$2a$10$abcdefghijklmnopqrstuuABCDEFGHIJKLMNOPQRSTUVWXYZ01234",
				IP: netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), Port: 641, Version: "1.1", Mode: store.ModeComplete})
			if len(devs) == cap(devs) || i == n-1 {
				if _, err := db.ImportDevices(ctx, devs, false); err != nil {
					b.Fatal(err)
				}
				devs = devs[:0]
			}
		}
		c := testConfig(b)
		c.Store.RegistryPoll = Duration(time.Hour)
		s := startServerWith(b, c, Options{Logger: testLogger(b), Store: db})
		next := uint32(3000000)
		for _, way := range []string{"changes", "reload"} {
			b.Run(fmt.Sprintf("devices=%d/%s", n, way), func(b *testing.B) {
				for b.Loop() {
					next++
					if err := db.AddDevice(ctx, &store.Device{Address: next, IP: netip.MustParseAddr("127.0.0.1"), Port: uint16(next),
						Version: "1.1", Mode: store.ModeComplete}); err != nil {
						b.Fatal(err)
					}
					if way == "changes" {
						if !s.devs.reloadIfChanged(ctx, "bench") {
							b.Fatal("change not seen")
						}
					} else if err := s.devs.reload(ctx); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
		if s.devs.current().get(3000001) == nil {
			b.Fatal("added device not in the registry")
		}
	}
}
