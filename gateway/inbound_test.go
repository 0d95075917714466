package gateway

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/textproto"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

type delivery struct {
	from string
	to   []string
	msg  []byte
	env  Envelope
}

type testReceiver struct {
	mu         sync.Mutex
	deliveries []delivery
	deliverErr error
	inDeliver  chan struct{} // signalled when Deliver starts, if set
	block      chan struct{} // Deliver waits for it (or its context), if set
}

func (r *testReceiver) Recipient(ctx context.Context, a string) error {
	switch {
	case strings.HasSuffix(a, "@emsd.example.test") && !strings.HasPrefix(a, "nobody@"):
		return nil
	case a == "dberror@example.com":
		return errors.New("registry unavailable")
	}
	return fmt.Errorf("%w: %s", ErrUnknownRecipient, a)
}

func (r *testReceiver) Deliver(ctx context.Context, env *Envelope, msg []byte) error {
	if r.inDeliver != nil {
		r.inDeliver <- struct{}{}
	}
	if r.block != nil {
		select {
		case <-r.block:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.deliverErr != nil {
		return r.deliverErr
	}
	r.deliveries = append(r.deliveries, delivery{env.From, append([]string(nil), env.To...), msg, *env})
	return nil
}

func (r *testReceiver) got() []delivery {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]delivery(nil), r.deliveries...)
}

func startInbound(t *testing.T, r Receiver, o InboundOptions) (*InboundServer, string, chan error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if o.Domain == "" {
		o.Domain = "mx.emsd.example.test"
	}
	s := NewInboundServer(r, o)
	if s.Addr() != nil {
		t.Error("Addr before Serve")
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(ln) }()
	t.Cleanup(func() {
		s.Close()
		if err := <-served; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v", err)
		}
	})
	return s, ln.Addr().String(), served
}

// send runs one SMTP transaction and returns the error of the first
// command that fails and how many RCPTs were accepted.
func send(t *testing.T, addr, from string, to []string, msg []byte, tlsConfig *tls.Config) (int, error) {
	t.Helper()
	var c *smtp.Client
	var err error
	if tlsConfig != nil {
		c, err = smtp.DialStartTLS(addr, tlsConfig)
	} else {
		c, err = smtp.Dial(addr)
	}
	if err != nil {
		return 0, err
	}
	defer c.Close()
	if err := c.Hello("client.example.com"); err != nil {
		return 0, err
	}
	if err := c.Mail(from, &smtp.MailOptions{Size: int64(len(msg))}); err != nil {
		return 0, err
	}
	n := 0
	var rcptErr error
	for _, a := range to {
		if err := c.Rcpt(a, nil); err != nil {
			rcptErr = err
			continue
		}
		n++
	}
	if n == 0 {
		return 0, rcptErr
	}
	w, err := c.Data()
	if err != nil {
		return n, err
	}
	if _, err := w.Write(msg); err != nil {
		return n, err
	}
	if err := w.Close(); err != nil {
		return n, err
	}
	c.Quit()
	return n, rcptErr
}

func smtpCode(err error) string {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return fmt.Sprintf("%d %d.%d.%d", se.Code, se.EnhancedCode[0], se.EnhancedCode[1], se.EnhancedCode[2])
	}
	if err == nil {
		return "ok"
	}
	return "error: " + err.Error()
}

var inboundMail = []byte(crlfText("From: alice@example.com\nTo: 198.036@emsd.example.test\nSubject: hi\n\nhello\n"))

