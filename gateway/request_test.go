package gateway

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// pipeSession serves one SMTP session over a pipe inside a synctest
// bubble and returns the client's end and the server.
func pipeSession(t *testing.T, o InboundOptions) (net.Conn, *bufio.Reader, *InboundServer) {
	t.Helper()
	o.Domain = "mx.emsd.example.test"
	s := NewInboundServer(&testReceiver{}, o)
	ln := newChanListener()
	served := make(chan error, 1)
	go func() { served <- s.Serve(ln) }()
	t.Cleanup(func() {
		s.Close()
		ln.Close()
		if err := <-served; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v", err)
		}
	})
	server, client := net.Pipe()
	ln.conns <- remoteConn{Conn: server, remote: &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 4000}}
	t.Cleanup(func() { client.Close() })
	r := bufio.NewReader(client)
	if l, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(l, "220 ") {
		t.Fatalf("greeting %q %v", l, err)
	}
	return client, r, s
}

// closedAt drains the server's replies in the background and reports when
// it closed the connection.
func closedAt(r *bufio.Reader) <-chan time.Time {
	c := make(chan time.Time, 1)
	go func() {
		io.Copy(io.Discard, r)
		c <- time.Now()
	}()
	return c
}

// A client that trickles a command one octet at a time is cut off when
// the request's time is over, not kept alive by each octet.
func TestInboundTrickledCommand(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, r, _ := pipeSession(t, InboundOptions{})
		start := time.Now()
		done := closedAt(r)
		var wg sync.WaitGroup
		defer wg.Wait()
		wg.Go(func() {
			for _, b := range []byte("NOOP NOOP NOOP NOOP\r\n") {
				if _, err := c.Write([]byte{b}); err != nil {
					return
				}
				time.Sleep(90 * time.Second)
			}
		})
		if d := (<-done).Sub(start); d > 5*time.Minute+time.Second {
			t.Fatalf("closed after %v, want 5m", d)
		}
	})
}

// A whole session ends at its deadline even when every request comes in
// time.
func TestInboundSessionTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, r, _ := pipeSession(t, InboundOptions{SessionTimeout: 20 * time.Minute})
		start := time.Now()
		done := closedAt(r)
		var wg sync.WaitGroup
		defer wg.Wait()
		wg.Go(func() {
			for {
				if _, err := c.Write([]byte("NOOP\r\n")); err != nil {
					return
				}
				time.Sleep(4 * time.Minute)
			}
		})
		if d := (<-done).Sub(start); d < 20*time.Minute || d > 20*time.Minute+time.Second {
			t.Fatalf("closed after %v, want 20m", d)
		}
	})
}

// Message content gets a second more for every MinDataRate octets: at a
// fair rate a message longer than the read timeout completes, a trickle
// is cut off.
func TestInboundMinDataRate(t *testing.T) {
	for _, tc := range []struct {
		name    string
		perSec  int
		accepts bool
	}{
		{"fair rate", 1000, true},
		{"trickle", 100, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				c, r, _ := pipeSession(t, InboundOptions{ReadTimeout: 10 * time.Second, MinDataRate: 500})
				cmd := func(line, want string) {
					t.Helper()
					if _, err := c.Write([]byte(line + "\r\n")); err != nil {
						t.Fatal(err)
					}
					for {
						l, err := r.ReadString('\n')
						if err != nil {
							t.Fatalf("%s: %v", line, err)
						}
						if l[3] == ' ' {
							if !strings.HasPrefix(l, want) {
								t.Fatalf("%s: %q", line, l)
							}
							return
						}
					}
				}
				cmd("EHLO client.example", "250")
				cmd("MAIL FROM:<a@example.com>", "250")
				cmd("RCPT TO:<198036@emsd.example.test>", "250")
				cmd("DATA", "354")
				body := "Subject: slow\r\n\r\n" + strings.Repeat(strings.Repeat("x", 98)+"\r\n", 300) // 30 kB: 30 s at 1000/s
				var werr error
				for i := 0; i < len(body) && werr == nil; i += tc.perSec / 10 {
					_, werr = c.Write([]byte(body[i:min(i+tc.perSec/10, len(body))]))
					time.Sleep(100 * time.Millisecond)
				}
				if !tc.accepts {
					if werr == nil {
						t.Fatal("a trickled message was read to its end")
					}
					return
				}
				cmd(".", "250")
			})
		})
	}
}

// The server counts as crowded, and requests get the stress timeout, with
// more than three quarters of its sessions open.
func TestConnLimitsCrowded(t *testing.T) {
	var l connLimits
	l.set(4, 0)
	for i, want := range []bool{false, false, false, true} {
		l.acquire(netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}))
		if got := l.crowded(); got != want {
			t.Errorf("%d sessions: crowded %v", i+1, got)
		}
	}
	l.set(0, 0)
	if l.crowded() {
		t.Error("crowded without a limit")
	}
}
