package server

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/store"
)

// The Server as its parts see it: the registry watcher (registrar), the
// delivery routes (scheduler: targetOf here, endpointOf in dtls.go), and
// SIGHUP.

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
	if err := s.devs.reload(ctx); err != nil {
		errs = append(errs, fmt.Errorf("registry: %w", err))
	}
	if err := s.sched.reload(ctx); err != nil {
		errs = append(errs, fmt.Errorf("delivery queue: %w", err))
	}
	s.relay.kick()
	if s.tlsCert != nil {
		if err := s.tlsCert.load(time.Now()); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// registryReplaced: the whole registry was read again.
func (s *Server) registryReplaced(old, cur *registry) {
	if s.dtls != nil {
		s.dtls.registryReplaced(old, cur)
	}
	s.sched.unparkAll()
}

// devicesChanged: the registry entries of some devices changed; the
// sessions of keys that changed end, and the devices' deliveries are
// looked at again.
func (s *Server) devicesChanged(old map[emsd.Address]*device, cur map[emsd.Address]*store.Device) {
	if s.dtls != nil {
		s.dtls.devicesChanged(old, cur)
	}
	s.sched.unpark(slices.Collect(maps.Keys(cur)))
}

// targetOf chooses where deliveries to dev go now: over DTLS for a
// device with a key (dtls.go), else in clear (contactBook.target); known
// is the device's contact when the caller read it already (nil: read it).
func (s *Server) targetOf(dev *device, known *store.Contact) (t target, why string) {
	if t, why, ok := s.dtlsTarget(dev); ok {
		return t, why
	}
	return s.contacts.target(s.dctx, dev, known)
}