func TestInboundServer(t *testing.T) {
	var loop bytes.Buffer
	for range MaxHops + 1 {
		loop.WriteString("Received: from a by b; Thu, 26 Nov 2026 07:00:00 +0000\r\n")
	}
	loop.Write(inboundMail)
	tests := []struct {
		name       string
		o          InboundOptions
		deliverErr error
		to         []string
		msg        []byte
		wantErr    string // smtpCode of the transaction's first error
		wantRcpts  int
		delivered  []string // recipients of the single delivery, nil = none
	}{{
		name: "accepted, duplicate recipient delivered once",
		to:   []string{"198.036@emsd.example.test", "198.037@emsd.example.test", "198.036@EMSD.example.test"},
		msg:  inboundMail, wantErr: "ok", wantRcpts: 3,
		delivered: []string{"198.036@emsd.example.test", "198.037@emsd.example.test"},
	}, {
		name: "unknown recipient 550 at RCPT, the others delivered",
		to:   []string{"nobody@emsd.example.test", "198.036@emsd.example.test", "bob@elsewhere.example"},
		msg:  inboundMail, wantErr: "550 5.1.1", wantRcpts: 1,
		delivered: []string{"198.036@emsd.example.test"},
	}, {
		name: "recipient lookup failure is temporary",
		to:   []string{"dberror@example.com"}, msg: inboundMail, wantErr: "451 4.3.0",
	}, {
		name: "too many recipients 452",
		o:    InboundOptions{MaxRecipients: 2},
		to:   []string{"1@emsd.example.test", "2@emsd.example.test", "3@emsd.example.test"},
		msg:  inboundMail, wantErr: "452 4.5.3", wantRcpts: 2,
		delivered: []string{"1@emsd.example.test", "2@emsd.example.test"},
	}, {
		name: "oversize 552 at MAIL (SIZE)",
		o:    InboundOptions{MaxMessageBytes: 1000},
		to:   []string{"198.036@emsd.example.test"}, msg: bytes.Repeat([]byte("x"), 5000), wantErr: "552 5.3.4",
	}, {
		name:       "Deliver error 451",
		deliverErr: errors.New("disk full"),
		to:         []string{"198.036@emsd.example.test"}, msg: inboundMail, wantErr: "451 4.3.0", wantRcpts: 1,
	}, {
		name:       "permanent Deliver error 554",
		deliverErr: &PermanentError{Err: errors.New("no")},
		to:         []string{"198.036@emsd.example.test"}, msg: inboundMail, wantErr: "554 5.6.0", wantRcpts: 1,
	}, {
		name:       "Deliver's own SMTP reply",
		deliverErr: &smtp.SMTPError{Code: 552, EnhancedCode: smtp.EnhancedCode{5, 2, 2}, Message: "mailbox full"},
		to:         []string{"198.036@emsd.example.test"}, msg: inboundMail, wantErr: "552 5.2.2", wantRcpts: 1,
	}, {
		name: "mail loop 554",
		to:   []string{"198.036@emsd.example.test"}, msg: loop.Bytes(), wantErr: "554 5.4.6", wantRcpts: 1,
	}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := &testReceiver{deliverErr: tc.deliverErr}
			_, addr, _ := startInbound(t, r, tc.o)
			n, err := send(t, addr, "alice@example.com", tc.to, tc.msg, nil)
			if smtpCode(err) != tc.wantErr || n != tc.wantRcpts {
				t.Fatalf("%d recipients, %s; want %d, %s", n, smtpCode(err), tc.wantRcpts, tc.wantErr)
			}
			got := r.got()
			if tc.delivered == nil {
				if len(got) != 0 {
					t.Fatalf("delivered %+v", got)
				}
				return
			}
			if len(got) != 1 || got[0].from != "alice@example.com" || fmt.Sprint(got[0].to) != fmt.Sprint(tc.delivered) {
				t.Fatalf("delivered %+v", got)
			}
			m := string(got[0].msg)
			if !strings.HasPrefix(m, "Received: from client.example.com ([127.0.0.1])\r\n\tby mx.emsd.example.test (emsdp) with ESMTP") ||
				!strings.HasSuffix(m, string(tc.msg)) {
				t.Errorf("message\n%s", m)
			}
		})
	}
}

