package server

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/internal/lossynet"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/sqlite"
	"github.com/esro-emsdp/emsdp/store/storedid"
	"github.com/esro-emsdp/emsdp/ua"
)

// simFleet is a server on an in-memory network (virtual time) with
// devices that answer and devices that are switched off.
type simFleet struct {
	t    *testing.T
	net  *lossynet.Network
	mts  *lossynet.Conn
	s    *Server
	c    *Config
	got  chan simDelivery
	ctx  context.Context
	quit context.CancelFunc
}

type simDelivery struct {
	dev  emsd.Address
	subj string
	at   time.Time
}

func startSimFleet(t *testing.T, conf func(*Config)) *simFleet {
	return startSimFleetWith(t, conf, Options{})
}

// startSimFleetWith starts it with o (its Logger and PacketConn are the
// simulation's).
func startSimFleetWith(t *testing.T, conf func(*Config), o Options) *simFleet {
	n := lossynet.New(lossynet.Config{Delay: 2 * time.Millisecond, Seed: 1})
	mts, err := n.Listen("10.0.0.1:641")
	must(t, err)
	c := testConfig(t)
	c.SMTP.Listen, c.Admin.Listen = "", ""
	setTimers(c, esro.ShippedTimers()) // the server's defaults: a silent device costs T_noresp
	c.Delivery.Retry = []Duration{Duration(time.Minute), Duration(2 * time.Minute)}
	c.Delivery.DrainTimeout = Duration(30 * time.Second)
	if conf != nil {
		conf(c)
	}
	o.Logger, o.PacketConn = testLogger(t), mts
	s, err := Start(context.Background(), c, o)
	must(t, err)
	f := &simFleet{t: t, net: n, mts: mts, s: s, c: c, got: make(chan simDelivery, 1000)}
	f.ctx, f.quit = context.WithCancel(context.Background())
	return f
}

func (f *simFleet) close() {
	f.quit()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	f.s.Shutdown(ctx)
}

func simIP(a emsd.Address) string {
	return fmt.Sprintf("10.%d.%d.%d:641", uint32(a)>>16&255, uint32(a)>>8&255, uint32(a)&255)
}

// register adds a device without anything listening at its address.
func (f *simFleet) register(a emsd.Address) {
	addDevice(f.t, f.s, a, netip.MustParseAddrPort(simIP(a)), deviceOpts{})
}

// switchOn starts the device's user agent at its address.
func (f *simFleet) switchOn(a emsd.Address) *ua.Client {
	conn, err := f.net.Listen(simIP(a))
	must(f.t, err)
	quiet := slog.New(slog.DiscardHandler)
	ep, err := esro.NewEndpoint(conn, &esro.Config{Timers: esro.ShippedTimers(), Logger: quiet})
	must(f.t, err)
	f.t.Cleanup(func() { ep.Close() })
	cl, err := ua.New(ep, ua.Config{Server: f.mts.AddrPort(), Address: a, Logger: quiet,
		Handler: ua.HandlerFunc(func(_ context.Context, d *ua.Delivery) error {
			f.got <- simDelivery{a, d.IPM.Heading.Subject, time.Now()}
			return nil
		})})
	must(f.t, err)
	f.t.Cleanup(func() { cl.Close() })
	return cl
}

// queue queues n messages for each device, as mail received by another
// process would be.
func (f *simFleet) queue(devs []emsd.Address, n int) {
	now := time.Now()
	var w store.Work
	for i := range n {
		for _, a := range devs {
			subj := fmt.Sprintf("%s/%d", a, i)
			ipm := testIPM(a.String())
			ipm.Heading.Subject = subj
			content, err := ipm.Marshal(emsd.Options{})
			must(f.t, err)
			w.Deliveries = append(w.Deliveries, store.NewDelivery{Device: uint32(a),
				MessageID: storedid.MessageID(emsd.RFC822ID("<" + subj + "@example.com>")).String(), ContentType: uint32(emsd.ContentIPM),
				Content: content, Priority: 1, NextAttempt: now, Expires: now.Add(time.Hour)})
		}
	}
	must(f.t, f.s.st.Enqueue(context.Background(), w))
	f.s.sched.noteQueued(w)
}

