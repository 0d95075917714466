package gateway

import (
	"net"
	"sync"
	"time"
)

// requestConn enforces the inbound session's time limits on its reads,
// the way Postfix's smtpd_per_request_deadline and smtpd_min_data_rate do,
// so that a client trickling bytes cannot hold a session slot:
//
//   - A request (a command line, a message's content, a TLS handshake)
//     starts at the first read after a reply was written, and must arrive
//     within the read timeout: the deadline is not moved by each byte.
//   - While it arrives, every minRate octets received move the deadline
//     on by a second, so a large message at a reasonable rate completes.
//   - When the server is crowded (overloaded reports it), the request
//     time is the stress timeout instead, as Postfix's overload mode.
//   - The whole session ends at its own deadline, reads and writes.
//   - After a timeout every read fails: the session is over.
//
// go-smtp's own read deadlines (ReadTimeout) are left off: this type
// replaces them.
type requestConn struct {
	net.Conn
	readTimeout, stressTimeout time.Duration
	minRate                    int64 // octets a second; 0: none
	sessionEnd                 time.Time
	overloaded                 func() bool

	mu       sync.Mutex
	replied  bool // a write since the last read: the next read starts a request
	deadline time.Time
	got      int64 // octets of the current request
	timeout  time.Duration
	// expired is the timeout that ended the session, returned by every
	// later read: bufio hands a partial line read before a timeout to
	// go-smtp as a whole command and drops the error, which would let
	// the session go on.
	expired error
}

func newRequestConn(c net.Conn, o *InboundOptions, overloaded func() bool) *requestConn {
	d := &requestConn{Conn: c, readTimeout: o.ReadTimeout, stressTimeout: o.StressReadTimeout,
		overloaded: overloaded, replied: true}
	if o.MinDataRate > 0 {
		d.minRate = int64(o.MinDataRate)
	}
	if o.SessionTimeout > 0 {
		d.sessionEnd = time.Now().Add(o.SessionTimeout)
	}
	return d
}

func (c *requestConn) Read(p []byte) (int, error) {
	now := time.Now()
	c.mu.Lock()
	if c.expired != nil {
		c.mu.Unlock()
		return 0, c.expired
	}
	if c.replied {
		c.replied, c.got = false, 0
		c.timeout = c.readTimeout
		if c.overloaded != nil && c.overloaded() {
			c.timeout = min(c.timeout, c.stressTimeout)
		}
		c.deadline = now.Add(c.timeout)
	}
	d := c.deadline
	if c.minRate > 0 {
		d = d.Add(time.Duration(c.got * int64(time.Second) / c.minRate))
	}
	if !c.sessionEnd.IsZero() && c.sessionEnd.Before(d) {
		d = c.sessionEnd
	}
	c.mu.Unlock()
	if err := c.Conn.SetReadDeadline(d); err != nil {
		return 0, err
	}
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	c.got += int64(n)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		c.expired = err
	}
	c.mu.Unlock()
	return n, err
}

func (c *requestConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.replied = true
	c.mu.Unlock()
	return c.Conn.Write(p)
}

// SetReadDeadline is ignored: Read sets its own.
func (c *requestConn) SetReadDeadline(time.Time) error { return nil }

// SetWriteDeadline applies t, or the session's end if that comes first.
func (c *requestConn) SetWriteDeadline(t time.Time) error {
	if !c.sessionEnd.IsZero() && (t.IsZero() || c.sessionEnd.Before(t)) {
		t = c.sessionEnd
	}
	return c.Conn.SetWriteDeadline(t)
}

func (c *requestConn) SetDeadline(t time.Time) error { return c.SetWriteDeadline(t) }
