package server

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/netip"
	"sync"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/server/internal/authlimit"
	"github.com/esro-emsdp/emsdp/store"
)

// Identification failures, answered ERROR 4 with parameter 4 (see
// docs/protocol.md EMSD §9.3 Recommend, Open Point 3), except errAuthLimited and
// errAuthBusy, a password not checked because of the failed-
// authentication limits or a full queue of checks: those get a transient
// resource error, so that the device tries again later rather than give
// up on a password that may be right.
var (
	errUnknownDevice = errors.New("unknown device")
	errBadPassword   = errors.New("wrong password")
	errAuthLimited   = errors.New("password not checked: too many failed authentications")
	errAuthBusy      = errors.New("password not checked: too many checks waiting")
)

// pwCache remembers, per device, the last password that matched its
// hash, so that bcrypt (tens of milliseconds by design) runs once per
// device and password rather than once per operation. The registrar's
// authlimit.Limiter decides when bcrypt may run.
type pwCache struct {
	mu sync.Mutex
	ok map[emsd.Address][32]byte
}

func pwKey(d *device, pw string) [32]byte { return sha256.Sum256([]byte(d.PasswordHash + "\x00" + pw)) }

// cached reports whether pw is the password last verified for d, which
// needs no bcrypt. The two steps are apart so that identify can put the
// failed-authentication limits between them.
func (c *pwCache) cached(d *device, pw string) bool {
	if d.PasswordHash == "" {
		return true
	}
	key := pwKey(d, pw)
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ok[d.addr] == key
}

// verify checks pw against d's hash with bcrypt, and remembers it when it
// matches.
func (c *pwCache) verify(d *device, pw string) bool {
	if d.PasswordHash == "" {
		return true
	}
	if !store.CheckPassword(d.PasswordHash, pw) {
		return false
	}
	c.mu.Lock()
	if c.ok == nil {
		c.ok = map[emsd.Address][32]byte{}
	}
	c.ok[d.addr] = pwKey(d, pw)
	c.mu.Unlock()
	return true
}

// identify finds and authenticates the device an INVOKE comes from (see
// docs/protocol.md EMSD §9.3 with its Recommend): credentials naming an emsd-address
// select that device; otherwise the source address does. The password is
// verified whenever the device has one and checkPW is set (operations
// without a security element cannot carry one). A device identified by
// its credentials alone but without a password must also come from its
// registered IP address. Password checks go through g.auth, the
// failed-authentication limits (see authlimit.Limiter for why a limited source
// is refused even the password pwCache holds).
//
// A device the registry does not know may have been added a moment ago:
// the registry is then re-read at once (fresh) and tried again,
// rather than the device being refused until the next registry_poll.
//
// authed reports that the device proved itself with its password: only
// then may its source address become its contact (contact.go), and the
// source is proven to the ESRO endpoint (esro.Prove): the replies to it
// are no longer limited against reflection. A device identified by its
// DTLS session is not authed in that sense: deliveries to it follow its
// sessions, not contacts (dtls.go).
func (g *registrar) identify(ctx context.Context, w esro.ResponseWriter, peer netip.AddrPort, sec *emsd.SecurityElement, checkPW bool) (d *device, authed bool, err error) {
	if a, ok := dtlsDevice(ctx); ok {
		d, err := g.identifyDTLS(a, sec)
		return d, false, err
	}
	d, authed, err = g.identifyIn(ctx, g.current(), peer, sec, checkPW)
	if errors.Is(err, errUnknownDevice) && g.fresh() {
		d, authed, err = g.identifyIn(ctx, g.current(), peer, sec, checkPW)
	}
	if authed {
		esro.Prove(w)
	}
	if err == nil && d.RequireDTLS {
		return nil, false, errDTLSRequired
	}
	return d, authed, err
}

// identifyDTLS: the DTLS session's PSK identity is the device, proven by
// its key, so no password is needed. A security element naming another
// device is refused: one device cannot act for another.
func (g *registrar) identifyDTLS(a emsd.Address, sec *emsd.SecurityElement) (*device, error) {
	d := g.current().get(a)
	if d == nil || d.PSK == nil {
		return nil, errUnknownDevice // removed, or its key removed, since the handshake
	}
	if sec != nil && sec.Address != nil && sec.Address.Address != a {
		return nil, fmt.Errorf("%w: DTLS identity %s names device %s", errUnknownDevice, a, sec.Address.Address)
	}
	return d, nil
}

func (g *registrar) identifyIn(ctx context.Context, r *registry, peer netip.AddrPort, sec *emsd.SecurityElement, checkPW bool) (*device, bool, error) {
	if g.ipOnly() {
		if d := r.byPeer(peer, true); d != nil {
			return d, false, nil
		}
		return nil, false, errUnknownDevice
	}
	var d *device
	if sec != nil && sec.Address != nil {
		d = r.get(sec.Address.Address)
		if d == nil {
			return nil, false, errUnknownDevice
		}
		if d.PasswordHash == "" && d.ap.Addr() != peer.Addr() {
			return nil, false, errUnknownDevice
		}
	} else if d = r.byPeer(peer, false); d == nil {
		return nil, false, errUnknownDevice
	}
	if checkPW && d.PasswordHash != "" {
		pw := ""
		if sec != nil {
			pw = sec.Password
		}
		// The cache answers only for sources and devices within their
		// limits; bcrypt waits for its turn (authlimit.Limiter.Check), and the
		// cache is asked again then, as a check of the same password
		// that ran meanwhile may have filled it.
		byDevice := d.ap.Addr() != peer.Addr()
		limit := g.auth.Over(peer.Addr(), d.addr, byDevice)
		if limit == "" && g.pw.cached(d, pw) {
			return d, true, nil
		}
		var ok bool
		var err error
		if limit == "" {
			ok, limit, err = g.auth.Check(ctx, peer.Addr(), d.addr, byDevice, func() bool {
				return g.pw.cached(d, pw) || g.pw.verify(d, pw)
			})
		}
		switch {
		case limit != "":
			g.authLimited.WithLabelValues(limit).Inc()
			if n, warn := g.auth.Refused(); warn {
				g.log.Warn("authentications refused unchecked: too many failed authentications",
					"limit", limit, "source", authlimit.Source(peer.Addr()).String(), "device", d.addr, "refused_since_last_warning", n)
			}
			return nil, false, errAuthLimited
		case errors.Is(err, authlimit.ErrQueueFull):
			g.authLimited.WithLabelValues(authlimit.LimitQueue).Inc()
			return nil, false, errAuthBusy
		case err != nil:
			return nil, false, fmt.Errorf("%w: %w", errAuthBusy, err)
		case !ok:
			return nil, false, errBadPassword
		}
		return d, true, nil
	}
	return d, false, nil
}
