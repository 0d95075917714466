package postgres

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/goleak"

	"github.com/esro-emsdp/emsdp/internal/pgtest"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/storetest"
)

// cluster is the one PostgreSQL server of this test binary, set by
// TestMain before any test runs and never changed after.
var cluster *pgtest.Server

func TestMain(m *testing.M) {
	if dsn := os.Getenv(helperEnv); dsn != "" {
		os.Exit(helperProcess(dsn))
	}
	srv, err := pgtest.Start(context.Background(), pgtest.Options{})
	if err != nil {
		// Fail, do not skip: CI installs PostgreSQL, and a backend that is
		// never tested must not look green.
		fmt.Fprintln(os.Stderr, "store/postgres tests need a PostgreSQL server:", err)
		os.Exit(1)
	}
	cluster = srv
	code := m.Run()
	if err := srv.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		code = 1
	}
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// testConfig is Open's, with a fast node keeper.
var testConfig = config{version: len(migrations), keepEvery: 50 * time.Millisecond}

func openConninfo(t testing.TB, dsn string) *DB {
	t.Helper()
	db, err := open(context.Background(), dsn, testConfig)
	if err != nil {
		t.Fatal(err)
	}
	return db
}

// openTemp opens a store on a fresh database; the store must be closed
// before the test ends (the database is dropped then).
func openTemp(t testing.TB) *DB {
	t.Helper()
	return openConninfo(t, cluster.NewDatabase(t))
}

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store {
		db, err := Open(context.Background(), cluster.NewDatabase(t))
		if err != nil {
			t.Fatal(err)
		}
		return db
	})
}

func mustT(t testing.TB, err error) {
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

func delivery(addr uint32, id string) store.NewDelivery {
	return store.NewDelivery{Device: addr, MessageID: id, ContentType: 32, Content: []byte(id), Priority: 1,
		NextAttempt: t0, Expires: t0.Add(time.Hour)}
}

// TestReopen: also, the submission of a closed handle (a gone node) is
// listed by the next.
func TestReopen(t *testing.T) {
	storetest.Reopen(t, func(t *testing.T) (store.Store, func(*testing.T) store.Store) {
		dsn := cluster.NewDatabase(t)
		open := func(t *testing.T) store.Store { return openConninfo(t, dsn) }
		return open(t), open
	})
}

// The operator's commands: MustExist and ReadOnly create nothing in a
// database without a store; a read-only handle reads beside a server's
// and cannot write.
func TestOpenExistingAndReadOnly(t *testing.T) {
	ctx := context.Background()
	dsn := cluster.NewDatabase(t)
	for _, o := range []Options{{MustExist: true}, {ReadOnly: true}} {
		if _, err := OpenWith(ctx, dsn, o); !errors.Is(err, ErrNoStore) {
			t.Fatalf("%+v on an empty database: %v, want ErrNoStore", o, err)
		}
	}
	rw := openConninfo(t, dsn)
	defer rw.Close()
	if v, err := rw.SchemaVersion(ctx); err != nil || v != len(migrations) {
		t.Fatalf("schema %d %v", v, err)
	}
	dev := &store.Device{Address: 198036, IP: netip.MustParseAddr("127.0.0.1"), Port: 641, Version: "1.1", Mode: store.ModeComplete}
	if err := rw.AddDevice(ctx, dev); err != nil {
		t.Fatal(err)
	}
	ro, err := OpenWith(ctx, dsn, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if ds, err := ro.Devices(ctx); err != nil || len(ds) != 1 {
		t.Fatalf("read-only devices %d %v", len(ds), err)
	}
	dev.Address = 198037
	if err := ro.AddDevice(ctx, dev); err == nil {
		t.Error("a read-only handle wrote")
	}
	ex, err := OpenWith(ctx, dsn, Options{MustExist: true})
	if err != nil {
		t.Fatal(err)
	}
	ex.Close()
}

// TestMigrations: a database at schema 1 with data is upgraded in place;
// servers opening a fresh database together migrate it once; a database
// from a newer program is refused.
func TestMigrations(t *testing.T) {
	ctx := context.Background()
	dsn := cluster.NewDatabase(t)
	db, err := open(ctx, dsn, config{version: 1})
	mustT(t, err)
	if v, _ := db.SchemaVersion(ctx); v != 1 {
		t.Fatalf("version %d, want 1", v)
	}
	// This program's AddDevice writes columns of later schemas: a row as
	// schema 1 knew it.
	_, err = db.pool.Exec(ctx, `INSERT INTO devices (address, password_hash, ip, port, version, mode, created, updated)
		VALUES (7, '', '127.0.0.1', 7, '1.1', 'complete', 0, 0)`)
	mustT(t, err)
	if _, err := db.NextMessageNumber(ctx, t0); err != nil {
		t.Fatal(err)
	}
	// Schema 1 has no queues yet.
	if err := db.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{delivery(7, "m")}}); err == nil {
		t.Error("enqueue on schema 1 succeeded")
	}
	mustT(t, db.Close())

	db = openConninfo(t, dsn)
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
	mustT(t, db.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{delivery(7, "m")}}))
	mustT(t, db.Close())

	// Reopening applies nothing twice.
	db = openConninfo(t, dsn)
	var rows int
	mustT(t, db.pool.QueryRow(ctx, `SELECT COUNT(*) FROM schema_version`).Scan(&rows))
	if rows != len(migrations) {
		t.Errorf("%d schema_version rows, want %d", rows, len(migrations))
	}
	_, err = db.pool.Exec(ctx, `INSERT INTO schema_version (version, applied) VALUES ($1, 0)`, len(migrations)+1)
	mustT(t, err)
	mustT(t, db.Close())
	if _, err := Open(ctx, dsn); !errors.Is(err, ErrSchemaTooNew) {
		t.Errorf("newer schema: %v", err)
	}

	// Several servers starting on an empty database at once.
	fresh := cluster.NewDatabase(t)
	errs := make(chan error, 4)
	dbs := make(chan *DB, 4)
	for range 4 {
		go func() {
			db, err := open(ctx, fresh, testConfig)
			errs <- err
			dbs <- db
		}()
	}
	for range 4 {
		if err := <-errs; err != nil {
			t.Errorf("concurrent open: %v", err)
		}
		if db := <-dbs; db != nil {
			defer db.Close()
		}
	}
}

