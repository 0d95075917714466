package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/server"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/sqlite"
	"github.com/esro-emsdp/emsdp/ua"
)

// benchDomain is the mail domain of the benchmark's devices.
const benchDomain = "emsd.bench"

// emsdHarness is a real EMSD server (package server, as `emsdp serve` runs
// it: SQLite store in a temporary data directory) on loopback, with devices
// that each run a ua.Client on their own UDP socket. Every socket logs its
// datagrams.
type emsdHarness struct {
	srv  *server.Server
	conn *countingUDPConn // the server's EMSD socket; nil with plain
	addr netip.AddrPort   // its address
	dir  string
	devs []*benchDevice
	// started is how long server.Start took, startRSS the resident set
	// it added.
	started  time.Duration
	startRSS uint64
}

type benchDevice struct {
	addr emsd.Address
	conn *countingUDPConn
	ep   *esro.Endpoint
	ua   *ua.Client
	got  chan *ua.Delivery
}

// deviceSpec describes one device to register.
type deviceSpec struct {
	addr     emsd.Address
	password string
	mode     store.Mode
}

// harnessOptions tune startEMSD.
type harnessOptions struct {
	timers esro.Timers
	smtp   bool // also listen for inbound SMTP (to make the server deliver)
	// plain lets the server open its own socket, as serve does, instead
	// of one that logs every datagram.
	plain bool
	// cost is the bcrypt cost of the passwords; 0: the cheapest.
	cost  int
	log   *slog.Logger
	extra []*store.Device // more registry entries, nobody behind them
}

// startEMSD registers the devices in a fresh store, starts the server and
// the devices' user agents. Close undoes all of it.
func startEMSD(ctx context.Context, specs []deviceSpec, o harnessOptions) (_ *emsdHarness, err error) {
	dir, err := os.MkdirTemp("", "emsdp-bench-")
	if err != nil {
		return nil, fmt.Errorf("data directory: %w", err)
	}
	h := &emsdHarness{dir: dir}
	defer func() {
		if err != nil {
			h.Close(ctx)
		}
	}()
	// Devices first: the server is told where they are by the registry,
	// which it reads at start.
	for _, s := range specs {
		c, err := listenCountingUDP("127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		d := &benchDevice{addr: s.addr, conn: c, got: make(chan *ua.Delivery, 16)}
		if d.ep, err = esro.NewEndpoint(c, &esro.Config{Timers: o.timers, Logger: o.log}); err != nil {
			c.Close()
			return nil, fmt.Errorf("device %s: %w", s.addr, err)
		}
		h.devs = append(h.devs, d)
	}
	addrs := make([]netip.AddrPort, len(h.devs))
	for i, d := range h.devs {
		addrs[i] = d.conn.addrPort()
	}
	if err := register(ctx, dir, specs, addrs, o.cost, o.extra); err != nil {
		return nil, err
	}
	cfg := server.DefaultConfig()
	cfg.Domain, cfg.Hostname, cfg.Data = benchDomain, "mts."+benchDomain, dir
	cfg.EMSD.Listen, cfg.Admin.Listen, cfg.SMTP.Listen = "127.0.0.1:0", "", ""
	if o.smtp {
		cfg.SMTP.Listen = "127.0.0.1:0"
	}
	t := o.timers
	cfg.ESRO.AckDelay, cfg.ESRO.Roundtrip = server.Duration(t.Acknowledgement), server.Duration(t.Roundtrip)
	cfg.ESRO.Retransmit, cfg.ESRO.NSDULifetime = server.Duration(t.Retransmit), server.Duration(t.NSDULifetime)
	cfg.ESRO.Retries = t.RetransmitCount
	before, err := readMem()
	if err != nil {
		return nil, err
	}
	start := time.Now()
	if o.plain {
		if h.srv, err = server.Start(ctx, cfg, server.Options{Logger: o.log}); err != nil {
			return nil, fmt.Errorf("server: %w", err)
		}
		h.addr = h.srv.Addrs().EMSD
	} else {
		if h.conn, err = listenCountingUDP("127.0.0.1:0"); err != nil {
			return nil, err
		}
		start = time.Now()
		if h.srv, err = server.Start(ctx, cfg, server.Options{Logger: o.log, PacketConn: h.conn}); err != nil {
			// Start closes the socket only on some of its error paths; a
			// second Close is harmless.
			h.conn.Close()
			return nil, fmt.Errorf("server: %w", err)
		}
		h.addr = h.conn.addrPort()
	}
	h.started = time.Since(start)
	after, err := readMem()
	if err != nil {
		return nil, err
	}
	h.startRSS = max(after.rss, before.rss) - before.rss
	for _, d := range h.devs {
		uc := ua.Config{Server: h.addr, Address: d.addr, Logger: o.log,
			Handler: ua.HandlerFunc(func(ctx context.Context, del *ua.Delivery) error {
				select {
				case d.got <- del:
					return nil
				case <-ctx.Done():
					return ctx.Err()
				}
			})}
		for _, s := range specs {
			if s.addr == d.addr {
				uc.Password = s.password
			}
		}
		if d.ua, err = ua.New(d.ep, uc); err != nil {
			return nil, fmt.Errorf("device %s: %w", d.addr, err)
		}
	}
	return h, nil
}

// register writes the devices, at addrs, into the store of dir, as
// `emsdp device add` does, and the extra entries as `emsdp device import`
// does.
func register(ctx context.Context, dir string, specs []deviceSpec, addrs []netip.AddrPort, cost int, extra []*store.Device) error {
	db, err := sqlite.OpenDir(ctx, dir, nil)
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	defer db.Close()
	if _, err := writeDevices(ctx, db, extra); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	for i, s := range specs {
		hash := ""
		if s.password != "" {
			// bcrypt's cheapest cost: the server checks a password once
			// per device and caches the match, and registering many
			// devices at the default cost would take seconds.
			b, err := bcrypt.GenerateFromPassword([]byte(s.password), max(cost, bcrypt.MinCost))
			if err != nil {
				return fmt.Errorf("device %s: %w", s.addr, err)
			}
			hash = string(b)
		}
		ap := addrs[i]
		mode := s.mode
		if mode == "" {
			mode = store.ModeComplete
		}
		if err := db.AddDevice(ctx, &store.Device{Address: uint32(s.addr), PasswordHash: hash, IP: ap.Addr(),
			Port: ap.Port(), Version: "1.1", Mode: mode}); err != nil {
			return fmt.Errorf("device %s: %w", s.addr, err)
		}
	}
	return nil
}

// Close stops the devices and the server and removes the data directory.
func (h *emsdHarness) Close(ctx context.Context) error {
	var errs []error
	for _, d := range h.devs {
		if d.ua != nil {
			errs = append(errs, d.ua.Close())
		}
		errs = append(errs, d.ep.Close())
	}
	if h.srv != nil {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		errs = append(errs, h.srv.Shutdown(ctx))
	}
	errs = append(errs, os.RemoveAll(h.dir))
	return errors.Join(errs...)
}
