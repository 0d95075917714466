package server

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/esro-emsdp/emsdp/internal/testcert"
	"github.com/esro-emsdp/emsdp/internal/testport"
	"github.com/esro-emsdp/emsdp/store"
)

// postfix is a private Postfix instance on loopback: its own
// configuration, queue and log directory, no system file touched.
type postfix struct {
	dir, etc string
	addr     string // its SMTP listener
}

// postfixBinary finds Debian's postfix command. Missing, it fails the test
// naming the package (./test.sh installs it); without root, which a
// private Postfix instance needs, the test is skipped, loudly.
func postfixBinary(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("postfix")
	if err != nil {
		if _, serr := os.Stat("/usr/sbin/postfix"); serr == nil {
			bin, err = "/usr/sbin/postfix", nil
		}
	}
	switch {
	case err != nil:
		t.Fatal("Postfix is not installed (Debian package postfix; ./test.sh installs it): " +
			"the relay is tested against a real Postfix")
	case os.Geteuid() != 0:
		t.Skip("SKIP: a private Postfix instance needs root (its daemons run as the postfix user); " +
			"the relay is not tested against a real Postfix")
	}
	return bin
}

// startPostfix starts Postfix on loopback with cert, a self-signed
// certificate, for STARTTLS (like Debian's snakeoil one, signed by no CA),
// relaying everything to relayhost and mail for the EMSD domain to
// emsdSMTP.
func startPostfix(t *testing.T, cert *testcert.Cert, relayhost, emsdSMTP string) *postfix {
	t.Helper()
	bin := postfixBinary(t)
	// Postfix's daemons (user postfix) must traverse to their queue:
	// not under t.TempDir, which is private to root.
	dir, err := os.MkdirTemp("", "emsdp-postfix-")
	must(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	must(t, os.Chmod(dir, 0o755))
	p := &postfix{dir: dir, etc: filepath.Join(dir, "etc")}
	for _, d := range []string{"etc", "queue", "data"} {
		must(t, os.Mkdir(filepath.Join(dir, d), 0o755))
	}
	if out, err := exec.Command("chown", "postfix", filepath.Join(dir, "data")).CombinedOutput(); err != nil {
		t.Skipf("SKIP: no postfix user for the Postfix daemons: %v %s", err, out)
	}
	must(t, os.WriteFile(filepath.Join(p.etc, "cert.pem"), cert.CertPEM, 0o644))
	must(t, os.WriteFile(filepath.Join(p.etc, "key.pem"), cert.KeyPEM, 0o600))
	must(t, os.WriteFile(filepath.Join(p.etc, "transport"), []byte("emsd.test smtp:["+strings.Replace(emsdSMTP, ":", "]:", 1)+"\n"), 0o644))
	mainCF := fmt.Sprintf(`compatibility_level = 3.6
queue_directory = %[1]s/queue
data_directory = %[1]s/data
maillog_file = %[1]s/maillog
maillog_file_prefixes = %[1]s
syslog_name = postfix-emsdp-test
mail_owner = postfix
myhostname = postfix.test
mydomain = postfix.test
myorigin = postfix.test
mydestination = postfix.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [%[2]s
transport_maps = texthash:%[1]s/etc/transport
smtp_dns_support_level = disabled
smtp_tls_security_level = none
smtpd_tls_security_level = may
smtpd_tls_cert_file = %[1]s/etc/cert.pem
smtpd_tls_key_file = %[1]s/etc/key.pem
smtpd_tls_received_header = yes
alias_maps =
alias_database =
`, dir, strings.Replace(relayhost, ":", "]:", 1))
	must(t, os.WriteFile(filepath.Join(p.etc, "main.cf"), []byte(mainCF), 0o644))
	master, err := os.ReadFile("/etc/postfix/master.cf")
	if err != nil {
		t.Skipf("SKIP: Postfix's master.cf: %v", err)
	}
	// Postfix's master binds the port master.cf names (it cannot be
	// handed a socket bound for it): a port the kernel gives no socket of
	// its own choosing (listenPort), and another one if something bound
	// it explicitly all the same before Postfix did.
	for attempt := 1; ; attempt++ {
		p.addr = listenPort(t)
		// The smtp service on our port, not chrooted (the queue is not
		// prepared for a chroot).
		var lines []string
		for _, l := range strings.Split(string(master), "\n") {
			if f := strings.Fields(l); len(f) >= 8 && f[0] == "smtp" && f[1] == "inet" {
				l = fmt.Sprintf("%s inet n - n - - smtpd", p.addr)
			}
			lines = append(lines, l)
		}
		must(t, os.WriteFile(filepath.Join(p.etc, "master.cf"), []byte(strings.Join(lines, "\n")), 0o644))

		// The postfix command reports to syslog, or to a terminal: its log
		// file is the place to look when it fails.
		out, err := exec.Command(bin, "-c", p.etc, "start").CombinedOutput()
		if err == nil {
			break
		}
		if attempt < 5 && strings.Contains(p.log(), "port "+p.addr[strings.LastIndexByte(p.addr, ':')+1:]+": Address already in use") {
			t.Logf("Postfix found %s taken; another port", p.addr)
			continue
		}
		t.Fatalf("postfix start: %v %s\n%s", err, out, p.log())
	}
	t.Cleanup(func() {
		if out, err := exec.Command(bin, "-c", p.etc, "stop").CombinedOutput(); err != nil {
			t.Logf("postfix stop: %v %s", err, out)
		}
		if t.Failed() {
			t.Logf("Postfix log:\n%s", p.log())
		}
	})
	eventually(t, "Postfix listening on "+p.addr, func() bool {
		c, err := net.DialTimeout("tcp", p.addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	return p
}

// listenPort returns a loopback TCP address for a program that must be
// told its port rather than report the one it bound: a port free now,
// below the kernel's ephemeral range (ip_local_port_range), which the
// kernel gives no socket bound to port 0 nor any outgoing connection, so
// that only another explicit bind can take it before the program binds
// it.
func listenPort(t *testing.T) string {
	t.Helper()
	return fmt.Sprintf("127.0.0.1:%d", testport.Quiet(t, "tcp"))
}

func (p *postfix) log() string {
	b, _ := os.ReadFile(filepath.Join(p.dir, "maillog"))
	return string(b)
}

// A real Postfix (Debian's) as the smarthost, with a self-signed
// certificate: opportunistic TLS encrypts to it; verify defers until
// relay.ca_file names the certificate, and the reload sends the mail at
// once. Postfix's bounce of a recipient refused behind it comes back to
// the device as an EMSD report.
func TestPostfixSmarthost(t *testing.T) {
	postfixBinary(t)
	cert := testcert.New(t, "postfix.test")
	sink := startSmarthost(t, "") // where Postfix relays to
	c := testConfig(t)
	c.Relay.Retry = []Duration{Duration(time.Hour)}
	s := startServer(t, c)
	pf := startPostfix(t, cert, sink.addr, s.Addrs().SMTP.String())
	dev := newDevice(t, s, 198036, deviceOpts{password: "pw"})

	t.Run("opportunistic", func(t *testing.T) {
		reconfigure(t, s, func(c *Config) { c.Relay.Smarthost, c.Relay.TLS = pf.addr, "opportunistic" })
		submitTo(t, dev, "bob@example.com", "through postfix")
		m := sink.next(t)
		if !slices.Equal(m.to, []string{"bob@example.com"}) || m.from != "198.036@emsd.test" {
			t.Fatalf("sink got %s -> %v", m.from, m.to)
		}
		// Postfix's Received: for our hop says the session was encrypted.
		hdr, _, _ := bytes.Cut(m.data, []byte("\r\n\r\n"))
		if !bytes.Contains(hdr, []byte("with ESMTPS")) && !bytes.Contains(hdr, []byte("using TLS")) {
			t.Errorf("not over TLS:\n%s", hdr)
		}
		if !bytes.Contains(hdr, []byte("Subject: through postfix")) ||
			!regexp.MustCompile(`Received: from device 198\.036 \(\[127\.0\.0\.1\]\)\r\n\tby mts\.emsd\.test \(emsdp\) with EMSD id <EMSD\.[0-9a-f]{8}\.[0-9a-f]{8}@emsd\.test>;`).Match(hdr) {
			t.Errorf("header:\n%s", hdr)
		}
	})

	// A recipient the next hop refuses after Postfix took the message:
	// Postfix's bounce comes back over SMTP to the device, with its
	// delivery-status and header parts.
	t.Run("Postfix bounce", func(t *testing.T) {
		sink.setRcptErr("nobody@example.com", &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"})
		submitTo(t, dev, "nobody@example.com", "will bounce")
		del := dev.next(t)
		if del.IPM == nil {
			t.Fatalf("delivery %+v", del)
		}
		body := string(del.IPM.Body.Text)
		for _, want := range []string{"Final-Recipient: rfc822; nobody@example.com", "Status: 5.1.1", "Subject: will bounce"} {
			if !strings.Contains(body, want) {
				t.Errorf("bounce lacks %q:\n%s", want, body)
			}
		}
	})

	// swaks, as an operator would test inbound mail by hand: a message
	// whose text is more than a device takes is refused, not cut.
	t.Run("swaks oversize", func(t *testing.T) {
		swaks, err := exec.LookPath("swaks")
		if err != nil {
			t.Fatal("swaks is not installed (Debian package swaks; ./test.sh installs it)")
		}
		body := filepath.Join(t.TempDir(), "body.txt")
		must(t, os.WriteFile(body, bytes.Repeat([]byte("A line of a long letter for a small device.\n"), 2000), 0o644))
		out, err := exec.Command(swaks, "--server", s.Addrs().SMTP.String(), "--from", "carol@example.com",
			"--to", "198.036@emsd.test", "--header", "Subject: too long", "--body", body, "--silent", "2").CombinedOutput()
		if err == nil || !bytes.Contains(out, []byte("552 5.3.4 Message too big for 198.036@emsd.test")) {
			t.Errorf("swaks: %v\n%s", err, out)
		}
		dev.none(t, 200*time.Millisecond)
	})

	t.Run("verify, then ca_file", func(t *testing.T) {
		reconfigure(t, s, func(c *Config) { c.Relay.TLS = "verify" })
		submitTo(t, dev, "carol@example.com", "verified")
		var lastErr string
		eventually(t, "the relay deferred", func() bool {
			l, err := s.st.ListQueue(context.Background(), store.QueueFilter{Kind: store.QueueRelay, States: []string{"queued"}})
			must(t, err)
			if len(l.Entries) == 1 {
				lastErr = l.Entries[0].LastError
			}
			return lastErr != ""
		})
		if !strings.Contains(lastErr, "not verified") {
			t.Errorf("deferred with %q", lastErr)
		}
		caFile := filepath.Join(t.TempDir(), "postfix.pem")
		must(t, os.WriteFile(caFile, cert.CertPEM, 0o644))
		reconfigure(t, s, func(c *Config) { c.Relay.CAFile = caFile })
		if m := sink.next(t); !slices.Equal(m.to, []string{"carol@example.com"}) {
			t.Fatalf("sink got %v", m.to)
		}
	})
}
