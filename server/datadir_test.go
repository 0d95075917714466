//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package server

import (
	"bytes"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// The store and the lock are created 0600 and a new data directory 0700
// whatever the umask; an existing directory open to others is reported.
func TestDataDirModes(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	for _, tc := range []struct {
		name  string
		mkdir fs.FileMode // 0: the directory does not exist yet
		warn  bool
	}{
		{"new directory", 0, false},
		{"existing 0755 directory", 0o755, true},
		{"existing 0700 directory", 0o700, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := testConfig(t)
			c.Data = filepath.Join(t.TempDir(), "data")
			if tc.mkdir != 0 {
				must(t, os.Mkdir(c.Data, tc.mkdir))
			}
			var logs lockedBuffer
			startServerWith(t, c, Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
			if tc.mkdir == 0 {
				if fi, err := os.Stat(c.Data); err != nil || fi.Mode().Perm() != 0o700 {
					t.Errorf("data directory: %v %v", fi.Mode(), err)
				}
			}
			ents, err := os.ReadDir(c.Data)
			must(t, err)
			if len(ents) < 3 { // the store, its WAL and index, the lock
				t.Errorf("files %v", ents)
			}
			for _, e := range ents {
				fi, err := e.Info()
				must(t, err)
				if fi.Mode().Perm() != 0o600 {
					t.Errorf("%s: mode %v", e.Name(), fi.Mode())
				}
			}
			warned := strings.Contains(logs.String(), "data directory readable by others")
			if warned != tc.warn || (warned && !strings.Contains(logs.String(), c.Data+" 0755")) {
				t.Errorf("warning %v, want %v:\n%s", warned, tc.warn, logs.String())
			}
		})
	}
}
