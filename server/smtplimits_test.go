package server

import (
	"bufio"
	"errors"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"
)

// rawSMTP is an SMTP client connection read line by line.
type rawSMTP struct {
	c net.Conn
	r *bufio.Reader
}

// dialSMTPFrom connects to the server's SMTP listener from the local
// address from (Linux answers on all of 127/8) and returns the
// connection with its first reply.
func dialSMTPFrom(t *testing.T, s *Server, from string) (*rawSMTP, string) {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
	c, err := d.Dial("tcp", s.Addrs().SMTP.String())
	if errors.Is(err, syscall.EADDRNOTAVAIL) {
		t.Skipf("no local address %s on this system", from)
	}
	must(t, err)
	c.SetDeadline(time.Now().Add(10 * time.Second)) // a broken server fails the test, not hangs it
	t.Cleanup(func() { c.Close() })
	rc := &rawSMTP{c, bufio.NewReader(c)}
	return rc, rc.line(t)
}

func (c *rawSMTP) line(t *testing.T) string {
	t.Helper()
	l, err := c.r.ReadString('\n')
	if err != nil {
		t.Fatalf("read: %v (got %q)", err, l)
	}
	return strings.TrimSuffix(l, "\r\n")
}

// quit ends the session and waits for the server to close the
// connection, by which time it no longer counts it.
func (c *rawSMTP) quit(t *testing.T) {
	t.Helper()
	if _, err := io.WriteString(c.c, "QUIT\r\n"); err != nil {
		t.Fatal(err)
	}
	if l := c.line(t); !strings.HasPrefix(l, "221 ") {
		t.Fatalf("QUIT: %q", l)
	}
	if rest, err := io.ReadAll(c.r); err != nil || len(rest) > 0 {
		t.Fatalf("after QUIT: %q, %v", rest, err)
	}
}

const tooManyConns = "421 4.7.0 mts.emsd.test Too many connections, try again later"

// wantGreeting opens a connection from from and checks its first reply:
// 220, or the 421 of the connection limits followed by the close.
func wantGreeting(t *testing.T, s *Server, from string, refused bool) *rawSMTP {
	t.Helper()
	c, got := dialSMTPFrom(t, s, from)
	if !refused {
		if !strings.HasPrefix(got, "220 mts.emsd.test ") {
			t.Fatalf("from %s: %q, want 220", from, got)
		}
		return c
	}
	if got != tooManyConns {
		t.Fatalf("from %s: %q, want %q", from, got, tooManyConns)
	}
	if rest, err := io.ReadAll(c.r); err != nil || len(rest) > 0 {
		t.Fatalf("after 421: %q, %v; want the connection closed", rest, err)
	}
	return nil
}

// smtp.max_connections and max_connections_per_ip reach the listener;
// refusals and open sessions are in the metrics.
func TestSMTPConnectionLimits(t *testing.T) {
	c := testConfig(t)
	c.SMTP.MaxConnections, c.SMTP.MaxConnectionsPerIP = 3, 1
	s := startServer(t, c)
	_, body := get(t, "http://"+s.Addrs().Admin.String()+"/metrics")
	for _, want := range []string{`gateway_inbound_refused_total{limit="ip"} 0`, `gateway_inbound_refused_total{limit="total"} 0`,
		"gateway_inbound_sessions 0"} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics at start lacks %s", want)
		}
	}
	check := func(step string, sessions, ip, total float64) {
		t.Helper()
		for _, m := range []struct {
			name, label string
			want        float64
		}{{"gateway_inbound_sessions", "", sessions}, {"gateway_inbound_refused_total", "ip", ip},
			{"gateway_inbound_refused_total", "total", total}} {
			if got := s.metrics.counter(t, m.name, m.label); got != m.want {
				t.Errorf("%s: %s{%s} = %v, want %v", step, m.name, m.label, got, m.want)
			}
		}
	}
	a := wantGreeting(t, s, "127.0.0.1", false)
	wantGreeting(t, s, "127.0.0.1", true)
	check("per client", 1, 1, 0)
	b := wantGreeting(t, s, "127.0.0.2", false)
	cc := wantGreeting(t, s, "127.0.0.3", false)
	wantGreeting(t, s, "127.0.0.4", true)
	check("total", 3, 1, 1)
	for _, c := range []*rawSMTP{a, b, cc} {
		c.quit(t)
	}
	check("all closed", 0, 1, 1)
	wantGreeting(t, s, "127.0.0.1", false).quit(t)
}
