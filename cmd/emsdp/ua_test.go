package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/mail"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/ua"
	"github.com/esro-emsdp/emsdp/ua/uatest"
)

// uaFastTimers match the fast flags of esro_test.go; both ends use them.
func uaFastTimers() esro.Timers {
	return esro.Timers{Acknowledgement: 5 * time.Millisecond, Roundtrip: 20 * time.Millisecond,
		Retransmit: 30 * time.Millisecond, NSDULifetime: 20 * time.Millisecond, RetransmitCount: 3}
}

// uaNoLeaks checks, after the test's other cleanups, that it left no
// goroutine behind (the package has no goleak TestMain).
func uaNoLeaks(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, ignore) })
}

// uaMTS starts a uatest MTS on loopback that knows device 198.036 with
// password "pw".
func uaMTS(t *testing.T) *uatest.MTS {
	t.Helper()
	c, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := uatest.NewMTS(t, c, uaFastTimers())
	m.SetPassword(198036, "pw")
	return m
}

// uaRun runs "emsdp ua ARGS" (with the fast timers unless usage is
// expected) and returns the exit code and output.
func uaRun(t *testing.T, stdin string, args ...string) (int, string, string) {
	t.Helper()
	env, out, errb := testEnv()
	env.stdin = strings.NewReader(stdin)
	code := run(t.Context(), env, append([]string{"ua"}, append(args, strings.Fields(fast)...)...))
	return code, out.String(), errb.String()
}

// closedUDPAddr returns ip:port where nothing answers, as at a device
// that is off: datagrams sent there get ICMP port unreachable. Until the
// test ends the port is held by a socket connected to the discard port,
// which the kernel gives no datagram from anyone else; a port found free
// and closed could be taken by another socket in the meantime.
func closedUDPAddr(t *testing.T, ip string) string {
	t.Helper()
	c, err := net.DialUDP("udp4", &net.UDPAddr{IP: net.ParseIP(ip)}, &net.UDPAddr{IP: net.ParseIP(ip), Port: 9})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.LocalAddr().String()
}

