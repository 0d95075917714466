package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/esro-emsdp/emsdp/internal/testcert"
)

func TestRelaySend(t *testing.T) {
	tests := []struct {
		name      string
		host      *testSmarthost
		configure func(*smtp.Server)
		from      string
		to        []string
		msg       []byte
		// want: per-recipient outcome "ok", "temp" or "perm".
		want      []string
		wantErr   string // "", "temp" or "perm"
		delivered int
		check     func(t *testing.T, h *testSmarthost)
	}{{
		name: "accepted", host: &testSmarthost{},
		from: "198.036@emsd.example.test", to: []string{"bob@example.com", "carol@example.com"},
		want: []string{"ok", "ok"}, delivered: 1,
		check: func(t *testing.T, h *testSmarthost) {
			m := h.received()[0]
			if m.from != "198.036@emsd.example.test" || fmt.Sprint(m.to) != "[bob@example.com carol@example.com]" ||
				string(m.data) != string(testMessage) || m.helo != "mts.emsd.example.test" || m.tls || m.utf8 {
				t.Errorf("got %+v\n%q", m, m.data)
			}
		},
	}, {
		name: "per-recipient 4xx and 5xx",
		host: &testSmarthost{rcptErr: map[string]error{
			"busy@example.com":   &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 2, 1}, Message: "try later"},
			"nouser@example.com": &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"},
		}},
		from: "a@emsd.example.test", to: []string{"busy@example.com", "ok@example.com", "nouser@example.com"},
		want: []string{"temp", "ok", "perm"}, delivered: 1,
		check: func(t *testing.T, h *testSmarthost) {
			if m := h.received()[0]; fmt.Sprint(m.to) != "[ok@example.com]" {
				t.Errorf("delivered to %v", m.to)
			}
		},
	}, {
		name: "every recipient refused: no DATA",
		host: &testSmarthost{rcptErr: map[string]error{
			"x@example.com": &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no"},
		}},
		from: "a@emsd.example.test", to: []string{"x@example.com"}, want: []string{"perm"},
	}, {
		name: "MAIL 5xx is permanent",
		host: &testSmarthost{mailErr: &smtp.SMTPError{Code: 553, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "sender refused"}},
		from: "a@emsd.example.test", to: []string{"b@example.com"}, want: []string{"perm"}, wantErr: "perm",
	}, {
		name: "DATA 4xx is transient",
		host: &testSmarthost{dataErr: &smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 3, 1}, Message: "disk full"}},
		from: "a@emsd.example.test", to: []string{"b@example.com"}, want: []string{"temp"}, wantErr: "temp",
	}, {
		name: "DATA 5xx is permanent",
		host: &testSmarthost{dataErr: &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 6, 0}, Message: "content rejected"}},
		from: "a@emsd.example.test", to: []string{"b@example.com", "c@example.com"}, want: []string{"perm", "perm"}, wantErr: "perm",
	}, {
		name: "over the smarthost's SIZE: permanent, no MAIL", host: &testSmarthost{},
		configure: func(s *smtp.Server) { s.MaxMessageBytes = 50 },
		from:      "a@emsd.example.test", to: []string{"b@example.com"}, want: []string{"perm"}, wantErr: "perm",
		check: func(t *testing.T, h *testSmarthost) {
			if h.mails != 0 {
				t.Errorf("%d MAIL commands", h.mails)
			}
		},
	}, {
		name: "needs SMTPUTF8, not offered", host: &testSmarthost{},
		from: "a@emsd.example.test", to: []string{"jürgen@example.de"}, want: []string{"perm"}, wantErr: "perm",
	}, {
		name: "SMTPUTF8 used when needed", host: &testSmarthost{},
		configure: func(s *smtp.Server) { s.EnableSMTPUTF8 = true },
		from:      "a@emsd.example.test", to: []string{"jürgen@example.de"}, want: []string{"ok"}, delivered: 1,
		check: func(t *testing.T, h *testSmarthost) {
			if m := h.received()[0]; !m.utf8 || m.to[0] != "jürgen@example.de" {
				t.Errorf("%+v", m)
			}
		},
	}, {
		name: "SMTPUTF8 not used when not needed", host: &testSmarthost{},
		configure: func(s *smtp.Server) { s.EnableSMTPUTF8 = true },
		from:      "a@emsd.example.test", to: []string{"b@example.com"}, want: []string{"ok"}, delivered: 1,
		check: func(t *testing.T, h *testSmarthost) {
			if h.received()[0].utf8 {
				t.Error("SMTPUTF8 requested")
			}
		},
	}, {
		name: "null reverse path", host: &testSmarthost{},
		from: "", to: []string{"b@example.com"}, want: []string{"ok"}, delivered: 1,
		check: func(t *testing.T, h *testSmarthost) {
			if h.received()[0].from != "" {
				t.Errorf("from %q", h.received()[0].from)
			}
		},
	}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			addr := tc.host.start(t, tc.configure)
			r := &Relay{Addr: addr, HeloName: "mts.emsd.example.test"}
			msg := tc.msg
			if msg == nil {
				msg = testMessage
			}
			res, err := r.Send(context.Background(), tc.from, tc.to, msg)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("err %v", err)
			case tc.wantErr == "perm" && !IsPermanent(err):
				t.Fatalf("err %v, want permanent", err)
			case tc.wantErr == "perm":
				var pe *PermanentError
				if !errors.As(err, &pe) {
					t.Errorf("err %T is no *PermanentError", err)
				}
			case tc.wantErr == "temp" && (err == nil || IsPermanent(err)):
				t.Fatalf("err %v, want transient", err)
			}
			if len(res) != len(tc.to) {
				t.Fatalf("%d results", len(res))
			}
			for i, r := range res {
				got := "ok"
				if r.Err != nil {
					got = "temp"
					if r.Permanent {
						got = "perm"
					}
				}
				if r.Addr != tc.to[i] || got != tc.want[i] {
					t.Errorf("result %d: %+v, want %s", i, r, tc.want[i])
				}
			}
			if n := len(tc.host.received()); n != tc.delivered {
				t.Errorf("%d messages delivered, want %d", n, tc.delivered)
			}
			if tc.check != nil {
				tc.check(t, tc.host)
			}
		})
	}
}

