package server

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/sqlite"
	"github.com/esro-emsdp/emsdp/ua"
)

// failingStore refuses the outcome writes (FinishDelivery, FinishRelays)
// while fail is set, as SQLite does on a full or read-only disk.
type failingStore struct {
	store.Store
	fail  atomic.Bool
	tries atomic.Int32
}

var errDiskFull = errors.New("database or disk is full (SQLITE_FULL, injected)")

func (f *failingStore) FinishDelivery(ctx context.Context, id int64, from store.DeliveryState, r store.DeliveryResult) error {
	if f.fail.Load() {
		f.tries.Add(1)
		return fmt.Errorf("sqlite: finish delivery: %w", errDiskFull)
	}
	return f.Store.FinishDelivery(ctx, id, from, r)
}

func (f *failingStore) FinishRelays(ctx context.Context, rs []store.RelayResult, w store.Work) error {
	if f.fail.Load() {
		f.tries.Add(1)
		return fmt.Errorf("sqlite: finish relays: %w", errDiskFull)
	}
	return f.Store.FinishRelays(ctx, rs, w)
}

// The store refuses outcome writes while a delivery and a relay are in
// flight: the device has the message, the smarthost too, and the
// outcomes wait in memory, retried; /healthz and the metrics say so; the
// device's next message waits behind the first. Once the store takes
// writes again, both outcomes are recorded, the next message is
// delivered, and nothing is delivered or relayed twice.
func TestOutcomeWriteFailures(t *testing.T) {
	db, err := sqlite.Open(context.Background(), filepath.Join(t.TempDir(), "own.db"), nil)
	must(t, err)
	t.Cleanup(func() { db.Close() })
	fs := &failingStore{Store: db}
	host := startSmarthost(t, "")
	c := testConfig(t)
	c.Relay.Smarthost = host.addr
	s := startServerWith(t, c, Options{Logger: testLogger(t), Store: fs})
	dev := newDevice(t, s, 198036, deviceOpts{})

	fs.fail.Store(true)
	for _, subj := range []string{"one", "two"} {
		must(t, sendMail(s, "carol@example.com", []string{"198.036@emsd.test"}, inboundMsg("198.036@emsd.test", subj, "b")))
	}
	if d := dev.next(t); d.IPM.Heading.Subject != "one" {
		t.Fatalf("delivered %q first", d.IPM.Heading.Subject)
	}
	_, err = dev.ua.Submit(context.Background(), &ua.Message{To: []string{"bob@example.com"}, Subject: "out", Body: []byte("b\n")})
	must(t, err)
	host.next(t)

	eventually(t, "both outcomes pending", func() bool {
		return s.metrics.counter(t, "emsd_store_outcomes_pending", "") == 2 &&
			s.metrics.counter(t, "emsd_store_write_failures_total", "") >= 2
	})
	base := "http://" + s.Addrs().Admin.String()
	if code, body := get(t, base+"/healthz"); code != 503 ||
		!strings.Contains(body, "store writes: 2 outcomes not recorded yet, retrying (last error: sqlite: finish") {
		t.Errorf("/healthz while outcome writes fail: %d %q", code, body)
	}
	dev.none(t, 300*time.Millisecond) // "two" waits: "one" is still in flight
	st := queueStats(t, s)
	if st.Deliveries[store.DeliveryInFlight] != 1 || st.Relays[store.RelaySending] != 1 {
		t.Errorf("store while outcome writes fail: %+v", st)
	}

	fs.fail.Store(false)
	if d := dev.next(t); d.IPM.Heading.Subject != "two" {
		t.Errorf("delivered %q after the store came back, want two", d.IPM.Heading.Subject)
	}
	eventually(t, "every outcome recorded", func() bool {
		st := queueStats(t, s)
		return st.Deliveries[store.DeliveryDelivered] == 2 && st.Relays[store.RelaySent] == 1 &&
			s.metrics.counter(t, "emsd_store_outcomes_pending", "") == 0
	})
	if code, body := get(t, base+"/healthz"); code != 200 || body != "ok\n" {
		t.Errorf("/healthz after the store came back: %d %q", code, body)
	}
	dev.none(t, 300*time.Millisecond)
	host.none(t, 100*time.Millisecond)
	t.Logf("%d outcome writes refused", fs.tries.Load())
}

// An entry this server has in flight without a worker on it (its claim's
// worker is gone) is re-queued once it is a minute old; one held past the
// deadline counts as stuck in /healthz and the metrics.
func TestInFlightCheck(t *testing.T) {
	s := startServer(t, testConfig(t))
	ctx := context.Background()
	addDevice(t, s, 198040, freeUDP(t), deviceOpts{})
	addDevice(t, s, 198041, freeUDP(t), deviceOpts{})
	now := time.Now()
	var refs []store.QueueRef
	for _, dev := range []uint32{198040, 198041} {
		// Queued behind the scheduler's back (it rescans in 30 s) and
		// claimed at once, as by a worker that then went away.
		must(t, s.st.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{{Device: dev,
			MessageID: encodeMsgID(emsd.RFC822ID(fmt.Sprintf("<%d@example.com>", dev))), Content: []byte{0x30, 0},
			NextAttempt: now, Expires: now.Add(time.Hour)}}}))
		d, err := s.st.ClaimDelivery(ctx, dev, now, store.Limits{})
		must(t, err)
		refs = append(refs, store.QueueRef{Kind: store.QueueDelivery, ID: d.ID})
	}
	s.out.hold(refs[1]) // a worker of this server holds the second
	defer s.out.release(refs[1])
	inFlight := func() int {
		t.Helper()
		l, err := s.st.ListQueue(ctx, store.QueueFilter{States: []string{"inflight"}})
		must(t, err)
		return len(l.Entries)
	}

	must(t, s.checkInFlight(ctx, time.Now()))
	if n := inFlight(); n != 2 {
		t.Fatalf("%d in flight after a check at once, want 2: a fresh claim is left alone", n)
	}
	must(t, s.checkInFlight(ctx, time.Now().Add(reclaimAfter+time.Second)))
	if e, err := s.st.QueueEntry(ctx, refs[0]); err != nil || e.State != "queued" || e.Attempts != 1 {
		t.Errorf("the orphan after the check: %+v %v", e, err)
	}
	if n := inFlight(); n != 1 {
		t.Errorf("%d in flight, want the held one only", n)
	}
	base := "http://" + s.Addrs().Admin.String()
	if code, body := get(t, base+"/healthz"); code != 200 {
		t.Errorf("/healthz before the deadline: %d %q", code, body)
	}

	must(t, s.checkInFlight(ctx, time.Now().Add(stuckAfter+time.Minute)))
	if n := s.metrics.counter(t, "emsd_queue_stuck_entries", ""); n != 1 {
		t.Errorf("emsd_queue_stuck_entries %v, want 1", n)
	}
	if code, body := get(t, base+"/healthz"); code != 503 || !strings.Contains(body, "queue: 1 entries in flight past their deadline") {
		t.Errorf("/healthz with an entry stuck: %d %q", code, body)
	}
}