// TestDSN: both DSN forms work; a bad one is refused; two deployments in
// separate schemas of one database do not see each other.
func TestDSN(t *testing.T) {
	ctx := context.Background()
	name, err := cluster.CreateDatabase(ctx)
	mustT(t, err)
	defer cluster.DropDatabase(ctx, name)
	for _, dsn := range []string{cluster.Conninfo(name), cluster.URL(name)} {
		db, err := Open(ctx, dsn)
		if err != nil {
			t.Fatalf("%s: %v", dsn, err)
		}
		mustT(t, db.Ping(ctx))
		mustT(t, db.Close())
	}
	for _, dsn := range []string{"postgres://%zz", "host=/nonexistent/dir dbname=x connect_timeout=2",
		cluster.Conninfo(name) + " search_path=nosuchschema"} {
		if db, err := Open(ctx, dsn); err == nil {
			db.Close()
			t.Errorf("%q accepted", dsn)
		}
	}

	admin, err := pgx.Connect(ctx, cluster.Conninfo(name))
	mustT(t, err)
	_, err = admin.Exec(ctx, `CREATE SCHEMA a; CREATE SCHEMA b`)
	admin.Close(ctx)
	mustT(t, err)
	a := openConninfo(t, cluster.Conninfo(name)+" search_path=a")
	defer a.Close()
	b := openConninfo(t, cluster.URL(name)+"&search_path=b")
	defer b.Close()
	if a.keys == b.keys {
		t.Error("schemas share advisory lock keys")
	}
	mustT(t, a.AddDevice(ctx, testDevice(1)))
	mustT(t, b.AddDevice(ctx, testDevice(1)))
	mustT(t, a.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{delivery(1, "a")}}))
	if d, err := b.ClaimDelivery(ctx, 1, t0, store.Limits{}); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("schema b claimed %v, %v", d, err)
	}
	if d, err := a.ClaimDelivery(ctx, 1, t0, store.Limits{}); err != nil || d.MessageID != "a" {
		t.Errorf("schema a claim: %v %v", d, err)
	}
}