func TestUASend(t *testing.T) {
	uaNoLeaks(t)
	m := uaMTS(t)
	srv := m.Addr().String()
	body := filepath.Join(t.TempDir(), "body.txt")
	if err := os.WriteFile(body, []byte("Grüße aus dem Gerät\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	idRE := regexp.MustCompile(`^submitted message-id=([0-9a-f]{8}\.[0-9a-f]{8})\n$`)

	code, out, errs := uaRun(t, "", "send", "--server", srv, "--address", "198.036", "--password", "pw",
		"--to", "198.037,\"Doe, Jane\" <jane@example.com>", "--to", "bob@example.com", "--cc", "EMSD=198.038", "--bcc", "carol@example.org",
		"--reply-to", "198.036", "--subject", "Grüße 🌍", "--file", body, "--priority", "urgent", "--delivery-report")
	mm := idRE.FindStringSubmatch(out)
	if code != exitOK || mm == nil {
		t.Fatalf("exit %d, stdout %q, stderr %q", code, out, errs)
	}
	subs := m.Submissions()
	if len(subs) != 1 || subs[0].ID.String() != mm[1] {
		t.Fatalf("MTS has %+v, printed %s", subs, mm[1])
	}
	h := subs[0].IPM.Heading
	var rcpts []string
	for _, r := range h.Recipients {
		rcpts = append(rcpts, fmt.Sprintf("%v/%v", r.Recipient, r.Flags))
	}
	nd := (emsd.RcptNonDeliveryReport | emsd.RcptDeliveryReport).String()
	want := []string{"198.037/" + nd, `"Doe, Jane" <jane@example.com>/` + nd, "bob@example.com/" + nd,
		"198.038/" + (emsd.RcptCopy | emsd.RcptNonDeliveryReport | emsd.RcptDeliveryReport).String(),
		"carol@example.org/" + (emsd.RcptBlindCopy | emsd.RcptNonDeliveryReport | emsd.RcptDeliveryReport).String()}
	if strings.Join(rcpts, "|") != strings.Join(want, "|") {
		t.Fatalf("recipients\n%q\nwant\n%q", rcpts, want)
	}
	if h.Originator != emsd.LocalOR(198036, "") || h.Subject != "Grüße 🌍" || string(subs[0].IPM.Body.Text) != "Grüße aus dem Gerät\n" ||
		h.Flags != emsd.MsgPriorityUrgent || len(h.ReplyTo) != 0 {
		t.Fatalf("heading %+v body %q", h, subs[0].IPM.Body.Text)
	}
	if sec := subs[0].Arg.Security; sec == nil || sec.Address == nil || sec.Address.Address != 198036 || sec.Password != "pw" {
		t.Fatalf("security %+v", sec)
	}

	// Body from standard input, password from the environment; 40 KB is
	// segmented.
	big := strings.Repeat("0123456789abcdef\n", 40<<10/17)
	env, outb, errb := testEnv()
	env.stdin = strings.NewReader(big)
	env.getenv = func(k string) string {
		if k == "EMSDP_PASSWORD" {
			return "pw"
		}
		return ""
	}
	code = run(t.Context(), env, append([]string{"ua", "send", "--server", srv, "--address", "198.036", "--to", "198.037"}, strings.Fields(fast)...))
	if code != exitOK || !idRE.MatchString(outb.String()) {
		t.Fatalf("stdin: exit %d, stdout %q, stderr %q", code, outb.String(), errb.String())
	}
	if subs := m.Submissions(); len(subs) != 2 || string(subs[1].IPM.Body.Text) != big || len(m.Invocations()) < 25 {
		t.Fatalf("segmented submission: %d submissions, %d invocations", len(subs), len(m.Invocations()))
	}
}

func TestUASendErrors(t *testing.T) {
	uaNoLeaks(t)
	m := uaMTS(t)
	srv := m.Addr().String()
	dir := t.TempDir()
	for _, tc := range []struct {
		name  string
		stdin string
		args  string
		code  int
		out   string // regexp on stdout
		err   string // regexp on stderr
	}{
		{"wrong password", "x", "--server " + srv + " --address 198.036 --password nope --to 198.037", exitError,
			`^error code=4 security-error parameter=4 transient=false\n$`, `^$`},
		{"unknown device", "x", "--server " + srv + " --address 198.099 --password pw --to 198.037", exitError, `^error code=4 `, `^$`},
		// The ICMP port unreachable ends it at once (IP_RECVERR), with no
		// second invocation nor a warning about one.
		{"no server", "x", "--server " + closedUDPAddr(t, "127.0.0.1") + " --address 198.036 --password pw --to 198.037", exitFailure,
			`^failure reason=255 unreachable\n$`, `^$`},
		{"missing server", "x", "--address 198.036 --to 198.037", exitUsage, `^$`, `--server HOST:PORT is required`},
		{"missing address", "x", "--server " + srv + " --to 198.037", exitUsage, `^$`, `--address NNN.NNN is required`},
		{"bad address", "x", "--server " + srv + " --address 19x.036 --to 198.037", exitUsage, `^$`, `--address "19x.036"`},
		{"no recipients", "x", "--server " + srv + " --address 198.036", exitUsage, `^$`, `at least one recipient`},
		{"empty recipient list", "x", "--server " + srv + " --address 198.036 --to ,", exitUsage, `^$`, `empty address list`},
		{"bad recipient", "x", "--server " + srv + " --address 198.036 --to bob@", exitUsage, `^$`, `to: ua: invalid message: bad address "bob@"`},
		{"bad local recipient", "x", "--server " + srv + " --address 198.036 --to 1.2.3.4", exitUsage, `^$`, `bad EMSD address "1.2.3.4"`},
		{"long subject", "x", "--server " + srv + " --address 198.036 --to 198.037 --subject " + strings.Repeat("s", 128), exitUsage, `^$`, `subject is 128 octets`},
		{"unreadable file", "", "--server " + srv + " --address 198.036 --to 198.037 --file " + filepath.Join(dir, "missing"), exitFailed, `^$`, `no such file`},
		{"beyond 32 segments", strings.Repeat("x", 50<<10), "--server " + srv + " --address 198.036 --password pw --to 198.037", exitUsage, `^$`, `needs 35 segments, limit 32`},
		{"beyond the body limit", strings.Repeat("x", 70<<10), "--server " + srv + " --address 198.036 --to 198.037", exitUsage, `^$`, `larger than 65536 octets`},
		{"long password", "x", "--server " + srv + " --address 198.036 --password " + strings.Repeat("p", 17) + " --to 198.037", exitUsage, `^$`, `at most 16`},
		{"bad priority", "x", "--server " + srv + " --address 198.036 --to 198.037 --priority soon", exitUsage, `^$`, `--priority`},
		{"bad protocol", "x", "--server " + srv + " --address 198.036 --to 198.037 --protocol 2.0", exitUsage, `^$`, `--protocol`},
		{"unknown flag", "x", "--server " + srv + " --frobnicate", exitUsage, `^$`, `frobnicate`},
		{"extra argument", "x", "--server " + srv + " --address 198.036 --to 198.037 extra", exitUsage, `^$`, `unexpected argument`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errs := uaRun(t, tc.stdin, append([]string{"send"}, strings.Fields(tc.args)...)...)
			if code != tc.code || !regexp.MustCompile(tc.out).MatchString(out) || !regexp.MustCompile(tc.err).MatchString(errs) {
				t.Fatalf("exit %d (want %d), stdout %q, stderr %q", code, tc.code, out, errs)
			}
		})
	}
	if n := len(m.Submissions()); n != 0 {
		t.Fatalf("%d submissions accepted", n)
	}
	if code, _, _ := uaRun(t, "", "nonsense"); code != exitUsage {
		t.Fatalf("ua nonsense: exit %d", code)
	}
}

// uaStartReceive runs "emsdp ua receive" until the test ends and returns
// the address it listens on and its stdout.
func uaStartReceive(t *testing.T, args ...string) (addr string, out, errb *syncBuffer) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	env, out, errb := testEnv()
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, env, append(append([]string{"ua", "receive", "--listen", "127.0.0.1:0"}, args...), strings.Fields(fast)...))
	}()
	t.Cleanup(func() {
		cancel()
		if code := <-done; code != exitOK {
			t.Errorf("receive exited %d: %s", code, errb.String())
		}
	})
	re := regexp.MustCompile(`listening on (\S+),`)
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if m := re.FindStringSubmatch(errb.String()); m != nil {
			return m[1], out, errb
		}
		select {
		case code := <-done:
			done <- code
			t.Fatalf("receive exited %d: %s", code, errb.String())
		default:
		}
	}
	t.Fatalf("receive did not start: %s", errb.String())
	return "", nil, nil
}

