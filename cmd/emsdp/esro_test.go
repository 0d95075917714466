package main

import (
	"bytes"
	"context"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// syncBuffer is a bytes.Buffer safe for a command writing while the test reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func testEnv() (*cmdEnv, *syncBuffer, *syncBuffer) {
	out, errb := &syncBuffer{}, &syncBuffer{}
	return &cmdEnv{stdin: strings.NewReader(""), stdout: out, stderr: errb, getenv: func(string) string { return "" }}, out, errb
}

// startPerformer runs 'emsdp esro perform' until the test ends and returns
// its address.
func startPerformer(t *testing.T, args ...string) (addr string, out *syncBuffer) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	env, out, errb := testEnv()
	done := make(chan int, 1)
	go func() { done <- run(ctx, env, append([]string{"esro", "perform", "--listen", "127.0.0.1:0"}, args...)) }()
	t.Cleanup(func() {
		cancel()
		if code := <-done; code != exitOK {
			t.Errorf("perform exited %d: %s", code, errb.String())
		}
	})
	re := regexp.MustCompile(`listening on (\S+),`)
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if m := re.FindStringSubmatch(errb.String()); m != nil {
			return m[1], out
		}
	}
	t.Fatalf("performer did not start: %s", errb.String())
	return "", nil
}

const fast = "--roundtrip=20ms --retransmit=30ms --nsdu-lifetime=20ms --ack-delay=5ms --retries=3"

func TestESROCommands(t *testing.T) {
	timers := strings.Fields(fast)
	a3, out3 := startPerformer(t, append([]string{"--sap", "13", "--handshake", "3", "--reply", "echo"}, timers...)...)
	a2, _ := startPerformer(t, append([]string{"--sap", "7", "--handshake", "2", "--reply", "error:7"}, timers...)...)
	an, _ := startPerformer(t, append([]string{"--sap", "9", "--handshake", "2", "--reply", "none"}, timers...)...)
	ad, _ := startPerformer(t, append([]string{"--sap", "13", "--reply", "date"}, timers...)...)
	af, _ := startPerformer(t, append([]string{"--sap", "13", "--reply", "date", "--amplification", "0"}, timers...)...)
	for _, tc := range []struct {
		name string
		args string
		code int
		out  string // regexp
	}{
		{"3-way result", "--to " + a3 + " --sap 13 --handshake 3 --op 2 --enc 2 --data date", exitOK, `^result enc=2 data="date"\n$`},
		{"hex argument", "--to " + a3 + " --sap 13 --op 63 --enc 0 --hex 00ff", exitOK, `^result enc=0 data="\\x00\\xff"\n$`},
		{"date", "--to " + ad + " --sap 13 --op 2 --enc 2 --data date", exitOK, `^result enc=2 data="\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\\n"\n$`},
		{"date, no amplification limit", "--to " + af + " --sap 13 --op 2 --enc 2 --data date", exitOK, `^result enc=2 data="\w{3} `},
		{"2-way error", "--to " + a2 + " --sap 7 --handshake 2 --op 1 --data hi", exitError, `^error value=7 data="hi"\n$`},
		{"unbound SAP", "--to " + a3 + " --sap 14 --data x", exitFailure, `^failure reason=2 user not responding\n$`},
		{"no answer", "--to " + an + " --sap 9 --handshake 2 --data x", exitFailure, `^failure reason=2 user not responding\n$`},
		{"closed port", "--to " + closedUDPAddr(t, "127.0.0.1") + " --sap 9 --handshake 2 --data x", exitFailure, `^failure reason=255 unreachable\n$`},
		{"count", "--to " + a3 + " --sap 13 --data x --count 50 --concurrency 4", exitOK,
			`^summary completed=50 results=50 errors=0 failures=0 invocations/s=[\d.]+ p50=\S+ p99=\S+\n$`},
		{"count with errors", "--to " + a2 + " --sap 7 --handshake 2 --data x --count 5", exitError, `^summary completed=5 results=0 errors=5 failures=0 `},
		{"sap out of range", "--to " + a3 + " --sap 16 --data x", exitUsage, `^$`},
		{"op out of range", "--to " + a3 + " --sap 13 --op 64 --data x", exitUsage, `^$`},
		{"handshake", "--to " + a3 + " --sap 13 --handshake 4", exitUsage, `^$`},
		{"two arguments", "--to " + a3 + " --sap 13 --data x --hex 00", exitUsage, `^$`},
		{"bad hex", "--to " + a3 + " --sap 13 --hex zz", exitUsage, `^$`},
		{"missing sap", "--to " + a3, exitUsage, `^$`},
		{"bad duration", "--to " + a3 + " --sap 13 --retransmit soon", exitUsage, `^$`},
		{"retries out of range", "--to " + a3 + " --sap 13 --retries 300", exitUsage, `^$`},
		{"unknown flag", "--to " + a3 + " --sap 13 --frobnicate", exitUsage, `^$`},
		{"argument larger than a PDU", "--to " + a3 + " --sap 13 --hex " + strings.Repeat("00", 1501), exitUsage, `^$`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env, out, errb := testEnv()
			args := append([]string{"esro", "invoke"}, strings.Fields(tc.args)...)
			if tc.code != exitUsage {
				args = append(args, timers...)
			}
			code := run(t.Context(), env, args)
			if code != tc.code || !regexp.MustCompile(tc.out).MatchString(out.String()) {
				t.Fatalf("exit %d (want %d), stdout %q, stderr %q", code, tc.code, out.String(), errb.String())
			}
		})
	}
	if !regexp.MustCompile(`(?m)^invoke peer=127\.0\.0\.1:\d+ sap=13 op=2 enc=2 len=4$`).MatchString(out3.String()) {
		t.Fatalf("performer output %q", out3.String())
	}
}

