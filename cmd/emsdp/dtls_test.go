package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// capture is a UDP relay on loopback that keeps every datagram it passes,
// both ways: what a packet capture on the path would see.
type capture struct {
	front *net.UDPConn
	mu    sync.Mutex
	seen  [][]byte
	wg    sync.WaitGroup
}

func newCapture(t *testing.T, target string) *capture {
	t.Helper()
	to, err := net.ResolveUDPAddr("udp4", target)
	if err != nil {
		t.Fatal(err)
	}
	front, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	back, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	c := &capture{front: front}
	var client *net.UDPAddr
	var cmu sync.Mutex
	c.wg.Add(2)
	go func() {
		defer c.wg.Done()
		buf := make([]byte, 65536)
		for {
			n, from, err := front.ReadFromUDP(buf)
			if err != nil {
				return
			}
			cmu.Lock()
			client = from
			cmu.Unlock()
			c.keep(buf[:n])
			back.WriteToUDP(buf[:n], to)
		}
	}()
	go func() {
		defer c.wg.Done()
		buf := make([]byte, 65536)
		for {
			n, _, err := back.ReadFromUDP(buf)
			if err != nil {
				return
			}
			c.keep(buf[:n])
			cmu.Lock()
			cl := client
			cmu.Unlock()
			if cl != nil {
				front.WriteToUDP(buf[:n], cl)
			}
		}
	}()
	t.Cleanup(func() { front.Close(); back.Close(); c.wg.Wait() })
	return c
}

func (c *capture) keep(b []byte) {
	c.mu.Lock()
	c.seen = append(c.seen, append([]byte(nil), b...))
	c.mu.Unlock()
}

func (c *capture) addr() string { return c.front.LocalAddr().String() }

func (c *capture) all() (n, bytes int, joined []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, d := range c.seen {
		bytes += len(d)
		joined = append(joined, d...)
	}
	return len(c.seen), bytes, joined
}

