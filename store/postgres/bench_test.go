package postgres

import (
	"context"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/sqlite"
)

// The benchmarks run the same work on both backends, so that
//
//	go test -run '^$' -bench . ./store/postgres
//
// compares them. Both sync every commit to disk (SQLite synchronous=FULL,
// the test cluster with fsync on). "serial" is one caller; "parallel" is
// 4 callers per CPU, as a busy server has (store/sqlite group-commits
// them, PostgreSQL flushes concurrent commits together).

type backend struct {
	name string
	open func(b *testing.B) store.Store
}

var backends = []backend{
	{"sqlite", func(b *testing.B) store.Store {
		db, err := sqlite.Open(context.Background(), filepath.Join(b.TempDir(), sqlite.FileName), nil)
		if err != nil {
			b.Fatal(err)
		}
		return db
	}},
	{"postgres", func(b *testing.B) store.Store { return openTemp(b) }},
}

// bench runs f serially and in parallel on every backend; f gets a
// distinct worker number and its own op counter.
func bench(b *testing.B, setup func(b *testing.B, s store.Store), f func(b *testing.B, s store.Store, worker, op int)) {
	for _, be := range backends {
		for _, par := range []int{0, 4} {
			mode := "serial"
			if par > 0 {
				mode = "parallel"
			}
			b.Run(be.name+"/"+mode, func(b *testing.B) {
				s := be.open(b)
				defer s.Close()
				if setup != nil {
					setup(b, s)
				}
				b.ReportAllocs()
				if par == 0 {
					op := 0
					for b.Loop() {
						f(b, s, 0, op)
						op++
					}
					return
				}
				var workers atomic.Int64
				b.SetParallelism(par)
				b.ResetTimer()
				b.RunParallel(func(pb *testing.PB) {
					w := int(workers.Add(1))
					for op := 0; pb.Next(); op++ {
						f(b, s, w, op)
					}
				})
			})
		}
	}
}

// BenchmarkAddSubmission: a device's submission committed (counter,
// dedupe look-up, insert): the latency before RESULT.
func BenchmarkAddSubmission(b *testing.B) {
	ctx := context.Background()
	bench(b, nil, func(b *testing.B, s store.Store, w, op int) {
		_, _, err := s.AddSubmission(ctx, &store.Submission{Device: uint32(1 + w), InstanceID: uint8(op),
			ContentHash: fmt.Appendf(nil, "%d/%d", w, op), ContentType: 32, Content: make([]byte, 500),
			Received: time.Now()}, time.Now().Add(-time.Minute))
		if err != nil {
			b.Fatal(err)
		}
	})
}

// BenchmarkDeliveryCycle: queue a delivery, claim it, finish it with a
// status: the store's share of one delivery.
func BenchmarkDeliveryCycle(b *testing.B) {
	ctx := context.Background()
	bench(b, nil, func(b *testing.B, s store.Store, w, op int) {
		dev := uint32(1 + w)
		now := time.Now()
		err := s.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{{Device: dev, MessageID: fmt.Sprint(op),
			ContentType: 32, Content: make([]byte, 500), Priority: 1, NextAttempt: now, Expires: now.Add(time.Hour)}}})
		if err != nil {
			b.Fatal(err)
		}
		d, err := s.ClaimDelivery(ctx, dev, now, store.Limits{})
		if err != nil {
			b.Fatal(err)
		}
		if err := s.FinishDelivery(ctx, d.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered,
			Status: 2}); err != nil {
			b.Fatal(err)
		}
	})
}

// BenchmarkRelayCycle: queue a relay with two recipients, claim due
// recipients (any caller's), finish them.
func BenchmarkRelayCycle(b *testing.B) {
	ctx := context.Background()
	bench(b, nil, func(b *testing.B, s store.Store, w, op int) {
		now := time.Now()
		err := s.Enqueue(ctx, store.Work{Relays: []store.NewRelay{{From: "f@x", Message: make([]byte, 2000),
			NextAttempt: now, Expires: now.Add(time.Hour),
			Recipients: []store.RelayRecipient{{Addr: "a@x"}, {Addr: "b@x"}}}}})
		if err != nil {
			b.Fatal(err)
		}
		bs, err := s.ClaimRelays(ctx, now, 2)
		if err != nil {
			b.Fatal(err)
		}
		var rs []store.RelayResult
		for _, bt := range bs {
			for _, rc := range bt.Recipients {
				rs = append(rs, store.RelayResult{ID: rc.ID, From: store.RelaySending, State: store.RelaySent})
			}
		}
		if err := s.FinishRelays(ctx, rs, store.Work{}); err != nil {
			b.Fatal(err)
		}
	})
}

// BenchmarkNextMessageNumber: the one counter every local message id
// draws from.
func BenchmarkNextMessageNumber(b *testing.B) {
	ctx := context.Background()
	bench(b, nil, func(b *testing.B, s store.Store, _, _ int) {
		if _, err := s.NextMessageNumber(ctx, time.Now()); err != nil {
			b.Fatal(err)
		}
	})
}

// BenchmarkReads: what every INVOKE and scheduler pass reads (the
// device, due devices, next due time).
func BenchmarkReads(b *testing.B) {
	ctx := context.Background()
	setup := func(b *testing.B, s store.Store) {
		for d := range uint32(100) {
			if err := s.AddDevice(ctx, testDevice(d+1)); err != nil {
				b.Fatal(err)
			}
		}
	}
	bench(b, setup, func(b *testing.B, s store.Store, w, op int) {
		if _, err := s.Device(ctx, uint32(1+(w+op)%100)); err != nil {
			b.Fatal(err)
		}
		if _, _, err := s.DeviceNextDue(ctx, uint32(1+(w+op)%100)); err != nil {
			b.Fatal(err)
		}
		if _, _, err := s.NextDue(ctx, time.Now()); err != nil {
			b.Fatal(err)
		}
	})
}
