package main

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestMain lets the test binary be the emsdp command (EMSDP_TEST_CLI=1),
// so that end-to-end tests run real processes they can kill.
func TestMain(m *testing.M) {
	if os.Getenv("EMSDP_TEST_CLI") == "1" {
		main()
	}
	os.Exit(m.Run())
}

// cliProc is an emsdp process.
type cliProc struct {
	cmd    *exec.Cmd
	stderr *syncBuffer
	stdout *syncBuffer
	done   chan error
}

// startCLI runs "emsdp ARGS" as a process until the test ends (SIGTERM
// then, SIGKILL if it lingers) and waits for ready on its stderr.
func startCLI(t *testing.T, ready *regexp.Regexp, args ...string) (*cliProc, []string) {
	t.Helper()
	p := &cliProc{cmd: exec.Command(os.Args[0], args...), stderr: &syncBuffer{}, stdout: &syncBuffer{}, done: make(chan error, 1)}
	p.cmd.Env = append(os.Environ(), "EMSDP_TEST_CLI=1")
	p.cmd.Stderr, p.cmd.Stdout = p.stderr, p.stdout
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	t.Cleanup(func() { p.stop(t) })
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if m := ready.FindStringSubmatch(p.stderr.String()); m != nil {
			return p, m
		}
		select {
		case err := <-p.done:
			p.done <- err
			t.Fatalf("emsdp %s exited: %v: %s", args[0], err, p.stderr.String())
		default:
		}
	}
	t.Fatalf("emsdp %s did not start: %s", args[0], p.stderr.String())
	return nil, nil
}

// stop ends the process with SIGTERM (a no-op if it has ended).
func (p *cliProc) stop(t *testing.T) {
	select {
	case err := <-p.done:
		p.done <- err
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-p.done:
		p.done <- err
		if err != nil {
			t.Errorf("%s: %v: %s", p.cmd.Args[1], err, lastLines(p.stderr.String()))
		}
	case <-time.After(30 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
		t.Errorf("%s did not stop on SIGTERM: %s", p.cmd.Args[1], lastLines(p.stderr.String()))
	}
}

// kill ends the process with SIGKILL.
func (p *cliProc) kill() {
	p.cmd.Process.Signal(syscall.SIGKILL)
	err := <-p.done
	p.done <- err
}

// A fleet of `emsdp ua receive` processes behind an `emsdp serve`
// process, half of them stopped: the running ones get all their mail at
// once; the server is killed with SIGKILL with mail in flight and
// started again; the stopped devices come back and get theirs. Every
// message ends up in its device's Maildir exactly once.
func TestFleetProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	// The server on the default ESRO timers, where an attempt to a
	// stopped device lasts half a minute, and one worker for devices that
	// answer: a stopped device must never take it.
	cfg := filepath.Join(dir, "emsdp.toml")
	if err := os.WriteFile(cfg, []byte("domain = \"emsd.test\"\n[store]\nregistry_poll = \"50ms\"\n"+
		"[delivery]\nconcurrency = 1\nretry = [\"1s\"]\ndrain_timeout = \"10s\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	const devices, first, second = 6, 3, 2
	type dev struct {
		addr, maildir string
	}
	serveRe := regexp.MustCompile(`emsdp serve: listening emsd=(\S+) smtp=(\S+) admin=(\S+)`)
	listen := "127.0.0.1:0"
	serve := func() (*cliProc, serveAddrs) {
		p, m := startCLI(t, serveRe, "serve", "--config", cfg, "--listen", listen, "--smtp", "127.0.0.1:0",
			"--admin", "127.0.0.1:0", "--data", data)
		return p, serveAddrs{m[1], m[2], m[3]}
	}
	srv, a := serve()
	listen = a.emsd // the same after the restart: the devices know it
	// A running device's client starts first, on a port of its own, and
	// the device is registered where it listens: a port found free and
	// closed for "device add" to name may be taken by then. A stopped
	// device is registered where nothing answers, and comes back on a
	// port of its own: it polls, and the server delivers there.
	receive := func(d dev, server string) string {
		_, m := startCLI(t, regexp.MustCompile(`listening on (\S+),`), append([]string{"ua", "receive", "--listen", "127.0.0.1:0",
			"--maildir", d.maildir, "--domain", "emsd.test", "--server", server, "--address", d.addr,
			"--password", "pw" + d.addr, "--poll"}, strings.Fields(fast)...)...)
		return m[1]
	}
	var devs []dev
	for i := range devices {
		d := dev{addr: fmt.Sprintf("198.%03d", 100+i), maildir: filepath.Join(dir, fmt.Sprintf("Maildir-%d", i))}
		var at string
		if i%2 == 1 {
			at = receive(d, a.emsd)
		} else {
			at = closedUDPAddr(t, "127.0.0.1")
		}
		_, port, _ := net.SplitHostPort(at)
		if code, _, errs := runCmd(t, "", "device", "add", "--data", data, "--address", d.addr, "--password", "pw"+d.addr,
			"--ip", "127.0.0.1", "--port", port); code != exitOK {
			t.Fatalf("device add: exit %d: %s", code, errs)
		}
		devs = append(devs, d)
	}
	mail := func(to dev, n int) {
		t.Helper()
		msg := fmt.Sprintf("From: carol@example.com\r\nTo: %s@emsd.test\r\nSubject: m%d\r\nMessage-ID: <%s.%d@example.com>\r\n\r\nbody %d\r\n",
			to.addr, n, to.addr, n, n)
		waitFor(t, "the server to take the mail", func() bool {
			return smtpSend(a.smtp, "carol@example.com", to.addr+"@emsd.test", msg) == nil
		})
	}
	for n := range first {
		for _, d := range devs {
			mail(d, n)
		}
	}
	start := time.Now()
	for i, d := range devs {
		if i%2 == 1 {
			waitFor(t, d.addr+" to get its mail while half the fleet is off", func() bool { return maildirCount(d.maildir) == first })
		}
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("the running devices waited %v for their mail", took)
	}
	// More mail, and SIGKILL while it goes out.
	for n := first; n < first+second; n++ {
		for i, d := range devs {
			if i%2 == 1 {
				mail(d, n)
			}
		}
	}
	srv.kill()
	srv, a = serve()
	for i, d := range devs {
		if i%2 == 0 {
			receive(d, a.emsd)
		}
	}
	for i, d := range devs {
		want := first
		if i%2 == 1 {
			want += second
		}
		waitFor(t, d.addr+" to get all its mail", func() bool { return maildirCount(d.maildir) >= want })
		// Anything doubled would have been stored by now, or said so.
		time.Sleep(200 * time.Millisecond)
		if n := maildirCount(d.maildir); n != want {
			t.Errorf("%s: %d messages in its Maildir, want %d", d.addr, n, want)
		}
	}
	srv.stop(t)
	// (A handler that outlived the fast timers' performer timeout logs
	// its cancelled store call: not the scheduler's business.)
	for l := range strings.Lines(srv.stderr.String()) {
		if strings.Contains(l, "level=ERROR") && !strings.Contains(l, "context canceled") {
			t.Errorf("server error: %s", l)
		}
	}
}