// Help asked for, at the top and for a command group, is printed on
// stdout with exit 0; a missing or unknown verb is a usage error.
func TestHelpExitCodes(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
		out  string // on stdout
	}{
		{[]string{"-h"}, exitOK, "usage: emsdp <command>"},
		{[]string{"help"}, exitOK, "usage: emsdp <command>"},
		{[]string{}, exitUsage, ""},
		{[]string{"device", "-h"}, exitOK, "usage: emsdp device add|list|show|remove|passwd"},
		{[]string{"queue", "--help"}, exitOK, "usage: emsdp queue"},
		{[]string{"ua", "-h"}, exitOK, "usage: emsdp ua"},
		{[]string{"esro", "help"}, exitOK, "usage: emsdp esro"},
		{[]string{"device"}, exitUsage, ""},
		{[]string{"device", "frob"}, exitUsage, ""},
	} {
		code, out, errs := runCmd(t, "", tc.args...)
		if code != tc.code || (tc.out != "" && !strings.Contains(out, tc.out)) || (tc.out == "" && out != "") {
			t.Errorf("%v: exit %d (want %d), stdout %q, stderr %q", tc.args, code, tc.code, out, errs)
		}
	}
}

func TestPerformUsage(t *testing.T) {
	for _, args := range []string{"--reply maybe", "--reply error:256", "--sap 0", "--sap 16", "--handshake 1", "--listen 127.0.0.1:0 extra", "--amplification -1", "--amplification x"} {
		env, _, _ := testEnv()
		if code := run(t.Context(), env, append([]string{"esro", "perform"}, strings.Fields(args)...)); code != exitUsage {
			t.Errorf("%s: exit %d", args, code)
		}
	}
	env, _, errb := testEnv()
	if code := run(t.Context(), env, []string{"nonsense"}); code != exitUsage || !strings.Contains(errb.String(), "unknown command") {
		t.Errorf("unknown command: %d %q", code, errb.String())
	}
}
