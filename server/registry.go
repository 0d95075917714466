package server

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/mailconv"
	"github.com/esro-emsdp/emsdp/store"
)

// device is a registry entry with its protocol values decoded.
type device struct {
	store.Device
	addr    emsd.Address
	version emsd.Version
	ap      netip.AddrPort // registered address; invalid for a device registered without one
}

// registry is an immutable snapshot of the device registry; the server
// swaps in a new one on reload (SIGHUP, or an edit noticed by polling).
type registry struct {
	version int64
	byAddr  map[emsd.Address]*device
	byAP    map[netip.AddrPort]*device
	byIP    map[netip.Addr][]*device
	byAlias map[string]*device
}

func newRegistry(version int64, devs []*store.Device) *registry {
	r := &registry{
		version: version,
		byAddr:  make(map[emsd.Address]*device, len(devs)),
		byAP:    make(map[netip.AddrPort]*device, len(devs)),
		byIP:    make(map[netip.Addr][]*device, len(devs)),
		byAlias: map[string]*device{},
	}
	for _, sd := range devs {
		v, err := emsd.ParseVersion(sd.Version)
		if err != nil {
			v = emsd.V1_1 // the reference's default for an unknown type (docs/protocol.md EMSD §9.2)
		}
		d := &device{Device: *sd, addr: emsd.Address(sd.Address), version: v}
		r.byAddr[d.addr] = d
		if ip := sd.IP.Unmap(); ip.IsValid() {
			d.ap = netip.AddrPortFrom(ip, sd.Port)
			r.byAP[d.ap] = d
			r.byIP[ip] = append(r.byIP[ip], d)
		}
		for _, a := range sd.Aliases {
			r.byAlias[strings.ToLower(a)] = d
		}
	}
	return r
}

