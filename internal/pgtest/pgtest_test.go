package pgtest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/goleak"
)

// helperEnv makes the test binary a child that starts a server, prints its
// directory and waits to be killed.
const helperEnv = "PGTEST_HELPER_START"

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) != "" {
		os.Exit(helperStart())
	}
	goleak.VerifyTestMain(m)
}

func helperStart() int {
	s, err := Start(context.Background(), Options{NoFsync: true})
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	fmt.Println("started", s.dir, s.Conninfo("postgres"))
	select {} // until killed
}

func TestFindBinaries(t *testing.T) {
	fake := t.TempDir()
	for _, b := range []string{"initdb", "pg_ctl", "postgres"} {
		if err := os.WriteFile(filepath.Join(fake, b), []byte("#!/bin/sh\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	partial := t.TempDir()
	if err := os.WriteFile(filepath.Join(partial, "initdb"), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	notExec := t.TempDir()
	for _, b := range []string{"initdb", "pg_ctl", "postgres"} {
		if err := os.WriteFile(filepath.Join(notExec, b), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	empty := ""
	inPath := partial + string(os.PathListSeparator) + fake
	for _, tc := range []struct {
		name string
		o    Options
		want string
	}{
		{"from PATH", Options{Path: &inPath, Dirs: []string{}}, fake},
		{"from the extra dirs", Options{Path: &empty, Dirs: []string{partial, notExec, fake}}, fake},
		{"incomplete or not executable", Options{Path: &empty, Dirs: []string{partial, notExec}}, ""},
		{"nothing", Options{Path: &empty, Dirs: []string{}}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := FindBinaries(tc.o)
			if tc.want == "" {
				if !errors.Is(err, ErrNoPostgres) || !strings.Contains(err.Error(), "apt-get install -y postgresql") {
					t.Fatalf("got %q, %v; want ErrNoPostgres with an install hint", got, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %q, %v; want %q", got, err, tc.want)
			}
		})
	}
	// Start reports the same error.
	if _, err := Start(context.Background(), Options{Path: &empty, Dirs: []string{}}); !errors.Is(err, ErrNoPostgres) {
		t.Errorf("Start without binaries: %v", err)
	}
}

// TestServer: a cluster starts, hands out separate databases that accept
// writes, drops them, and leaves nothing behind when stopped.
func TestServer(t *testing.T) {
	ctx := context.Background()
	s, err := Start(ctx, Options{NoFsync: true})
	if err != nil {
		t.Fatal(err)
	}
	dir := s.dir
	var dbs []string
	t.Run("databases", func(t *testing.T) {
		for i := range 2 {
			dsn := s.NewDatabase(t)
			c, err := pgx.Connect(ctx, dsn)
			if err != nil {
				t.Fatal(err)
			}
			var name string
			if err := c.QueryRow(ctx, `SELECT current_database()`).Scan(&name); err != nil {
				t.Fatal(err)
			}
			dbs = append(dbs, name)
			if _, err := c.Exec(ctx, `CREATE TABLE t (v int); INSERT INTO t VALUES (1)`); err != nil {
				t.Fatalf("database %d: %v", i, err)
			}
			c.Close(ctx)
		}
		// The URL form reaches the same server.
		c, err := pgx.Connect(ctx, s.URL("postgres"))
		if err != nil {
			t.Fatal(err)
		}
		c.Close(ctx)
	})
	if len(dbs) != 2 || dbs[0] == dbs[1] {
		t.Fatalf("databases %v", dbs)
	}
	// Dropped at the end of the subtest.
	c, err := pgx.Connect(ctx, s.Conninfo("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	var n int
	if err := c.QueryRow(ctx, `SELECT COUNT(*) FROM pg_database WHERE datname = ANY($1)`, dbs).Scan(&n); err != nil {
		t.Fatal(err)
	}
	c.Close(ctx)
	if n != 0 {
		t.Errorf("%d test databases left", n)
	}

	// A crash-style restart keeps committed data and cuts sessions.
	c, err = pgx.Connect(ctx, s.Conninfo("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, `CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)`); err != nil {
		t.Fatal(err)
	}
	if err := s.Restart(ctx, true); err != nil {
		t.Fatal(err)
	}
	if err := c.Ping(ctx); err == nil {
		t.Error("session survived the restart")
	}
	c.Close(ctx)
	c, err = pgx.Connect(ctx, s.Conninfo("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	var v int
	if err := c.QueryRow(ctx, `SELECT v FROM kept`).Scan(&v); err != nil || v != 42 {
		t.Errorf("after restart: %d %v", v, err)
	}
	c.Close(ctx)

	// An outage: halted, nothing answers; resumed, the data is there.
	if err := s.Halt(ctx, true); err != nil {
		t.Fatal(err)
	}
	if c, err := pgx.Connect(ctx, s.Conninfo("postgres")); err == nil {
		c.Close(ctx)
		t.Error("a halted server answers")
	}
	if err := s.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	c, err = pgx.Connect(ctx, s.Conninfo("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.QueryRow(ctx, `SELECT v FROM kept`).Scan(&v); err != nil || v != 42 {
		t.Errorf("after an outage: %d %v", v, err)
	}
	c.Close(ctx)

	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("directory left behind: %v", err)
	}
	if _, err := pgx.Connect(ctx, s.Conninfo("postgres")); err == nil {
		t.Error("server still answers after Stop")
	}
}

// TestWatchdog: a test binary killed with SIGKILL (no cleanup runs) does
// not leave its server running.
func TestWatchdog(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=1")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	if !sc.Scan() {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatal("helper printed nothing")
	}
	f := strings.SplitN(sc.Text(), " ", 3)
	if f[0] != "started" || len(f) != 3 {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("helper: %s", sc.Text())
	}
	dir, dsn := f[1], f[2]
	defer os.RemoveAll(dir)
	ctx := context.Background()
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("helper's server: %v", err)
	}
	c.Close(ctx)
	cmd.Process.Kill()
	cmd.Wait()
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := os.Stat(filepath.Join(dir, "data", "postmaster.pid"))
		if os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("server still running 30 s after its test binary was killed")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if c, err := pgx.Connect(ctx, dsn); err == nil {
		c.Close(ctx)
		t.Error("server answers after its test binary was killed")
	}
}