// TestUAOverDTLS: devices provisioned with "device add --psk" (a key
// generated, or given) submit and receive through "serve --dtls-listen" without passwords; a
// capture of the path holds neither password nor mail text; require_dtls
// refuses the same device on plain UDP; a wrong key gets nothing through.
func TestUAOverDTLS(t *testing.T) {
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
	m, _, _ := uaBackground(t, regexp.MustCompile(`listening emsd=(\S+) .* dtls=(\S+)`), "serve", "--config", cfg, "--data", data,
		"--listen", "127.0.0.1:0", "--dtls-listen", "127.0.0.1:0", "--smtp", "off", "--admin", "off", "--log-level", "warn")
	plain, dtlsAddr := m[1], m[2]

	// The sender's key is generated and printed; the receiver's is given,
	// so that its client can start first, on a port of its own, before it
	// is registered there (a port found free and closed for "device add"
	// to name may be taken by then).
	keys := map[string]string{"198.037": "00112233445566778899aabbccddeeff"}
	_, senderPort, _ := strings.Cut(closedUDPAddr(t, "127.0.0.1"), ":") // it never receives here
	code, out, errs := runCmd(t, "", "device", "add", "--data", data, "--address", "198.036", "--ip", "127.0.0.1",
		"--port", senderPort, "--psk", "generate", "--password", "pw-in-clear", "--require-dtls")
	k := regexp.MustCompile(`(?m)^psk: ([0-9a-f]+)$`).FindStringSubmatch(out)
	if code != exitOK || k == nil {
		t.Fatalf("device add 198.036: %d %s %s", code, out, errs)
	}
	keys["198.036"] = k[1]
	keyFile := filepath.Join(dir, "198.036.key")
	if err := os.WriteFile(keyFile, []byte(keys["198.036"]+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	// The receiver polls over DTLS, and the server delivers through that
	// session (or one it opens to the registered address).
	rm, recv, _ := uaBackground(t, regexp.MustCompile(`listening on (\S+),`), append([]string{"ua", "receive", "--listen", "127.0.0.1:0",
		"--maildir", filepath.Join(dir, "Maildir"), "--domain", "emsd.test", "--server", dtlsAddr, "--address", "198.037",
		"--dtls", "--psk", keys["198.037"], "--poll"}, timers...)...)
	_, port, _ := strings.Cut(rm[1], ":")
	if code, out, errs := runCmd(t, "", "device", "add", "--data", data, "--address", "198.037", "--ip", "127.0.0.1",
		"--port", port, "--psk", keys["198.037"]); code != exitOK {
		t.Fatalf("device add 198.037: %d %s %s", code, out, errs)
	}

	cap := newCapture(t, dtlsAddr)
	secretSubject, secretBody := "Quarterly numbers", "The vault code is 4711-0815, keep it quiet.\n"
	code, out, errs = runCmdStdin(t, secretBody, append([]string{"ua", "send", "--server", cap.addr(), "--address", "198.036",
		"--password", "pw-in-clear", "--dtls", "--psk-file", keyFile, "--to", "198.037", "--subject", secretSubject}, timers...)...)
	if code != exitOK || !strings.HasPrefix(out, "submitted message-id=") {
		t.Fatalf("ua send --dtls: exit %d %q %q", code, out, errs)
	}
	waitLine(t, recv, regexp.MustCompile(`delivered message-id=\S+ from=198\.036 subject="`+secretSubject+`"`))
	n, size, wire := cap.all()
	if n < 4 {
		t.Fatalf("capture holds %d datagrams", n)
	}
	for _, clear := range []string{"pw-in-clear", secretSubject, "vault code", "4711-0815"} {
		if bytes.Contains(wire, []byte(clear)) {
			t.Errorf("%q in clear on the DTLS path", clear)
		}
	}
	t.Logf("DTLS submission with handshake: %d datagrams, %d bytes", n, size)

	// Without a password but with the key: accepted (the key is the proof).
	code, out, errs = runCmdStdin(t, "no password\n", append([]string{"ua", "send", "--server", dtlsAddr, "--address", "198.037",
		"--dtls", "--psk", keys["198.037"], "--to", "198.036"}, timers...)...)
	if code != exitOK {
		t.Fatalf("send without password: exit %d %q %q", code, out, errs)
	}
	// require_dtls: the same device over plain UDP, even with its password.
	code, out, _ = runCmdStdin(t, "plain\n", append([]string{"ua", "send", "--server", plain, "--address", "198.036",
		"--password", "pw-in-clear", "--to", "198.037"}, timers...)...)
	if code != exitError || !strings.HasPrefix(out, "error code=4 ") {
		t.Fatalf("plain UDP for a require_dtls device: exit %d %q", code, out)
	}
	// A wrong key gets no session, hence no answer; the command says
	// what that most likely means.
	wrong := strings.Repeat("ab", 16)
	code, out, errs = runCmdStdin(t, "x\n", append([]string{"ua", "send", "--server", dtlsAddr, "--address", "198.037",
		"--dtls", "--psk", wrong, "--to", "198.036", "--retries", "2"}, timers...)...)
	if code != exitFailure || !strings.HasPrefix(out, "failure ") || !strings.Contains(errs, "no DTLS session with "+dtlsAddr+": the handshake did not complete; a wrong key") {
		t.Fatalf("wrong key: exit %d %q %q", code, out, errs)
	}
	// Usage errors.
	for _, args := range [][]string{
		{"ua", "send", "--server", dtlsAddr, "--address", "198.037", "--dtls", "--to", "198.036"},
		{"ua", "send", "--server", dtlsAddr, "--address", "198.037", "--psk", wrong, "--to", "198.036"},
		{"ua", "send", "--server", dtlsAddr, "--address", "198.037", "--dtls", "--psk", "abcd", "--to", "198.036"},
	} {
		if code, _, _ := runCmdStdin(t, "x", args...); code != exitUsage {
			t.Errorf("%v: exit %d, want usage", args, code)
		}
	}
}

func runCmdStdin(t *testing.T, stdin string, args ...string) (int, string, string) {
	t.Helper()
	return runCmd(t, stdin, args...)
}

// needOpenSSL returns the openssl program, failing loudly without it.
func needOpenSSL(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("openssl")
	if err != nil {
		t.Fatal("openssl is missing: install the Debian package openssl (./test.sh does)")
	}
	return p
}

// TestOpenSSLClientToPerform: OpenSSL's DTLS client sends a raw ESRO
// INVOKE to "esro perform --dtls" and reads the RESULT, with each of the
// default suites.
func TestOpenSSLClientToPerform(t *testing.T) {
	openssl := needOpenSSL(t)
	key := "00112233445566778899aabbccddeeff"
	m, out, _ := uaBackground(t, regexp.MustCompile(`listening on (\S+),`), "esro", "perform", "--listen", "127.0.0.1:0",
		"--dtls", "--psk-identity", "device-7", "--psk", key)
	for _, cipher := range []string{"PSK-AES128-CCM8", "ECDHE-PSK-CHACHA20-POLY1305"} {
		t.Run(cipher, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, openssl, "s_client", "-dtls1_2", "-connect", m[1], "-psk", key,
				"-psk_identity", "device-7", "-cipher", cipher, "-quiet")
			stdin, _ := cmd.StdinPipe()
			var stdout syncBuffer
			cmd.Stdout = &stdout
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			// s_client keeps the session after its input ends: stop it.
			defer func() { stdin.Close(); cmd.Process.Kill(); cmd.Wait() }()
			// INVOKE: SAP 13, reference 1, encoding 0, operation 0.
			stdin.Write([]byte("\xd0\x01\x00hello over openssl"))
			for !strings.Contains(stdout.String(), "\x01\x01hello over openssl") {
				if ctx.Err() != nil {
					t.Fatalf("no RESULT from perform; got %q", stdout.String())
				}
				time.Sleep(20 * time.Millisecond)
			}
		})
	}
	if !strings.Contains(out.String(), "identity=device-7") {
		t.Fatalf("perform did not report the identity: %q", out.String())
	}
}

