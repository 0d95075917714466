package postgres

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/esro-emsdp/emsdp/store"
)

// Two handles on one database are two servers: separate pools, separate
// nodes. These tests check what the package doc promises for them.

func twoNodes(t *testing.T, c config) (a, b *DB, dsn string) {
	t.Helper()
	dsn = cluster.NewDatabase(t)
	var err error
	if a, err = open(context.Background(), dsn, c); err != nil {
		t.Fatal(err)
	}
	if b, err = open(context.Background(), dsn, c); err != nil {
		a.Close()
		t.Fatal(err)
	}
	if a.nodeID() == b.nodeID() {
		t.Fatalf("two handles share node %d", a.nodeID())
	}
	return a, b, dsn
}

// TestTwoNodesDeliveries: workers of two servers claim deliveries for the
// same devices at once; a device never has two in flight, every delivery
// is delivered exactly once, and each device's deliveries go in queueing
// order.
func TestTwoNodesDeliveries(t *testing.T) {
	a, b, _ := twoNodes(t, testConfig)
	defer a.Close()
	defer b.Close()
	ctx := context.Background()
	const devices, perDevice = 8, 8
	var ds []store.NewDelivery
	for i := range perDevice {
		for d := range uint32(devices) {
			ds = append(ds, delivery(d+1, fmt.Sprintf("%d/%d", d+1, i)))
		}
	}
	mustT(t, a.Enqueue(ctx, store.Work{Deliveries: ds}))

	var mu sync.Mutex
	inFlight := map[uint32]int{}
	order := map[uint32][]int{}
	var done atomic.Int64
	var wg sync.WaitGroup
	for w := range 6 {
		s := []*DB{a, b}[w%2]
		wg.Go(func() {
			for done.Load() < devices*perDevice && !t.Failed() {
				for d := range uint32(devices) {
					c, err := s.ClaimDelivery(ctx, d+1, t0, store.Limits{})
					if errors.Is(err, store.ErrBusy) || errors.Is(err, store.ErrNotFound) {
						continue
					}
					if err != nil {
						t.Error(err)
						return
					}
					var dev uint32
					var i int
					fmt.Sscanf(c.MessageID, "%d/%d", &dev, &i)
					// Held from the claim until just before the finish: a
					// second claim can only succeed after the finish.
					mu.Lock()
					inFlight[dev]++
					if inFlight[dev] > 1 {
						t.Errorf("device %d: %d in flight", dev, inFlight[dev])
					}
					order[dev] = append(order[dev], i)
					mu.Unlock()
					runtime.Gosched()
					mu.Lock()
					inFlight[dev]--
					mu.Unlock()
					if err := s.FinishDelivery(ctx, c.ID, store.DeliveryInFlight,
						store.DeliveryResult{State: store.DeliveryDelivered}); err != nil {
						t.Error(err)
						return
					}
					done.Add(1)
				}
			}
		})
	}
	wg.Wait()
	for d := range uint32(devices) {
		if want := []int{0, 1, 2, 3, 4, 5, 6, 7}; !slices.Equal(order[d+1], want) {
			t.Errorf("device %d delivered %v, want %v", d+1, order[d+1], want)
		}
	}
	st, err := b.Stats(ctx)
	mustT(t, err)
	if st.Deliveries[store.DeliveryDelivered] != devices*perDevice {
		t.Errorf("stats %+v", st)
	}
}

