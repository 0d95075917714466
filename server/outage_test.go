package server

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/internal/pgtest"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/sqlite"
	"github.com/esro-emsdp/emsdp/store/storedid"
	"github.com/esro-emsdp/emsdp/ua"
)

// failingStore refuses the outcome writes (FinishDelivery, FinishRelays)
// while fail is set, as SQLite does on a full or read-only disk.
type failingStore struct {
	store.Store
	fail  atomic.Bool
	tries atomic.Int32
	// failNumbers refuses NextMessageNumber: a report cannot get its id.
	failNumbers atomic.Bool
}

func (f *failingStore) NextMessageNumber(ctx context.Context, t time.Time) (uint32, error) {
	if f.failNumbers.Load() {
		return 0, fmt.Errorf("sqlite: message number: %w", errDiskFull)
	}
	return f.Store.NextMessageNumber(ctx, t)
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

// startFailingServer starts a server relaying to a smarthost of its own on
// a SQLite store whose writes the test can make fail.
func startFailingServer(t *testing.T) (*Server, *failingStore, *smarthost) {
	t.Helper()
	db, err := sqlite.Open(context.Background(), filepath.Join(t.TempDir(), "own.db"), nil)
	must(t, err)
	t.Cleanup(func() { db.Close() })
	fs := &failingStore{Store: db}
	host := startSmarthost(t, "")
	c := testConfig(t)
	c.Relay.Smarthost = host.addr
	return startServerWith(t, c, Options{Logger: testLogger(t), Store: fs}), fs, host
}

// The store refuses outcome writes while a delivery and a relay are in
// flight: the device has the message, the smarthost too, and the
// outcomes wait in memory, retried; /healthz and the metrics say so; the
// device's next message waits behind the first. Once the store takes
// writes again, both outcomes are recorded, the next message is
// delivered, and nothing is delivered or relayed twice.
func TestOutcomeWriteFailures(t *testing.T) {
	s, fs, host := startFailingServer(t)
	dev := newDevice(t, s, 198036, deviceOpts{})

	fs.fail.Store(true)
	for _, subj := range []string{"one", "two"} {
		must(t, sendMail(s, "carol@example.com", []string{"198.036@emsd.test"}, inboundMsg("198.036@emsd.test", subj, "b")))
	}
	if d := dev.next(t); d.IPM.Heading.Subject != "one" {
		t.Fatalf("delivered %q first", d.IPM.Heading.Subject)
	}
	_, err := dev.ua.Submit(context.Background(), &ua.Message{To: []string{"bob@example.com"}, Subject: "out", Body: []byte("b\n")})
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
	// ("one" was the first attempt to a device not heard from: unclaimed,
	// it shows queued until its outcome is written.)
	st := queueStats(t, s)
	if st.Deliveries[store.DeliveryQueued] != 2 || st.Deliveries[store.DeliveryDelivered] != 0 || st.Relays[store.RelaySending] != 1 {
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

// A device refuses a message while the store refuses to number the
// non-delivery report: the outcome waits with its report, retried, and
// the DSN reaches the sender once the store takes writes again; it is
// not left out.
func TestReportWhileStoreRefuses(t *testing.T) {
	s, fs, host := startFailingServer(t)
	refuser := listenESRO(t, "127.0.0.1")
	must(t, refuser.HandleFunc(3, esro.ThreeWay, func(_ context.Context, w esro.ResponseWriter, inv *esro.Invocation) {
		fs.failNumbers.Store(true) // from now on, until the test says
		w.Error(esro.EncodingBER, 7, unhex("020107"))
	}))
	addDevice(t, s, 198037, epAddr(refuser), deviceOpts{})
	must(t, sendMail(s, "carol@example.com", []string{"198.037@emsd.test"}, inboundMsg("198.037@emsd.test", "refused", "x")))
	eventually(t, "the outcome waiting for its report", func() bool {
		return testutil.ToFloat64(s.metrics.storeWriteFailures) >= 1 && s.sched.out.pending.Load() == 1
	})
	host.none(t, 300*time.Millisecond)
	fs.failNumbers.Store(false)
	m := host.next(t)
	if m.from != "" || len(m.to) != 1 || m.to[0] != "carol@example.com" || !strings.Contains(string(m.data), "Action: failed") {
		t.Errorf("DSN from %q to %v:\n%s", m.from, m.to, m.data)
	}
	eventually(t, "the outcome recorded", func() bool {
		return queueStats(t, s).Deliveries[store.DeliveryFailed] == 1 && s.sched.out.pending.Load() == 0
	})
}

// An entry this server has in flight without a worker on it (its claim's
// worker is gone) is re-queued once it is a minute old; one held past the
// deadline counts as stuck in /healthz and the metrics.
func TestInFlightCheck(t *testing.T) {
	s := startServer(t, testConfig(t))
	ctx := context.Background()
	// Devices that permit no delivery (delivery control): the scheduler
	// never claims their entries itself.
	var none uint64
	for _, dev := range []emsd.Address{198040, 198041} {
		addDevice(t, s, dev, closedUDP(t, "127.0.0.1"), deviceOpts{})
		must(t, s.st.SetDeliveryControl(ctx, uint32(dev), store.DeliveryControl{Operations: &none}))
	}
	must(t, s.Reload(ctx))
	now := time.Now()
	var refs []store.QueueRef
	for _, dev := range []uint32{198040, 198041} {
		// Queued behind the scheduler's back (it rescans in 30 s) and
		// claimed at once, as by a worker that then went away.
		must(t, s.st.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{{Device: dev,
			MessageID: storedid.MessageID(emsd.RFC822ID(fmt.Sprintf("<%d@example.com>", dev))).String(), Content: []byte{0x30, 0},
			NextAttempt: now, Expires: now.Add(time.Hour)}}}))
		d, err := s.st.ClaimDelivery(ctx, dev, now, store.Limits{})
		must(t, err)
		refs = append(refs, store.QueueRef{Kind: store.QueueDelivery, ID: d.ID})
	}
	s.sched.out.hold(refs[1]) // a worker of this server holds the second
	defer s.sched.out.release(refs[1])
	inFlight := func() int {
		t.Helper()
		l, err := s.st.ListQueue(ctx, store.QueueFilter{States: []string{"inflight"}})
		must(t, err)
		return len(l.Entries)
	}

	must(t, s.sched.checkInFlight(ctx, time.Now()))
	if n := inFlight(); n != 2 {
		t.Fatalf("%d in flight after a check at once, want 2: a fresh claim is left alone", n)
	}
	must(t, s.sched.checkInFlight(ctx, time.Now().Add(reclaimAfter+time.Second)))
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

	// (The re-queue made the scheduler check at once too, with the real
	// time, which may come between this check and the look.)
	eventually(t, "the held entry counted as stuck", func() bool {
		must(t, s.sched.checkInFlight(ctx, time.Now().Add(stuckAfter+time.Minute)))
		code, body := get(t, base+"/healthz")
		return s.metrics.counter(t, "emsd_queue_stuck_entries", "") == 1 && code == 503 &&
			strings.Contains(body, "queue: 1 entries in flight past their deadline")
	})
}

// PostgreSQL stops for a few seconds while two servers share it, with a
// delivery and a relay whose outcomes are being written, and more mail
// for the same devices queued. Once it is back, nothing is stuck: every
// message reaches its device once (the devices drop re-deliveries by
// message id, as emsdp ua does) and the smarthost once, every outcome is
// recorded, and /healthz is ok again on both servers. (The test logs how
// long the deliveries took after the database came back.)
func TestPostgresOutage(t *testing.T) {
	if testing.Short() {
		t.Skip("stops and starts a PostgreSQL server")
	}
	ctx := context.Background()
	pg, err := pgtest.Start(ctx, pgtest.Options{NoFsync: true}) // its own: this test stops it
	if err != nil {
		t.Fatalf("PostgreSQL server for the test: %v", err) // CI installs it: fail, do not skip
	}
	t.Cleanup(func() { pg.Stop() })
	host := startSmarthost(t, "")
	c1 := testConfig(t)
	c1.Store.Driver, c1.Store.Conninfo = StorePostgres, pg.NewDatabase(t)
	c1.Relay.Smarthost = host.addr
	c1.Data = filepath.Join(t.TempDir(), "shared")
	// The reference's shipped timers: a device answers well within
	// them while the test stops the database.
	timers := esro.ShippedTimers()
	setTimers(c1, timers)
	c2 := *c1
	s1, s2 := startServer(t, c1), startServer(t, &c2)

	halted := make(chan struct{})
	waiting := make(chan string, 2)
	hold := func(what string) {
		waiting <- what
		<-halted
	}
	host.mu.Lock()
	host.onData = func(m hostMsg) {
		if slices.Contains(m.to, "held@example.com") {
			hold("relay")
		}
	}
	host.mu.Unlock()
	const devices = 4
	type got struct {
		dev  emsd.Address
		subj string
	}
	gotc := make(chan got, 100)
	var devs []*testDevice
	for i := range devices {
		addr := emsd.Address(198040 + i)
		devs = append(devs, newDevice(t, s1, addr, deviceOpts{timers: timers,
			handler: ua.HandlerFunc(func(_ context.Context, d *ua.Delivery) error {
				if d.IPM.Heading.Subject == "held" {
					hold("delivery")
				}
				gotc <- got{addr, d.IPM.Heading.Subject}
				return nil
			})}))
	}
	must(t, s2.Reload(ctx))

	// A relay and a delivery are held open by the smarthost and the
	// device; more mail for every device is queued on both servers.
	_, err = devs[1].ua.Submit(ctx, &ua.Message{To: []string{"held@example.com"}, Subject: "out", Body: []byte("b\n")})
	must(t, err)
	must(t, sendMail(s1, "carol@example.com", []string{"198.040@emsd.test"}, inboundMsg("198.040@emsd.test", "held", "b")))
	want := map[got]int{{198040, "held"}: 1}
	for i := range devices {
		for k, s := range []*Server{s1, s2} {
			to := fmt.Sprintf("%s@emsd.test", emsd.Address(198040+i))
			subj := fmt.Sprintf("before %d", k)
			must(t, sendMail(s, "carol@example.com", []string{to}, inboundMsg(to, subj, "b")))
			want[got{emsd.Address(198040 + i), subj}] = 1
		}
	}
	for range 2 {
		select {
		case <-waiting:
		case <-time.After(20 * time.Second):
			t.Fatal("the held delivery and relay did not start")
		}
	}
	must(t, pg.Halt(ctx, true))
	close(halted) // the device stores, the smarthost accepts: the outcomes meet a stopped database
	// (Gathering every metric fails while the store does: the queue
	// gauges ask it.)
	failures := func() float64 {
		return testutil.ToFloat64(s1.metrics.storeWriteFailures) + testutil.ToFloat64(s2.metrics.storeWriteFailures)
	}
	eventually(t, "outcome writes failing", func() bool { return failures() >= 2 })
	for _, s := range []*Server{s1, s2} {
		if code, _ := get(t, "http://"+s.Addrs().Admin.String()+"/healthz"); code != 503 {
			t.Errorf("/healthz with the database stopped: %d", code)
		}
	}
	time.Sleep(3 * time.Second)
	must(t, pg.Resume(ctx))

	for i := range devices {
		to := fmt.Sprintf("%s@emsd.test", emsd.Address(198040+i))
		eventuallyErr(t, func() error { return sendMail(s2, "carol@example.com", []string{to}, inboundMsg(to, "after", "b")) })
		want[got{emsd.Address(198040 + i), "after"}] = 1
	}
	// A server learns of mail another one queued for a device it holds
	// back (the other delivers to it, or heard it last) at its next
	// rescan: allow two.
	seen := map[got]int{}
	back := time.Now()
	for range want {
		select {
		case g := <-gotc:
			seen[g]++
		case <-time.After(2*defaultRescan + 10*time.Second):
			t.Fatalf("deliveries so far: %v", seen)
		}
	}
	t.Logf("every message delivered %v after the database came back", time.Since(back).Round(time.Millisecond))
	select {
	case g := <-gotc:
		t.Errorf("delivered again: %v", g)
	case <-time.After(500 * time.Millisecond):
	}
	if !maps.Equal(seen, want) {
		t.Errorf("delivered %v, want %v", seen, want)
	}
	relayed := host.next(t)
	if !slices.Equal(relayed.to, []string{"held@example.com"}) {
		t.Errorf("relayed to %v", relayed.to)
	}
	host.none(t, 300*time.Millisecond)
	eventually(t, "every outcome recorded, nothing left in flight", func() bool {
		st := queueStats(t, s1)
		return st.Deliveries[store.DeliveryDelivered] == len(want) && st.Relays[store.RelaySent] == 1 &&
			st.Deliveries[store.DeliveryQueued]+st.Deliveries[store.DeliveryInFlight]+st.Relays[store.RelaySending] == 0
	})
	for _, s := range []*Server{s1, s2} {
		eventually(t, "/healthz ok again", func() bool {
			code, _ := get(t, "http://"+s.Addrs().Admin.String()+"/healthz")
			return code == 200
		})
	}
	t.Logf("outcome write tries refused: %v", failures())
}

// A server is killed (SIGKILL) while it delivers to a device that has
// not answered yet; the other server sharing the PostgreSQL store, with
// the default settings (a 30 s rescan, the 5 s node check), delivers to
// the device once the dead server's session is seen gone for 5 s: it
// does not wait for its next rescan. The test logs the takeover time.
func TestKillTakeover(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a server process")
	}
	c := pgConfig(t)
	setTimers(c, esro.ShippedTimers()) // the dead server's attempt stays in flight
	dir := t.TempDir()
	c.Data = filepath.Join(dir, "data")
	c.Admin.Listen = ""
	cfgPath := filepath.Join(dir, "emsdp.toml")
	f, err := os.Create(cfgPath)
	must(t, err)
	must(t, toml.NewEncoder(f).Encode(c))
	f.Close()

	p1 := startChild(t, cfgPath)
	mts1 := netip.MustParseAddrPort(p1.emsd)
	type arrival struct {
		from netip.AddrPort
		at   time.Time
	}
	arrivals := make(chan arrival, 100)
	stop := make(chan struct{})
	t.Cleanup(func() { close(stop) })
	dev := listenESROTimers(t, "127.0.0.1", esro.ShippedTimers())
	must(t, dev.HandleFunc(3, esro.ThreeWay, func(ctx context.Context, w esro.ResponseWriter, inv *esro.Invocation) {
		arrivals <- arrival{inv.Peer, time.Now()}
		if inv.Peer == mts1 {
			select { // the dead server's attempt: never answered
			case <-ctx.Done():
			case <-stop:
			}
			return
		}
		w.Error(esro.EncodingBER, 7, unhex("020106")) // resource error: the device is busy, try later
	}))
	db, err := c.OpenStore(context.Background())
	must(t, err)
	defer db.Close()
	must(t, db.AddDevice(context.Background(), &store.Device{Address: 198040, IP: epAddr(dev).Addr(), Port: epAddr(dev).Port(),
		Version: "1.1", Mode: store.ModeComplete}))
	eventuallyErr(t, func() error {
		return sendMailTo(p1.smtp, "carol@example.com", []string{"198.040@emsd.test"}, inboundMsg("198.040@emsd.test", "m", "b"))
	})
	select {
	case a := <-arrivals:
		if a.from != mts1 {
			t.Fatalf("first delivery from %v, want the server process at %v", a.from, mts1)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("no delivery from the server process")
	}
	s2 := startServerWith(t, c, Options{Logger: testLogger(t)}) // default rescan
	p1.kill()
	killed := time.Now()
	for {
		select {
		case a := <-arrivals:
			if a.from == mts1 {
				continue // a retransmission of the dead server's, already on its way
			}
			took := a.at.Sub(killed)
			t.Logf("takeover after kill -9: %v", took.Round(time.Millisecond))
			if took >= defaultRescan {
				t.Errorf("taken over after %v: the rescan did it, not the sweep", took)
			}
			if a.from != s2.Addrs().EMSD {
				t.Errorf("delivery from %v, want the other server at %v", a.from, s2.Addrs().EMSD)
			}
			return
		case <-time.After(2 * defaultRescan):
			t.Fatal("the other server never delivered the dead server's work")
		}
	}
}