func TestUAReceive(t *testing.T) {
	uaNoLeaks(t)
	m := uaMTS(t)
	m.SetReferenceControl(true) // ERROR 7, as the reference answers a poll
	dir := filepath.Join(t.TempDir(), "Maildir")
	verify := filepath.Join(t.TempDir(), "verify")
	addr, out, errb := uaStartReceive(t, "--maildir", dir, "--server", m.Addr().String(), "--address", "198.036",
		"--password", "pw", "--poll", "--domain", "emsd.example", "--verify-list", verify)
	to, err := resolveUDP(addr)
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); len(m.Controls()) == 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no delivery control")
		}
	}
	if sec := m.Controls()[0].Security; sec == nil || sec.Address == nil || sec.Address.Address != 198036 || sec.Password != "pw" {
		t.Fatalf("poll credentials %+v", sec)
	}

	big := bytes.Repeat([]byte("a long line of the delivered body\n"), 10<<10/34)
	submitted := time.Date(2026, 11, 26, 8, 0, 0, 0, time.UTC)
	for i, tc := range []struct {
		id     emsd.MessageID
		from   emsd.ORAddress
		subj   string
		body   []byte
		twoWay bool
		line   string
	}{
		{emsd.RFC822ID("<in1@example.com>"), emsd.RFC822OR("Alice Example <alice@example.com>"), "Hello \"device\"", []byte("hi\n"), false,
			`delivered message-id=<in1@example.com> from=alice@example.com subject="Hello \"device\""`},
		{emsd.LocalID(0x6b07d9d0, 7), emsd.LocalOR(198037, ""), "Grüße", big, true,
			`delivered message-id=6b07d9d0.00000007 from=198.037 subject="Grüße"`},
		{emsd.RFC822ID("<in3@example.com>"), emsd.RFC822OR(`"198.036": `), "=?utf-8?q?caf=C3=A9?=", []byte("x\n"), false,
			`delivered message-id=<in3@example.com> from="\"198.036\": " subject="café"`},
		// The first again, in a new attempt (new instance id and delivery
		// time): answered, not stored again.
		{emsd.RFC822ID("<in1@example.com>"), emsd.RFC822OR("Alice Example <alice@example.com>"), "Hello \"device\"", []byte("hi\n"), true,
			`duplicate message-id=<in1@example.com> from=alice@example.com subject="Hello \"device\""`},
	} {
		ipm := &emsd.IPM{Heading: emsd.Heading{Originator: tc.from, Subject: tc.subj,
			Recipients: []emsd.RecipientData{{Recipient: emsd.LocalOR(198036, "")}}}, Body: &emsd.Body{Text: tc.body}}
		o := uatest.DeliverOptions{TwoWay: tc.twoWay, SubmissionTime: submitted, DeliveryTime: submitted.Add(time.Duration(i) * time.Hour)}
		if err := m.Deliver(t.Context(), to, tc.id, ipm, o); err != nil {
			t.Fatalf("delivery %d: %v", i, err)
		}
		lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
		if len(lines) != i+1 || lines[i] != tc.line {
			t.Fatalf("stdout %q, want line %d %q", out.String(), i, tc.line)
		}
	}
	ents, err := os.ReadDir(filepath.Join(dir, "new"))
	if err != nil || len(ents) != 3 {
		t.Fatalf("new/: %v %v", ents, err)
	}
	var subjects []string
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, "new", e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		msg, err := mail.ReadMessage(bytes.NewReader(b))
		if err != nil {
			t.Fatalf("%s: %v", e.Name(), err)
		}
		s, _ := new(mime.WordDecoder).DecodeHeader(msg.Header.Get("Subject"))
		body, _ := io.ReadAll(msg.Body)
		if s == "Grüße" && (len(body) < len(big) || msg.Header.Get("From") != "198.037@emsd.example") {
			t.Fatalf("stored message %s", b[:200])
		}
		subjects = append(subjects, s)
	}
	if !strings.Contains(errb.String(), "delivery control answered with EMSD error 7") {
		t.Fatalf("stderr %q", errb.String())
	}

	// A submission by "ua send" with the same verify list is confirmed by
	// the receiver when the MTS verifies it (§10.4); an unknown one is not.
	code, sout, serr := uaRun(t, "x\n", "send", "--server", m.Addr().String(), "--address", "198.036", "--password", "pw",
		"--to", "198.037", "--verify-list", verify)
	if code != exitOK {
		t.Fatalf("send: %d %q %q", code, sout, serr)
	}
	sid := m.Submissions()[0].ID
	for _, tc := range []struct {
		id   emsd.MessageID
		want emsd.SubmissionStatus
	}{{emsd.MessageID{IsLocal: true, Local: sid}, emsd.SendMessage}, {emsd.LocalID(1, 1), emsd.DropMessage}} {
		if st, err := m.SubmissionVerify(t.Context(), to, tc.id); err != nil || st != tc.want {
			t.Fatalf("verify %v: %v %v", tc.id, st, err)
		}
	}
}