// A message over MaxMessageBytes without SIZE is refused after DATA.
// The DSN extension (RFC 3461) is offered, and NOTIFY, ORCPT, RET and
// ENVID reach the Receiver with the envelope, per recipient in order.
func TestInboundServerDSNParameters(t *testing.T) {
	r := &testReceiver{}
	_, addr, _ := startInbound(t, r, InboundOptions{})
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Hello("client.test"); err != nil {
		t.Fatal(err)
	}
	if ok, _ := c.Extension("DSN"); !ok {
		t.Fatal("DSN not offered")
	}
	if err := c.Mail("alice@example.com", &smtp.MailOptions{Return: smtp.DSNReturnHeaders, EnvelopeID: "QQ314159"}); err != nil {
		t.Fatal(err)
	}
	for _, rc := range []struct {
		to string
		o  *smtp.RcptOptions
	}{
		{"198.036@emsd.example.test", &smtp.RcptOptions{Notify: []smtp.DSNNotify{smtp.DSNNotifySuccess, smtp.DSNNotifyFailure},
			OriginalRecipientType: smtp.DSNAddressTypeRFC822, OriginalRecipient: "alice+list@example.net"}},
		{"198.037@emsd.example.test", &smtp.RcptOptions{Notify: []smtp.DSNNotify{smtp.DSNNotifyNever}}},
		{"198.038@emsd.example.test", nil},
	} {
		if err := c.Rcpt(rc.to, rc.o); err != nil {
			t.Fatal(err)
		}
	}
	w, err := c.Data()
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte("Subject: x\r\n\r\nhi\r\n"))
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	got := r.got()
	if len(got) != 1 {
		t.Fatalf("%d deliveries", len(got))
	}
	env := got[0].env
	want := Envelope{From: "alice@example.com", To: []string{"198.036@emsd.example.test", "198.037@emsd.example.test", "198.038@emsd.example.test"},
		Ret: smtp.DSNReturnHeaders, EnvID: "QQ314159", Rcpts: []RcptDSN{
			{Notify: []smtp.DSNNotify{smtp.DSNNotifySuccess, smtp.DSNNotifyFailure}, ORCPT: "rfc822;alice+list@example.net"},
			{Notify: []smtp.DSNNotify{smtp.DSNNotifyNever}}, {}}}
	if fmt.Sprintf("%+v", env) != fmt.Sprintf("%+v", want) {
		t.Errorf("envelope\n got %+v\nwant %+v", env, want)
	}
}

