package esrodtls

import (
	"sync/atomic"

	"github.com/pion/logging"
)

// Reasons a handshake fails, as Stats.HandshakesFailed counts them.
const (
	reasonUnknownIdentity = iota
	reasonBadKey
	reasonTimeout
	reasonRateLimited
	reasonBusy
	reasonNoCookie
	numReasons
)

// FailureReasons names the keys of Stats.HandshakesFailed.
var FailureReasons = [numReasons]string{"unknown_identity", "bad_key", "timeout", "rate_limited", "busy", "no_cookie"}

type counters struct {
	hsOK     atomic.Uint64
	hsFailed [numReasons]atomic.Uint64
	sessions atomic.Int64
	rebinds  atomic.Uint64
	stale    atomic.Uint64
	sent     atomic.Uint64
	recv     atomic.Uint64
}

// Stats is a snapshot of a Conn's counters.
type Stats struct {
	// HandshakesOK counts completed handshakes (both sides).
	HandshakesOK uint64
	// HandshakesFailed counts failed or refused handshakes by reason
	// (FailureReasons). A wrong key shows as "timeout": the peer's
	// Finished does not decrypt and is dropped like any forged record.
	// "bad_key" is a handshake the peer or pion ended with another error.
	HandshakesFailed map[string]uint64
	// Sessions established now.
	Sessions int64
	// Rebinds counts sessions whose peer continued from a new address
	// (Connection IDs, RFC 9146).
	Rebinds uint64
	// Reopened counts sessions this side opened and replaced after they
	// fell silent (Config.StaleAfter).
	Reopened uint64
	// DatagramsSent and DatagramsReceived count ESRO PDUs through sessions.
	DatagramsSent, DatagramsReceived uint64
}

// Stats returns the counters.
func (c *Conn) Stats() Stats {
	s := Stats{
		HandshakesOK:      c.st.hsOK.Load(),
		HandshakesFailed:  make(map[string]uint64, numReasons),
		Sessions:          c.st.sessions.Load(),
		Rebinds:           c.st.rebinds.Load(),
		Reopened:          c.st.stale.Load(),
		DatagramsSent:     c.st.sent.Load(),
		DatagramsReceived: c.st.recv.Load(),
	}
	for i, name := range FailureReasons {
		s.HandshakesFailed[name] = c.st.hsFailed[i].Load()
	}
	return s
}

// quietLogger keeps pion's internal logging off; failures are counted.
type quietLogger struct{}

func (quietLogger) NewLogger(string) logging.LeveledLogger { return quiet{} }

type quiet struct{}

func (quiet) Trace(string)          {}
func (quiet) Tracef(string, ...any) {}
func (quiet) Debug(string)          {}
func (quiet) Debugf(string, ...any) {}
func (quiet) Info(string)           {}
func (quiet) Infof(string, ...any)  {}
func (quiet) Warn(string)           {}
func (quiet) Warnf(string, ...any)  {}
func (quiet) Error(string)          {}
func (quiet) Errorf(string, ...any) {}
