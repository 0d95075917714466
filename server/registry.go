package server

import (
	"cmp"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
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

// registry is the device registry in memory. It is built whole at start
// (and on SIGHUP or when the store's change log no longer reaches back to
// its version), and otherwise kept current by applying the store's change
// log (store.RegistryChanges): an edit costs the devices it changed, not
// the registry. Entries are immutable *device values, replaced whole.
// Safe for concurrent use.
//
// Memory: a device costs its *device (the store.Device fields, its
// decoded address, version and registered address: about 300 bytes with
// a bcrypt hash and no aliases) plus one entry in byAddr and one in byAP
// and byIP: about 660 bytes in all (resident memory per device after
// start: README, "A large device registry"). Devices with nothing queued cost nothing more: the delivery
// scheduler holds entries only for devices with queued mail.
type registry struct {
	mu      sync.RWMutex
	version int64
	byAddr  map[emsd.Address]*device
	byAP    map[netip.AddrPort]*device
	byIP    map[netip.Addr][]*device // in address order
	byAlias map[string]*device
}

func deviceOf(sd *store.Device) *device {
	v, err := emsd.ParseVersion(sd.Version)
	if err != nil {
		v = emsd.V1_1 // the reference's default for an unknown type (docs/protocol.md EMSD §9.2)
	}
	d := &device{Device: *sd, addr: emsd.Address(sd.Address), version: v}
	if ip := sd.IP.Unmap(); ip.IsValid() {
		d.ap = netip.AddrPortFrom(ip, sd.Port)
	}
	return d
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
		r.put(deviceOf(sd))
	}
	return r
}

// put files d, replacing the entry of its address. r.mu held (or r not
// yet shared).
func (r *registry) put(d *device) {
	r.drop(d.addr)
	r.byAddr[d.addr] = d
	if d.ap.IsValid() {
		r.byAP[d.ap] = d
		ds := r.byIP[d.ap.Addr()]
		i, _ := slices.BinarySearchFunc(ds, d.addr, func(e *device, a emsd.Address) int { return cmp.Compare(e.addr, a) })
		r.byIP[d.ap.Addr()] = slices.Insert(ds, i, d)
	}
	for _, a := range d.Aliases {
		r.byAlias[strings.ToLower(a)] = d
	}
}

// drop removes the entry of address a, if any. r.mu held.
func (r *registry) drop(a emsd.Address) *device {
	old := r.byAddr[a]
	if old == nil {
		return nil
	}
	delete(r.byAddr, a)
	if old.ap.IsValid() {
		ip := old.ap.Addr()
		ds := slices.DeleteFunc(r.byIP[ip], func(e *device) bool { return e == old })
		if len(ds) == 0 {
			delete(r.byIP, ip)
		} else {
			r.byIP[ip] = ds
		}
		if r.byAP[old.ap] == old {
			delete(r.byAP, old.ap)
			for _, e := range ds { // another device registered at the same address and port
				if e.ap == old.ap {
					r.byAP[old.ap] = e
					break
				}
			}
		}
	}
	for _, al := range old.Aliases {
		if k := strings.ToLower(al); r.byAlias[k] == old {
			delete(r.byAlias, k)
		}
	}
	return old
}

// apply brings r to version v: devs are the changed devices' entries now,
// nil for a removed one. It returns the entries replaced or removed.
func (r *registry) apply(v int64, devs map[emsd.Address]*store.Device) map[emsd.Address]*device {
	r.mu.Lock()
	defer r.mu.Unlock()
	old := make(map[emsd.Address]*device, len(devs))
	for a, sd := range devs {
		if o := r.drop(a); o != nil {
			old[a] = o
		}
		if sd != nil {
			r.put(deviceOf(sd))
		}
	}
	if v > r.version {
		r.version = v
	}
	return old
}

func (r *registry) get(a emsd.Address) *device {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.byAddr[a]
}

func (r *registry) atAP(ap netip.AddrPort) *device {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.byAP[ap]
}

func (r *registry) alias(spec string) *device {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.byAlias[strings.ToLower(spec)]
}

func (r *registry) size() int {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return len(r.byAddr)
}

func (r *registry) ver() int64 {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.version
}

// byPeer finds the device an INVOKE came from by its network address:
// IP and port, then IP alone when only one device has that IP (see
// docs/protocol.md EMSD §9.2; the reference knows only the IP).
func (r *registry) byPeer(peer netip.AddrPort, ipOnly bool) *device {
	r.mu.RLock()
	defer r.mu.RUnlock()
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
	d := s.registry().get(a)
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

// reloadIfChanged brings the registry up to the store's version, logging
// why, and reports whether it changed: the devices the store's change log
// names are read again, or the whole registry when the log no longer
// reaches back to the registry's version.
func (s *Server) reloadIfChanged(ctx context.Context, why string) bool {
	s.regMu.Lock()
	defer s.regMu.Unlock()
	r := s.registry()
	since := r.ver()
	v, addrs, ok, err := s.st.RegistryChanges(ctx, since)
	if err != nil || v == since {
		if err != nil && ctx.Err() == nil {
			s.log.Warn("registry changes", "err", err)
		}
		return false
	}
	if !ok {
		if err := s.reloadRegistryLocked(ctx); err != nil {
			if ctx.Err() == nil {
				s.log.Warn("registry reload", "err", err)
			}
			return false
		}
		s.log.Info("device registry reloaded", "devices", s.registry().size(), "why", why)
		return true
	}
	devs := make(map[emsd.Address]*store.Device, len(addrs))
	for _, a := range addrs {
		d, err := s.st.Device(ctx, a)
		switch {
		case errors.Is(err, store.ErrNotFound):
			d = nil // removed
		case err != nil:
			if ctx.Err() == nil {
				s.log.Warn("registry change", "device", a, "err", err)
			}
			return false // the version stays: the next look tries again
		}
		devs[emsd.Address(a)] = d
	}
	old := r.apply(v, devs)
	if s.dtls != nil {
		for a, o := range old {
			if n := devs[a]; o.PSK != nil && (n == nil || string(n.PSK) != string(o.PSK)) {
				s.dtls.conn.CloseIdentity(a.String())
			}
		}
	}
	s.metrics.devices.Set(float64(r.size()))
	s.unpark(slices.Collect(maps.Keys(devs)))
	s.log.Debug("device registry changes applied", "devices", len(devs), "version", v, "why", why)
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
	if d := r.alias(spec); d != nil {
		return d.addr, true
	}
	if a, ok := (mailconv.Mapping{Domains: s.domains}).Numeric(lowerDomain(spec)); ok && r.get(a) != nil {
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

// reloadRegistry re-reads the whole device registry from the store.
func (s *Server) reloadRegistry(ctx context.Context) error {
	s.regMu.Lock()
	defer s.regMu.Unlock()
	return s.reloadRegistryLocked(ctx)
}

func (s *Server) reloadRegistryLocked(ctx context.Context) error {
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
