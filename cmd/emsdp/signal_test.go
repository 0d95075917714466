package main

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// The first SIGINT cancels the context and the command drains; a second
// one ends the process at once, however long the drain would take. The
// test runs itself as the child (signalChild), which drains forever.
func TestSecondSignalEndsAtOnce(t *testing.T) {
	if os.Getenv("EMSDP_SIGNAL_CHILD") == "1" {
		signalChild()
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestSecondSignalEndsAtOnce$")
	cmd.Env = append(os.Environ(), "EMSDP_SIGNAL_CHILD=1")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	lines := bufio.NewScanner(out)
	next := func(want string) {
		t.Helper()
		for lines.Scan() {
			if lines.Text() == want {
				return
			}
		}
		cmd.Process.Kill()
		t.Fatalf("child never printed %q", want)
	}
	next("ready")
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	next("draining")
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		t.Fatalf("child ended on the first signal: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGINT {
			t.Fatalf("child after the second signal: %v, want killed by SIGINT", err)
		}
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		t.Fatal("child still running 10 s after the second SIGINT")
	}
}

func signalChild() {
	ctx, stop := signalContext()
	defer stop()
	os.Stdout.WriteString("ready\n")
	<-ctx.Done()
	os.Stdout.WriteString("draining\n")
	time.Sleep(time.Minute) // a drain longer than the test waits
	os.Exit(0)
}