func (f *simFleet) attempts(a emsd.Address) int {
	l, err := f.s.st.ListQueue(context.Background(), store.QueueFilter{Kind: store.QueueDelivery, Device: uint32(a)})
	must(f.t, err)
	n := 0
	for _, e := range l.Entries {
		n += e.Attempts
	}
	return n
}

// Half the fleet is switched off: the devices that answer get all their
// mail at once, as if the others did not exist; attempts to the silent
// ones never run more than delivery.probes at a time, each holds its
// worker for one invocation only, and a silent device is held by its
// backoff (not retried message after message). A silent device that
// comes back and polls gets its mail at once. Nothing is lost or doubled.
func TestFleetOfflineDevices(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := startSimFleet(t, func(c *Config) { c.Delivery.Concurrency, c.Delivery.Probes = 4, 1 })
		defer f.close()
		var live, dead []emsd.Address
		for i := range 16 {
			a := emsd.Address(198100 + i)
			f.register(a)
			if i%2 == 0 {
				dead = append(dead, a)
			} else {
				live = append(live, a)
				f.switchOn(a)
			}
		}
		start := time.Now()
		var all []emsd.Address
		for i := range dead {
			all = append(all, dead[i], live[i])
		}
		f.queue(all, 5)
		seen := map[string]int{}
		var last time.Time
		for range len(live) * 5 {
			select {
			case d := <-f.got:
				seen[d.subj]++
				last = d.at
			case <-time.After(10 * time.Minute):
				t.Fatalf("live devices got %d of %d messages", len(seen), len(live)*5)
			}
			f.s.sched.mu.Lock()
			busy := f.s.sched.fleet.busy
			f.s.sched.mu.Unlock()
			if busy[kLive] > 4 || busy[kProbe] > 1 {
				t.Errorf("attempts in flight by kind %v: over the limits", busy)
			}
		}
		// One silent attempt lasts T_noresp (about 33 s with these
		// timers); the live devices must not wait for one, only for the
		// cut time of a few.
		t.Logf("the live devices had their mail after %v", last.Sub(start))
		if took := last.Sub(start); took > 2*time.Second {
			t.Errorf("the live devices' mail took %v", took)
		}

		// Ten minutes on: every silent device was tried, within its
		// backoff, one message at a time (a worker is never stuck on it).
		time.Sleep(10 * time.Minute)
		noresp := esro.ShippedTimers().NoResponse()
		for _, a := range dead {
			n := f.attempts(a)
			t.Logf("silent device %s: %d attempts", a, n)
			// At most one attempt per probe slot per T_noresp, and none
			// sooner than the backoff allows: 1 + (10 min - T_noresp) /
			// (T_noresp + 1 min) at most.
			if max := 1 + int((10*time.Minute-noresp)/(noresp+time.Minute)); n < 1 || n > max {
				t.Errorf("silent device %s: %d attempts in 10 minutes, want 1..%d", a, n, max)
			}
		}
		st := queueStats(t, f.s)
		if st.Deliveries[store.DeliveryQueued]+st.Deliveries[store.DeliveryInFlight] != len(dead)*5 {
			t.Errorf("queue: %+v, want the silent devices' %d messages", st.Deliveries, len(dead)*5)
		}

		// One comes back and polls: its mail comes at once.
		back := dead[3]
		cl := f.switchOn(back)
		polled := time.Now()
		_, err := cl.DeliveryControl(context.Background(), nil)
		must(t, err)
		for range 5 {
			select {
			case d := <-f.got:
				if d.dev != back {
					t.Fatalf("delivery to %s, want only %s", d.dev, back)
				}
				seen[d.subj]++
				last = d.at
			case <-time.After(10 * time.Minute):
				t.Fatalf("the device that came back got %d messages", len(seen)-len(live)*5)
			}
		}
		if took := last.Sub(polled); took > 2*time.Second {
			t.Errorf("the device that came back waited %v for its mail", took)
		}
		time.Sleep(time.Minute)
		for subj, n := range seen {
			if n != 1 {
				t.Errorf("%s delivered %d times", subj, n)
			}
		}
		if len(f.got) > 0 {
			t.Errorf("extra delivery %+v", <-f.got)
		}
	})
}

