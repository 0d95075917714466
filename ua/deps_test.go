package ua

import (
	"errors"
	"os/exec"
	"strings"
	"testing"
)

// TestNoSMTPStack keeps the device client free of an SMTP stack: it
// converts deliveries to mail (Maildir) with package mailconv, and must not
// link go-smtp through package gateway or otherwise.
func TestNoSMTPStack(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skipf("SKIPPED: the go tool is not in PATH (%v): cannot list ua's dependencies", err)
	}
	cmd := exec.CommandContext(t.Context(), goTool, "list", "-deps", "-f", "{{.ImportPath}}", ".")
	out, err := cmd.Output()
	if err != nil {
		var stderr []byte
		if ee := (*exec.ExitError)(nil); errors.As(err, &ee) {
			stderr = ee.Stderr
		}
		t.Fatalf("go list -deps: %v\n%s", err, stderr)
	}
	deps := strings.Fields(string(out))
	have := map[string]bool{}
	for _, p := range deps {
		have[p] = true
	}
	// The list must be the real one for a check of what is absent to mean
	// anything.
	for _, p := range []string{"github.com/esro-emsdp/emsdp/ua", "github.com/esro-emsdp/emsdp/mailconv"} {
		if !have[p] {
			t.Fatalf("go list -deps does not list %s; got %d packages", p, len(deps))
		}
	}
	for _, p := range deps {
		if p == "github.com/emersion/go-smtp" || strings.HasPrefix(p, "github.com/emersion/go-smtp/") ||
			p == "github.com/esro-emsdp/emsdp/gateway" {
			t.Errorf("ua depends on %s: the device client must not link an SMTP stack", p)
		}
	}
}