func TestUAReceiveUsage(t *testing.T) {
	uaNoLeaks(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	os.WriteFile(file, nil, 0o600)
	for _, tc := range []struct {
		args string
		code int
		err  string
	}{
		{"--maildir " + dir, exitUsage, "--listen ADDR is required"},
		{"--listen 127.0.0.1:0", exitUsage, "--maildir DIR is required"},
		{"--listen 127.0.0.1:0 --maildir " + dir + " --poll", exitUsage, "--server HOST:PORT is required"},
		{"--listen 127.0.0.1:0 --maildir " + dir + " --poll --server 127.0.0.1:9", exitUsage, "--address NNN.NNN is required"},
		{"--listen 127.0.0.1:0 --maildir " + file, exitFailed, "maildir"},
		{"--listen 127.0.0.1:0 --maildir " + dir + " --domain=", exitUsage, "--domain"},
	} {
		code, _, errs := uaRun(t, "", append([]string{"receive"}, strings.Fields(tc.args)...)...)
		if code != tc.code || !strings.Contains(errs, tc.err) {
			t.Errorf("%s: exit %d (want %d), stderr %q", tc.args, code, tc.code, errs)
		}
	}
}

func TestUAVerify(t *testing.T) {
	uaNoLeaks(t)
	m := uaMTS(t)
	m.SetDeliveryStatus(emsd.RFC822ID("<in1@example.com>"), emsd.DeliveryReportSent)
	m.SetDeliveryStatus(emsd.LocalID(0x6b07d9d0, 7), emsd.NonDeliveryReportSent)
	srv := m.Addr().String()
	for _, tc := range []struct {
		args string
		code int
		out  string
	}{
		{"--server " + srv + " --address 198.036 --password pw <in1@example.com>", exitOK, "status=2 delivery-report-sent\n"},
		{"6B07D9D0.00000007 --server " + srv, exitOK, "status=3 non-delivery-report-sent\n"},
		{"--server " + srv + " <other@example.com>", exitFailed, "status=1 no-report-sent\n"},
		{"--server " + closedUDPAddr(t, "127.0.0.1") + " <in1@example.com>", exitFailure, "failure reason=255 unreachable\n"},
		{"--server " + srv, exitUsage, ""},
		{"--server " + srv + " a b", exitUsage, ""},
		{"<in1@example.com>", exitUsage, ""},
		{"--server " + srv + " " + strings.Repeat("x", 128), exitUsage, ""},
	} {
		code, out, errs := uaRun(t, "", append([]string{"verify"}, strings.Fields(tc.args)...)...)
		if code != tc.code || out != tc.out {
			t.Errorf("%s: exit %d (want %d), stdout %q (want %q), stderr %q", tc.args, code, tc.code, out, tc.out, errs)
		}
	}
}

func FuzzSplitAddresses(f *testing.F) {
	for _, s := range []string{`198.037,bob@example.com`, `"Doe, Jane" <jane@example.com>, 198.036`, `<a,b>,c`, `"\",",x`, `,,`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		for _, p := range splitAddresses(s) {
			if p == "" || p != strings.TrimSpace(p) || !strings.Contains(s, p) {
				t.Fatalf("%q: part %q", s, p)
			}
		}
		if !strings.Contains(s, `"`) && !strings.Contains(s, "<") {
			var want []string
			for _, p := range strings.Split(s, ",") {
				if p = strings.TrimSpace(p); p != "" {
					want = append(want, p)
				}
			}
			if got := splitAddresses(s); strings.Join(got, "\x00") != strings.Join(want, "\x00") {
				t.Fatalf("%q: %q, want %q", s, got, want)
			}
		}
	})
}

