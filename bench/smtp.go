package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

// smtpSink is a go-smtp server on loopback that accepts mail and discards
// it: a submission server (AUTH PLAIN required before MAIL) or an MX (no
// AUTH). Its listener counts the octets of every connection.
type smtpSink struct {
	srv  *smtp.Server
	ln   *countingListener
	done chan error
}

// sinkCreds are the credentials a submission sink demands; nil: an MX.
type sinkCreds struct{ user, pass string }

func startSMTPSink(ctx context.Context, creds *sinkCreds) (*smtpSink, error) {
	lc := net.ListenConfig{Control: clampMSS}
	ln, err := lc.Listen(ctx, "tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("smtp sink: %w", err)
	}
	s := &smtpSink{ln: &countingListener{Listener: ln, closed: make(chan [2]int, 1)}, done: make(chan error, 1)}
	s.srv = smtp.NewServer(smtp.BackendFunc(func(*smtp.Conn) (smtp.Session, error) {
		return &sinkSession{creds: creds}, nil
	}))
	s.srv.Domain = "mx.example.net"
	s.srv.MaxMessageBytes = 10 << 20
	s.srv.ReadTimeout, s.srv.WriteTimeout = 30*time.Second, 30*time.Second
	// Plain-text AUTH: the comparison is without TLS on both sides (EMSD
	// has no encryption either).
	s.srv.AllowInsecureAuth = creds != nil
	go func() { s.done <- s.srv.Serve(s.ln) }()
	return s, nil
}

func (s *smtpSink) addr() string { return s.ln.Addr().String() }

// Close stops the server and waits for its accept loop.
func (s *smtpSink) Close() error {
	err := s.srv.Close()
	if serr := <-s.done; serr != nil && !errors.Is(serr, smtp.ErrServerClosed) && !errors.Is(serr, net.ErrClosed) {
		err = errors.Join(err, serr)
	}
	return err
}

type sinkSession struct {
	creds  *sinkCreds
	authed bool
}

func (s *sinkSession) AuthMechanisms() []string {
	if s.creds == nil {
		return nil
	}
	return []string{sasl.Plain}
}

func (s *sinkSession) Auth(mech string) (sasl.Server, error) {
	if s.creds == nil || mech != sasl.Plain {
		return nil, smtp.ErrAuthUnknownMechanism
	}
	return sasl.NewPlainServer(func(identity, user, pass string) error {
		if (identity != "" && identity != user) || user != s.creds.user || pass != s.creds.pass {
			return smtp.ErrAuthFailed
		}
		s.authed = true
		return nil
	}), nil
}

func (s *sinkSession) Mail(string, *smtp.MailOptions) error {
	if s.creds != nil && !s.authed {
		return smtp.ErrAuthRequired
	}
	return nil
}

func (s *sinkSession) Rcpt(string, *smtp.RcptOptions) error { return nil }

func (s *sinkSession) Data(r io.Reader) error {
	_, err := io.Copy(io.Discard, r)
	return err
}

func (s *sinkSession) Reset()        {}
func (s *sinkSession) Logout() error { return nil }

// smtpSend runs one complete client session (connect, EHLO, AUTH PLAIN
// when auth is set, MAIL, RCPT, DATA, QUIT, close) and returns the octets
// the client's socket read and wrote.
func smtpSend(ctx context.Context, addr string, auth sasl.Client, from, to string, msg []byte) (in, out int, err error) {
	d := net.Dialer{Control: clampMSS}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return 0, 0, fmt.Errorf("smtp dial: %w", err)
	}
	cc := &countingConn{Conn: conn}
	// go-smtp sets its own deadlines per command; closing the connection
	// is what reliably ends it when ctx does.
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	c := smtp.NewClient(cc)
	defer c.Close()
	if err := smtpSession(c, auth, from, to, msg); err != nil {
		return 0, 0, fmt.Errorf("smtp %s: %w", addr, err)
	}
	cc.mu.Lock()
	defer cc.mu.Unlock()
	return cc.in, cc.out, nil
}

func smtpSession(c *smtp.Client, auth sasl.Client, from, to string, msg []byte) error {
	if err := c.Hello("device." + benchDomain); err != nil {
		return err
	}
	return smtpTransaction(c, auth, from, to, msg)
}

// smtpTransaction authenticates (auth nil: not), sends msg and quits, on
// a client that has said hello.
func smtpTransaction(c *smtp.Client, auth sasl.Client, from, to string, msg []byte) error {
	if auth != nil {
		if err := c.Auth(auth); err != nil {
			return err
		}
	}
	if err := c.Mail(from, nil); err != nil {
		return err
	}
	if err := c.Rcpt(to, nil); err != nil {
		return err
	}
	w, err := c.Data()
	if err != nil {
		return err
	}
	if _, err := w.Write(msg); err != nil {
		return err
	}
	if err := w.Close(); err != nil {
		return err
	}
	return c.Quit()
}
