package server

import (
	"context"
	"errors"
	"log/slog"
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
	s.recheck.Lock()
	s.recheckAt = time.Time{} // as if registryRecheck had passed
	s.recheck.Unlock()
	if err := submit(); err != nil {
		t.Fatalf("device added to the store: %v", err)
	}
	if _, ok := s.registry().byAddr[198036]; !ok {
		t.Error("registry not reloaded")
	}
}
