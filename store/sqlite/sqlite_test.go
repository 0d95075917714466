package sqlite

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/storetest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func openTemp(t *testing.T) *DB {
	t.Helper()
	db, err := Open(context.Background(), filepath.Join(t.TempDir(), FileName), nil)
	if err != nil {
		t.Fatal(err)
	}
	return db
}

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store { return openTemp(t) })
}

func mustT(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

var t0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

func testDevice(addr uint32) *store.Device {
	return &store.Device{Address: addr, IP: netip.MustParseAddr("127.0.0.1"), Port: uint16(addr % 60000),
		Version: "1.1", Mode: store.ModeComplete}
}

func TestReopen(t *testing.T) {
	storetest.Reopen(t, func(t *testing.T) (store.Store, func(*testing.T) store.Store) {
		path := filepath.Join(t.TempDir(), FileName)
		open := func(t *testing.T) store.Store {
			db, err := Open(context.Background(), path, nil)
			mustT(t, err)
			return db
		}
		return open(t), open
	})
}

// TestMigrations: a database at schema 1 with data is upgraded in place;
// a database from a newer program is refused.
func TestMigrations(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), FileName)
	db, err := open(ctx, path, nil, 1)
	mustT(t, err)
	if v, _ := db.SchemaVersion(ctx); v != 1 {
		t.Fatalf("version %d, want 1", v)
	}
	// This program's AddDevice writes columns of later schemas: a row as
	// schema 1 knew it.
	_, err = db.sql.ExecContext(ctx, `INSERT INTO devices (address, ip, port, version, mode, created, updated)
		VALUES (7, '127.0.0.1', 7, '1.1', 'complete', 0, 0)`)
	mustT(t, err)
	if _, err := db.NextMessageNumber(ctx, t0); err != nil {
		t.Fatal(err)
	}
	// Schema 1 has no queues yet.
	if err := db.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{{Device: 7, MessageID: "m", Expires: t0}}}); err == nil {
		t.Error("enqueue on schema 1 succeeded")
	}
	mustT(t, db.Close())

	db, err = Open(ctx, path, nil)
	mustT(t, err)
	if v, _ := db.SchemaVersion(ctx); v != len(migrations) {
		t.Errorf("version %d, want %d", v, len(migrations))
	}
	if d, err := db.Device(ctx, 7); err != nil || d.Contact.Known() {
		t.Errorf("device after migration: %+v, %v", d, err)
	}
	// Schema 3 added contacts: a device from before has none, and can get one.
	c := store.Contact{Addr: netip.MustParseAddrPort("127.0.0.3:27999"), Via: "mts", At: t0}
	if _, written, err := db.SetContact(ctx, 7, c); err != nil || !written {
		t.Errorf("contact on a migrated device: %v", err)
	}
	if got, err := db.DeviceContact(ctx, 7); err != nil || got.Addr != c.Addr {
		t.Errorf("contact on a migrated device: %+v %v", got, err)
	}
	if n, _ := db.NextMessageNumber(ctx, t0); n != 2 {
		t.Errorf("counter after migration %d, want 2", n)
	}
	mustT(t, db.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{{Device: 7, MessageID: "m", Expires: t0}}}))
	// Reopening applies nothing twice.
	mustT(t, db.Close())
	db, err = Open(ctx, path, nil)
	mustT(t, err)
	var rows int
	mustT(t, db.sql.QueryRowContext(ctx, `SELECT COUNT(*) FROM schema_version`).Scan(&rows))
	if rows != len(migrations) {
		t.Errorf("%d schema_version rows, want %d", rows, len(migrations))
	}
	_, err = db.sql.ExecContext(ctx, `INSERT INTO schema_version (version, applied) VALUES (?, 0)`, len(migrations)+1)
	mustT(t, err)
	mustT(t, db.Close())
	if _, err := Open(ctx, path, nil); !errors.Is(err, ErrSchemaTooNew) {
		t.Errorf("newer schema: %v", err)
	}
	if _, err := Open(ctx, filepath.Join(t.TempDir(), "a?b.db"), nil); err == nil {
		t.Error("path with '?' accepted")
	}
}

// TestTwoHandles: two handles on one file (as the server and a device
// command are) write concurrently without losing or failing anything.
func TestTwoHandles(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), FileName)
	a, err := Open(ctx, path, nil)
	mustT(t, err)
	defer a.Close()
	b, err := Open(ctx, path, nil)
	mustT(t, err)
	defer b.Close()
	var wg sync.WaitGroup
	for i, db := range []*DB{a, b} {
		wg.Go(func() {
			for k := range 50 {
				addr := uint32(1000*(i+1) + k)
				if err := db.AddDevice(ctx, testDevice(addr)); err != nil {
					t.Error(err)
					return
				}
				if _, err := db.NextMessageNumber(ctx, t0); err != nil {
					t.Error(err)
					return
				}
				if err := db.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{{Device: addr, MessageID: "m",
					Content: []byte{1}, NextAttempt: t0, Expires: t0.Add(time.Hour)}}}); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	devs, err := b.Devices(ctx)
	mustT(t, err)
	st, err := a.Stats(ctx)
	mustT(t, err)
	if len(devs) != 100 || st.Deliveries[store.DeliveryQueued] != 100 {
		t.Errorf("%d devices, %d deliveries; want 100 each", len(devs), st.Deliveries[store.DeliveryQueued])
	}
	if n, _ := a.NextMessageNumber(ctx, t0); n != 101 {
		t.Errorf("shared counter at %d, want 101", n)
	}
}

// helperEnv names the database a re-executed test binary writes to.
const helperEnv = "EMSDP_SQLITE_HELPER_DB"

// TestHelperProcess is not a test: run as a subprocess by the tests below,
// it adds devices and deliveries and prints each committed address.
func TestHelperProcess(t *testing.T) {
	path := os.Getenv(helperEnv)
	if path == "" {
		t.Skip("helper process only")
	}
	ctx := context.Background()
	db, err := Open(ctx, path, nil)
	if err != nil {
		fmt.Println("open:", err)
		os.Exit(1)
	}
	for k := range 100000 {
		addr := uint32(500000 + k)
		if err := db.AddDevice(ctx, testDevice(addr)); err != nil {
			fmt.Println("add:", err)
			os.Exit(1)
		}
		if err := db.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{{Device: addr, MessageID: "m",
			Content: []byte{1}, NextAttempt: t0, Expires: t0.Add(time.Hour)}}}); err != nil {
			fmt.Println("enqueue:", err)
			os.Exit(1)
		}
		fmt.Println("committed", addr)
	}
	os.Exit(0)
}

