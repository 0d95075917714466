// Package pgtest runs a throwaway PostgreSQL server for tests: it finds the
// server binaries, initdb's a cluster in a temporary directory (trust
// authentication, listening only on a Unix socket inside that directory),
// starts it with pg_ctl and hands out one fresh database per test.
//
// One server per test binary is enough (start it in TestMain); databases
// keep the tests apart. PostgreSQL refuses to run as root, so under euid 0
// the server runs as the "postgres" system user (the Debian package creates
// it; Start creates it with useradd when it is missing).
//
// A watchdog shell holds the read end of a pipe whose write end only this
// process has: when the test binary exits for any reason (including a
// timeout panic or SIGKILL), the watchdog sees EOF and stops the server, so
// no server outlives its tests.
package pgtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5"
)

// ErrNoPostgres: the PostgreSQL server binaries were not found.
var ErrNoPostgres = errors.New("pgtest: PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in PATH or " +
	"/usr/lib/postgresql/*/bin; install them, e.g. `apt-get install -y postgresql`, or run ./test.sh, which installs what the tests need")

// Superuser is the database superuser of the test cluster.
const Superuser = "postgres"

// port names the socket file; nothing listens on TCP.
const port = 5432

// Options tune Start. The zero value is usable.
type Options struct {
	// NoFsync turns fsync off: faster, and enough for tests that never
	// crash the server itself. Benchmarks keep it on to be comparable with
	// the embedded store.
	NoFsync bool
	// Dirs replaces the directories searched for the binaries after PATH
	// (default: /usr/lib/postgresql/*/bin, newest version first).
	Dirs []string
	// Path replaces $PATH for the search (tests of the search itself).
	Path *string
}

// Server is a running throwaway cluster.
type Server struct {
	bin      string      // directory of initdb, pg_ctl, postgres
	dir      string      // temporary directory: data, socket, log
	sock     string      // socket directory
	cred     *serverCred // nil: run the server as this process's user
	watchdog *exec.Cmd
	stopPipe io.WriteCloser
	seq      atomic.Int64
	opts     string // the server's options (pg_ctl -o), for Halt and Resume
}

// FindBinaries returns the directory holding initdb, pg_ctl and postgres.
func FindBinaries(o Options) (string, error) {
	path := os.Getenv("PATH")
	if o.Path != nil {
		path = *o.Path
	}
	dirs := filepath.SplitList(path)
	extra := o.Dirs
	if extra == nil {
		extra, _ = filepath.Glob("/usr/lib/postgresql/*/bin")
		// Newest major version first ("9.6" < "15": compare numerically).
		sort.Slice(extra, func(i, j int) bool { return version(extra[i]) > version(extra[j]) })
	}
	for _, d := range append(dirs, extra...) {
		if d == "" {
			continue
		}
		ok := true
		for _, b := range []string{"initdb", "pg_ctl", "postgres"} {
			if fi, err := os.Stat(filepath.Join(d, b)); err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
				ok = false
				break
			}
		}
		if ok {
			// PATH entries are often symlinks into the real bin directory;
			// pg_ctl finds postgres next to itself either way.
			return d, nil
		}
	}
	return "", ErrNoPostgres
}

func version(binDir string) float64 {
	v, _ := strconv.ParseFloat(filepath.Base(filepath.Dir(binDir)), 64)
	return v
}

