package main

import (
	"context"
	"log/slog"
	"os/exec"
	"strings"
	"testing"
)

// The two-process run over a veth pair, without netem (which this test
// cannot count on): every invocation completes, and the namespaces are
// gone afterwards.
func TestVethRun(t *testing.T) {
	p, err := setupVeth(t.Context(), false)
	if err != nil {
		t.Skipf("no network namespaces here: %v", err)
	}
	closed := false
	defer func() {
		if !closed {
			p.Close()
		}
	}()
	o := &benchOptions{log: slog.New(slog.DiscardHandler)}
	for _, fixed := range []bool{false, true} {
		x, err := p.run(t.Context(), o, 40, fixed)
		if err != nil {
			t.Fatal(err)
		}
		if x.Failed != 0 || x.Elapsed <= 0 {
			t.Errorf("fixed=%v: %+v", fixed, x)
		}
	}
	closed = true
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	out, err := exec.CommandContext(context.Background(), "ip", "netns", "list").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, ns := range p.ns {
		if strings.Contains(string(out), ns) {
			t.Errorf("namespace %s left behind", ns)
		}
	}
}
