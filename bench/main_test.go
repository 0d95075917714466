package main

import (
	"context"
	"os"
	"testing"

	"go.uber.org/goleak"
)

// Sections must stop every server, socket and goroutine they start. The
// test binary also serves as the child of a netem run, as the program does.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == netemChildArg {
		os.Exit(netemChild(context.Background(), os.Args[2:], os.Stdin, os.Stdout, os.Stderr))
	}
	goleak.VerifyTestMain(m)
}