// uaE2ETimers are the ESRO timers of the end-to-end test, on every end:
// short, but with a performer timeout (T_noresp = 2L + (N+1)(R+RT), 3.8 s)
// long enough for the server's first bcrypt check of a password under the
// race detector on a busy machine.
const uaE2ETimers = "--ack-delay=10ms --roundtrip=100ms --retransmit=300ms --nsdu-lifetime=100ms --retries=8"

// uaBackground runs one emsdp command until the test ends, and waits for
// ready on its stderr.
func uaBackground(t *testing.T, ready *regexp.Regexp, args ...string) (match []string, out, errb *syncBuffer) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	env, out, errb := testEnv()
	done := make(chan int, 1)
	go func() { done <- run(ctx, env, args) }()
	t.Cleanup(func() {
		cancel()
		if code := <-done; code != exitOK {
			t.Errorf("%s exited %d: %s", args[0], code, errb.String())
		}
	})
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if m := ready.FindStringSubmatch(errb.String()); m != nil {
			return m, out, errb
		}
		select {
		case code := <-done:
			done <- code
			t.Fatalf("%s exited %d: %s", args[0], code, errb.String())
		default:
		}
	}
	t.Fatalf("%s did not start: %s", args[0], errb.String())
	return nil, nil, nil
}

// waitLine waits for a stdout line matching re.
func waitLine(t *testing.T, b *syncBuffer, re *regexp.Regexp) []string {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if m := re.FindStringSubmatch(b.String()); m != nil {
			return m
		}
	}
	t.Fatalf("no line %v in %q", re, b.String())
	return nil
}

