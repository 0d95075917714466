package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/sqlite"
	"github.com/esro-emsdp/emsdp/ua"
)

// versionCounter counts the registry version look-ups of a store.
type versionCounter struct {
	store.Store
	n atomic.Int64
}

func (c *versionCounter) RegistryVersion(ctx context.Context) (int64, error) {
	c.n.Add(1)
	return c.Store.RegistryVersion(ctx)
}

func (c *versionCounter) RegistryChanges(ctx context.Context, since int64) (int64, []uint32, bool, error) {
	c.n.Add(1)
	return c.Store.RegistryChanges(ctx, since)
}

// A device added to the store ("emsdp device add") is served at its
// first invocation, without waiting for registry_poll; unknown devices
// make the server look at the store at most once per registryRecheck.
func TestUnknownDeviceRechecksRegistry(t *testing.T) {
	db, err := sqlite.Open(context.Background(), filepath.Join(t.TempDir(), "own.db"), nil)
	must(t, err)
	defer db.Close()
	st := &versionCounter{Store: db}
	c := testConfig(t)
	c.Store.RegistryPoll = Duration(time.Hour) // no polling during the test
	s := startServerWith(t, c, Options{Logger: testLogger(t), Store: st})

	ep := listenESRO(t, "127.0.0.1")
	client, err := ua.New(ep, ua.Config{Server: s.Addrs().EMSD, Address: 198036, Logger: slog.New(slog.DiscardHandler)})
	must(t, err)
	defer client.Close()
	submit := func() error {
		_, err := client.Submit(context.Background(), &ua.Message{To: []string{"bob@example.com"}, Subject: "s", Body: []byte("b\n")})
		return err
	}

	// Unknown, and the registry has not changed: refused.
	before := st.n.Load()
	var uerr *ua.Error
	if err := submit(); !errors.As(err, &uerr) || uerr.Code != emsd.CodeSecurity {
		t.Fatalf("unknown device: %v", err)
	}
	if st.n.Load() != before+1 {
		t.Errorf("%d registry look-ups for one unknown device, want 1", st.n.Load()-before)
	}
	// At once again: no second look-up within registryRecheck.
	if err := submit(); !errors.As(err, &uerr) {
		t.Fatalf("unknown device again: %v", err)
	}
	if st.n.Load() != before+1 {
		t.Errorf("%d registry look-ups within %v, want 1", st.n.Load()-before, registryRecheck)
	}

	// Added behind the server's back, after the recheck interval: served
	// at its first invocation.
	ap := epAddr(ep)
	must(t, db.AddDevice(context.Background(), &store.Device{Address: 198036, IP: ap.Addr(), Port: ap.Port(),
		Version: "1.1", Mode: store.ModeComplete}))
	s.devs.recheck.Lock()
	s.devs.recheckAt = time.Time{} // as if registryRecheck had passed
	s.devs.recheck.Unlock()
	if err := submit(); err != nil {
		t.Fatalf("device added to the store: %v", err)
	}
	if s.devs.current().get(198036) == nil {
		t.Error("registry not reloaded")
	}
}

// A submission naming a device added to the store a moment ago (emsdp
// device add while the server runs), before the registry's next poll,
// reaches it: by its number and by number@domain, neither refused as
// unknown nor relayed to the Internet.
func TestUnknownRecipientRechecksRegistry(t *testing.T) {
	c := testConfig(t)
	c.Store.RegistryPoll = Duration(time.Hour) // no polling during the test
	s := startServer(t, c)
	sender := newDevice(t, s, 198036, deviceOpts{password: "pw"})
	got := make(chan *ua.Delivery, 10)
	for _, a := range []emsd.Address{198037, 198038} {
		ep := listenESRO(t, "127.0.0.1")
		ap := epAddr(ep)
		// Behind the server's back, as another process adds it.
		must(t, s.st.AddDevice(context.Background(), &store.Device{Address: uint32(a), IP: ap.Addr(), Port: ap.Port(),
			Version: "1.1", Mode: store.ModeComplete}))
		cl, err := ua.New(ep, ua.Config{Server: s.Addrs().EMSD, Address: a, Logger: slog.New(slog.DiscardHandler),
			Handler: ua.HandlerFunc(func(_ context.Context, d *ua.Delivery) error { got <- d; return nil })})
		must(t, err)
		t.Cleanup(func() { cl.Close() })
	}
	if s.devs.current().get(198037) != nil {
		t.Fatal("registry already reloaded: the test proves nothing")
	}
	_, err := sender.ua.Submit(context.Background(), &ua.Message{To: []string{"198.037", "198.038@emsd.test"},
		Subject: "to new devices", Body: []byte("hi\n")})
	must(t, err)
	for range 2 {
		select {
		case d := <-got:
			if d.IPM.Heading.Subject != "to new devices" {
				t.Errorf("got %q", d.IPM.Heading.Subject)
			}
		case <-time.After(15 * time.Second):
			t.Fatal("a device added before the submission got nothing")
		}
	}
	if n := s.metrics.counter(t, "emsd_deliveries_total", "rejected"); n != 0 {
		t.Errorf("%v recipients rejected", n)
	}
	if st := queueStats(t, s); len(st.Relays) != 0 {
		t.Errorf("relayed to the Internet: %v", st.Relays)
	}
}