// Shutdown gives up at once on an attempt to a silent device (after one
// retransmission interval without an answer, not the whole drain time)
// and re-queues it without counting the attempt: nothing is lost.
func TestShutdownAbandonsSilentDevices(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := startSimFleet(t, nil)
		f.register(198200)
		f.queue([]emsd.Address{198200}, 1)
		time.Sleep(time.Second)
		f.s.sched.mu.Lock()
		busy := f.s.sched.fleet.inFlight()
		f.s.sched.mu.Unlock()
		if busy != 1 {
			t.Fatalf("%d attempts in flight, want the one to the silent device", busy)
		}
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		must(t, f.s.Shutdown(ctx))
		f.quit()
		// drain_timeout is 30 s; T_retx, the silence that counts, is 3 s
		// and the attempt began a second before.
		if took := time.Since(start); took > 2500*time.Millisecond {
			t.Errorf("shutdown took %v", took)
		}
		st, err := f.c.OpenStore(context.Background())
		must(t, err)
		defer st.Close()
		l, err := st.ListQueue(context.Background(), store.QueueFilter{Kind: store.QueueDelivery})
		must(t, err)
		if len(l.Entries) != 1 || l.Entries[0].State != string(store.DeliveryQueued) || l.Entries[0].Attempts != 0 {
			t.Errorf("after shutdown the queue holds %+v, want the delivery queued with no attempt counted", l.Entries)
		}
	})
}

// delivery.rate paces the delivery invocations of all devices together:
// a backlog goes out at the configured rate after the first burst, and
// the pacing is counted.
func TestFleetPacing(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := startSimFleet(t, func(c *Config) { c.Delivery.Rate, c.Delivery.Burst = 10, 5 })
		defer f.close()
		var devs []emsd.Address
		for i := range 20 {
			a := emsd.Address(198300 + i)
			f.register(a)
			f.switchOn(a)
			devs = append(devs, a)
		}
		start := time.Now()
		f.queue(devs, 2)
		var at []time.Duration
		for range 40 {
			select {
			case d := <-f.got:
				at = append(at, d.at.Sub(start))
			case <-time.After(time.Minute):
				t.Fatalf("%d of 40 delivered", len(at))
			}
		}
		// 5 at once, then one every 100 ms: the 40th after 3.5 s.
		for i, d := range at {
			earliest := time.Duration(max(i-4, 0)) * 100 * time.Millisecond
			if d < earliest-time.Millisecond {
				t.Errorf("delivery %d after %v, before the pace allows (%v)", i+1, d, earliest)
			}
		}
		if last := at[len(at)-1]; last > 4*time.Second {
			t.Errorf("the last delivery after %v, want about 3.5 s", last)
		}
		if n := f.s.metrics.counter(t, "emsd_delivery_invocations_total", ""); n < 40 {
			t.Errorf("%v invocations counted", n)
		}
		if w := f.s.metrics.counter(t, "emsd_delivery_pacing_delay_seconds_total", ""); w <= 0 {
			t.Error("no pacing delay counted")
		}
	})
}

