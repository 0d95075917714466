package server

import (
	"context"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/sqlite"
)

// peekCounter is a SQLite store counting the reads of first attempts.
type peekCounter struct {
	*sqlite.DB
	mu      sync.Mutex
	alone   int // PeekDelivery calls
	batches []int
}

func (p *peekCounter) PeekDelivery(ctx context.Context, addr uint32, now time.Time, lim store.Limits) (*store.Delivery, error) {
	p.mu.Lock()
	p.alone++
	p.mu.Unlock()
	return p.DB.PeekDelivery(ctx, addr, now, lim)
}

func (p *peekCounter) PeekDeliveries(ctx context.Context, addrs []uint32, now time.Time) (map[uint32]store.Peeked, error) {
	p.mu.Lock()
	p.batches = append(p.batches, len(addrs))
	p.mu.Unlock()
	return p.DB.PeekDeliveries(ctx, addrs, now)
}

// A fleet of devices not heard from, most of them switched off, costs the
// store a read per firstBatchSize first attempts, not two reads each; the
// devices that answer get all their mail, each message once, and the
// silent ones' attempts are counted by their outcomes.
func TestFirstAttemptsBatched(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		db, err := sqlite.Open(context.Background(), filepath.Join(t.TempDir(), sqlite.FileName), nil)
		must(t, err)
		defer db.Close()
		st := &peekCounter{DB: db}
		f := startSimFleetWith(t, nil, Options{Store: st})
		defer f.close()
		const n, per = 2*firstBatchSize + 10, 2
		var devs []emsd.Address
		live := map[emsd.Address]int{}
		for i := range n {
			a := emsd.Address(197000 + i)
			devs = append(devs, a)
			f.register(a)
			if i%10 == 0 {
				f.switchOn(a)
				live[a] = 0
			}
		}
		f.queue(devs, per)
		for range len(live) * per {
			select {
			case d := <-f.got:
				live[d.dev]++
			case <-time.After(time.Minute):
				t.Fatalf("the live devices got %v", live)
			}
		}
		time.Sleep(esro.ShippedTimers().NoResponse() + time.Second)
		synctest.Wait()
		for a, got := range live {
			if got != per {
				t.Errorf("device %s got %d messages, want %d", a, got, per)
			}
		}
		st.mu.Lock()
		alone, batches := st.alone, append([]int(nil), st.batches...)
		st.mu.Unlock()
		if alone != 0 {
			t.Errorf("%d first attempts read alone, want none", alone)
		}
		slices.Sort(batches) // the reads run concurrently
		if want := []int{10, firstBatchSize, firstBatchSize}; !slices.Equal(batches, want) {
			t.Errorf("batch reads of %v devices, want %v", batches, want)
		}
		for _, a := range devs {
			if _, ok := live[a]; ok {
				continue
			}
			if got := f.attempts(a); got != 1 {
				t.Fatalf("silent device %s: %d attempts counted, want 1", a, got)
			}
		}
	})
}