func TestInboundServerOversizeData(t *testing.T) {
	r := &testReceiver{}
	_, addr, _ := startInbound(t, r, InboundOptions{MaxMessageBytes: 1000})
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Mail("alice@example.com", nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt("198.036@emsd.example.test", nil); err != nil {
		t.Fatal(err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatal(err)
	}
	w.Write(bytes.Repeat([]byte("0123456789\r\n"), 1000))
	if err := w.Close(); smtpCode(err) != "552 5.3.4" {
		t.Fatalf("close: %s", smtpCode(err))
	}
	if len(r.got()) != 0 {
		t.Fatal("delivered")
	}
}

func TestInboundServerSTARTTLS(t *testing.T) {
	cert, pool := selfSigned(t)
	r := &testReceiver{}
	_, addr, _ := startInbound(t, r, InboundOptions{TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}})
	if _, err := send(t, addr, "alice@example.com", []string{"198.036@emsd.example.test"}, inboundMail,
		&tls.Config{RootCAs: pool, ServerName: "localhost"}); err != nil {
		t.Fatal(err)
	}
	got := r.got()
	if len(got) != 1 || !strings.Contains(string(got[0].msg), "with ESMTPS\r\n\tfor <198.036@emsd.example.test>;") {
		t.Fatalf("%+v", got)
	}
}

// STARTTLS is offered only with a TLS configuration; RequireTLS refuses
// MAIL on a plaintext connection and takes it after STARTTLS; OnTLS is
// called once per connection that completed the handshake.
func TestInboundServerRequireTLS(t *testing.T) {
	cert, pool := selfSigned(t)
	serverTLS := &tls.Config{Certificates: []tls.Certificate{cert}}
	clientTLS := &tls.Config{RootCAs: pool, ServerName: "localhost"}
	for _, tc := range []struct {
		name      string
		tls, req  bool // server: TLSConfig set, RequireTLS
		startTLS  bool // client
		offered   bool // STARTTLS in the EHLO reply
		wantMail  string
		delivered int
	}{
		{"no certificate", false, false, false, false, "ok", 1},
		{"offered, not used", true, false, false, true, "ok", 1},
		{"STARTTLS", true, false, true, true, "ok", 1},
		{"required, plaintext", true, true, false, true, "530 5.7.0", 0},
		{"required, STARTTLS", true, true, true, true, "ok", 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var handshakes atomic.Int32
			o := InboundOptions{RequireTLS: tc.req, OnTLS: func(st tls.ConnectionState) {
				if !st.HandshakeComplete {
					t.Error("OnTLS before the handshake completed")
				}
				handshakes.Add(1)
			}}
			if tc.tls {
				o.TLSConfig = serverTLS
			}
			r := &testReceiver{}
			_, addr, _ := startInbound(t, r, o)
			dial := smtp.Dial
			if tc.startTLS { // EHLO, STARTTLS (fails unless offered), handshake
				dial = func(addr string) (*smtp.Client, error) { return smtp.DialStartTLS(addr, clientTLS) }
			}
			c, err := dial(addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if err := c.Hello("client.example.com"); err != nil {
				t.Fatal(err)
			}
			if _, ok := c.TLSConnectionState(); ok != tc.startTLS {
				t.Fatalf("TLS %v", ok)
			}
			if ok, _ := c.Extension("STARTTLS"); ok != (tc.offered && !tc.startTLS) {
				t.Errorf("STARTTLS offered %v (TLS %v)", ok, tc.startTLS)
			}
			if got := smtpCode(c.Mail("alice@example.com", nil)); got != tc.wantMail {
				t.Fatalf("MAIL: %s, want %s", got, tc.wantMail)
			}
			if tc.wantMail == "ok" {
				if err := c.Rcpt("198.036@emsd.example.test", nil); err != nil {
					t.Fatal(err)
				}
				w, err := c.Data()
				if err != nil {
					t.Fatal(err)
				}
				w.Write(inboundMail)
				if err := w.Close(); err != nil {
					t.Fatal(err)
				}
			}
			if got := len(r.got()); got != tc.delivered {
				t.Errorf("%d messages delivered, want %d", got, tc.delivered)
			}
			want := int32(0)
			if tc.startTLS {
				want = 1
			}
			if n := handshakes.Load(); n != want {
				t.Errorf("OnTLS called %d times, want %d", n, want)
			}
		})
	}
}

// SetRequireTLS applies from the next MAIL, in sessions already open too.
func TestInboundServerSetRequireTLS(t *testing.T) {
	cert, _ := selfSigned(t)
	srv, addr, _ := startInbound(t, &testReceiver{}, InboundOptions{TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}})
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Hello("client.example.com"); err != nil {
		t.Fatal(err)
	}
	for i, st := range []struct {
		require bool
		want    string
	}{{false, "ok"}, {true, "530 5.7.0"}, {false, "ok"}} {
		srv.SetRequireTLS(st.require)
		if got := smtpCode(c.Mail("alice@example.com", nil)); got != st.want {
			t.Fatalf("step %d (require %v): MAIL: %s, want %s", i, st.require, got, st.want)
		}
		if err := c.Reset(); err != nil {
			t.Fatal(err)
		}
	}
}

