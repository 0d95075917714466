package server

import (
	"cmp"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/esro-emsdp/emsdp/emsd"
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
