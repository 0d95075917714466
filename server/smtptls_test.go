package server

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/emersion/go-smtp"

	"github.com/esro-emsdp/emsdp/internal/testcert"
)

func trusting(certs ...*testcert.Cert) *tls.Config {
	return &tls.Config{RootCAs: testcert.Pool(certs...)} // go-smtp sets ServerName to the dialled host, 127.0.0.1
}

// sendTLS runs one transaction over STARTTLS (tlsConf non-nil) or in
// plaintext and returns the TLS state the client saw.
func sendTLS(addr string, tlsConf *tls.Config, from, to, msg string) (tls.ConnectionState, error) {
	var c *smtp.Client
	var err error
	if tlsConf != nil {
		c, err = smtp.DialStartTLS(addr, tlsConf)
	} else {
		c, err = smtp.Dial(addr)
	}
	if err != nil {
		return tls.ConnectionState{}, err
	}
	defer c.Close()
	if err := c.Hello("client.test"); err != nil { // the handshake happens here
		return tls.ConnectionState{}, err
	}
	st, _ := c.TLSConnectionState()
	if err := c.Mail(from, nil); err != nil {
		return st, err
	}
	if err := c.Rcpt(to, nil); err != nil {
		return st, err
	}
	w, err := c.Data()
	if err != nil {
		return st, err
	}
	if _, err := io.WriteString(w, msg); err != nil {
		return st, err
	}
	if err := w.Close(); err != nil {
		return st, err
	}
	return st, c.Quit()
}

// offersSTARTTLS reports whether the EHLO reply lists STARTTLS.
func offersSTARTTLS(t *testing.T, addr string) bool {
	t.Helper()
	c, err := smtp.Dial(addr)
	must(t, err)
	defer c.Close()
	must(t, c.Hello("client.test"))
	ok, _ := c.Extension("STARTTLS")
	return ok
}

// Inbound SMTP with and without a certificate, with and without
// require_tls: what is offered, what is accepted, and that accepted mail
// reaches the device.
func TestSMTPSTARTTLS(t *testing.T) {
	cert := testcert.New(t, "mx.emsd.test")
	certFile, keyFile := cert.Files(t)
	tls11 := trusting(cert)
	tls11.MinVersion, tls11.MaxVersion = tls.VersionTLS10, tls.VersionTLS11
	for _, tc := range []struct {
		name          string
		cert, require bool
		client        *tls.Config // nil: plaintext
		wantErr       string      // "" = delivered
	}{
		{"no certificate", false, false, nil, ""},
		{"no certificate, client wants STARTTLS", false, false, trusting(cert), "doesn't support STARTTLS"},
		{"plaintext beside STARTTLS", true, false, nil, ""},
		{"STARTTLS", true, false, trusting(cert), ""},
		{"required, plaintext", true, true, nil, "530"},
		{"required, STARTTLS", true, true, trusting(cert), ""},
		{"TLS 1.1 refused", true, false, tls11, "protocol version"},
		{"untrusted certificate", true, false, trusting(testcert.New(t, "other")), "certificate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := testConfig(t)
			if tc.cert {
				c.SMTP.TLSCert, c.SMTP.TLSKey = certFile, keyFile
			}
			c.SMTP.RequireTLS = tc.require
			s := startServer(t, c)
			dev := newDevice(t, s, 198036, deviceOpts{})
			addr := s.Addrs().SMTP.String()
			if got := offersSTARTTLS(t, addr); got != tc.cert {
				t.Errorf("STARTTLS offered: %v", got)
			}
			st, err := sendTLS(addr, tc.client, "carol@example.com", "198.036@emsd.test",
				inboundMsg("198.036@emsd.test", "tls", "secret"))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one with %q", err, tc.wantErr)
				}
				if tc.wantErr == "530" {
					var se *smtp.SMTPError
					if !errors.As(err, &se) || se.EnhancedCode != (smtp.EnhancedCode{5, 7, 0}) {
						t.Errorf("%v: want 530 5.7.0", err)
					}
				}
				if n := s.metrics.counter(t, "gateway_inbound_total", "accepted"); n != 0 {
					t.Errorf("%v messages accepted", n)
				}
				if n := s.metrics.counter(t, "gateway_inbound_starttls_total", ""); n != 0 {
					t.Errorf("%v handshakes counted", n)
				}
				return
			}
			must(t, err)
			if got := st.HandshakeComplete; got != (tc.client != nil) {
				t.Errorf("TLS %v", got)
			}
			if st.HandshakeComplete && st.Version < tls.VersionTLS12 {
				t.Errorf("TLS version %x", st.Version)
			}
			if del := dev.next(t); del.IPM.Heading.Subject != "tls" {
				t.Errorf("delivered %q", del.IPM.Heading.Subject)
			}
			want := 0.0
			if tc.client != nil {
				want = 1
			}
			if n := s.metrics.counter(t, "gateway_inbound_starttls_total", ""); n != want {
				t.Errorf("gateway_inbound_starttls_total %v, want %v", n, want)
			}
		})
	}
}