// A client may send STARTTLS before any EHLO: the handshake is then
// seen at the first EHLO on the TLS connection, and counted once however
// many EHLOs follow.
func TestInboundServerSTARTTLSBeforeEHLO(t *testing.T) {
	cert, pool := selfSigned(t)
	var handshakes atomic.Int32
	_, addr, _ := startInbound(t, &testReceiver{}, InboundOptions{RequireTLS: true,
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}},
		OnTLS:     func(tls.ConnectionState) { handshakes.Add(1) }})
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	cmd := func(tp *textproto.Conn, want int, line string) {
		t.Helper()
		if line != "" {
			if err := tp.PrintfLine("%s", line); err != nil {
				t.Fatal(err)
			}
		}
		if _, msg, err := tp.ReadResponse(want); err != nil {
			t.Fatalf("%q: %v %s", line, err, msg)
		}
	}
	plain := textproto.NewConn(conn)
	cmd(plain, 220, "")
	cmd(plain, 220, "STARTTLS")
	tp := textproto.NewConn(tls.Client(conn, &tls.Config{RootCAs: pool, ServerName: "localhost"}))
	cmd(tp, 250, "EHLO client.example.com")
	cmd(tp, 250, "EHLO client.example.com")
	cmd(tp, 250, "MAIL FROM:<alice@example.com>")
	if n := handshakes.Load(); n != 1 { // before QUIT, whose Logout races with this
		t.Errorf("OnTLS called %d times, want 1", n)
	}
	cmd(tp, 221, "QUIT")
}

// Shutdown closes idle connections at once, lets a transaction in DATA
// finish (the client gets its 250), then returns; Serve then returns
// ErrServerClosed and no new connection is served.
func TestInboundServerShutdownDrains(t *testing.T) {
	r := &testReceiver{inDeliver: make(chan struct{}, 1), block: make(chan struct{})}
	s, addr, served := startInbound(t, r, InboundOptions{})
	for deadline := time.Now().Add(10 * time.Second); s.Addr() == nil; { // Serve runs in its own goroutine
		if time.Now().After(deadline) {
			t.Fatal("Serve did not start")
		}
		time.Sleep(time.Millisecond)
	}
	if s.Addr().String() != addr {
		t.Errorf("Addr %v", s.Addr())
	}
	idle, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	if err := idle.Hello("idle.example.com"); err != nil {
		t.Fatal(err)
	}
	sent := make(chan error, 1)
	go func() {
		_, err := send(t, addr, "alice@example.com", []string{"198.036@emsd.example.test"}, inboundMail, nil)
		sent <- err
	}()
	<-r.inDeliver
	stopped := make(chan error, 1)
	go func() { stopped <- s.Shutdown(context.Background()) }()
	// The idle client is disconnected while the delivery is held.
	deadline := time.Now().Add(10 * time.Second)
	for idle.Noop() == nil {
		if time.Now().After(deadline) {
			t.Fatal("idle connection still open")
		}
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case err := <-stopped:
		t.Fatalf("Shutdown returned %v with a delivery in progress", err)
	default:
	}
	close(r.block)
	if err := <-sent; err != nil {
		t.Fatalf("in-flight message: %v", err)
	}
	if err := <-stopped; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := <-served; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve: %v", err)
	}
	served <- ErrServerClosed // for the cleanup
	if len(r.got()) != 1 {
		t.Fatalf("deliveries %d", len(r.got()))
	}
	if c, err := net.Dial("tcp", addr); err == nil {
		c.Close()
		t.Error("still accepting connections")
	}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	defer ln.Close()
	if err := s.Serve(ln); !errors.Is(err, ErrServerClosed) {
		t.Errorf("Serve after Shutdown: %v", err)
	}
}

// When the context ends first, Shutdown cuts everything off: the Receiver
// call is cancelled and the client is not told the message was accepted.
func TestInboundServerShutdownTimeout(t *testing.T) {
	r := &testReceiver{inDeliver: make(chan struct{}, 1), block: make(chan struct{})}
	s, addr, _ := startInbound(t, r, InboundOptions{})
	sent := make(chan error, 1)
	go func() {
		_, err := send(t, addr, "alice@example.com", []string{"198.036@emsd.example.test"}, inboundMail, nil)
		sent <- err
	}()
	<-r.inDeliver
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := s.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := <-sent; err == nil {
		t.Fatal("client told the message was accepted")
	}
	if len(r.got()) != 0 {
		t.Fatal("delivered")
	}
}
