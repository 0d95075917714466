package open

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

func TestOpenSQLiteAccess(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "data")
	for _, a := range []Access{Existing, ReadOnly} {
		if _, err := Open(ctx, Config{Driver: SQLite, Dir: dir, Access: a}); !errors.Is(err, ErrNoStore) {
			t.Errorf("access %d on no store: %v, want ErrNoStore", a, err)
		}
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a store was looked for and something was created: %v", err)
	}
	db, err := Open(ctx, Config{Driver: SQLite, Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	must(t, db.Close())
	for _, a := range []Access{Existing, ReadOnly} {
		db, err := Open(ctx, Config{Driver: SQLite, Dir: dir, Access: a})
		if err != nil {
			t.Fatalf("access %d: %v", a, err)
		}
		must(t, db.Ping(ctx))
		must(t, db.Close())
	}
	if _, err := Open(ctx, Config{Driver: "mysql"}); err == nil || !strings.Contains(err.Error(), "mysql") {
		t.Errorf("unknown driver: %v", err)
	}
}

// A server's store locks its data directory until closed; the device
// commands' handles (no Serve) open beside it.
func TestOpenServeLocks(t *testing.T) {
	if runtime.GOOS == "windows" || runtime.GOOS == "plan9" {
		t.Skip("no flock on " + runtime.GOOS + ": the data directory is not locked")
	}
	ctx := context.Background()
	c := Config{Driver: SQLite, Dir: t.TempDir(), Serve: true}
	first, err := Open(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(ctx, c); !errors.Is(err, ErrDirLocked) || !strings.Contains(err.Error(), c.Dir) {
		t.Errorf("second server: %v, want ErrDirLocked naming %s", err, c.Dir)
	}
	cmd, err := Open(ctx, Config{Driver: SQLite, Dir: c.Dir, Access: Existing})
	if err != nil {
		t.Fatalf("device command beside the server: %v", err)
	}
	must(t, cmd.Close())
	must(t, first.Close())
	again, err := Open(ctx, c)
	if err != nil {
		t.Fatalf("after the first closed: %v", err)
	}
	must(t, again.Close())
}

func TestOpenServeWarnsLooseModes(t *testing.T) {
	dir := t.TempDir()
	must(t, os.Chmod(dir, 0o755))
	var logs bytes.Buffer
	db, err := Open(context.Background(), Config{Driver: SQLite, Dir: dir, Serve: true, Log: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	must(t, db.Close())
	if !strings.Contains(logs.String(), "data directory readable by others") || !strings.Contains(logs.String(), dir+" 0755") {
		t.Errorf("no warning for a 0755 directory:\n%s", logs.String())
	}
}

func TestLocation(t *testing.T) {
	for _, tc := range []struct {
		c            Config
		where, shown string
	}{
		{Config{Driver: SQLite, Dir: "/var/lib/emsdp"}, "/var/lib/emsdp/emsdp.db", "sqlite /var/lib/emsdp"},
		{Config{Driver: Postgres, Conninfo: "host=db password=secret"}, "host=db password=********", "postgres host=db password=********"},
		{Config{Driver: Postgres, Conninfo: "postgres://u:secret@db/emsdp"}, "postgres://u:********@db/emsdp", "postgres postgres://u:********@db/emsdp"},
	} {
		if got := tc.c.Location(); got != tc.where {
			t.Errorf("%+v: Location %q, want %q", tc.c, got, tc.where)
		}
		if got := tc.c.String(); got != tc.shown {
			t.Errorf("%+v: String %q, want %q", tc.c, got, tc.shown)
		}
	}
	if err := CheckConninfo("host=db password=secret port=x"); err == nil || strings.Contains(err.Error(), "secret") {
		t.Errorf("bad conninfo: %v", err)
	}
	if err := CheckConninfo("host=db dbname=emsdp"); err != nil {
		t.Errorf("good conninfo: %v", err)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