// The registry applies changes in place: entries replaced, removed and
// added keep every index (address, address and port, IP, alias) right.
func TestRegistryApply(t *testing.T) {
	sd := func(a uint32, ip string, port uint16, aliases ...string) *store.Device {
		return &store.Device{Address: a, IP: netip.MustParseAddr(ip), Port: port, Version: "1.1",
			Mode: store.ModeComplete, Aliases: aliases}
	}
	r := newRegistry(1, []*store.Device{sd(1, "10.0.0.1", 641, "one@x"), sd(2, "10.0.0.2", 641), sd(3, "10.0.0.2", 642)})
	type want struct {
		peer   string
		ipOnly bool
		dev    emsd.Address // 0: none
	}
	check := func(step string, ws []want, aliases map[string]emsd.Address, n int) {
		t.Helper()
		for _, w := range ws {
			var got emsd.Address
			if d := r.byPeer(netip.MustParseAddrPort(w.peer), w.ipOnly); d != nil {
				got = d.addr
			}
			if got != w.dev {
				t.Errorf("%s: byPeer(%s, %v) = %v, want %v", step, w.peer, w.ipOnly, got, w.dev)
			}
		}
		for al, a := range aliases {
			var got emsd.Address
			if d := r.alias(al); d != nil {
				got = d.addr
			}
			if got != a {
				t.Errorf("%s: alias %s = %v, want %v", step, al, got, a)
			}
		}
		if r.size() != n {
			t.Errorf("%s: %d devices, want %d", step, r.size(), n)
		}
	}
	check("built", []want{{"10.0.0.1:9", false, 1}, {"10.0.0.2:642", false, 3}, {"10.0.0.2:9", false, 0}, {"10.0.0.2:9", true, 2}},
		map[string]emsd.Address{"ONE@x": 1}, 3)

	// 1 moves to 2's IP and loses its alias to 4; 3 goes; 5 comes.
	old := r.apply(7, map[emsd.Address]*store.Device{1: sd(1, "10.0.0.2", 700), 3: nil,
		4: sd(4, "10.0.0.4", 641, "one@x"), 5: sd(5, "10.0.0.5", 641)})
	if len(old) != 2 || old[1] == nil || old[3] == nil {
		t.Errorf("replaced entries %v, want 1 and 3", old)
	}
	check("applied", []want{{"10.0.0.1:641", false, 0}, {"10.0.0.2:700", false, 1}, {"10.0.0.2:642", false, 0},
		{"10.0.0.2:9", true, 1}, {"10.0.0.4:1", false, 4}, {"10.0.0.5:641", false, 5}},
		map[string]emsd.Address{"one@x": 4}, 4)
	if r.ver() != 7 {
		t.Errorf("version %d, want 7", r.ver())
	}
	// Back to one device at 10.0.0.2: found by IP alone again.
	r.apply(8, map[emsd.Address]*store.Device{1: nil})
	check("removed", []want{{"10.0.0.2:9", false, 2}}, map[string]emsd.Address{"one@x": 4}, 3)
}

// Devices added, changed and removed while the server runs reach its
// registry as changes: the registry is not rebuilt, and each look costs
// the devices changed.
func TestRegistryChangesApplied(t *testing.T) {
	db, err := sqlite.Open(context.Background(), filepath.Join(t.TempDir(), "own.db"), nil)
	must(t, err)
	defer db.Close()
	c := testConfig(t)
	c.Store.RegistryPoll = Duration(time.Hour)
	s := startServerWith(t, c, Options{Logger: testLogger(t), Store: db})
	ctx := context.Background()
	r := s.devs.current()
	n0 := r.size()
	for i := range uint32(20) {
		must(t, db.AddDevice(ctx, &store.Device{Address: 500000 + i, IP: netip.MustParseAddr("127.0.0.1"), Port: uint16(20000 + i),
			Version: "1.1", Mode: store.ModeComplete, Aliases: []string{fmt.Sprintf("d%d@example.net", i)}}))
		if !s.devs.reloadIfChanged(ctx, "test") {
			t.Fatalf("add %d: no change seen", i)
		}
	}
	must(t, db.RemoveDevice(ctx, 500003))
	must(t, db.UpdateDevice(ctx, &store.Device{Address: 500004, IP: netip.MustParseAddr("127.0.0.2"), Port: 641,
		Version: "1.0", Mode: store.ModeComplete}))
	if !s.devs.reloadIfChanged(ctx, "test") || s.devs.reloadIfChanged(ctx, "test") {
		t.Fatal("changes seen not exactly once")
	}
	if s.devs.current() != r {
		t.Fatal("registry rebuilt instead of changed")
	}
	if r.size() != n0+19 || r.get(500003) != nil || r.alias("d3@example.net") != nil || r.alias("d4@example.net") != nil {
		t.Errorf("after removing 500003 and updating 500004: %d devices (want %d)", r.size(), n0+19)
	}
	if d := r.get(500004); d == nil || d.version != emsd.V1_0 || d.ap != netip.MustParseAddrPort("127.0.0.2:641") {
		t.Errorf("500004 not updated: %+v", d)
	}
	if a, ok := s.devs.resolve("d19@example.net"); !ok || a != 500019 {
		t.Errorf("alias of an added device: %v %v", a, ok)
	}
	if v, _ := db.RegistryVersion(ctx); r.ver() != v {
		t.Errorf("registry at version %d, store at %d", r.ver(), v)
	}
}
