package gateway

import (
	"bufio"
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// strictSMTP is a scripted smarthost in the manner of Python's smtpd: it
// refuses a second EHLO in a session (503) and offers no STARTTLS.
// greeting and ehlo are its first replies; it records the commands.
type strictSMTP struct {
	greeting, ehlo string
	mu             sync.Mutex
	cmds           []string
	data           string
	sessions       int
	dupEHLO        bool // a second EHLO in one session
}

func (s *strictSMTP) start(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { s.serve(c) })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return ln.Addr().String()
}

func (s *strictSMTP) serve(c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(c)
	say := func(l string) { c.Write([]byte(l + "\r\n")) }
	say(s.greeting)
	if !strings.HasPrefix(s.greeting, "220") {
		return
	}
	helloed := false
	s.mu.Lock()
	s.sessions++
	s.mu.Unlock()
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		cmd := strings.TrimRight(line, "\r\n")
		s.mu.Lock()
		s.cmds = append(s.cmds, cmd)
		s.mu.Unlock()
		switch verb := strings.ToUpper(strings.Fields(cmd + " x")[0]); {
		case verb == "EHLO" && helloed:
			s.mu.Lock()
			s.dupEHLO = true
			s.mu.Unlock()
			say("503 Duplicate HELO/EHLO")
		case verb == "EHLO":
			say(s.ehlo)
			helloed = strings.HasPrefix(s.ehlo, "250")
		case verb == "MAIL" || verb == "RCPT" || verb == "RSET" || verb == "NOOP":
			say("250 OK")
		case verb == "DATA":
			say("354 End data with <CR><LF>.<CR><LF>")
			var b strings.Builder
			for {
				l, err := r.ReadString('\n')
				if err != nil {
					return
				}
				if l == ".\r\n" {
					break
				}
				b.WriteString(strings.TrimPrefix(l, ".")) // dot-stuffing
			}
			s.mu.Lock()
			s.data = b.String()
			s.mu.Unlock()
			say("250 OK")
		case verb == "QUIT":
			say("221 Bye")
			return
		default:
			say("500 Error: command not recognized")
		}
	}
}

// The relay says EHLO once per session when the smarthost offers no
// STARTTLS (it once said it twice, which such a smarthost refuses with
// 503, and the message was bounced); a refused greeting or EHLO is
// transient, not a reason to bounce the message (Send's contract: only
// 5xx to MAIL or DATA and what the smarthost cannot take are permanent).
func TestRelayStrictSmarthost(t *testing.T) {
	const ehloOK = "250-strict.test\r\n250-SIZE 33554432\r\n250 8BITMIME"
	for _, tc := range []struct {
		name, greeting, ehlo string
		tls                  TLSMode
		delivered            bool
	}{
		{"opportunistic, no STARTTLS offered", "220 strict.test ESMTP", ehloOK, TLSOpportunistic, true},
		{"TLS none", "220 strict.test ESMTP", ehloOK, TLSNone, true},
		{"EHLO refused", "220 strict.test ESMTP", "550 go away", TLSOpportunistic, false},
		{"EHLO refused, TLS none", "220 strict.test ESMTP", "550 go away", TLSNone, false},
		{"greeting 554", "554 no SMTP service here", "", TLSOpportunistic, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := &strictSMTP{greeting: tc.greeting, ehlo: tc.ehlo}
			r := &Relay{Addr: h.start(t), HeloName: "mts.emsd.example.test", TLS: tc.tls, Timeout: 5 * time.Second}
			res, err := r.Send(context.Background(), "a@emsd.example.test", []string{"b@example.com"}, testMessage)
			h.mu.Lock()
			defer h.mu.Unlock()
			if tc.delivered {
				if err != nil || res[0].Err != nil {
					t.Fatalf("Send: %v %+v (commands %q)", err, res, h.cmds)
				}
				if h.dupEHLO || h.data != string(testMessage) {
					t.Errorf("second EHLO in a session: %v, data %q; commands %q", h.dupEHLO, h.data, h.cmds)
				}
				return
			}
			if err == nil || IsPermanent(err) || res[0].Permanent {
				t.Errorf("Send: %v, permanent=%v; want a transient failure", err, res[0].Permanent)
			}
		})
	}
}
