package server

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/storedid"
	"github.com/esro-emsdp/emsdp/ua"
)

// A server on PostgreSQL end to end: a device's mail reaches the
// smarthost, Internet mail reaches the device, metrics and health report
// the store, the data directory is left alone, and an unreachable
// database makes /healthz fail.
func TestPostgresEndToEnd(t *testing.T) {
	cluster := testPG.get(t)
	name, err := cluster.CreateDatabase(context.Background())
	must(t, err)
	t.Cleanup(func() { cluster.DropDatabase(context.Background(), name) })
	host := startSmarthost(t, "")
	c := testConfig(t)
	c.Store.Driver, c.Store.Conninfo = StorePostgres, cluster.Conninfo(name)
	c.Data = filepath.Join(t.TempDir(), "unused")
	c.Relay.Smarthost = host.addr
	s, err := Start(context.Background(), c, Options{Logger: testLogger(t)})
	must(t, err)
	defer s.Close()
	dev := newDevice(t, s, 198036, deviceOpts{password: "secret", aliases: []string{"alice@example.net"}})

	id, err := dev.ua.Submit(context.Background(), &ua.Message{To: []string{"bob@example.com"}, Subject: "out",
		Body: []byte("to the Internet\n")})
	must(t, err)
	m := host.next(t)
	if m.from != "198.036@emsd.test" || !slices.Equal(m.to, []string{"bob@example.com"}) ||
		!strings.Contains(string(m.data), fmt.Sprintf("<EMSD.%08x.%08x@emsd.test>", uint32(id.SubmissionTime), id.Number)) {
		t.Errorf("relayed from %s to %v:\n%s", m.from, m.to, m.data)
	}
	must(t, sendMail(s, "carol@example.com", []string{"alice@example.net"}, inboundMsg("alice@example.net", "in", "hello")))
	if del := dev.next(t); del.IPM.Heading.Subject != "in" {
		t.Errorf("delivered %q", del.IPM.Heading.Subject)
	}
	eventually(t, "relay and delivery recorded", func() bool {
		st := queueStats(t, s)
		return st.Relays[store.RelaySent] == 1 && st.Deliveries[store.DeliveryDelivered] == 1
	})

	base := "http://" + s.Addrs().Admin.String()
	code, body := get(t, base+"/metrics")
	for _, want := range []string{`emsd_submissions_total{result="accepted"} 1`, `emsd_devices 1`,
		`emsd_queue_deliveries{state="delivered"} 1`, `gateway_queue_relays{state="sent"} 1`, `emsd_submissions_pending 0`} {
		if code != 200 || !strings.Contains(body, want) {
			t.Errorf("/metrics (%d) lacks %s", code, want)
		}
	}
	if code, body := get(t, base+"/healthz"); code != 200 || body != "ok\n" {
		t.Errorf("/healthz: %d %q", code, body)
	}
	if _, err := os.Stat(c.Data); !os.IsNotExist(err) {
		t.Errorf("data directory touched with the PostgreSQL store: %v", err)
	}

	must(t, cluster.DropDatabase(context.Background(), name))
	if code, body := get(t, base+"/healthz"); code != 503 || !strings.Contains(body, "store: ") {
		t.Errorf("/healthz with the database gone: %d %q", code, body)
	}
}