// Reload (SIGHUP) swaps the certificate for new handshakes without
// restarting the listener: a session opened before goes on; a certificate
// that fails to load is reported and the one in use stays.
func TestSMTPCertificateReload(t *testing.T) {
	first, second := testcert.New(t, "first"), testcert.New(t, "second")
	certFile, keyFile := first.Files(t)
	c := testConfig(t)
	c.SMTP.TLSCert, c.SMTP.TLSKey = certFile, keyFile
	s := startServer(t, c)
	newDevice(t, s, 198036, deviceOpts{})
	addr := s.Addrs().SMTP.String()
	client := trusting(first, second)
	peer := func() *x509.Certificate {
		t.Helper()
		st, err := sendTLS(addr, client, "carol@example.com", "198.036@emsd.test", inboundMsg("198.036@emsd.test", "r", "b"))
		must(t, err)
		return st.PeerCertificates[0]
	}
	if got := peer(); !got.Equal(first.Leaf) {
		t.Fatalf("serving %q, want first", got.Subject.CommonName)
	}

	// A session from before the reload, to use after it.
	old, err := smtp.DialStartTLS(addr, client)
	must(t, err)
	defer old.Close()
	must(t, old.Hello("client.test"))

	second.Write(t, certFile, keyFile)
	if got := peer(); !got.Equal(first.Leaf) {
		t.Fatalf("serving %q before the reload, want first", got.Subject.CommonName)
	}
	must(t, s.Reload(context.Background()))
	if got := peer(); !got.Equal(second.Leaf) {
		t.Fatalf("serving %q after the reload, want second", got.Subject.CommonName)
	}
	must(t, old.Mail("carol@example.com", nil))
	must(t, old.Rcpt("198.036@emsd.test", nil))
	must(t, old.Quit())

	must(t, os.WriteFile(certFile, []byte("not a certificate"), 0o600))
	err = s.Reload(context.Background())
	if err == nil || !strings.Contains(err.Error(), certFile) {
		t.Fatalf("reload of a broken certificate: %v", err)
	}
	if got := peer(); !got.Equal(second.Leaf) {
		t.Fatalf("serving %q after a failed reload, want second", got.Subject.CommonName)
	}
	if n := s.metrics.counter(t, "gateway_inbound_starttls_total", ""); n != 5 {
		t.Errorf("gateway_inbound_starttls_total %v, want 5", n)
	}
}

// The [smtp] TLS keys: read from a file, validated with the key pair
// loaded, errors one line naming the key.
func TestSMTPTLSConfig(t *testing.T) {
	a, b := testcert.New(t, "a"), testcert.New(t, "b")
	certFile, keyFile := a.Files(t)
	_, otherKey := b.Files(t)
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.pem")
	garbage := filepath.Join(dir, "garbage.pem")
	must(t, os.WriteFile(garbage, []byte("hello"), 0o600))
	keys := func(cert, key string, require bool) string {
		s := "[smtp]\n"
		if cert != "" {
			s += "tls_cert = " + quote(cert) + "\n"
		}
		if key != "" {
			s += "tls_key = " + quote(key) + "\n"
		}
		if require {
			s += "require_tls = true\n"
		}
		return s
	}
	for _, tc := range []struct {
		name, text string
		wantErr    []string
	}{
		{"defaults", "", nil},
		{"certificate", keys(certFile, keyFile, false), nil},
		{"required", keys(certFile, keyFile, true), nil},
		{"certificate only", keys(certFile, "", false), []string{"smtp.tls_cert and smtp.tls_key: set both or neither"}},
		{"key only", keys("", keyFile, false), []string{"smtp.tls_cert and smtp.tls_key: set both or neither"}},
		{"required without certificate", keys("", "", true), []string{"smtp.require_tls needs smtp.tls_cert and smtp.tls_key"}},
		{"missing file", keys(missing, keyFile, false), []string{"smtp.tls_cert", missing, "no such file"}},
		{"not PEM", keys(garbage, keyFile, false), []string{"smtp.tls_cert", garbage, "PEM"}},
		{"key of another certificate", keys(certFile, otherKey, false), []string{"smtp.tls_key", otherKey, "does not match"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "emsdp.toml")
			must(t, os.WriteFile(p, []byte(tc.text), 0o600))
			c, err := LoadConfig(p)
			if tc.wantErr == nil {
				must(t, err)
				var out bytes.Buffer
				must(t, c.Write(&out))
				for _, k := range []string{"tls_cert = ", "tls_key = ", "require_tls = "} {
					if !strings.Contains(out.String(), k) {
						t.Errorf("written config lacks %s", k)
					}
				}
				if tc.text != "" && !strings.Contains(out.String(), "tls_cert = "+quote(certFile)) {
					t.Errorf("written config:\n%s", out.String())
				}
				return
			}
			var ce *ConfigError
			if !errors.As(err, &ce) {
				t.Fatalf("error %v (%T), want a *ConfigError", err, err)
			}
			for _, w := range tc.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error on several lines: %q", err)
			}
		})
	}
}

func quote(s string) string { return `"` + strings.ReplaceAll(s, `\`, `\\`) + `"` }