// TestTwoNodesRelays: two servers claiming relay batches at once never
// get the same recipient.
func TestTwoNodesRelays(t *testing.T) {
	a, b, _ := twoNodes(t, testConfig)
	defer a.Close()
	defer b.Close()
	ctx := context.Background()
	var rs []store.NewRelay
	for i := range 40 {
		rs = append(rs, store.NewRelay{From: "f@x", Message: []byte{byte(i)}, NextAttempt: t0, Expires: t0.Add(time.Hour),
			Recipients: []store.RelayRecipient{{Addr: fmt.Sprint(i, "a@x")}, {Addr: fmt.Sprint(i, "b@x")}, {Addr: fmt.Sprint(i, "c@x")}}})
	}
	mustT(t, a.Enqueue(ctx, store.Work{Relays: rs}))
	var mu sync.Mutex
	claimed := map[int64]int{}
	var wg sync.WaitGroup
	for w := range 6 {
		s := []*DB{a, b}[w%2]
		wg.Go(func() {
			for !t.Failed() {
				bs, err := s.ClaimRelays(ctx, t0, 4)
				if err != nil {
					t.Error(err)
					return
				}
				if len(bs) == 0 {
					return
				}
				var res []store.RelayResult
				mu.Lock()
				for _, b := range bs {
					for _, rc := range b.Recipients {
						claimed[rc.ID]++
						if claimed[rc.ID] > 1 || rc.Attempts != 1 {
							t.Errorf("recipient %d claimed %d times, attempt %d", rc.ID, claimed[rc.ID], rc.Attempts)
						}
						res = append(res, store.RelayResult{ID: rc.ID, From: store.RelaySending, State: store.RelaySent})
					}
				}
				mu.Unlock()
				if err := s.FinishRelays(ctx, res, store.Work{}); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if len(claimed) != 120 {
		t.Errorf("%d recipients claimed, want 120", len(claimed))
	}
	st, err := b.Stats(ctx)
	mustT(t, err)
	if st.Relays[store.RelaySent] != 120 {
		t.Errorf("stats %+v", st)
	}
}

// TestTwoNodesCounters: message numbers (from NextMessageNumber and
// AddSubmission alike) and instance ids drawn by two servers at once never
// repeat and leave no gaps.
func TestTwoNodesCounters(t *testing.T) {
	a, b, _ := twoNodes(t, testConfig)
	defer a.Close()
	defer b.Close()
	ctx := context.Background()
	mustT(t, a.AddDevice(ctx, testDevice(1)))
	var mu sync.Mutex
	var numbers []uint32
	var ids []int
	sizes := make(chan int, 64)
	for n, total := 1, 0; total < 256; n++ {
		n = min(n, 256-total)
		sizes <- n
		total += n
	}
	close(sizes)
	var wg sync.WaitGroup
	for w := range 6 {
		s := []*DB{a, b}[w%2]
		wg.Go(func() {
			for k := range 30 {
				var n uint32
				var err error
				if k%3 == 0 {
					var sub *store.Submission
					sub, _, err = s.AddSubmission(ctx, &store.Submission{Device: 1, InstanceID: uint8(k),
						ContentHash: fmt.Appendf(nil, "%d/%d", w, k), Received: t0}, t0)
					if err == nil {
						n = sub.Number
					}
				} else {
					n, err = s.NextMessageNumber(ctx, t0)
				}
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				numbers = append(numbers, n)
				mu.Unlock()
				if size, ok := <-sizes; ok {
					first, err := s.ReserveInstanceIDs(ctx, 1, size)
					if err != nil {
						t.Error(err)
						return
					}
					mu.Lock()
					for i := range size {
						ids = append(ids, (int(first)+i)%256)
					}
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	slices.Sort(numbers)
	for i, n := range numbers {
		if n != uint32(i+1) {
			t.Fatalf("message numbers %v: want 1..%d", numbers, len(numbers))
		}
	}
	slices.Sort(ids)
	for i, id := range ids {
		if id != i {
			t.Fatalf("instance ids %v: want 0..255 once each", ids)
		}
	}
	if len(ids) != 256 {
		t.Errorf("%d instance ids", len(ids))
	}
}

// TestTwoNodesDedupe: one re-invocation reaching both servers at once is
// still one submission with one message number.
func TestTwoNodesDedupe(t *testing.T) {
	a, b, _ := twoNodes(t, testConfig)
	defer a.Close()
	defer b.Close()
	ctx := context.Background()
	type res struct {
		sub *store.Submission
		dup bool
	}
	out := make(chan res, 8)
	var wg sync.WaitGroup
	for w := range 8 {
		s := []*DB{a, b}[w%2]
		wg.Go(func() {
			sub, dup, err := s.AddSubmission(ctx, &store.Submission{Device: 198036, InstanceID: 9, ContentHash: []byte("h"),
				ContentType: 32, Content: []byte("ipm"), Received: t0.Add(time.Duration(w) * time.Second)}, t0)
			if err != nil {
				t.Error(err)
				return
			}
			out <- res{sub, dup}
		})
	}
	wg.Wait()
	close(out)
	fresh := 0
	var first *store.Submission
	for r := range out {
		if !r.dup {
			fresh++
		}
		if first == nil {
			first = r.sub
		}
		if r.sub.ID != first.ID || r.sub.Number != first.Number || r.sub.LocalTime != first.LocalTime {
			t.Errorf("submissions %+v and %+v", first, r.sub)
		}
	}
	if fresh != 1 {
		t.Errorf("%d fresh submissions, want 1", fresh)
	}
	var n int
	mustT(t, a.pool.QueryRow(ctx, `SELECT COUNT(*) FROM submissions`).Scan(&n))
	if n != 1 {
		t.Errorf("%d submissions stored, want 1", n)
	}
}

// TestOwnership: a server starting (Recover, PendingSubmissions) leaves
// the work of a live server alone and takes over that of a closed one.
func TestOwnership(t *testing.T) {
	// b's keeper stays idle, so that only its Recover takes a's work.
	a, b, dsn := twoNodes(t, config{version: len(migrations), keepEvery: time.Hour})
	defer b.Close()
	ctx := context.Background()
	mustT(t, a.Enqueue(ctx, store.Work{
		Deliveries: []store.NewDelivery{delivery(1, "m1"), delivery(2, "m2")},
		Relays: []store.NewRelay{{Message: []byte("m"), NextAttempt: t0, Expires: t0.Add(time.Hour),
			Recipients: []store.RelayRecipient{{Addr: "a@x"}}}},
	}))
	sub, _, err := a.AddSubmission(ctx, &store.Submission{Device: 1, ContentHash: []byte("h"), Received: t0}, t0)
	mustT(t, err)
	c1, err := a.ClaimDelivery(ctx, 1, t0, store.Limits{})
	mustT(t, err)
	_, err = a.ClaimDelivery(ctx, 2, t0, store.Limits{})
	mustT(t, err)
	_, err = a.ClaimRelays(ctx, t0, 10)
	mustT(t, err)
	// Several sweeps of a third server pass: live work is never swept up.
	third := openConninfo(t, dsn)
	time.Sleep(10 * testConfig.keepEvery)
	mustT(t, third.Close())

	rec, err := b.Recover(ctx)
	mustT(t, err)
	if rec != (store.Recovered{}) {
		t.Errorf("b recovered live work of a: %+v", rec)
	}
	if p, _ := b.PendingSubmissions(ctx, t0.Add(time.Hour)); len(p) != 0 {
		t.Errorf("b lists a's pending submission: %+v", p)
	}
	if p, _ := a.PendingSubmissions(ctx, t0.Add(time.Hour)); len(p) != 1 || p[0].ID != sub.ID {
		t.Errorf("a's own pending submissions: %+v", p)
	}
	if _, err := b.ClaimDelivery(ctx, 1, t0, store.Limits{}); !errors.Is(err, store.ErrBusy) {
		t.Errorf("b claims a busy device: %v", err)
	}
	// a finishes one delivery itself, then stops with the rest in flight.
	mustT(t, a.FinishDelivery(ctx, c1.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered}))
	mustT(t, a.Close())
	rec, err = b.Recover(ctx)
	mustT(t, err)
	if rec != (store.Recovered{Deliveries: 1, Relays: 1}) {
		t.Errorf("b recovered %+v from the closed a", rec)
	}
	if p, _ := b.PendingSubmissions(ctx, t0.Add(time.Hour)); len(p) != 1 || p[0].ID != sub.ID {
		t.Errorf("b's pending after a closed: %+v", p)
	}
	c, err := b.ClaimDelivery(ctx, 2, t0, store.Limits{})
	mustT(t, err)
	if c.Attempts != 2 {
		t.Errorf("attempts after takeover %d, want 2", c.Attempts)
	}
}

// live reports whether node id holds its lock, as the other nodes see it.
func live(t *testing.T, s *DB, id int32) bool {
	t.Helper()
	var ok bool
	err := s.pool.QueryRow(context.Background(), `SELECT $2::int IN (`+liveNodes+`)`, s.keys.node, id).Scan(&ok)
	mustT(t, err)
	return ok
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestFencing: a server whose database session broke looks gone; once its
// work is taken over, its late outcome for that work is refused, and it
// gets its node back when it reconnects.
func TestFencing(t *testing.T) {
	// Keepers that never run on their own: the test drives them.
	a, b, _ := twoNodes(t, config{version: len(migrations), keepEvery: time.Hour})
	defer a.Close()
	defer b.Close()
	ctx := context.Background()
	mustT(t, b.Enqueue(ctx, store.Work{
		Deliveries: []store.NewDelivery{delivery(1, "m")},
		Relays: []store.NewRelay{{Message: []byte("m"), NextAttempt: t0, Expires: t0.Add(time.Hour),
			Recipients: []store.RelayRecipient{{Addr: "a@x"}}}},
	}))
	ca, err := a.ClaimDelivery(ctx, 1, t0, store.Limits{})
	mustT(t, err)
	ra, err := a.ClaimRelays(ctx, t0, 10)
	mustT(t, err)

	// a's node session ends (network trouble, a restarted pooler...).
	_, err = b.pool.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1`,
		fmt.Sprint("emsdp node ", a.nodeID()))
	mustT(t, err)
	waitFor(t, "a's node lock to go", func() bool { return !live(t, b, a.nodeID()) })
	rec, err := b.Recover(ctx)
	mustT(t, err)
	if rec != (store.Recovered{Deliveries: 1, Relays: 1}) {
		t.Fatalf("recovered %+v", rec)
	}
	cb, err := b.ClaimDelivery(ctx, 1, t0, store.Limits{})
	mustT(t, err)
	rb, err := b.ClaimRelays(ctx, t0, 10)
	mustT(t, err)

	// a's late outcomes do not overwrite b's claims.
	err = a.FinishDelivery(ctx, ca.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryFailed, Status: 3})
	if !errors.Is(err, store.ErrConflict) {
		t.Errorf("stale delivery finish: %v", err)
	}
	err = a.FinishRelays(ctx, []store.RelayResult{{ID: ra[0].Recipients[0].ID, From: store.RelaySending,
		State: store.RelayFailed}}, store.Work{Deliveries: []store.NewDelivery{delivery(9, "ndr")}})
	if !errors.Is(err, store.ErrConflict) {
		t.Errorf("stale relay finish: %v", err)
	}
	mustT(t, b.FinishDelivery(ctx, cb.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered, Status: 2}))
	mustT(t, b.FinishRelays(ctx, []store.RelayResult{{ID: rb[0].Recipients[0].ID, From: store.RelaySending,
		State: store.RelaySent}}, store.Work{}))
	if st, _ := b.DeliveryStatus(ctx, 1, "m"); st != 2 {
		t.Errorf("status %d, want b's 2", st)
	}
	st, err := b.Stats(ctx)
	mustT(t, err)
	if st.Deliveries[store.DeliveryDelivered] != 1 || st.Relays[store.RelaySent] != 1 || st.Deliveries[store.DeliveryQueued] != 0 {
		t.Errorf("stats %+v", st)
	}

	// a's keeper reconnects and holds its node again; a works as before.
	a.node.hold()
	if !live(t, b, a.nodeID()) {
		t.Fatal("a's node lock not re-acquired")
	}
	mustT(t, b.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{delivery(1, "m2")}}))
	c, err := a.ClaimDelivery(ctx, 1, t0, store.Limits{})
	mustT(t, err)
	if rec, _ := b.Recover(ctx); rec != (store.Recovered{}) {
		t.Errorf("b recovered from a live a: %+v", rec)
	}
	mustT(t, a.FinishDelivery(ctx, c.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered}))
}

// helperEnv names the DSN a re-executed test binary works on.
const helperEnv = "EMSDP_POSTGRES_HELPER_DSN"

// helperProcess runs in a child test binary: it claims deliveries for
// devices 1..5 and a relay batch, says so, then adds devices with a
// delivery each and prints every one committed, until killed.
func helperProcess(dsn string) int {
	ctx := context.Background()
	db, err := Open(ctx, dsn)
	if err != nil {
		fmt.Println("open:", err)
		return 1
	}
	for d := range uint32(5) {
		if _, err := db.ClaimDelivery(ctx, d+1, t0, store.Limits{}); err != nil {
			fmt.Println("claim:", err)
			return 1
		}
	}
	if _, err := db.ClaimRelays(ctx, t0, 3); err != nil {
		fmt.Println("claim relays:", err)
		return 1
	}
	fmt.Println("claimed")
	for k := range 100000 {
		addr := uint32(500000 + k)
		if err := db.AddDevice(ctx, testDevice(addr)); err != nil {
			fmt.Println("add:", err)
			return 1
		}
		if err := db.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{delivery(addr, "m")}}); err != nil {
			fmt.Println("enqueue:", err)
			return 1
		}
		fmt.Println("committed", addr)
	}
	return 0
}

// TestServerKilled: another server process is killed (SIGKILL) in the
// middle of its writes, with deliveries and relays in flight. Everything
// it reported committed is there; the survivor did not take its work
// while it lived, and takes it over without a restart once it is gone.
func TestServerKilled(t *testing.T) {
	ctx := context.Background()
	dsn := cluster.NewDatabase(t)
	// Two survivors: whichever sweeps, both are told. They check every
	// 200 ms: a gone node must be seen by both before one sweeps it, as
	// it is with the default 1 s checks and 5 s guard.
	slow := config{version: len(migrations), keepEvery: time.Second}
	b, err := open(ctx, dsn, slow)
	mustT(t, err)
	defer b.Close()
	third, err := open(ctx, dsn, slow)
	mustT(t, err)
	defer third.Close()
	var ds []store.NewDelivery
	for d := range uint32(5) {
		ds = append(ds, delivery(d+1, "m"))
	}
	mustT(t, b.Enqueue(ctx, store.Work{Deliveries: ds, Relays: []store.NewRelay{{Message: []byte("m"), NextAttempt: t0,
		Expires: t0.Add(time.Hour), Recipients: []store.RelayRecipient{{Addr: "a@x"}, {Addr: "b@x"}, {Addr: "c@x"}}}}}))

	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+dsn)
	out, err := cmd.StdoutPipe()
	mustT(t, err)
	mustT(t, cmd.Start())
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
	}()
	sc := bufio.NewScanner(out)
	if !sc.Scan() || sc.Text() != "claimed" {
		t.Fatalf("helper: %q", sc.Text())
	}
	var committed []uint32
	for sc.Scan() {
		var addr uint32
		if _, err := fmt.Sscanf(sc.Text(), "committed %d", &addr); err != nil {
			t.Fatalf("helper: %s", sc.Text())
		}
		committed = append(committed, addr)
		if len(committed) == 20 {
			// While it runs, its work is its own.
			if rec, err := b.Recover(ctx); err != nil || rec != (store.Recovered{}) {
				t.Errorf("recovered %+v %v from a live server", rec, err)
			}
			if _, err := b.ClaimDelivery(ctx, 3, t0, store.Limits{}); !errors.Is(err, store.ErrBusy) {
				t.Errorf("claim of a device busy elsewhere: %v", err)
			}
		}
		if len(committed) == 60 {
			cmd.Process.Kill()
			break
		}
	}
	cmd.Wait()

	for _, addr := range committed {
		if _, err := b.Device(ctx, addr); err != nil {
			t.Fatalf("device %d reported committed: %v", addr, err)
		}
	}
	st, err := b.Stats(ctx)
	mustT(t, err)
	if st.Devices < len(committed) || st.Deliveries[store.DeliveryQueued] < len(committed) {
		t.Errorf("stats %+v after %d committed", st, len(committed))
	}
	// The sweeper re-queues the dead server's work, no Recover needed.
	waitFor(t, "the dead server's work to be re-queued", func() bool {
		st, err := b.Stats(ctx)
		mustT(t, err)
		return st.Deliveries[store.DeliveryInFlight] == 0 && st.Relays[store.RelaySending] == 0
	})
	// And both survivors say so, for their schedulers to take the work
	// over at once.
	for _, h := range []*DB{b, third} {
		select {
		case <-h.Requeued():
		case <-time.After(10 * time.Second):
			t.Errorf("node %d: a dead server's work was re-queued without signalling Requeued", h.NodeID())
		}
	}
	for d := range uint32(5) {
		c, err := b.ClaimDelivery(ctx, d+1, t0, store.Limits{})
		mustT(t, err)
		if c.Attempts != 2 {
			t.Errorf("device %d: attempts %d, want 2", d+1, c.Attempts)
		}
	}
	bs, err := b.ClaimRelays(ctx, t0, 10)
	mustT(t, err)
	if len(bs) != 1 || len(bs[0].Recipients) != 3 {
		t.Errorf("relays after takeover %+v", bs)
	}
}

// TestConnectionsCut: all sessions of a server are cut while it writes
// (pool and node lock alike). No write that returned nil is missing, the
// server keeps working on new connections, and it gets its node back.
func TestConnectionsCut(t *testing.T) {
	ctx := context.Background()
	dsn := cluster.NewDatabase(t)
	a := openConninfo(t, dsn+" application_name=cut")
	defer a.Close()
	b := openConninfo(t, dsn)
	defer b.Close()
	var mu sync.Mutex
	var ok []uint32
	failed := 0
	cut := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 3 {
		wg.Go(func() {
			for k := range 60 {
				if k == 20 && w == 0 {
					close(cut)
				}
				addr := uint32(1000*(w+1) + k)
				err := a.AddDevice(ctx, testDevice(addr))
				if err == nil {
					err = a.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{delivery(addr, "m")}})
				}
				mu.Lock()
				if err == nil {
					ok = append(ok, addr)
				} else {
					failed++
				}
				mu.Unlock()
			}
		})
	}
	<-cut
	var n int
	err := b.pool.QueryRow(ctx, `SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity
		WHERE datname = current_database() AND (application_name = 'cut' OR application_name = $1)`,
		fmt.Sprint("emsdp node ", a.nodeID())).Scan(&n)
	mustT(t, err)
	wg.Wait()
	if n < 2 {
		t.Errorf("cut %d sessions", n)
	}
	t.Logf("%d writes failed at the cut, %d devices written", failed, len(ok))
	for _, addr := range ok {
		if _, err := b.Device(ctx, addr); err != nil {
			t.Fatalf("device %d reported committed: %v", addr, err)
		}
		var c int
		mustT(t, b.pool.QueryRow(ctx, `SELECT COUNT(*) FROM deliveries WHERE device = $1`, int64(addr)).Scan(&c))
		if c != 1 {
			t.Fatalf("device %d has %d deliveries, want 1", addr, c)
		}
	}
	if len(ok) < 150 {
		t.Errorf("only %d of 180 devices written: the pool did not recover", len(ok))
	}
	waitFor(t, "a's node lock to come back", func() bool { return live(t, b, a.nodeID()) })
	// Nothing was half-applied: every device has its delivery or the
	// enqueue failed visibly.
	var orphans int
	mustT(t, b.pool.QueryRow(ctx, `SELECT COUNT(*) FROM devices d WHERE NOT EXISTS
		(SELECT 1 FROM deliveries q WHERE q.device = d.address)`).Scan(&orphans))
	if orphans > failed {
		t.Errorf("%d devices without delivery, %d failures", orphans, failed)
	}
}

// TestClaimVersusExpiry: one server claims a device's deliveries while
// another expires them; every delivery ends exactly one way.
func TestClaimVersusExpiry(t *testing.T) {
	a, b, _ := twoNodes(t, testConfig)
	defer a.Close()
	defer b.Close()
	ctx := context.Background()
	var ds []store.NewDelivery
	for i := range 150 {
		d := delivery(1, fmt.Sprint(i))
		d.Expires = t0
		ds = append(ds, d)
	}
	mustT(t, a.Enqueue(ctx, store.Work{Deliveries: ds}))
	var mu sync.Mutex
	ended := map[string]int{}
	end := func(id string) {
		mu.Lock()
		ended[id]++
		mu.Unlock()
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for !t.Failed() {
			c, err := a.ClaimDelivery(ctx, 1, t0, store.Limits{})
			if errors.Is(err, store.ErrNotFound) {
				return
			}
			if err != nil {
				t.Error(err)
				return
			}
			if err := a.FinishDelivery(ctx, c.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered}); err != nil {
				t.Error(err)
				return
			}
			end(c.MessageID)
		}
	})
	for range 2 {
		wg.Go(func() {
			for !t.Failed() {
				exp, err := b.ExpiredDeliveries(ctx, t0, 5)
				if err != nil {
					t.Error(err)
					return
				}
				if len(exp) == 0 {
					return
				}
				for _, d := range exp {
					err := b.FinishDelivery(ctx, d.ID, store.DeliveryQueued, store.DeliveryResult{State: store.DeliveryFailed})
					if errors.Is(err, store.ErrConflict) {
						continue // claimed or expired by the other worker meanwhile
					}
					if err != nil {
						t.Error(err)
						return
					}
					end(d.MessageID)
				}
			}
		})
	}
	wg.Wait()
	if len(ended) != 150 {
		t.Errorf("%d deliveries ended, want 150", len(ended))
	}
	for id, n := range ended {
		if n != 1 {
			t.Errorf("delivery %s ended %d times", id, n)
		}
	}
}

// TestDatabaseRestart: PostgreSQL crashes and restarts (immediate stop,
// WAL recovery) while two servers write. Writes fail during the outage,
// none that returned nil is lost, both servers carry on with new
// connections and get their nodes back.
func TestDatabaseRestart(t *testing.T) {
	a, b, _ := twoNodes(t, testConfig)
	defer a.Close()
	defer b.Close()
	ctx := context.Background()
	var mu sync.Mutex
	var ok []uint32
	failed := 0
	restarted := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 4 {
		s := []*DB{a, b}[w%2]
		wg.Go(func() {
			for k := 0; ; k++ {
				select {
				case <-restarted:
					if k > 200 {
						return
					}
				default:
					if k > 2000 {
						return
					}
				}
				addr := uint32(10000*(w+1) + k)
				sub, _, err := s.AddSubmission(ctx, &store.Submission{Device: addr, ContentHash: []byte("h"),
					Received: t0}, t0)
				if err == nil {
					_, err = s.ReleaseSubmission(ctx, sub.ID, "confirmed", store.Work{
						Deliveries: []store.NewDelivery{delivery(addr, "m")}})
				}
				var pe *pgconn.PgError
				if errors.As(err, &pe) && pe.Code == "23505" {
					t.Errorf("a message number was issued twice: %v", err)
				}
				mu.Lock()
				if err == nil {
					ok = append(ok, addr)
				} else {
					failed++
				}
				mu.Unlock()
				if err != nil {
					time.Sleep(20 * time.Millisecond)
				}
			}
		})
	}
	time.Sleep(300 * time.Millisecond)
	err := cluster.Restart(ctx, true)
	close(restarted)
	wg.Wait()
	mustT(t, err)
	t.Logf("%d writes failed during the restart, %d submissions released", failed, len(ok))
	if failed == 0 {
		t.Error("no write failed: the restart did not happen under load")
	}
	for _, addr := range ok {
		var n int
		mustT(t, b.pool.QueryRow(ctx, `SELECT COUNT(*) FROM deliveries d JOIN submissions s ON s.device = d.device
			WHERE d.device = $1 AND s.state = 'released'`, int64(addr)).Scan(&n))
		if n != 1 {
			t.Fatalf("device %d: released submission with delivery: %d rows, want 1", addr, n)
		}
	}
	waitFor(t, "both nodes to hold their locks again", func() bool {
		return live(t, b, a.nodeID()) && live(t, a, b.nodeID())
	})
	// Message numbers stayed unique through the crash.
	var dups int
	mustT(t, a.pool.QueryRow(ctx, `SELECT COUNT(*) - COUNT(DISTINCT (local_time, local_number)) FROM submissions`).Scan(&dups))
	if dups != 0 {
		t.Errorf("%d repeated local message ids", dups)
	}
}

// TestQueueBesideServer: the operator's handle (emsdp queue) sees which
// server has an entry in flight, and its retry and remove leave that
// server's claims alone: the claimer still finishes them (the owner check
// of FinishDelivery and FinishRelays passes).
func TestQueueBesideServer(t *testing.T) {
	srv, op, _ := twoNodes(t, testConfig)
	defer srv.Close()
	defer op.Close()
	ctx := context.Background()
	mustT(t, srv.Enqueue(ctx, store.Work{
		Deliveries: []store.NewDelivery{delivery(1, "m1"), delivery(1, "m2")},
		Relays: []store.NewRelay{{Message: []byte("m"), NextAttempt: t0, Expires: t0.Add(time.Hour),
			Recipients: []store.RelayRecipient{{Addr: "a@x"}}}},
	}))
	c, err := srv.ClaimDelivery(ctx, 1, t0, store.Limits{})
	mustT(t, err)
	bs, err := srv.ClaimRelays(ctx, t0, 10)
	mustT(t, err)
	dRef := store.QueueRef{Kind: store.QueueDelivery, ID: c.ID}
	rRef := store.QueueRef{Kind: store.QueueRelay, ID: bs[0].Recipients[0].ID}

	l, err := op.ListQueue(ctx, store.QueueFilter{States: []string{"inflight", "sending"}})
	mustT(t, err)
	if len(l.Entries) != 2 || l.Entries[0].Owner != srv.nodeID() || l.Entries[1].Owner != srv.nodeID() {
		t.Errorf("in flight as the operator sees it: %+v (server node %d)", l.Entries, srv.nodeID())
	}
	if e, err := op.QueueEntry(ctx, dRef); err != nil || e.Owner != srv.nodeID() {
		t.Errorf("QueueEntry: %+v %v", e, err)
	}
	ch, err := op.RetryQueued(ctx, store.QueueSelect{All: true}, t0.Add(time.Minute))
	mustT(t, err)
	if ch.Changed != 1 || ch.InFlight != 2 {
		t.Errorf("retry all: %+v", ch)
	}
	ch, err = op.RemoveQueued(ctx, []store.QueueRef{dRef, rRef})
	mustT(t, err)
	if ch.Changed != 0 || ch.InFlight != 2 {
		t.Errorf("remove in flight: %+v", ch)
	}
	mustT(t, srv.FinishDelivery(ctx, c.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryDelivered}))
	mustT(t, srv.FinishRelays(ctx, []store.RelayResult{{ID: rRef.ID, From: store.RelaySending, State: store.RelaySent}},
		store.Work{}))
	if e, err := op.QueueEntry(ctx, dRef); err != nil || e.State != "delivered" || e.Owner != 0 {
		t.Errorf("after the finish: %+v %v", e, err)
	}
}