// A first attempt, to a device not heard from, is made unclaimed with a
// store of the server's own: nothing is written before its outcome, which
// counts the attempt and the instance ids it used. A device that answered
// is then claimed as before; ids never repeat across the two.
func TestFirstAttemptUnclaimed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := startSimFleet(t, nil)
		defer f.close()
		silent, live := emsd.Address(198200), emsd.Address(198201)
		f.register(silent)
		f.register(live)
		f.switchOn(live)
		f.queue([]emsd.Address{silent, live}, 2)
		for range 2 {
			select {
			case <-f.got:
			case <-time.After(time.Minute):
				t.Fatal("the live device did not get its mail")
			}
		}
		synctest.Wait()
		// The silent device's first attempt is in flight, unclaimed.
		f.s.sched.mu.Lock()
		inFlight := f.s.sched.inflight[silent] != nil
		f.s.sched.mu.Unlock()
		l, err := f.s.st.ListQueue(context.Background(), store.QueueFilter{Kind: store.QueueDelivery, Device: uint32(silent)})
		must(t, err)
		for _, e := range l.Entries {
			if e.State != string(store.DeliveryQueued) || e.Attempts != 0 {
				t.Errorf("during the first attempt: %s %s after %d attempts, want queued after 0", e.MessageID, e.State, e.Attempts)
			}
		}
		if !inFlight || len(l.Entries) != 2 {
			t.Errorf("during the first attempt: in flight %v, %d queued", inFlight, len(l.Entries))
		}
		// Its outcome (no answer within T_noresp) counts it.
		time.Sleep(esro.ShippedTimers().NoResponse() + time.Second)
		synctest.Wait()
		if n := f.attempts(silent); n != 1 {
			t.Errorf("after the first attempt to the silent device: %d attempts counted, want 1", n)
		}
		ctx := context.Background()
		for _, c := range []struct {
			dev  emsd.Address
			want uint8
		}{{silent, 1}, {live, 2}} {
			if got, err := f.s.st.ReserveInstanceIDs(ctx, uint32(c.dev), 1); err != nil || got != c.want {
				t.Errorf("device %s: next instance id %d (%v), want %d", c.dev, got, err, c.want)
			}
		}
	})
}

// After a restart the scheduler knows the devices only from the store:
// the devices heard from lately (a stored contact) are tried as live ones
// before those not heard from, and while they have work waiting for a
// worker, the devices not heard from (here all switched off) get no more
// than the probe share of first attempts; once the heard devices are
// done, the others are all tried. The heard devices' mail must not wait
// on a silent device's cut time.
func TestFleetHeardDevicesFirst(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := startSimFleet(t, func(c *Config) { c.Delivery.Concurrency, c.Delivery.Probes = 2, 1 })
		defer f.close()
		ctx := context.Background()
		var live, dead []emsd.Address
		for i := range 12 {
			a := emsd.Address(198300 + i)
			f.register(a)
			if i%3 != 0 {
				dead = append(dead, a)
				continue
			}
			live = append(live, a)
			f.switchOn(a)
			// Heard a minute before the restart, at its address.
			_, _, err := f.s.st.SetContact(ctx, uint32(a), store.Contact{Addr: netip.MustParseAddrPort(simIP(a)),
				Via: "an earlier run", At: time.Now().Add(-time.Minute), Polled: true})
			must(t, err)
		}
		// The mail is in the store, and the scheduler reads it as at a
		// start (runScheduler's first rescan).
		var w store.Work
		for i := range 3 {
			for _, a := range append(slices.Clone(dead), live...) {
				ipm := testIPM(a.String())
				ipm.Heading.Subject = fmt.Sprintf("%s/%d", a, i)
				content, err := ipm.Marshal(emsd.Options{})
				must(t, err)
				w.Deliveries = append(w.Deliveries, store.NewDelivery{Device: uint32(a),
					MessageID:   storedid.MessageID(emsd.RFC822ID("<" + ipm.Heading.Subject + "@example.com>")).String(),
					ContentType: uint32(emsd.ContentIPM), Content: content, Priority: 1,
					NextAttempt: time.Now(), Expires: time.Now().Add(time.Hour)})
			}
		}
		must(t, f.s.st.Enqueue(ctx, w))
		must(t, f.s.sched.rescanFleet(ctx, time.Time{}))
		f.s.sched.kick()
		start := time.Now()
		var last time.Time
		maxFirst := 0
		for range len(live) * 3 {
			select {
			case d := <-f.got:
				last = d.at
			case <-time.After(10 * time.Minute):
				t.Fatal("the heard devices did not get their mail")
			}
			f.s.sched.mu.Lock()
			maxFirst = max(maxFirst, f.s.sched.fleet.busy[kFirst])
			f.s.sched.mu.Unlock()
		}
		if took := last.Sub(start); took >= esro.ShippedTimers().RetransmitInterval() {
			t.Errorf("the heard devices' mail took %v: they waited on a silent device", took)
		}
		if maxFirst > 1 {
			t.Errorf("%d first attempts at once while the heard devices had mail, want the probe share (1)", maxFirst)
		}
		// Once they are done, every device not heard from is tried.
		time.Sleep(esro.ShippedTimers().NoResponse() + 10*time.Second)
		synctest.Wait()
		for _, a := range dead {
			if n := f.attempts(a); n < 1 {
				t.Errorf("device %s not tried after the heard devices were done", a)
			}
		}
	})
}

