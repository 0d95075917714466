package gateway

import (
	"crypto/tls"
	"io"
	"log"
	"net"
	"strings"
	"sync"
	"testing"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

// testSmarthost is a go-smtp server on loopback that records what it gets
// and answers as configured.
type testSmarthost struct {
	mu          sync.Mutex
	msgs        []testMsg
	mails       int
	rcptErr     map[string]error // by recipient
	mailErr     error
	dataErr     error
	requireAuth bool
	user, pass  string
	inData      chan struct{} // signalled when DATA starts, if set
	block       chan struct{} // DATA waits for it, if set
}

type testMsg struct {
	from, helo string
	to         []string
	data       []byte
	tls, utf8  bool
	user       string
	mail       smtp.MailOptions
	rcpt       []smtp.RcptOptions
}

type testSession struct {
	h    *testSmarthost
	conn *smtp.Conn
	m    testMsg
}

func (s *testSmarthost) NewSession(c *smtp.Conn) (smtp.Session, error) {
	return &testSession{h: s, conn: c}, nil
}

func (s *testSession) AuthMechanisms() []string { return []string{sasl.Plain} }

func (s *testSession) Auth(mech string) (sasl.Server, error) {
	return sasl.NewPlainServer(func(identity, user, pass string) error {
		if user != s.h.user || pass != s.h.pass {
			return smtp.ErrAuthFailed
		}
		s.m.user = user
		return nil
	}), nil
}

func (s *testSession) Mail(from string, opts *smtp.MailOptions) error {
	s.h.mu.Lock()
	defer s.h.mu.Unlock()
	s.h.mails++
	if s.h.requireAuth && s.m.user == "" {
		return smtp.ErrAuthRequired
	}
	if s.h.mailErr != nil {
		return s.h.mailErr
	}
	_, isTLS := s.conn.TLSConnectionState()
	s.m = testMsg{from: from, helo: s.conn.Hostname(), tls: isTLS, utf8: opts.UTF8, user: s.m.user, mail: *opts}
	return nil
}

func (s *testSession) Rcpt(to string, o *smtp.RcptOptions) error {
	s.h.mu.Lock()
	defer s.h.mu.Unlock()
	if err := s.h.rcptErr[to]; err != nil {
		return err
	}
	s.m.to = append(s.m.to, to)
	var ro smtp.RcptOptions
	if o != nil {
		ro = *o
	}
	s.m.rcpt = append(s.m.rcpt, ro)
	return nil
}

func (s *testSession) Data(r io.Reader) error {
	if s.h.inData != nil {
		s.h.inData <- struct{}{}
	}
	if s.h.block != nil {
		<-s.h.block
	}
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	s.h.mu.Lock()
	defer s.h.mu.Unlock()
	if s.h.dataErr != nil {
		return s.h.dataErr
	}
	s.m.data = b
	s.h.msgs = append(s.h.msgs, s.m)
	return nil
}

func (s *testSession) Reset()        {}
func (s *testSession) Logout() error { return nil }

func (s *testSmarthost) received() []testMsg {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]testMsg(nil), s.msgs...)
}

// start serves h on an ephemeral loopback port until the test ends.
func (s *testSmarthost) start(t *testing.T, configure func(*smtp.Server)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := smtp.NewServer(s)
	srv.Domain = "smarthost.test"
	srv.ErrorLog = log.New(io.Discard, "", 0)
	if configure != nil {
		configure(srv)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(ln)
	}()
	t.Cleanup(func() {
		if s.block != nil {
			select {
			case <-s.block:
			default:
				close(s.block)
			}
		}
		srv.Close()
		ln.Close() // Serve may not have registered it yet
		<-done
	})
	return ln.Addr().String()
}

func withTLS(t *testing.T) (func(*smtp.Server), *tls.Config) {
	cert, pool := selfSigned(t)
	return func(s *smtp.Server) {
		s.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}}
	}, &tls.Config{RootCAs: pool}
}

var testMessage = []byte(strings.ReplaceAll("From: 198.036@emsd.example.test\nTo: bob@example.com\nSubject: t\n\nhello\n.leading dot\n", "\n", "\r\n"))