// TLS towards a smarthost with a self-signed certificate, as Debian's
// Postfix has out of the box (snakeoil, no IP address in it).
func TestRelayTLS(t *testing.T) {
	cert := testcert.New(t, "smarthost with a self-signed certificate")
	tlsOn := func(s *smtp.Server) { s.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert.TLS}} }
	// A server that offers STARTTLS but cannot complete a handshake with
	// us (TLS 1.1 at most).
	badTLS := func(s *smtp.Server) {
		s.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert.TLS}, MaxVersion: tls.VersionTLS11}
	}
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, cert.CertPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(t.TempDir(), "other.pem")
	if err := os.WriteFile(other, testcert.New(t, "some other CA").CertPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	trust := &tls.Config{RootCAs: testcert.Pool(cert)}
	tests := []struct {
		name    string
		server  func(*smtp.Server)
		relay   Relay
		wantTLS bool
		wantErr error // nil: success; errAny: any transient error
	}{
		{"opportunistic, self-signed: encrypted, not verified", tlsOn, Relay{}, true, nil},
		{"opportunistic, handshake fails: clear", badTLS, Relay{}, false, nil},
		{"opportunistic, not offered: clear", nil, Relay{}, false, nil},
		{"none although offered", tlsOn, Relay{TLS: TLSNone}, false, nil},
		{"verify, self-signed: deferred", tlsOn, Relay{TLS: TLSVerify}, false, ErrTLSVerify},
		{"verify, other CA file: deferred", tlsOn, Relay{TLS: TLSVerify, CAFile: other}, false, ErrTLSVerify},
		{"verify, CA file", tlsOn, Relay{TLS: TLSVerify, CAFile: caFile}, true, nil},
		{"verify, trusted by TLSConfig", tlsOn, Relay{TLS: TLSVerify, TLSConfig: trust}, true, nil},
		{"verify, handshake fails: deferred", badTLS, Relay{TLS: TLSVerify, CAFile: caFile}, false, errHandshake},
		{"verify, not offered: clear", nil, Relay{TLS: TLSVerify, CAFile: caFile}, false, nil},
		{"verify, CA file missing: deferred", tlsOn, Relay{TLS: TLSVerify, CAFile: caFile + ".gone"}, false, errAny},
		{"required, CA file", tlsOn, Relay{TLS: TLSRequired, CAFile: caFile}, true, nil},
		{"required, self-signed: deferred", tlsOn, Relay{TLS: TLSRequired}, false, ErrTLSVerify},
		{"required, not offered: deferred", nil, Relay{TLS: TLSRequired}, false, ErrTLSUnavailable},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := &testSmarthost{}
			r := tc.relay
			r.Addr = h.start(t, tc.server)
			r.HeloName = "mts.emsd.example.test"
			res, err := r.Send(context.Background(), "a@emsd.example.test", []string{"b@example.com"}, testMessage)
			switch {
			case tc.wantErr == nil && err != nil:
				t.Fatalf("err %v", err)
			case tc.wantErr != nil && (err == nil || IsPermanent(err) || res[0].Permanent):
				t.Fatalf("err %v, want a transient error", err)
			case tc.wantErr != nil && tc.wantErr != errAny && !errors.Is(err, tc.wantErr):
				t.Fatalf("err %v, want %v", err, tc.wantErr)
			}
			if tc.wantErr != nil {
				if errors.Is(tc.wantErr, ErrTLSVerify) && !strings.Contains(err.Error(), "relay.ca_file") {
					t.Errorf("error %q does not say what to do", err)
				}
				if len(h.received()) != 0 {
					t.Error("message delivered")
				}
				return
			}
			m := h.received()
			if len(m) != 1 || m[0].tls != tc.wantTLS || m[0].helo != "mts.emsd.example.test" {
				t.Fatalf("received %+v", m)
			}
		})
	}
}