// Start initialises and starts a cluster in a new temporary directory.
func Start(ctx context.Context, o Options) (s *Server, err error) {
	bin, err := FindBinaries(o)
	if err != nil {
		return nil, err
	}
	s = &Server{bin: bin}
	if os.Geteuid() == 0 {
		if s.cred, err = serverUser(ctx); err != nil {
			return nil, err
		}
	}
	if s.dir, err = os.MkdirTemp("", "pgtest-"); err != nil {
		return nil, fmt.Errorf("pgtest: %w", err)
	}
	defer func() {
		if err != nil {
			s.Stop()
		}
	}()
	s.sock = filepath.Join(s.dir, "sock")
	if err := os.Mkdir(s.sock, 0o700); err != nil {
		return nil, fmt.Errorf("pgtest: %w", err)
	}
	if s.cred != nil {
		for _, d := range []string{s.dir, s.sock} {
			if err := os.Chown(d, int(s.cred.Uid), int(s.cred.Gid)); err != nil {
				return nil, fmt.Errorf("pgtest: hand %s to the server user: %w", d, err)
			}
		}
	}
	data := filepath.Join(s.dir, "data")
	if out, err := s.run(ctx, "initdb", "-D", data, "-U", Superuser, "-A", "trust", "--no-locale", "-E", "UTF8",
		"--no-sync"); err != nil {
		return nil, fmt.Errorf("pgtest: initdb: %w\n%s", err, out)
	}
	fsync := "on"
	if o.NoFsync {
		fsync = "off"
	}
	opts := fmt.Sprintf("-c listen_addresses='' -k %s -p %d -c fsync=%s -c max_connections=200 -c shared_buffers=32MB",
		s.sock, port, fsync)
	s.opts = opts
	logFile := filepath.Join(s.dir, "server.log")
	// The watchdog first: if anything below fails or this process dies,
	// it stops whatever got started.
	if err := s.startWatchdog(data); err != nil {
		return nil, err
	}
	if out, err := s.run(ctx, "pg_ctl", "-D", data, "-l", logFile, "-o", opts, "-w", "-t", "60", "start"); err != nil {
		log, _ := os.ReadFile(logFile)
		return nil, fmt.Errorf("pgtest: pg_ctl start: %w\n%s\n%s", err, out, tail(log, 2000))
	}
	return s, nil
}

func (s *Server) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	c := exec.CommandContext(ctx, filepath.Join(s.bin, name), args...)
	c.Dir = s.dir
	c.Env = append(os.Environ(), "LC_ALL=C", "PGTZ=UTC")
	runAs(c, s.cred)
	return c
}

func (s *Server) run(ctx context.Context, name string, args ...string) ([]byte, error) {
	return s.command(ctx, name, args...).CombinedOutput()
}

// startWatchdog starts `sh` blocked reading a pipe only this process can
// write: EOF (Stop, or this process gone) makes it stop the server.
func (s *Server) startWatchdog(data string) error {
	c := exec.Command("/bin/sh", "-c", `read -r _; exec "$0" -D "$1" -m fast -w -t 60 stop`,
		filepath.Join(s.bin, "pg_ctl"), data)
	c.Dir = s.dir
	c.Env = append(os.Environ(), "LC_ALL=C")
	runAs(c, s.cred)
	// Detach from the terminal's process group so that ^C reaches only
	// the test binary; the watchdog still stops the server after it.
	detach(c)
	w, err := c.StdinPipe()
	if err != nil {
		return fmt.Errorf("pgtest: watchdog: %w", err)
	}
	if err := c.Start(); err != nil {
		return fmt.Errorf("pgtest: watchdog: %w", err)
	}
	s.watchdog, s.stopPipe = c, w
	return nil
}

// Stop stops the server and removes its directory.
func (s *Server) Stop() error {
	var err error
	if s.watchdog != nil {
		s.stopPipe.Close()
		if werr := s.watchdog.Wait(); werr != nil && !isNotRunning(werr) {
			err = fmt.Errorf("pgtest: stop: %w", werr)
		}
		s.watchdog = nil
	}
	if s.dir != "" {
		if rerr := os.RemoveAll(s.dir); rerr != nil && err == nil {
			err = fmt.Errorf("pgtest: %w", rerr)
		}
		s.dir = ""
	}
	return err
}

// isNotRunning: pg_ctl stop exits 1 when no server runs (Start failed
// before pg_ctl start); nothing to report then.
func isNotRunning(err error) bool {
	var ee *exec.ExitError
	return errors.As(err, &ee) && ee.ExitCode() == 1
}