// TestOtherProcessKilled: another process writes while this one does, and
// is killed with SIGKILL mid-stream; everything it reported committed is
// there, the database is intact and this process never saw an error.
func TestOtherProcessKilled(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), FileName)
	db, err := Open(ctx, path, nil)
	mustT(t, err)
	defer db.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$")
	cmd.Env = append(os.Environ(), helperEnv+"="+path)
	out, err := cmd.StdoutPipe()
	mustT(t, err)
	mustT(t, cmd.Start())
	sc := bufio.NewScanner(out)
	var committed []uint32
	done := make(chan struct{})
	go func() {
		defer close(done)
		for k := 0; k < 40; k++ {
			if err := db.AddDevice(ctx, testDevice(uint32(1+k))); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	for sc.Scan() {
		var addr uint32
		if _, err := fmt.Sscanf(sc.Text(), "committed %d", &addr); err != nil {
			t.Fatalf("helper: %s", sc.Text())
		}
		committed = append(committed, addr)
		if len(committed) == 60 {
			cmd.Process.Kill()
			break
		}
	}
	cmd.Wait()
	<-done
	for _, addr := range committed {
		if _, err := db.Device(ctx, addr); err != nil {
			t.Fatalf("device %d reported committed: %v", addr, err)
		}
	}
	var check string
	mustT(t, db.sql.QueryRowContext(ctx, `PRAGMA integrity_check`).Scan(&check))
	if check != "ok" {
		t.Errorf("integrity check: %s", check)
	}
	st, err := db.Stats(ctx)
	mustT(t, err)
	if st.Devices < 40+len(committed) || st.Deliveries[store.DeliveryQueued] < len(committed) {
		t.Errorf("stats %+v after %d committed", st, len(committed))
	}
}

// TestGroupCommit: concurrent writes share transactions, yet each one
// succeeds or fails alone: a failing write (a duplicate address) leaves
// the writes committed with it intact.
func TestGroupCommit(t *testing.T) {
	db := openTemp(t)
	defer db.Close()
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make([]error, 200)
	for i := range errs {
		wg.Go(func() { errs[i] = db.AddDevice(ctx, testDevice(uint32(1+i/2))) })
	}
	wg.Wait()
	exists := 0
	for _, err := range errs {
		switch {
		case errors.Is(err, store.ErrExists):
			exists++
		case err != nil:
			t.Fatal(err)
		}
	}
	devs, err := db.Devices(ctx)
	mustT(t, err)
	if exists != 100 || len(devs) != 100 {
		t.Errorf("%d duplicates refused, %d devices; want 100 each", exists, len(devs))
	}
	// A cancelled write is not applied.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := db.AddDevice(cctx, testDevice(9999)); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled write: %v", err)
	}
	if _, err := db.Device(ctx, 9999); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("cancelled write applied: %v", err)
	}
	mustT(t, db.Close())
	if err := db.AddDevice(ctx, testDevice(10000)); !errors.Is(err, ErrClosed) {
		t.Errorf("write after close: %v", err)
	}
}

// The operator's commands open only an existing store (a mistyped
// directory is an error, not a new store), and listings read only.
func TestOpenExistingAndReadOnly(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "data dir #1") // a URI needs escaping
	for _, o := range []*Options{{MustExist: true}, {ReadOnly: true}} {
		if _, err := OpenDir(ctx, dir, o); !errors.Is(err, ErrNoDatabase) || !strings.Contains(err.Error(), dir) {
			t.Errorf("%+v: %v, want ErrNoDatabase naming the path", o, err)
		}
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("%+v created %s", o, dir)
		}
	}
	db, err := OpenDir(ctx, dir, nil)
	mustT(t, err)
	dev := &store.Device{Address: 198036, IP: netip.MustParseAddr("127.0.0.1"), Port: 641, Version: "1.1", Mode: store.ModeComplete}
	mustT(t, db.AddDevice(ctx, dev))

	ro, err := OpenDir(ctx, dir, &Options{ReadOnly: true})
	mustT(t, err)
	defer ro.Close()
	// Beside the writer, as emsdp device list beside emsdp serve.
	dev.Address = 198037
	mustT(t, db.AddDevice(ctx, dev))
	ds, err := ro.Devices(ctx)
	mustT(t, err)
	if len(ds) != 2 {
		t.Errorf("read-only handle sees %d devices, want 2", len(ds))
	}
	dev.Address = 198038
	if err := ro.AddDevice(ctx, dev); err == nil {
		t.Error("a read-only handle wrote")
	}
	mustT(t, db.Close())
	ex, err := OpenDir(ctx, dir, &Options{MustExist: true})
	mustT(t, err)
	mustT(t, ex.Close())
}
