package ports_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// The command builds for every system whose port view has its own code:
// macOS (lsof, libproc), FreeBSD (sockstat, sysctl) and Windows (socket
// tables, process PEB); Linux is this build. The Go build cache makes
// this cheap after the first run.
func TestCrossCompile(t *testing.T) {
	gobin := filepath.Join(os.Getenv("GOROOT"), "bin", "go")
	if _, err := os.Stat(gobin); err != nil {
		if gobin, err = exec.LookPath("go"); err != nil {
			t.Fatal("the go command is not in PATH: cannot cross-compile")
		}
	}
	for _, target := range [][2]string{{"darwin", "amd64"}, {"freebsd", "amd64"}, {"windows", "amd64"}} {
		cmd := exec.Command(gobin, "build", "-o", os.DevNull, "./cmd/emsdp")
		cmd.Dir = ".."
		cmd.Env = append(os.Environ(), "GOOS="+target[0], "GOARCH="+target[1], "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("GOOS=%s GOARCH=%s go build ./cmd/emsdp: %v\n%s", target[0], target[1], err, out)
		}
	}
}
