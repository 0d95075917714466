package server

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/mailconv"
	"github.com/esro-emsdp/emsdp/server/internal/authlimit"
	"github.com/esro-emsdp/emsdp/store"
)

// registryStore is the part of the store the registry reads.
type registryStore interface {
	RegistryVersion(ctx context.Context) (int64, error)
	Devices(ctx context.Context) ([]*store.Device, error)
	RegistryChanges(ctx context.Context, since int64) (version int64, addrs []uint32, ok bool, err error)
	Device(ctx context.Context, addr uint32) (*store.Device, error)
}

// registryWatcher hears of registry changes: the DTLS service ends the
// sessions of keys that changed, and the delivery scheduler looks again
// at the devices that changed.
type registryWatcher interface {
	// registryReplaced: the whole registry was read again (old is nil
	// at the first load).
	registryReplaced(old, cur *registry)
	// devicesChanged: the entries of the devices in cur changed (nil:
	// removed); old holds the entries they replaced.
	devicesChanged(old map[emsd.Address]*device, cur map[emsd.Address]*store.Device)
}

// registrar is the device registry with authentication: it keeps the
// in-memory registry current with the store (at start, on SIGHUP, at
// store.registry_poll, and at once for an unknown device), identifies
// and authenticates the device behind an INVOKE (identify.go) under the
// failed-authentication limits (authlimit.go), and maps Internet
// addresses to devices. It takes only the store's registry reads.
type registrar struct {
	st      registryStore
	log     *slog.Logger
	watch   registryWatcher
	ipOnly  func() bool // compat.ip_only_identification, as configured now
	domains []string    // the EMSD domains, lower case, the device domain first
	// ctx bounds the re-reads an unknown device makes (ends at shutdown).
	ctx context.Context

	devices     prometheus.Gauge
	authLimited *prometheus.CounterVec

	reg atomic.Pointer[registry]
	mu  sync.Mutex // serialises registry reloads and applied changes
	// recheck serialises fresh; recheckAt is its last look.
	recheck   sync.Mutex
	recheckAt time.Time
	pw        pwCache
	auth      *authlimit.Limiter
}

// current is the registry as last loaded.
func (g *registrar) current() *registry { return g.reg.Load() }

// reload re-reads the whole device registry from the store.
func (g *registrar) reload(ctx context.Context) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.reloadLocked(ctx)
}

func (g *registrar) reloadLocked(ctx context.Context) error {
	v, err := g.st.RegistryVersion(ctx)
	if err != nil {
		return err
	}
	devs, err := g.st.Devices(ctx)
	if err != nil {
		return err
	}
	cur := newRegistry(v, devs)
	old := g.reg.Swap(cur)
	g.devices.Set(float64(len(devs)))
	g.watch.registryReplaced(old, cur)
	return nil
}

// registryRecheck: an unknown device makes the server ask the store
// whether its registry changed at most this often, so that a flood from
// unknown or spoofed sources costs at most that many queries.
const registryRecheck = 250 * time.Millisecond

// fresh reloads the registry if the store's version moved since it
// was loaded, and reports whether it did.
func (g *registrar) fresh() bool {
	g.recheck.Lock()
	defer g.recheck.Unlock()
	now := time.Now()
	if now.Sub(g.recheckAt) < registryRecheck {
		return false
	}
	g.recheckAt = now
	ctx, cancel := context.WithTimeout(g.ctx, time.Second)
	defer cancel()
	return g.reloadIfChanged(ctx, "unknown device")
}

// reloadIfChanged brings the registry up to the store's version, logging
// why, and reports whether it changed: the devices the store's change log
// names are read again, or the whole registry when the log no longer
// reaches back to the registry's version.
func (g *registrar) reloadIfChanged(ctx context.Context, why string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	r := g.current()
	since := r.ver()
	v, addrs, ok, err := g.st.RegistryChanges(ctx, since)
	if err != nil || v == since {
		if err != nil && ctx.Err() == nil {
			g.log.Warn("registry changes", "err", err)
		}
		return false
	}
	if !ok {
		if err := g.reloadLocked(ctx); err != nil {
			if ctx.Err() == nil {
				g.log.Warn("registry reload", "err", err)
			}
			return false
		}
		g.log.Info("device registry reloaded", "devices", g.current().size(), "why", why)
		return true
	}
	devs := make(map[emsd.Address]*store.Device, len(addrs))
	for _, a := range addrs {
		d, err := g.st.Device(ctx, a)
		switch {
		case errors.Is(err, store.ErrNotFound):
			d = nil // removed
		case err != nil:
			if ctx.Err() == nil {
				g.log.Warn("registry change", "device", a, "err", err)
			}
			return false // the version stays: the next look tries again
		}
		devs[emsd.Address(a)] = d
	}
	old := r.apply(v, devs)
	g.devices.Set(float64(r.size()))
	g.watch.devicesChanged(old, devs)
	g.log.Debug("device registry changes applied", "devices", len(devs), "version", v, "why", why)
	return true
}

// resolve maps an Internet address to a device: an alias, or
// number@domain for one of the EMSD domains (docs/protocol.md EMSD §6.2).
func (g *registrar) resolve(spec string) (emsd.Address, bool) {
	r := g.current()
	if d := r.alias(spec); d != nil {
		return d.addr, true
	}
	if a, ok := (mailconv.Mapping{Domains: g.domains}).Numeric(lowerDomain(spec)); ok && r.get(a) != nil {
		return a, true
	}
	return 0, false
}

// unknownAmong reports whether routed recipients name a device reg does
// not know: a local address, or an address in one of the EMSD domains.
// Either may be a device the store has and the registry not yet.
func (g *registrar) unknownAmong(reg *registry, recipients []mailconv.Recipient) bool {
	for _, r := range recipients {
		switch {
		case r.Err != nil:
		case r.Local && reg.get(r.Device) == nil:
			return true
		case !r.Local && g.inDomain(r.Addr):
			return true
		}
	}
	return false
}

// inDomain reports whether the addr-spec addr is in one of the EMSD
// domains; a bare local part ("postmaster") names no other host either.
func (g *registrar) inDomain(addr string) bool {
	i := strings.LastIndexByte(addr, '@')
	if i < 0 {
		return true
	}
	return slices.Contains(g.domains, strings.ToLower(addr[i+1:]))
}

// mapping is how mailconv finds the devices among Internet addresses.
func (g *registrar) mapping() mailconv.Mapping {
	return mailconv.Mapping{Domains: g.domains, Resolve: g.resolve}
}

// poll reloads the registry when another process (emsdp device) changed
// it, every period (store.registry_poll; read again when reset fires).
func (g *registrar) poll(period func() time.Duration, reset <-chan struct{}) {
	t := time.NewTicker(period())
	defer t.Stop()
	for {
		select {
		case <-g.ctx.Done():
			return
		case <-reset:
			t.Reset(period())
			continue
		case <-t.C:
		}
		g.reloadIfChanged(g.ctx, "registry_poll")
	}
}
