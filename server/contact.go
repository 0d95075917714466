package server

import (
	"context"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/store"
)

// Devices behind a NAT or on changing addresses.
//
// A NAT lets datagrams in only over a binding the device opened, and
// (address-dependent filtering, RFC 4787) only from the address the
// device sent to. So the server learns where a device is from what it
// sends: each INVOKE whose password checked out (submission, delivery
// control) records its source address and this server's endpoint (Via)
// in the store as the device's contact (a submission from elsewhere than
// a fresh poll's address excepted, see heard). Nothing else moves it: not
// identification by source address (compat.ip_only_identification, a
// device without password, delivery verify, which carries no
// credentials), and not a wrong password, so a forged source address
// cannot redirect a device's mail.
//
// Deliveries go to the contact while it is fresh (delivery.contact_lifetime
// since the device was last heard), else to the registered address, else
// nowhere: the device is offline and its deliveries wait, unattempted,
// until it is heard again or they expire. A delivery to the contact that
// gets no answer is re-invoked at the registered address, when there is
// one, in the same attempt: a device that submitted from a passing port
// (emsdp ua send) still receives at the address it registered.
//
// Several servers on one PostgreSQL store: only the server that last heard
// the device delivers to a fresh contact (its deliveries leave from the
// address the NAT expects); the others leave the device alone while the
// contact is fresh, and fall back to the registered address, or offline,
// once it is not. A server restarted on another address is another
// server for this. A server finds work another server queued for a device
// it heard at the device's next poll or at its rescan (30 s). Servers
// behind one shared address are told apart all the same (Via is per
// process endpoint), which is right when a load balancer maps each device
// to one server and not otherwise.
//
// A server listening on a wildcard address answers from the address the
// kernel picks for the device's route: on a host with several addresses,
// listen on the one the devices use.

// contactCache remembers the contacts this server wrote, so that a device
// that polls often costs a store write only when it moved or every
// quarter lifetime.
//
// dead holds contacts that did not answer a delivery: they are not
// delivered to again until the device is heard again, so that a device
// gone quiet is offline (or reached at its registered address) rather
// than retried at a dead binding, and a contact left by a passing socket
// (emsdp ua send) costs one ESRO timeout, not one per message.
type contactCache struct {
	mu   sync.Mutex
	m    map[emsd.Address]store.Contact
	dead map[emsd.Address]netip.AddrPort
}

func (c *contactCache) isDead(a emsd.Address, ap netip.AddrPort) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	d, ok := c.dead[a]
	return ok && d == ap
}

func (c *contactCache) setDead(a emsd.Address, ap netip.AddrPort, dead bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !dead {
		delete(c.dead, a)
		return
	}
	if c.dead == nil {
		c.dead = map[emsd.Address]netip.AddrPort{}
	}
	c.dead[a] = ap
}

func (c *contactCache) get(a emsd.Address) (store.Contact, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	v, ok := c.m[a]
	return v, ok
}

func (c *contactCache) put(a emsd.Address, v store.Contact) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[emsd.Address]store.Contact{}
	}
	c.m[a] = v
}

func (c *contactCache) forget(a emsd.Address) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, a)
}

// contactStore is the part of the store that keeps device contacts.
type contactStore interface {
	DeviceContact(ctx context.Context, addr uint32) (store.Contact, error)
	SetContact(ctx context.Context, addr uint32, c store.Contact) (prev store.Contact, written bool, err error)
	TouchContact(ctx context.Context, addr uint32, c store.Contact, at time.Time) (bool, error)
}

// contactBook records where devices are heard from and chooses where
// their deliveries go (see the top of this file). It takes only the
// store's contacts.
type contactBook struct {
	st   contactStore
	log  *slog.Logger
	conf func() *Config // contact_lifetime and the store driver, as configured now
	// via names this server's EMSD endpoint in the contacts it writes.
	via string
	// reachable tells the delivery scheduler that a device's deliveries
	// may go now (it was heard, or heard elsewhere than before).
	reachable func(emsd.Address)
	// ctx bounds the store writes of heard and alive (ends at Close).
	ctx     context.Context
	changes prometheus.Counter // devices heard from another address
	cache   contactCache
}

// viaName names this server's EMSD endpoint among the servers that share
// a store: the host name and the socket's address.
func viaName(local string) string {
	h, err := os.Hostname()
	if err != nil || h == "" {
		h = "localhost"
	}
	return h + " " + local
}