// TestSessionSettings: commits are synchronous even where the database
// default says otherwise.
func TestSessionSettings(t *testing.T) {
	ctx := context.Background()
	name, err := cluster.CreateDatabase(ctx)
	mustT(t, err)
	defer cluster.DropDatabase(ctx, name)
	admin, err := pgx.Connect(ctx, cluster.Conninfo(name))
	mustT(t, err)
	_, err = admin.Exec(ctx, `ALTER DATABASE `+name+` SET synchronous_commit = off`)
	admin.Close(ctx)
	mustT(t, err)
	db := openConninfo(t, cluster.Conninfo(name))
	defer db.Close()
	for _, tc := range []struct{ name, want string }{
		{"synchronous_commit", "on"},
		{"idle_in_transaction_session_timeout", "1min"},
		{"transaction_isolation", "read committed"},
	} {
		var got string
		err := db.tx(ctx, func(tx pgx.Tx) error { return tx.QueryRow(ctx, "SHOW "+tc.name).Scan(&got) })
		mustT(t, err)
		if got != tc.want {
			t.Errorf("%s = %s, want %s", tc.name, got, tc.want)
		}
	}
}

// TestOctets: every string the caller chooses round-trips octet for
// octet, whatever it holds (PostgreSQL text would refuse NUL and invalid
// UTF-8), and aliases sort bytewise as in store/sqlite.
func TestOctets(t *testing.T) {
	db := openTemp(t)
	defer db.Close()
	ctx := context.Background()
	odd := "a\x00b\xff\xfe\xc3(z"
	d := testDevice(5)
	d.PasswordHash, d.Version = odd, odd
	d.Aliases = []string{"b@x", "éa@x", "a@x", "Z\x00@x"}
	mustT(t, db.AddDevice(ctx, d))
	got, err := db.Device(ctx, 5)
	mustT(t, err)
	if got.PasswordHash != odd || got.Version != odd ||
		!slices.Equal(got.Aliases, []string{"a@x", "b@x", "z\x00@x", "éa@x"}) {
		t.Errorf("device %q %q %q", got.PasswordHash, got.Version, got.Aliases)
	}

	rep := store.Report{Device: 9, Mail: odd + "m", Flags: 0x60, Recipient: odd + "r", MessageID: odd + "i",
		Headers: []byte(odd + "h")}
	nd := delivery(5, odd)
	nd.Report = rep
	mustT(t, db.Enqueue(ctx, store.Work{
		Deliveries: []store.NewDelivery{nd},
		Relays: []store.NewRelay{{From: odd + "f", Message: []byte(odd), NextAttempt: t0, Expires: t0.Add(time.Hour),
			Recipients: []store.RelayRecipient{{Addr: odd + "@x", Report: rep}}}},
	}))
	c, err := db.ClaimDelivery(ctx, 5, t0, store.Limits{})
	mustT(t, err)
	if c.MessageID != odd || c.Report.Mail != rep.Mail || c.Report.Recipient != rep.Recipient ||
		c.Report.MessageID != rep.MessageID || !bytes.Equal(c.Report.Headers, rep.Headers) {
		t.Errorf("delivery %+v", c)
	}
	mustT(t, db.FinishDelivery(ctx, c.ID, store.DeliveryInFlight, store.DeliveryResult{State: store.DeliveryQueued,
		NextAttempt: t0, Error: odd, Status: 3}))
	if st, err := db.DeliveryStatus(ctx, 5, odd); err != nil || st != 3 {
		t.Errorf("status %d %v", st, err)
	}
	c, err = db.ClaimDelivery(ctx, 5, t0, store.Limits{})
	mustT(t, err)
	if c.LastError != odd {
		t.Errorf("last error %q", c.LastError)
	}
	bs, err := db.ClaimRelays(ctx, t0, 10)
	mustT(t, err)
	if len(bs) != 1 || bs[0].From != odd+"f" || string(bs[0].Message) != odd || bs[0].Recipients[0].Addr != odd+"@x" ||
		bs[0].Recipients[0].Report.Recipient != rep.Recipient {
		t.Fatalf("relay %+v", bs)
	}
	mustT(t, db.FinishRelays(ctx, []store.RelayResult{{ID: bs[0].Recipients[0].ID, From: store.RelaySending,
		State: store.RelayQueued, NextAttempt: t0, Error: odd}}, store.Work{}))
	exp, err := db.ExpiredRelays(ctx, t0.Add(2*time.Hour), 10)
	mustT(t, err)
	if len(exp) != 1 || exp[0].Recipients[0].LastError != odd {
		t.Errorf("expired relay %+v", exp)
	}

	sub, _, err := db.AddSubmission(ctx, &store.Submission{Device: 5, ContentHash: []byte{0}, ContentType: 32,
		Content: []byte{}, Received: t0}, t0)
	mustT(t, err)
	ok, err := db.DropSubmission(ctx, sub.ID, odd)
	mustT(t, err)
	again, dup, err := db.AddSubmission(ctx, &store.Submission{Device: 5, ContentHash: []byte{0}, Received: t0}, t0)
	mustT(t, err)
	if !ok || !dup || again.Verify != odd || again.Content == nil {
		t.Errorf("submission %v %v %+v", ok, dup, again)
	}
}