var errAny = errors.New("any error")

// DSN parameters reach a smarthost that offers DSN, per recipient.
func TestRelayDSN(t *testing.T) {
	h := &testSmarthost{}
	r := &Relay{Addr: h.start(t, func(s *smtp.Server) { s.EnableDSN = true }), TLS: TLSNone}
	_, err := r.SendDSN(context.Background(), "198.036@emsd.example.test", []string{"b@example.com", "c@example.com"}, testMessage,
		&DSNRequest{Ret: smtp.DSNReturnHeaders, EnvID: "6b080580.00000001",
			Notify: [][]smtp.DSNNotify{{smtp.DSNNotifySuccess, smtp.DSNNotifyFailure}, {smtp.DSNNotifyNever}},
			ORCPT:  []string{"b@example.com", ""}})
	if err != nil {
		t.Fatal(err)
	}
	m := h.received()[0]
	if m.mail.Return != smtp.DSNReturnHeaders || m.mail.EnvelopeID != "6b080580.00000001" || len(m.rcpt) != 2 ||
		fmt.Sprint(m.rcpt[0].Notify) != "[SUCCESS FAILURE]" || m.rcpt[0].OriginalRecipient != "b@example.com" ||
		fmt.Sprint(m.rcpt[1].Notify) != "[NEVER]" || m.rcpt[1].OriginalRecipient != "" {
		t.Errorf("mail %+v rcpt %+v", m.mail, m.rcpt)
	}
	// Without DSN at the smarthost the parameters are left out.
	h2 := &testSmarthost{}
	r2 := &Relay{Addr: h2.start(t, nil), TLS: TLSNone}
	if _, err := r2.SendDSN(context.Background(), "a@x", []string{"b@example.com"}, testMessage,
		&DSNRequest{Ret: smtp.DSNReturnHeaders, Notify: [][]smtp.DSNNotify{{smtp.DSNNotifyNever}}}); err != nil {
		t.Fatal(err)
	}
	if m := h2.received()[0]; m.mail.Return != "" || m.rcpt[0].Notify != nil {
		t.Errorf("parameters sent without DSN: %+v %+v", m.mail, m.rcpt)
	}
}