// Two servers share one PostgreSQL store (and one data directory, which
// they do not use): a device submits to either, the registry is one, and
// every message for a device is delivered to it exactly once, by one of
// the servers, although both have its mail and try (the store's
// per-device claims let one server at a time deliver to a device). Relays
// leave once each.
func TestTwoServers(t *testing.T) {
	host := startSmarthost(t, "")
	c1 := pgConfig(t)
	c1.Relay.Smarthost = host.addr
	c1.Data = filepath.Join(t.TempDir(), "shared")
	c2 := *c1 // another server: its own ports (127.0.0.1:0), the same store
	s1, s2 := startServer(t, c1), startServer(t, &c2)
	mts := map[netip.AddrPort]string{s1.Addrs().EMSD: "s1", s2.Addrs().EMSD: "s2"}
	if s1.Addrs().EMSD == s2.Addrs().EMSD {
		t.Fatal("both servers on one port")
	}

	// Device 198.036 submits through s1 and, from another port (it is
	// identified by its credentials), through s2.
	a1 := newDevice(t, s1, 198036, deviceOpts{password: "pw"})
	ep2 := listenESRO(t, "127.0.0.1")
	a2, err := ua.New(ep2, ua.Config{Server: s2.Addrs().EMSD, Address: 198036, Password: "pw",
		Logger: slog.New(slog.DiscardHandler)})
	must(t, err)
	defer a2.Close()
	// Device 198.040 is off-line while mail for it queues on both
	// servers: nothing answers at its registered address.
	addDevice(t, s1, 198040, closedUDP(t, "127.0.0.1"), deviceOpts{password: "pw-040", aliases: []string{"r@example.net"}})
	must(t, s2.Reload(context.Background())) // (or within registry_poll)

	var subjects []string
	big := strings.Repeat("A line of a long body, so that it goes in segments both ways.\n", 80)
	for i, c := range []*ua.Client{a1.ua, a2, a1.ua, a2, a1.ua, a2} {
		subj := fmt.Sprintf("dev %d", i)
		body := "short\n"
		if i < 2 {
			body = big // one segmented submission to each server
		}
		_, err := c.Submit(context.Background(), &ua.Message{To: []string{"198.040"},
			Cc: []string{fmt.Sprintf("x%d@example.com", i)}, Subject: subj, Body: []byte(body)})
		must(t, err)
		subjects = append(subjects, subj)
	}
	for i, s := range []*Server{s1, s2, s1, s2} {
		subj := fmt.Sprintf("smtp %d", i)
		must(t, sendMail(s, "carol@example.com", []string{"r@example.net"}, inboundMsg("r@example.net", subj, "hi")))
		subjects = append(subjects, subj)
	}

	// Both servers have its mail queued and try to deliver; the store lets
	// one of them at a time: the other finds the device busy and holds it,
	// or the attempt fails (nothing listens) and the device is held.
	eventually(t, "the device held, an attempt deferred", func() bool {
		held := 0
		for _, s := range []*Server{s1, s2} {
			if s.held(198040, false) {
				held++
			}
		}
		return held >= 1 && s1.metrics.counter(t, "emsd_deliveries_total", "deferred")+
			s2.metrics.counter(t, "emsd_deliveries_total", "deferred") > 0
	})

	got := make(chan *ua.Delivery, 100)
	// It comes up on a port of its own and polls s1, with its password,
	// so that s1 delivers where it polls from.
	rEP, err := esro.Listen("udp", "127.0.0.1:0", &esro.Config{Timers: fastTimers})
	must(t, err)
	defer rEP.Close()
	r, err := ua.New(rEP, ua.Config{Server: s1.Addrs().EMSD, Address: 198040, Password: "pw-040",
		Handler: ua.HandlerFunc(func(_ context.Context, d *ua.Delivery) error { got <- d; return nil })})
	must(t, err)
	defer r.Close()
	// It polls s1, which delivers its mail whichever server queued it (s2
	// leaves alone a device another server heard while that is fresh).
	_, err = r.DeliveryControl(context.Background(), nil)
	must(t, err)

	seen := map[string]int{}
	by := map[string]int{}
	for range subjects {
		select {
		case d := <-got:
			seen[d.IPM.Heading.Subject]++
			by[mts[d.From]]++
			if d.IPM.Heading.Subject == "dev 0" && string(d.IPM.Body.Text) != big {
				t.Errorf("segmented message delivered with %d octets, want %d", len(d.IPM.Body.Text), len(big))
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("deliveries so far %v", seen)
		}
	}
	select {
	case d := <-got:
		t.Errorf("extra delivery %q from %s", d.IPM.Heading.Subject, d.From)
	case <-time.After(500 * time.Millisecond):
	}
	for _, subj := range subjects {
		if seen[subj] != 1 {
			t.Errorf("%q delivered %d times (all: %v)", subj, seen[subj], seen)
		}
	}
	if by[""] != 0 {
		t.Errorf("deliveries from an unknown address: %v", by)
	}
	t.Logf("deliveries by server: %v", by)
	eventually(t, "both servers to record the outcomes", func() bool {
		return s1.metrics.counter(t, "emsd_deliveries_total", "delivered")+
			s2.metrics.counter(t, "emsd_deliveries_total", "delivered") == float64(len(subjects))
	})
	if st := queueStats(t, s2); st.Deliveries[store.DeliveryDelivered] != len(subjects) ||
		st.Deliveries[store.DeliveryQueued]+st.Deliveries[store.DeliveryInFlight] != 0 {
		t.Errorf("store after the deliveries: %+v", st)
	}

	relayed := map[string]int{}
	for range 6 {
		relayed[strings.Join(host.next(t).to, ",")]++
	}
	host.none(t, 300*time.Millisecond)
	for i := range 6 {
		if rc := fmt.Sprintf("x%d@example.com", i); relayed[rc] != 1 {
			t.Errorf("relayed %v", relayed)
			break
		}
	}
}

// A device found busy (store.ErrBusy: another server sharing the store is
// delivering to it) is held; when that work comes back to the queue without
// this server being told (the other server stopped), the periodic rescan
// delivers it, even while kicks keep the scheduler's timer from firing, as
// they do on a busy server.
func TestRescanUnderLoad(t *testing.T) {
	for _, sc := range storeConfigs {
		t.Run(sc.driver, func(t *testing.T) {
			c := sc.config(t)
			s, err := Start(context.Background(), c, Options{Logger: testLogger(t), rescan: 300 * time.Millisecond})
			must(t, err)
			defer s.Close()
			dev := newDevice(t, s, 198036, deviceOpts{})
			// The other server: a second handle on the store.
			other, err := c.OpenStore(context.Background())
			must(t, err)
			defer other.Close()
			ctx := context.Background()
			now := time.Now()
			queue := func(subj string, at time.Time) {
				content, err := testIPM("198.036").Marshal(emsd.Options{})
				must(t, err)
				must(t, other.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{{Device: 198036,
					MessageID: storedid.MessageID(emsd.RFC822ID("<" + subj + "@example.com>")).String(), ContentType: uint32(emsd.ContentIPM),
					Content: content, Priority: 1, NextAttempt: at, Expires: now.Add(time.Hour)}}}))
			}
			// Not due for this server yet, so that the other one claims it.
			queue("first", now.Add(time.Hour))
			d1, err := other.ClaimDelivery(ctx, 198036, now.Add(time.Hour), store.Limits{})
			must(t, err)
			queue("second", now)
			s.sched.noteQueued(store.Work{Deliveries: []store.NewDelivery{{Device: 198036}}})
			eventually(t, "the device held as busy", func() bool { return s.held(198036, true) })

			var wg sync.WaitGroup
			stop := make(chan struct{})
			wg.Go(func() {
				for {
					select {
					case <-stop:
						return
					case <-time.After(5 * time.Millisecond):
						s.sched.kick()
					}
				}
			})
			defer func() {
				close(stop)
				wg.Wait()
			}()
			// The other server gives its delivery back and goes away.
			must(t, other.FinishDelivery(ctx, d1.ID, store.DeliveryInFlight,
				store.DeliveryResult{State: store.DeliveryQueued, NextAttempt: time.Now(), Requeue: true}))
			for range 2 {
				select {
				case <-dev.got:
				case <-time.After(5 * time.Second):
					t.Fatal("held device not served")
				}
			}
		})
	}
}
