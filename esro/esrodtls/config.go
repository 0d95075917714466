package esrodtls

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"time"

	"github.com/pion/dtls/v3"
)

// Cipher suites offered by default: TLS_PSK_WITH_AES_128_CCM_8 is RFC 7925's
// mandatory suite (8-byte tag, the cheapest on the wire); the ECDHE_PSK suite
// adds forward secrecy at the cost of one key exchange per handshake.
var defaultSuites = []dtls.CipherSuiteID{
	dtls.TLS_PSK_WITH_AES_128_CCM_8,
	dtls.TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256,
}

// DefaultCipherSuites returns the suites a zero Config offers, most preferred
// first.
func DefaultCipherSuites() []dtls.CipherSuiteID {
	return append([]dtls.CipherSuiteID(nil), defaultSuites...)
}

// ParseCipherSuite maps a suite's IANA name (as OpenSSL and RFCs spell it, e.g.
// "TLS_PSK_WITH_AES_128_CCM_8") to its id. Only PSK suites are accepted.
func ParseCipherSuite(name string) (dtls.CipherSuiteID, error) {
	for _, id := range pskSuites {
		if id.String() == name {
			return id, nil
		}
	}
	return 0, fmt.Errorf("esrodtls: unknown or non-PSK cipher suite %q", name)
}

var pskSuites = []dtls.CipherSuiteID{
	dtls.TLS_PSK_WITH_AES_128_CCM_8,
	dtls.TLS_PSK_WITH_AES_128_CCM,
	dtls.TLS_PSK_WITH_AES_256_CCM_8,
	dtls.TLS_PSK_WITH_AES_128_GCM_SHA256,
	dtls.TLS_PSK_WITH_CHACHA20_POLY1305_SHA256,
	dtls.TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256,
	dtls.TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA256,
}

// ErrUnknownIdentity is what a PSK lookup returns for an identity it has no
// key for; the handshake then fails and is counted as "unknown_identity".
var ErrUnknownIdentity = errors.New("esrodtls: unknown PSK identity")

// ErrNoSession is returned by WriteTo for a peer with no session, on a Conn
// that cannot open one (no Credentials).
var ErrNoSession = errors.New("esrodtls: no DTLS session with peer")

// Config configures a Conn. Listen needs PSK; opening sessions to peers
// (WriteTo an address without a session) needs Credentials.
type Config struct {
	// PSK returns the key of a client's identity, or ErrUnknownIdentity.
	// The server side calls it during each handshake. It must not log the key.
	PSK func(identity string) ([]byte, error)

	// Credentials returns the identity and key this side presents when it
	// opens a session to peer (the client side).
	Credentials func(peer netip.AddrPort) (identity string, key []byte, err error)

	// CipherSuites in order of preference; DefaultCipherSuites when empty.
	CipherSuites []dtls.CipherSuiteID

	// HandshakeTimeout bounds one handshake (default 10 s).
	HandshakeTimeout time.Duration

	// IdleTimeout closes a session that carried nothing for this long
	// (default 1 h). Devices are expected to keep sessions for long: a
	// handshake costs several round trips, an established session none.
	IdleTimeout time.Duration

	// StaleAfter replaces a session this side opened when it has sent for
	// this long without receiving anything (default 5 s): the server lost
	// it (a restart, a new session from the same address) without a
	// close_notify reaching us. ESRO answers every PDU it sends within a
	// round trip, so silence that long means the session is gone, and the
	// retransmissions then travel in a new one.
	StaleAfter time.Duration

	// MaxHandshakes bounds the handshakes in progress at once on the server
	// side (default 256); further attempts are dropped and counted "busy".
	MaxHandshakes int

	// AllowHandshake, when set, is asked before the server side spends any
	// work on a new source; false drops the attempt (counted "rate_limited").
	AllowHandshake func(src netip.AddrPort) bool

	// NoCookie turns the HelloVerifyRequest cookie exchange off. Only for
	// measurements: without it a forged source address costs the server a
	// handshake and gets a larger answer than its request.
	NoCookie bool

	// NoConnectionID turns Connection IDs off (RFC 9146): a peer whose
	// address changes then needs a new handshake.
	NoConnectionID bool

	// MTU of DTLS records (default 1200, pion's; ESRO PDUs must fit).
	MTU int

	// Logger for session events (never keys); slog.Default when nil.
	Logger *slog.Logger
}

// cidSize is 8 bytes: enough that a guessed id is hopeless, short enough
// that it costs little in every record.
const cidSize = 8

// maxPending is how many datagrams wait for a session being opened; ESRO
// retransmits anything dropped beyond that.
const maxPending = 16

func (c *Conn) dtlsConfig(server bool, identity string, key []byte) (*dtls.Config, error) {
	for _, s := range c.cfg.CipherSuites {
		if !isPSKSuite(s) {
			return nil, fmt.Errorf("esrodtls: cipher suite %v is not a PSK suite", s)
		}
	}
	dc := &dtls.Config{
		CipherSuites:         c.cfg.CipherSuites,
		ExtendedMasterSecret: dtls.RequestExtendedMasterSecret,
		MTU:                  c.cfg.MTU,
		// pion's own logger stays silent: it would print handshake errors
		// per source, which a flood would turn into a log flood.
		LoggerFactory: quietLogger{},
	}
	if server {
		dc.PSK = func(hint []byte) ([]byte, error) {
			k, err := c.cfg.PSK(string(hint))
			if err != nil {
				return nil, err
			}
			return k, nil
		}
		// An empty hint: the identity is the client's to name.
		dc.PSKIdentityHint = []byte{}
		dc.InsecureSkipVerifyHello = c.cfg.NoCookie
		if !c.cfg.NoConnectionID {
			dc.ConnectionIDGenerator = dtls.RandomCIDGenerator(cidSize)
		}
	} else {
		dc.PSK = func([]byte) ([]byte, error) { return key, nil }
		dc.PSKIdentityHint = []byte(identity)
		if !c.cfg.NoConnectionID {
			// The client asks the server to tag its records with the
			// server's id; the server's own address does not move.
			dc.ConnectionIDGenerator = dtls.OnlySendCIDGenerator()
		}
	}
	return dc, nil
}

func isPSKSuite(id dtls.CipherSuiteID) bool {
	for _, s := range pskSuites {
		if s == id {
			return true
		}
	}
	return false
}