// TestInvokeToOpenSSLServer: "esro invoke --dtls" against OpenSSL's DTLS
// server, whose standard input plays the performer: the test reads the
// INVOKE it prints and writes back a RESULT for its reference number.
func TestInvokeToOpenSSLServer(t *testing.T) {
	openssl := needOpenSSL(t)
	key := "0123456789abcdef0123456789abcdef"
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	// s_server binds a port of its own; with -quiet it does not print
	// which, so the test reads it from the process's socket.
	srv := exec.CommandContext(ctx, openssl, "s_server", "-dtls1_2", "-accept", "127.0.0.1:0", "-nocert",
		"-psk", key, "-psk_identity", "device-9", "-cipher", "PSK-AES128-CCM8", "-quiet")
	stdin, _ := srv.StdinPipe()
	stdout, _ := srv.StdoutPipe()
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { stdin.Close(); cancel(); srv.Wait() }()
	go func() {
		buf := make([]byte, 4096)
		n, err := io.ReadAtLeast(stdout, buf, 3)
		if err != nil {
			return
		}
		if buf[0]&7 != 0 { // not an INVOKE
			return
		}
		// RESULT: type 1, encoding 0; the INVOKE's reference; data.
		res := append([]byte{0x01, buf[1]}, []byte("answer:"+string(buf[3:n]))...)
		stdin.Write(res)
		io.Copy(io.Discard, stdout) // the ACK
	}()
	port := procUDPPort(t, srv.Process.Pid)
	var code int
	var out, errs string
	for range 5 {
		code, out, errs = runCmd(t, "", "esro", "invoke", "--to", "127.0.0.1:"+port, "--sap", "13", "--data", "ping",
			"--dtls", "--psk-identity", "device-9", "--psk", key, "--cipher-suites", "TLS_PSK_WITH_AES_128_CCM_8")
		if code == exitOK {
			break
		}
		time.Sleep(300 * time.Millisecond)
	}
	if code != exitOK || out != "result enc=0 data=\"answer:ping\"\n" {
		t.Fatalf("invoke: exit %d %q %q", code, out, errs)
	}
}

// procUDPPort waits for process pid to bind a UDP socket on 127.0.0.1
// and returns its port, read from /proc: the socket inodes among the
// process's descriptors, looked up in /proc/net/udp.
func procUDPPort(t *testing.T, pid int) string {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		if err != nil {
			t.Fatalf("the process's descriptors: %v", err)
		}
		inodes := map[string]bool{}
		for _, fd := range fds {
			l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
			if in, ok := strings.CutPrefix(l, "socket:["); ok {
				inodes[strings.TrimSuffix(in, "]")] = true
			}
		}
		table, err := os.ReadFile("/proc/net/udp")
		if err != nil {
			t.Fatalf("the UDP sockets: %v", err)
		}
		// "sl local_address rem_address st ... inode": local 0100007F:PORT in hex.
		for l := range strings.Lines(string(table)) {
			f := strings.Fields(l)
			if len(f) < 10 || !inodes[f[9]] {
				continue
			}
			if ip, port, ok := strings.Cut(f[1], ":"); ok && ip == "0100007F" {
				n, err := strconv.ParseUint(port, 16, 16)
				if err == nil && n != 0 {
					return strconv.FormatUint(n, 10)
				}
			}
		}
	}
	t.Fatalf("process %d bound no UDP port on 127.0.0.1", pid)
	return ""
}