// heard records that dev, authenticated by its password, sent from peer,
// in a poll (delivery control) or not (a submission). It runs before the
// INVOKE wakes the device's queue, so that the deliveries it starts go to
// peer.
//
// A submission does not move a fresh contact heard in a poll from
// elsewhere: a device that polls from one socket and submits from
// another (emsdp ua receive --poll beside emsdp ua send, whose socket
// closes when it has sent) receives where it polls. A single socket
// behind a NAT, the usual device, polls and submits from one address.
func (b *contactBook) heard(dev *device, peer netip.AddrPort, polled bool) {
	now := time.Now()
	life := time.Duration(b.conf().Delivery.ContactLifetime)
	c := store.Contact{Addr: peer, Via: b.via, At: now, Polled: polled}
	if b.cache.isDead(dev.addr, peer) {
		b.cache.setDead(dev.addr, peer, false)
		b.reachable(dev.addr)
	}
	last, ok := b.cache.get(dev.addr)
	if ok && last.Addr == peer && last.Via == b.via && (last.Polled || !polled) && now.Sub(last.At) < life/4 {
		return
	}
	if !polled {
		cur, err := b.st.DeviceContact(b.ctx, uint32(dev.addr))
		if err == nil && cur.Polled && now.Sub(cur.At) < life {
			if cur.Addr != peer && !b.cache.isDead(dev.addr, cur.Addr) {
				return // it receives where it polls from
			}
			c.Polled = cur.Addr == peer
		}
	}
	prev, written, err := b.st.SetContact(b.ctx, uint32(dev.addr), c)
	if err != nil {
		b.cache.forget(dev.addr)
		b.log.Warn("record device address", "device", dev.addr, "peer", peer, "err", err)
		return
	}
	if !written {
		return // a newer contact is stored (another server heard it since)
	}
	b.cache.put(dev.addr, c)
	moved := prev.Addr != peer || prev.Via != b.via
	if moved && prev.Known() {
		b.changes.Inc()
		b.log.Info("device address changed", "device", dev.addr, "from", prev.Addr, "to", peer,
			"last_heard", now.Sub(prev.At).Round(time.Second), "other_server", prev.Via != b.via)
	} else if !prev.Known() {
		b.log.Info("device heard", "device", dev.addr, "from", peer)
	}
	if moved || now.Sub(prev.At) >= life {
		// Deliveries held for an offline device, or waiting for the
		// server that heard it, can go now.
		b.reachable(dev.addr)
	}
}

// alive is the sign of life of a delivery: the device answered at the
// contact to, so its binding is open; the contact stays fresh. It never
// moves the contact (TouchContact changes only the time of that very
// contact), so a delivery that ends after the device moved changes
// nothing.
func (b *contactBook) alive(a emsd.Address, to netip.AddrPort) {
	now := time.Now()
	life := time.Duration(b.conf().Delivery.ContactLifetime)
	last, ok := b.cache.get(a)
	if !ok || last.Addr != to || last.Via != b.via || now.Sub(last.At) < life/4 {
		return
	}
	touched, err := b.st.TouchContact(b.ctx, uint32(a), last, now)
	if err != nil {
		b.log.Warn("record device address", "device", a, "err", err)
		return
	}
	if touched {
		last.At = now
		b.cache.put(a, last)
	}
}

// lastHeard is when device a was last heard from as this server knows it
// (heard or alive since start; zero: not, or its contact has stopped
// answering): the scheduler tries such a device before those not heard
// from (fleet.noteHeard).
func (b *contactBook) lastHeard(a emsd.Address) time.Time {
	c, ok := b.cache.get(a)
	if !ok || b.cache.isDead(a, c.Addr) {
		return time.Time{}
	}
	return c.At
}

// contactFailed notes that the contact ap of device a did not answer a
// delivery.
func (b *contactBook) failed(a emsd.Address, ap netip.AddrPort) {
	if !b.cache.isDead(a, ap) {
		b.log.Info("device not answering at the address it was heard from", "device", a, "address", ap)
	}
	b.cache.setDead(a, ap, true)
}

// target is where a delivery goes: to, then fallback (invalid: none) when
// to does not answer. learned says whether to is the device's contact.
type target struct {
	to, fallback netip.AddrPort
	learned      bool
	dtls         bool // through the DTLS endpoint (dtlsTarget)
}

// Why a device gets no delivery now.
const (
	targetOffline   = "offline"   // not heard lately and no registered address
	targetElsewhere = "elsewhere" // heard lately by another server sharing the store
)

// target chooses where deliveries to dev go now in clear (see the top of
// this file); why is set when they must wait. ctx is the deliveries'.
// known is the device's contact when the caller read it already (nil:
// read it).
func (b *contactBook) target(ctx context.Context, dev *device, known *store.Contact) (t target, why string) {
	var c store.Contact
	var err error
	if known != nil {
		c = *known
	} else {
		c, err = b.st.DeviceContact(ctx, uint32(dev.addr))
	}
	if err != nil {
		c = store.Contact{} // the registered address still works
		if ctx.Err() == nil {
			b.log.Warn("device address", "device", dev.addr, "err", err)
		}
	}
	cfg := b.conf()
	fresh := c.Known() && time.Since(c.At) < time.Duration(cfg.Delivery.ContactLifetime) &&
		!b.cache.isDead(dev.addr, c.Addr)
	switch {
	case fresh && c.Via != b.via && cfg.Store.Driver == StorePostgres:
		// (With SQLite there is one server: another Via is an earlier
		// run of this one.)
		return t, targetElsewhere
	case fresh:
		t = target{to: c.Addr, learned: true}
		if dev.ap.IsValid() && dev.ap != c.Addr {
			t.fallback = dev.ap
		}
		return t, ""
	case dev.ap.IsValid():
		return target{to: dev.ap}, ""
	}
	return t, targetOffline
}

// tryTo is the address of an attempt's try (0 or 1) of a segment: the
// contact, then the fallback when there is one; else the same twice.
func (t *target) tryTo(try int) netip.AddrPort {
	if try > 0 && t.fallback.IsValid() {
		// The contact did not answer: the rest of the message goes to
		// the registered address as well.
		t.to, t.fallback, t.learned = t.fallback, netip.AddrPort{}, false
	}
	return t.to
}