// heldOutcome is a SQLite store whose first outcome write of a claimed
// delivery waits until released.
type heldOutcome struct {
	*sqlite.DB
	taken   atomic.Bool
	held    chan struct{} // closed when the held write begins
	release chan struct{}
}

func (h *heldOutcome) FinishDelivery(ctx context.Context, id int64, from store.DeliveryState, r store.DeliveryResult) error {
	if from == store.DeliveryInFlight {
		if h.taken.CompareAndSwap(false, true) {
			close(h.held)
			<-h.release
		}
	}
	return h.DB.FinishDelivery(ctx, id, from, r)
}

// An attempt's slot goes to the next device in line while its outcome is
// written (fleet.record): with delivery.concurrency 1 and one answering
// device's outcome write held, the other answering device is delivered
// to meanwhile. Shutdown still waits for the held write, which is then
// recorded.
func TestFleetOutcomeWriteFreesSlot(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		db, err := sqlite.Open(context.Background(), filepath.Join(t.TempDir(), sqlite.FileName), nil)
		must(t, err)
		defer db.Close()
		st := &heldOutcome{DB: db, held: make(chan struct{}), release: make(chan struct{})}
		f := startSimFleetWith(t, func(c *Config) { c.Delivery.Concurrency = 1 }, Options{Store: st})
		released := false
		defer func() {
			if !released {
				close(st.release)
			}
			f.close()
		}()
		devs := []emsd.Address{198300, 198301}
		for _, a := range devs {
			f.register(a)
			f.switchOn(a)
		}
		// Each device's first message goes by a first attempt (unclaimed:
		// its outcome is not held), after which the device answers and
		// its second goes by a live attempt, one at a time. The first
		// live attempt's outcome write is held.
		f.queue(devs, 2)
		for i := range 4 {
			select {
			case <-f.got:
			case <-time.After(time.Second): // under the cut time, which would free the slot too (promote)
				t.Fatalf("%d messages delivered within a second, want 4 (one live attempt's outcome write held)", i)
			}
		}
		<-st.held
		done := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			done <- f.s.Shutdown(ctx)
		}()
		time.Sleep(time.Second)
		synctest.Wait()
		select {
		case err := <-done:
			t.Fatalf("shutdown returned (%v) before the held outcome was written", err)
		default:
		}
		close(st.release)
		released = true
		must(t, <-done)
		l, err := db.ListQueue(context.Background(), store.QueueFilter{Kind: store.QueueDelivery})
		must(t, err)
		if len(l.Entries) != 4 {
			t.Errorf("%d deliveries, want 4", len(l.Entries))
		}
		for _, e := range l.Entries {
			if e.State != string(store.DeliveryDelivered) {
				t.Errorf("after shutdown: %s %s, want every delivery delivered", e.MessageID, e.State)
			}
		}
	})
}