// TestClosedAndCancelled: a cancelled write is not applied; nothing works
// after Close, which can be called twice.
func TestClosedAndCancelled(t *testing.T) {
	db := openTemp(t)
	ctx := context.Background()
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := db.AddDevice(cctx, testDevice(9999)); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled write: %v", err)
	}
	if _, err := db.Device(ctx, 9999); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("cancelled write applied: %v", err)
	}
	mustT(t, db.Close())
	mustT(t, db.Close())
	for name, err := range map[string]error{
		"AddDevice": db.AddDevice(ctx, testDevice(1)),
		"Ping":      db.Ping(ctx),
		"Enqueue":   db.Enqueue(ctx, store.Work{Deliveries: []store.NewDelivery{delivery(1, "m")}}),
		"Device":    second(db.Device(ctx, 1)),
		"Devices":   second(db.Devices(ctx)),
		"Stats":     second(db.Stats(ctx)),
		"Expired":   second(db.ExpiredRelays(ctx, t0, 1)),
	} {
		if !errors.Is(err, ErrClosed) {
			t.Errorf("%s after Close: %v", name, err)
		}
	}
}

func second[T any](_ T, err error) error { return err }

// TestLimitSemantics: list limits read as in store/sqlite (negative: no
// limit, zero: nothing).
func TestLimitSemantics(t *testing.T) {
	db := openTemp(t)
	defer db.Close()
	ctx := context.Background()
	var ds []store.NewDelivery
	for i := range 3 {
		ds = append(ds, delivery(1, fmt.Sprint(i)))
	}
	mustT(t, db.Enqueue(ctx, store.Work{Deliveries: ds, Relays: []store.NewRelay{{Message: []byte("m"), NextAttempt: t0,
		Expires: t0.Add(time.Hour), Recipients: []store.RelayRecipient{{Addr: "a@x"}, {Addr: "b@x"}}}}}))
	for _, tc := range []struct{ limit, want int }{{-1, 3}, {0, 0}, {2, 2}} {
		exp, err := db.ExpiredDeliveries(ctx, t0.Add(2*time.Hour), tc.limit)
		mustT(t, err)
		if len(exp) != tc.want {
			t.Errorf("limit %d: %d expired, want %d", tc.limit, len(exp), tc.want)
		}
	}
	bs, err := db.ClaimRelays(ctx, t0, 0)
	mustT(t, err)
	if len(bs) != 0 {
		t.Errorf("limit 0 claimed %+v", bs)
	}
	bs, err = db.ClaimRelays(ctx, t0, -1)
	mustT(t, err)
	if len(bs) != 1 || len(bs[0].Recipients) != 2 {
		t.Errorf("limit -1 claimed %+v", bs)
	}
}

// TestErrorsWrapped: database failures name the operation and keep the
// PostgreSQL error reachable.
func TestErrorsWrapped(t *testing.T) {
	db := openTemp(t)
	defer db.Close()
	ctx := context.Background()
	_, err := db.pool.Exec(ctx, `DROP TABLE delivery_status`)
	mustT(t, err)
	_, err = db.DeliveryStatus(ctx, 1, "m")
	if err == nil || !strings.Contains(err.Error(), "postgres: delivery status") || errors.Is(err, store.ErrNotFound) {
		t.Errorf("error %v", err)
	}
}