// The README's device quick start against the project's own server: two
// devices registered with "emsdp device add" exchange mail through
// "emsdp serve" with "emsdp ua receive" and "emsdp ua send", small and
// segmented, then "emsdp ua verify"; a wrong password is refused.
func TestUAWithServer(t *testing.T) {
	uaNoLeaks(t)
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	cfg := filepath.Join(dir, "emsdp.toml")
	timers := strings.Fields(uaE2ETimers)
	toml := "domain = \"emsd.test\"\n[esro]\nack_delay = \"10ms\"\nroundtrip = \"100ms\"\nretransmit = \"300ms\"\nnsdu_lifetime = \"100ms\"\nretries = 8\n" +
		"[delivery]\nretry = [\"200ms\"]\n[store]\nregistry_poll = \"50ms\"\n"
	if err := os.WriteFile(cfg, []byte(toml), 0o600); err != nil {
		t.Fatal(err)
	}
	m, _, _ := uaBackground(t, regexp.MustCompile(`listening emsd=(\S+) `), "serve", "--config", cfg, "--data", data,
		"--listen", "127.0.0.1:0", "--smtp", "off", "--admin", "off", "--log-level", "warn")
	srv := m[1]

	// Two devices with addresses of their own (both on loopback), as
	// devices have: delivery verify carries no credentials, so the server
	// knows the asking device by its IP address (docs/protocol.md EMSD §9.13).
	ips := map[string]string{"198.036": "127.0.0.1", "198.037": "127.0.0.2"}
	if c, err := net.ListenPacket("udp4", "127.0.0.2:0"); err != nil {
		t.Skipf("no second loopback address: %v", err)
	} else {
		c.Close()
	}
	// Each device's client starts first, on a port of its own, and the
	// device is registered where it listens: a port found free and closed
	// for "device add" to name may be taken by then.
	receivers := map[string]*syncBuffer{}
	for _, dev := range []string{"198.036", "198.037"} {
		m, out, _ := uaBackground(t, regexp.MustCompile(`listening on (\S+),`), append([]string{"ua", "receive", "--listen", ips[dev] + ":0",
			"--maildir", filepath.Join(dir, "Maildir-"+dev), "--domain", "emsd.test", "--server", srv, "--address", dev,
			"--password", "pw-" + dev, "--poll"}, timers...)...)
		receivers[dev] = out
		_, port, _ := strings.Cut(m[1], ":")
		env, dout, errb := testEnv()
		if code := run(t.Context(), env, []string{"device", "add", "--data", data, "--address", dev, "--password", "pw-" + dev,
			"--ip", ips[dev], "--port", port}); code != exitOK {
			t.Fatalf("device add %s: %d %s %s", dev, code, dout, errb)
		}
	}
	send := func(stdin string, args ...string) (int, string, string) {
		env, out, errb := testEnv()
		env.stdin = strings.NewReader(stdin)
		code := run(t.Context(), env, append(append([]string{"ua", "send", "--server", srv}, args...), timers...))
		return code, out.String(), errb.String()
	}

	idRE := regexp.MustCompile(`^submitted message-id=[0-9a-f]{8}\.[0-9a-f]{8}\n$`)
	big := strings.Repeat("0123456789 abcdefghijklmnopqrstuvwxyz\n", 40<<10/38)
	for i, tc := range []struct {
		from, to, subject, body string
	}{
		{"198.036", "198.037", "Lunch?", "Lunch at noon?\n"},
		{"198.037", "198.036", "Re: Lunch? ✓", "Gern, um 12 Uhr.\n"},
		{"198.036", "198.037", "10 KB", big[:10<<10]},
		{"198.037", "198.036", "40 KB", big},
	} {
		code, out, errs := send(tc.body, "--address", tc.from, "--password", "pw-"+tc.from, "--to", tc.to, "--subject", tc.subject,
			"--local", ips[tc.from]+":0")
		if code != exitOK || !idRE.MatchString(out) {
			t.Fatalf("send %d: exit %d, stdout %q, stderr %q", i, code, out, errs)
		}
		line := waitLine(t, receivers[tc.to], regexp.MustCompile(`delivered message-id=(\S+) from=`+regexp.QuoteMeta(tc.from)+
			` subject=`+regexp.QuoteMeta(fmt.Sprintf("%q", tc.subject))+`\n`))
		// The stored message carries the body.
		maildir := filepath.Join(dir, "Maildir-"+tc.to, "new")
		found := false
		ents, _ := os.ReadDir(maildir)
		for _, e := range ents {
			b, _ := os.ReadFile(filepath.Join(maildir, e.Name()))
			msg, err := mail.ReadMessage(bytes.NewReader(b))
			if err != nil {
				t.Fatalf("%s: %v", e.Name(), err)
			}
			if msg.Header.Get("Message-Id") == line[1] || strings.Contains(msg.Header.Get("Message-Id"), strings.Trim(line[1], "<>")) {
				found = true
				body, _ := io.ReadAll(msg.Body)
				if tc.to == "198.037" && len(tc.body) < 100 && !strings.Contains(string(body), strings.TrimSpace(tc.body)) {
					t.Fatalf("stored body %q", body)
				}
			}
		}
		if !found {
			t.Fatalf("message %s not in %s", line[1], maildir)
		}
		if i == 0 {
			// The receiving device asks about its delivery.
			env, out, errb := testEnv()
			code := run(t.Context(), env, append([]string{"ua", "verify", "--server", srv, "--address", "198.037",
				"--password", "pw-198.037", "--local", ips["198.037"] + ":0", line[1]}, timers...))
			if code != exitOK || out.String() != "status=2 delivery-report-sent\n" {
				t.Fatalf("verify %s: exit %d, %q %q", line[1], code, out, errb)
			}
		}
	}
	// Duplicates: a device whose RESULT was lost (so it never ACKed)
	// re-invokes the same submission with the same instance id (see
	// docs/protocol.md EMSD §1.5): one message, one id, delivered once. The first INVOKE
	// comes from a bare socket that reads the RESULT and never ACKs it.
	ipm, err := (&ua.Message{To: []string{"198.037"}, Subject: "once", Body: []byte("only once\n")}).IPM(198036)
	if err != nil {
		t.Fatal(err)
	}
	content, _ := ipm.Marshal(emsd.Options{})
	arg, _ := (&emsd.SubmitArgument{Security: &emsd.SecurityElement{Address: &emsd.EMSDAddress{Address: 198036}, Password: "pw-198.036"},
		ContentType: emsd.ContentIPM, Contents: content}).Marshal(emsd.Options{})
	subData := emsd.PrependInstanceID(77, arg)
	to, _ := resolveUDP(srv)
	raw, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	invoke, _ := esro.AppendPDU(nil, &esro.PDU{Type: esro.TypeInvoke, SAP: 5, Ref: 9, Operation: 33, Data: subData})
	if _, err := raw.WriteToUDPAddrPort(invoke, to); err != nil {
		t.Fatal(err)
	}
	raw.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 1500)
	n, _, err := raw.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatal(err)
	}
	first, err := esro.ParsePDU(buf[:n])
	if err != nil || first.Type != esro.TypeResult || first.Ref != 9 {
		t.Fatalf("first submission answered %v %v", first, err)
	}
	// The re-invocation comes from the same socket, as a device's does;
	// from another one it would be another program's message. (Binding
	// its port again after closing it could find it taken.)
	raw.SetReadDeadline(time.Time{})
	ep, err := esro.NewEndpoint(raw, &esro.Config{Timers: uaParseTimers(t, timers)})
	if err != nil {
		t.Fatal(err)
	}
	defer ep.Close()
	res, err := ep.Invoke(t.Context(), &esro.Request{To: to, SAP: 5, Operation: 33, Handshake: esro.ThreeWay, Data: subData})
	if err != nil {
		t.Fatalf("re-invoked submission: %v", err)
	}
	if string(res.Data) != string(first.Data) {
		t.Fatalf("re-invoked submission got another id: % x, % x", first.Data, res.Data)
	}
	waitLine(t, receivers["198.037"], regexp.MustCompile(`subject="once"`))
	time.Sleep(500 * time.Millisecond) // a second delivery would come now
	if n := strings.Count(receivers["198.037"].String(), `subject="once"`); n != 1 {
		t.Fatalf("delivered %d times", n)
	}

	code, out, errs := send("x\n", "--address", "198.036", "--password", "wrong", "--to", "198.037")
	if code != exitError || !strings.HasPrefix(out, "error code=4 security-error parameter=4") {
		t.Fatalf("wrong password: exit %d, stdout %q, stderr %q", code, out, errs)
	}
}