func TestRelayAuth(t *testing.T) {
	tlsOn, trust := withTLS(t)
	tests := []struct {
		name    string
		server  func(*smtp.Server)
		relay   Relay
		wantErr bool
		user    string
	}{
		{"AUTH PLAIN over STARTTLS", tlsOn, Relay{Username: "relayuser", Password: "s3cret", TLSConfig: trust}, false, "relayuser"},
		{"wrong password is transient", tlsOn, Relay{Username: "relayuser", Password: "wrong", TLSConfig: trust}, true, ""},
		{"no AUTH without TLS", nil, Relay{Username: "relayuser", Password: "s3cret"}, true, ""},
		{"insecure AUTH when allowed", func(s *smtp.Server) { s.AllowInsecureAuth = true },
			Relay{Username: "relayuser", Password: "s3cret", TLS: TLSNone, AllowInsecureAuth: true}, false, "relayuser"},
		{"credentials required by the smarthost", tlsOn, Relay{TLSConfig: trust}, true, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := &testSmarthost{requireAuth: true, user: "relayuser", pass: "s3cret"}
			r := tc.relay
			r.Addr = h.start(t, tc.server)
			res, err := r.Send(context.Background(), "a@emsd.example.test", []string{"b@example.com"}, testMessage)
			if tc.wantErr {
				if err == nil || res[0].Err == nil {
					t.Fatalf("no error")
				}
				// Our credentials are wrong or missing: retry once fixed, do
				// not bounce.
				if IsPermanent(err) || res[0].Permanent {
					t.Fatalf("err %v is permanent", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if m := h.received(); len(m) != 1 || m[0].user != tc.user {
				t.Fatalf("received %+v", m)
			}
		})
	}
}

func TestRelayCancel(t *testing.T) {
	h := &testSmarthost{inData: make(chan struct{}, 1), block: make(chan struct{})}
	r := &Relay{Addr: h.start(t, nil)}
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		<-h.inData
		cancel()
	}()
	res, err := r.Send(ctx, "a@emsd.example.test", []string{"b@example.com"}, testMessage)
	if !errors.Is(err, context.Canceled) || IsPermanent(err) || res[0].Err == nil || res[0].Permanent {
		t.Fatalf("err %v results %+v", err, res)
	}
}

// A smarthost that accepts the connection and says nothing: Send ends at
// its timeout (or the caller's deadline) with a transient error.
func TestRelayTimeout(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- c
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		for c := range accepted {
			c.Close()
		}
	})
	for _, tc := range []struct {
		name string
		r    Relay
		ctx  func() (context.Context, context.CancelFunc)
	}{
		{"Relay.Timeout", Relay{Timeout: 100 * time.Millisecond}, func() (context.Context, context.CancelFunc) {
			return context.WithCancel(context.Background())
		}},
		{"caller deadline", Relay{TLS: TLSNone}, func() (context.Context, context.CancelFunc) {
			return context.WithTimeout(context.Background(), 100*time.Millisecond)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := tc.r
			r.Addr = ln.Addr().String()
			ctx, cancel := tc.ctx()
			defer cancel()
			res, err := r.Send(ctx, "a@emsd.example.test", []string{"b@example.com"}, testMessage)
			if !errors.Is(err, context.DeadlineExceeded) || IsPermanent(err) || res[0].Permanent {
				t.Fatalf("err %v", err)
			}
		})
	}
}

func TestRelayDialFailure(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	r := &Relay{Addr: addr}
	res, err := r.Send(context.Background(), "a@emsd.example.test", []string{"b@example.com"}, testMessage)
	if err == nil || IsPermanent(err) || !strings.Contains(err.Error(), addr) || res[0].Err == nil {
		t.Fatalf("err %v", err)
	}
	if _, err := r.Send(context.Background(), "a@b", nil, testMessage); err == nil {
		t.Error("no recipients accepted")
	}
}

func TestParseTLSMode(t *testing.T) {
	for s, want := range map[string]TLSMode{"": TLSOpportunistic, "Opportunistic": TLSOpportunistic, "none": TLSNone, "verify": TLSVerify, "required": TLSRequired} {
		if m, err := ParseTLSMode(s); err != nil || m != want || (s != "" && !strings.EqualFold(m.String(), s)) {
			t.Errorf("%q: %v %v", s, m, err)
		}
	}
	if _, err := ParseTLSMode("sometimes"); err == nil {
		t.Error("bad mode accepted")
	}
}