// byPeer finds the device an INVOKE came from by its network address:
// IP and port, then IP alone when only one device has that IP (see
// docs/protocol.md EMSD §9.2; the reference knows only the IP).
func (r *registry) byPeer(peer netip.AddrPort, ipOnly bool) *device {
	if !ipOnly {
		if d := r.byAP[peer]; d != nil {
			return d
		}
	}
	if ds := r.byIP[peer.Addr()]; len(ds) == 1 || (ipOnly && len(ds) > 0) {
		return ds[0]
	}
	return nil
}

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
// device and password rather than once per operation. The authLimiter
// decides when bcrypt may run.
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
// registered IP address. Password checks go through s.auth, the
// failed-authentication limits (see authLimiter for why a limited source
// is refused even the password pwCache holds).
//
// A device the registry does not know may have been added a moment ago:
// the registry is then re-read at once (registryFresh) and tried again,
// rather than the device being refused until the next registry_poll.
//
// authed reports that the device proved itself with its password: only
// then may its source address become its contact (contact.go), and the
// source is proven to the ESRO endpoint (esro.Prove): the replies to it
// are no longer limited against reflection. A device identified by its
// DTLS session is not authed in that sense: deliveries to it follow its
// sessions, not contacts (dtls.go).
func (s *Server) identify(ctx context.Context, w esro.ResponseWriter, peer netip.AddrPort, sec *emsd.SecurityElement, checkPW bool) (d *device, authed bool, err error) {
	if a, ok := dtlsDevice(ctx); ok {
		d, err := s.identifyDTLS(a, sec)
		return d, false, err
	}
	d, authed, err = s.identifyIn(ctx, s.registry(), peer, sec, checkPW)
	if errors.Is(err, errUnknownDevice) && s.registryFresh() {
		d, authed, err = s.identifyIn(ctx, s.registry(), peer, sec, checkPW)
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
func (s *Server) identifyDTLS(a emsd.Address, sec *emsd.SecurityElement) (*device, error) {
	d := s.registry().byAddr[a]
	if d == nil || d.PSK == nil {
		return nil, errUnknownDevice // removed, or its key removed, since the handshake
	}
	if sec != nil && sec.Address != nil && sec.Address.Address != a {
		return nil, fmt.Errorf("%w: DTLS identity %s names device %s", errUnknownDevice, a, sec.Address.Address)
	}
	return d, nil
}

// registryRecheck: an unknown device makes the server ask the store
// whether its registry changed at most this often, so that a flood from
// unknown or spoofed sources costs at most that many queries.
const registryRecheck = 250 * time.Millisecond

// registryFresh reloads the registry if the store's version moved since it
// was loaded, and reports whether it did.
func (s *Server) registryFresh() bool {
	s.recheck.Lock()
	defer s.recheck.Unlock()
	now := time.Now()
	if now.Sub(s.recheckAt) < registryRecheck {
		return false
	}
	s.recheckAt = now
	ctx, cancel := context.WithTimeout(s.loopCtx, time.Second)
	defer cancel()
	return s.reloadIfChanged(ctx, "unknown device")
}

// reloadIfChanged reloads the registry if the store's version moved since
// it was loaded, logging why, and reports whether it did.
func (s *Server) reloadIfChanged(ctx context.Context, why string) bool {
	v, err := s.st.RegistryVersion(ctx)
	if err != nil || v == s.registry().version {
		return false
	}
	if err := s.reloadRegistry(ctx); err != nil {
		if ctx.Err() == nil {
			s.log.Warn("registry reload", "err", err)
		}
		return false
	}
	s.log.Info("device registry reloaded", "devices", len(s.registry().byAddr), "why", why)
	return true
}

func (s *Server) identifyIn(ctx context.Context, r *registry, peer netip.AddrPort, sec *emsd.SecurityElement, checkPW bool) (*device, bool, error) {
	if s.conf().Compat.IPOnlyIdentification {
		if d := r.byPeer(peer, true); d != nil {
			return d, false, nil
		}
		return nil, false, errUnknownDevice
	}
	var d *device
	if sec != nil && sec.Address != nil {
		d = r.byAddr[sec.Address.Address]
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
		// limits; bcrypt waits for its turn (authLimiter.check), and the
		// cache is asked again then, as a check of the same password
		// that ran meanwhile may have filled it.
		byDevice := d.ap.Addr() != peer.Addr()
		limit := s.auth.over(peer.Addr(), d.addr, byDevice)
		if limit == "" && s.pw.cached(d, pw) {
			return d, true, nil
		}
		var ok bool
		var err error
		if limit == "" {
			ok, limit, err = s.auth.check(ctx, peer.Addr(), d.addr, byDevice, func() bool {
				return s.pw.cached(d, pw) || s.pw.verify(d, pw)
			})
		}
		switch {
		case limit != "":
			s.metrics.authLimited.WithLabelValues(limit).Inc()
			if n, warn := s.auth.refused(); warn {
				s.log.Warn("authentications refused unchecked: too many failed authentications",
					"limit", limit, "source", sourceOf(peer.Addr()).String(), "device", d.addr, "refused_since_last_warning", n)
			}
			return nil, false, errAuthLimited
		case errors.Is(err, errAuthQueueFull):
			s.metrics.authLimited.WithLabelValues(limitQueue).Inc()
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

// resolve maps an Internet address to a device: an alias, or
// number@domain for one of the EMSD domains (docs/protocol.md EMSD §6.2).
func (s *Server) resolve(spec string) (emsd.Address, bool) {
	r := s.registry()
	if d := r.byAlias[strings.ToLower(spec)]; d != nil {
		return d.addr, true
	}
	if a, ok := (mailconv.Mapping{Domains: s.domains}).Numeric(lowerDomain(spec)); ok && r.byAddr[a] != nil {
		return a, true
	}
	return 0, false
}

func (s *Server) mapping() mailconv.Mapping {
	return mailconv.Mapping{Domains: s.domains, Resolve: s.resolve}
}

func (s *Server) registry() *registry { return s.reg.Load() }

// Reload is SIGHUP: it re-reads the device registry from the store and
// the SMTP certificate files (a renewed certificate takes effect for new
// STARTTLS handshakes; one that fails to load leaves the old one in use),
// and makes the delivery scheduler and the relay worker look at the queues
// at once, so that entries another process changed (emsdp queue retry)
// are taken up now rather than at the next rescan (rescan, relayIdle):
// the scheduler re-reads every device's due time and lifts the holds of
// devices whose attempts failed.
// The configuration file is Reconfigure's.
func (s *Server) Reload(ctx context.Context) error {
	var errs []error
	if err := s.reloadRegistry(ctx); err != nil {
		errs = append(errs, fmt.Errorf("registry: %w", err))
	}
	if err := s.rescanFleet(ctx, time.Time{}); err != nil {
		errs = append(errs, fmt.Errorf("delivery queue: %w", err))
	}
	s.sched.mu.Lock()
	s.sched.fleet.release(time.Now())
	s.sched.mu.Unlock()
	s.kick()
	s.kickRelay()
	if s.tlsCert != nil {
		if err := s.tlsCert.load(time.Now()); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// reloadRegistry re-reads the device registry from the store.
func (s *Server) reloadRegistry(ctx context.Context) error {
	v, err := s.st.RegistryVersion(ctx)
	if err != nil {
		return err
	}
	devs, err := s.st.Devices(ctx)
	if err != nil {
		return err
	}
	old := s.reg.Swap(newRegistry(v, devs))
	s.dtlsKeysChanged(old, s.registry())
	s.metrics.devices.Set(float64(len(devs)))
	s.unparkAll()
	return nil
}

// deviceAddrSpec is a device's Internet address.
func (s *Server) deviceAddrSpec(a emsd.Address) string { return a.String() + "@" + s.domain }