// Conninfo returns the key=value connection string of database db.
func (s *Server) Conninfo(db string) string {
	return fmt.Sprintf("host=%s port=%d user=%s dbname=%s sslmode=disable", s.sock, port, Superuser, db)
}

// URL returns the postgres:// connection string of database db.
func (s *Server) URL(db string) string {
	return fmt.Sprintf("postgres://%s@/%s?host=%s&port=%d&sslmode=disable", Superuser, db, s.sock, port)
}

// CreateDatabase creates an empty database and returns its name.
func (s *Server) CreateDatabase(ctx context.Context) (string, error) {
	name := fmt.Sprintf("test_%d_%d", os.Getpid(), s.seq.Add(1))
	err := s.admin(ctx, "CREATE DATABASE "+name+" TEMPLATE template0")
	if err != nil {
		return "", err
	}
	return name, nil
}

// DropDatabase drops a database, ending any sessions still connected.
func (s *Server) DropDatabase(ctx context.Context, name string) error {
	return s.admin(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)")
}

func (s *Server) admin(ctx context.Context, sql string) error {
	c, err := pgx.Connect(ctx, s.Conninfo("postgres"))
	if err != nil {
		return fmt.Errorf("pgtest: connect: %w", err)
	}
	defer c.Close(context.WithoutCancel(ctx))
	if _, err := c.Exec(ctx, sql); err != nil {
		return fmt.Errorf("pgtest: %s: %w", sql, err)
	}
	return nil
}

// NewDatabase creates a database for one test and drops it when the test
// ends; it returns the key=value connection string (conninfo).
func (s *Server) NewDatabase(tb testing.TB) string {
	tb.Helper()
	name, err := s.CreateDatabase(context.Background())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := s.DropDatabase(context.Background(), name); err != nil {
			tb.Error(err)
		}
	})
	return s.Conninfo(name)
}

// Log returns the end of the server log (for failure messages).
func (s *Server) Log() string {
	b, _ := os.ReadFile(filepath.Join(s.dir, "server.log"))
	return tail(b, 4000)
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		}
	}
	return strings.TrimSpace(string(b))
}

// Halt stops the server (as a crash would with immediate: no shutdown
// checkpoint, every session cut) and leaves it stopped until Resume: an
// outage of the database. Stop still cleans up after a Halt.
func (s *Server) Halt(ctx context.Context, immediate bool) error {
	mode := "fast"
	if immediate {
		mode = "immediate"
	}
	if out, err := s.run(ctx, "pg_ctl", "-D", filepath.Join(s.dir, "data"), "-m", mode, "-w", "-t", "60", "stop"); err != nil {
		return fmt.Errorf("pgtest: pg_ctl stop: %w\n%s", err, out)
	}
	return nil
}

// Resume starts a halted server again with its settings.
func (s *Server) Resume(ctx context.Context) error {
	logFile := filepath.Join(s.dir, "server.log")
	if out, err := s.run(ctx, "pg_ctl", "-D", filepath.Join(s.dir, "data"), "-l", logFile, "-o", s.opts,
		"-w", "-t", "60", "start"); err != nil {
		return fmt.Errorf("pgtest: pg_ctl start: %w\n%s\n%s", err, out, s.Log())
	}
	return nil
}

// Restart stops the server and starts it again with the same settings.
// With immediate set it stops as a crash would (no shutdown checkpoint:
// the restart recovers from the WAL) and cuts every session.
func (s *Server) Restart(ctx context.Context, immediate bool) error {
	mode := "fast"
	if immediate {
		mode = "immediate"
	}
	data := filepath.Join(s.dir, "data")
	if out, err := s.run(ctx, "pg_ctl", "-D", data, "-l", filepath.Join(s.dir, "server.log"), "-m", mode,
		"-w", "-t", "60", "restart"); err != nil {
		return fmt.Errorf("pgtest: pg_ctl restart: %w\n%s\n%s", err, out, s.Log())
	}
	return nil
}