// uaParseTimers reads timer flags as the commands do.
func uaParseTimers(t *testing.T, args []string) esro.Timers {
	fs := flag.NewFlagSet("timers", flag.ContinueOnError)
	var tf timerFlags
	tf.register(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	return tf.t
}

// A device stores a delivery and dies before it answers; the real server
// delivers the message again in a new attempt to the restarted device
// ("emsdp ua receive" on the same Maildir), which answers it as done
// without storing it a second time, and the server counts it delivered.
func TestUARedeliveryWithServer(t *testing.T) {
	uaNoLeaks(t)
	data := filepath.Join(t.TempDir(), "data")
	a, _ := startServe(t, "--config", serveConfig(t, ""), "--listen", "127.0.0.1:0", "--smtp", "127.0.0.1:0",
		"--admin", "127.0.0.1:0", "--data", data)
	maildir := filepath.Join(t.TempDir(), "Maildir")

	// The first life of the device stores the message, then hangs until
	// its endpoint is closed, as if killed before its RESULT went out. It
	// listens on a port of its own, and the device is registered there.
	ep, err := esro.Listen("udp", "127.0.0.1:0", &esro.Config{Timers: uaFastTimers(), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer ep.Close()
	_, port, _ := net.SplitHostPort(ep.LocalAddr().String())
	if code, _, errs := runCmd(t, "", "device", "add", "--data", data, "--address", "198.037", "--password", "pw-037",
		"--ip", "127.0.0.1", "--port", port); code != exitOK {
		t.Fatalf("device add: exit %d: %s", code, errs)
	}
	md, err := ua.OpenMaildir(maildir, ua.MaildirConfig{Domain: "emsd.test", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	stored := make(chan struct{})
	var once sync.Once
	c, err := ua.New(ep, ua.Config{Logger: slog.New(slog.DiscardHandler), Handler: ua.HandlerFunc(func(ctx context.Context, d *ua.Delivery) error {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if _, err := md.Store(d); err != nil {
			return err
		}
		once.Do(func() { close(stored) })
		<-ctx.Done()
		return ctx.Err()
	})})
	if err != nil {
		t.Fatal(err)
	}
	msg := "From: Carol <carol@example.com>\r\nTo: 198.037@emsd.test\r\nSubject: Once only\r\nMessage-ID: <once@example.com>\r\n\r\nStore me once.\r\n"
	// The server learns of the device by polling its store.
	waitFor(t, "the server to take the mail", func() bool { return smtpSend(a.smtp, "carol@example.com", "198.037@emsd.test", msg) == nil })
	select {
	case <-stored:
	case <-time.After(20 * time.Second):
		t.Fatal("no delivery")
	}
	c.Close()
	ep.Close()
	if n := maildirCount(maildir); n != 1 {
		t.Fatalf("%d messages in the Maildir", n)
	}

	// The second life, on another port (binding the first one again could
	// find it taken by another socket since): it polls with its password,
	// and the server delivers where the polls come from.
	_, rout, _ := uaBackground(t, regexp.MustCompile(`listening on`), append([]string{"ua", "receive", "--listen", "127.0.0.1:0",
		"--maildir", maildir, "--domain", "emsd.test", "--server", a.emsd, "--address", "198.037", "--password", "pw-037", "--poll"},
		strings.Fields(fast)...)...)
	// Delivered under the server's local id for the message.
	waitLine(t, rout, regexp.MustCompile(`duplicate message-id=[0-9a-f]{8}\.[0-9a-f]{8} from=carol@example.com subject="Once only"\n`))
	waitMetrics(t, a.admin, `emsd_deliveries_total{outcome="delivered"} 1`)
	if n := maildirCount(maildir); n != 1 || strings.Contains(rout.String(), "delivered message-id") {
		t.Fatalf("%d messages in the Maildir; receive printed %q", n, rout.String())
	}
}

// The report of the NAT issue, through the commands: device 198.002 is
// registered at 127.0.0.2:27102 and runs "ua receive --poll" from
// 127.0.0.3 (as a NAT or a new lease would make it), and a device
// registered without any address polls from wherever it is; mail for them
// arrives, and "device show" and "queue list --device" say where they were
// heard. The servers' address-change counter stays 0.
func TestUAReceiveElsewhere(t *testing.T) {
	uaNoLeaks(t)
	for _, ip := range []string{"127.0.0.2", "127.0.0.3"} {
		if c, err := net.ListenPacket("udp4", ip+":0"); err != nil {
			t.Skipf("no loopback address %s: %v", ip, err)
		} else {
			c.Close()
		}
	}
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	cfg := filepath.Join(dir, "emsdp.toml")
	timers := strings.Fields(uaE2ETimers)
	toml := "domain = \"emsd.test\"\n[esro]\nack_delay = \"10ms\"\nroundtrip = \"100ms\"\nretransmit = \"300ms\"\nnsdu_lifetime = \"100ms\"\nretries = 8\n" +
		"[delivery]\nretry = [\"200ms\"]\n[store]\nregistry_poll = \"50ms\"\n"
	if err := os.WriteFile(cfg, []byte(toml), 0o600); err != nil {
		t.Fatal(err)
	}
	m, _, _ := uaBackground(t, regexp.MustCompile(`listening emsd=(\S+) `), "serve", "--config", cfg, "--data", data,
		"--listen", "127.0.0.1:0", "--smtp", "off", "--admin", "off", "--log-level", "warn")
	srv := m[1]
	_, port, _ := strings.Cut(closedUDPAddr(t, "127.0.0.2"), ":") // nobody listens there
	for _, args := range [][]string{
		{"--address", "198.002", "--password", "pw2", "--ip", "127.0.0.2", "--port", port},
		{"--address", "198.003", "--password", "pw3"},
	} {
		if code, out, errs := runCmd(t, "", append([]string{"device", "add", "--config", cfg, "--data", data}, args...)...); code != exitOK {
			t.Fatalf("device add: %d %s %s", code, out, errs)
		}
	}
	recv := map[string]*syncBuffer{}
	// 198.002 listens and polls on a port of its own on 127.0.0.3.
	listen := map[string]string{"198.002": "127.0.0.3:0", "198.003": ""}
	for dev, pw := range map[string]string{"198.002": "pw2", "198.003": "pw3"} {
		args := []string{"ua", "receive", "--maildir", filepath.Join(dir, "Maildir-"+dev), "--domain", "emsd.test",
			"--server", srv, "--address", dev, "--password", pw, "--poll", "--poll-interval", "200ms"}
		if listen[dev] != "" {
			args = append(args, "--listen", listen[dev])
		}
		m, out, errb := uaBackground(t, regexp.MustCompile(`listening on (\S+),`), append(args, timers...)...)
		if listen[dev] != "" {
			listen[dev] = m[1]
		}
		waitLine(t, errb, regexp.MustCompile(`delivery control answered\n`))
		recv[dev] = out
	}
	for i, to := range []string{"198.002", "198.003", "198.002"} {
		code, out, errs := runCmd(t, "x\n", append([]string{"ua", "send", "--server", srv, "--address", "198.003", "--password", "pw3",
			"--to", to, "--subject", fmt.Sprint("m", i)}, timers...)...)
		if code != exitOK {
			t.Fatalf("send: %d %q %q", code, out, errs)
		}
		waitLine(t, recv[to], regexp.MustCompile(fmt.Sprintf(`delivered message-id=\S+ from=198\.003 subject="m%d"\n`, i)))
	}
	code, out, _ := runCmd(t, "", "device", "show", "198.002", "--config", cfg, "--data", data)
	if want := regexp.MustCompile(`\nheard: +` + regexp.QuoteMeta(listen["198.002"]) + `, \d+s ago .* in a poll; deliveries go there\n`); code != exitOK || !want.MatchString(out) {
		t.Errorf("device show: %d %q", code, out)
	}
	code, out, _ = runCmd(t, "", "queue", "list", "--device", "198.003", "--state", "all", "--config", cfg, "--data", data)
	if want := regexp.MustCompile(`\n-- device 198\.003 heard: 127\.0\.0\.1:\d+, \d+s ago .* in a poll; deliveries go there\n`); code != exitOK || !want.MatchString(out) {
		t.Errorf("queue list: %d %q", code, out)
	}
}
